"""Batched generation: each row equals its own single-prompt generation."""

import mlx.core as mx
import pytest
from test_generate import _ByteTok
from tiny import tiny_config, write_folder

import qmlx
from qmlx.batch import PaddedKVCache, batch_generate, stream_batch_generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config(), seed=0)
    return qmlx.load(folder)


PROMPTS = [
    "a",
    "hello world, how are",
    "some much longer prompt with many more tokens in it",
    "x y",
]


def single(model, tok, prompt, n, **kw):
    events = list(qmlx.stream_generate(model, tok, prompt, n, temperature=0.0, **kw))
    toks = [e.token for e in events if e.token is not None]
    return toks, "".join(e.text for e in events), events[-1].finish_reason


@pytest.mark.parametrize("prefill_step", [512, 7])
def test_each_row_equals_its_single_prompt_output(tiny, prefill_step):
    model, tok = tiny
    results = batch_generate(model, tok, PROMPTS, 24, temperature=0.0, prefill_step=prefill_step)
    for prompt, r in zip(PROMPTS, results):
        toks, text, finish = single(model, tok, prompt, 24)
        assert r.tokens == toks, prompt
        assert r.text == text and r.finish_reason == finish == "length"


def test_padded_cache_logits_match_unpadded(tiny):
    model, _ = tiny
    short, long = [5, 6, 7], list(range(20, 32))
    cache = [PaddedKVCache(mx.array([9, 0])) for _ in model.layers]
    batch = mx.array([[0] * 9 + short, long])
    got = model(batch, cache=cache)[:, -1]
    for row, ids in enumerate([short, long]):
        want = model(mx.array(ids)[None])[0, -1]
        assert mx.allclose(got[row], want, atol=1e-4).item()


class BigramModel:
    """Predicts the next token from the current one alone (a table), in any batch row."""

    def __init__(self, table: dict[int, int], n_layers: int = 2, vocab: int = 300):
        self.layers = [None] * n_layers
        self.next = mx.array([table.get(i, 0) for i in range(vocab)])
        self.vocab = vocab

    def __call__(self, inputs, cache=None):
        B, L = inputs.shape
        for c in cache:
            c.update_and_fetch(mx.zeros((B, 1, L, 1)), mx.zeros((B, 1, L, 1)))
        return mx.where(mx.arange(self.vocab) == self.next[inputs][..., None], 30.0, 0.0)


def test_rows_finish_independently():
    # Row 0 hits EOS, row 1 a stop string, row 2 its own max_tokens.
    chains = [b"abc", b"wxyz END", b"qrstuv"]
    table = {c[i]: c[i + 1] for c in chains for i in range(len(c) - 1)}
    table[ord("c")] = 258
    model, tok = BigramModel(table), _ByteTok()
    prompts = [list(b"a"), list(b"...w"), list(b"q")]
    events = list(stream_batch_generate(model, tok, prompts, [50, 50, 3], temperature=0.0, stop="END"))
    by_row = {i: [e for j, e in events if j == i] for i in range(3)}
    text = {i: "".join(e.text for e in evs) for i, evs in by_row.items()}
    assert text == {0: "bc", 1: "xyz ", 2: "rst"}
    assert [by_row[i][-1].finish_reason for i in range(3)] == ["stop", "stop", "length"]
    assert [e.finish_reason for e in by_row[1][:-1]] == [None] * (len(by_row[1]) - 1)


def test_per_row_samplers(tiny):
    model, tok = tiny
    greedy = lambda lp: mx.argmax(lp, axis=-1)
    results = batch_generate(model, tok, PROMPTS[:2], 8, sampler=[greedy, greedy])
    assert results[1].tokens == single(model, tok, PROMPTS[1], 8)[0]
