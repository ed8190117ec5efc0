"""Fast tier: the model on tiny random configs against an independent NumPy reference."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from reference_numpy import forward as np_forward
from tiny import random_model, tiny_config

from qmlx.cache import make_cache


def np_weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


IDS = [5, 17, 250, 3, 99, 42, 7, 180, 64, 11, 200, 1]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1), (8, 2)])
@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_reference(heads, kv_heads, tied):
    cfg = tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = random_model(cfg)
    got = np.array(model(mx.array([IDS]))[0])
    want = np_forward(cfg, np_weights(model), IDS)
    assert got.shape == (len(IDS), cfg["vocab_size"])
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)
    assert ("lm_head.weight" in dict(tree_flatten(model.parameters()))) == (not tied)


def test_yarn_matches_transformers_formula():
    rs = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = tiny_config(rope_scaling=rs, max_position_embeddings=256)
    model = random_model(cfg)
    ids = [int(i) for i in np.random.RandomState(0).randint(0, 256, size=100)]
    got = np.array(model(mx.array([ids]))[0])
    want = np_forward(cfg, np_weights(model), ids)
    np.testing.assert_allclose(got, want, atol=5e-3, rtol=1e-3)
    # and yarn really changes the computation
    plain = np_forward(tiny_config(max_position_embeddings=256), np_weights(model), ids)
    assert np.abs(plain - want).max() > 1e-2


def test_causal_mask_future_tokens_do_not_leak():
    model = random_model(tiny_config())
    a = np.array(model(mx.array([IDS]))[0])
    changed = IDS[:6] + [1, 2, 3, 4, 5, 6]
    b = np.array(model(mx.array([changed]))[0])
    np.testing.assert_allclose(a[:6], b[:6], atol=1e-5)
    assert np.abs(a[6:] - b[6:]).max() > 1e-3


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 1, 5], [12]])
def test_cached_forward_equals_full_forward(chunks):
    model = random_model(tiny_config())
    full = np.array(model(mx.array([IDS]))[0])
    cache = make_cache(len(model.layers))
    outs, pos = [], 0
    for n in chunks:
        outs.append(np.array(model(mx.array([IDS[pos : pos + n]]), cache=cache)[0]))
        pos += n
    np.testing.assert_allclose(np.concatenate(outs), full, atol=1e-4)
    assert cache[0].offset == len(IDS)


def test_batch_rows_are_independent():
    model = random_model(tiny_config())
    a, b = IDS, IDS[::-1]
    both = np.array(model(mx.array([a, b])))
    np.testing.assert_allclose(both[0], np.array(model(mx.array([a]))[0]), atol=1e-4)
    np.testing.assert_allclose(both[1], np.array(model(mx.array([b]))[0]), atol=1e-4)


def test_rope_tables_are_not_parameters():
    model = random_model(tiny_config(rope_scaling={"type": "yarn", "factor": 2.0}))
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not any("rope" in n for n in names)
