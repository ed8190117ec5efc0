"""Samplers and logits processors against direct NumPy computations of transformers' and
OpenAI's rules."""

import math

import mlx.core as mx
import numpy as np
import pytest

from qmlx.sample import make_logits_processors, make_sampler

N_DRAWS = 20000
# Logits with a clear ranking and no ties; probabilities ~ .35 .21 .13 .10 .08 .05 ...
LOGITS = np.array([2.0, 1.5, 1.0, 0.7, 0.5, 0.0, -0.3, -1.0, -2.0, -4.0], dtype=np.float32)


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """transformers' warpers, written the way transformers writes them (ascending sort)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    if top_k > 0:
        x = np.where(x < np.sort(x)[-min(top_k, len(x))], -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x)
        cumulative = np.cumsum(softmax(x[order]))
        remove = cumulative <= 1 - top_p
        remove[-1] = False  # min_tokens_to_keep = 1
        x[order[remove]] = -np.inf
    if min_p > 0:
        p = softmax(x)
        x = np.where(p < min_p * p.max(), -np.inf, x)
    return softmax(x)


def draw(sampler, logits, n=N_DRAWS):
    """n samples from one row, drawn as one (n, V) batch."""
    logprobs = mx.array(logits - np.log(np.exp(logits.astype(np.float64)).sum()), mx.float32)
    tokens = np.array(sampler(mx.broadcast_to(logprobs[None], (n, len(logits)))))
    assert tokens.shape == (n,)
    return np.bincount(tokens, minlength=len(logits)) / n


SETTINGS = [
    {"temperature": 1.0},
    {"temperature": 0.7, "top_k": 3},
    {"temperature": 1.0, "top_p": 0.75},
    {"temperature": 1.6, "top_p": 0.8},
    {"temperature": 0.7, "top_p": 0.8, "top_k": 5},  # Qwen2.5-Instruct's generation_config
    {"temperature": 1.0, "min_p": 0.2},
    {"temperature": 2.0, "min_p": 0.3},
    {"temperature": 0.5, "top_k": 6, "top_p": 0.9, "min_p": 0.1},
    {"temperature": 1.0, "top_p": 0.05},  # below the top token's mass: the top token only
    {"temperature": 1.0, "top_k": 20},  # k beyond the vocabulary: no filter
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampler_matches_renormalised_distribution(settings):
    mx.random.seed(0)
    freq = draw(make_sampler(**settings), LOGITS)
    want = reference_probs(LOGITS, **settings)
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(want)[0])  # never outside the support
    assert all(freq[i] > 0 for i in np.nonzero(want > 0.01)[0])
    np.testing.assert_allclose(freq, want, atol=0.02)  # 5+ standard deviations at N_DRAWS


def test_temperature_is_applied_before_top_p_and_min_p():
    # At temperature 2 the distribution is flatter, so top_p 0.8 keeps more tokens than it
    # would if temperature came last -- transformers' order, which Qwen's settings assume.
    tempered_first = reference_probs(LOGITS, 2.0, top_p=0.8) > 0
    tempered_last = reference_probs(LOGITS, 1.0, top_p=0.8) > 0
    assert tempered_first.sum() > tempered_last.sum()
    mx.random.seed(1)
    assert np.array_equal(draw(make_sampler(2.0, top_p=0.8), LOGITS) > 0, tempered_first)
    # min_p compares tempered probabilities too.
    assert np.array_equal(
        draw(make_sampler(2.0, min_p=0.3), LOGITS) > 0, reference_probs(LOGITS, 2.0, min_p=0.3) > 0
    )


def test_greedy_is_argmax_per_row():
    logits = np.random.default_rng(0).standard_normal((4, 1000)).astype(np.float32)
    got = np.array(make_sampler(0.0, top_p=0.5, top_k=3)(mx.array(logits)))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    # top_k=1 sampling is greedy as well, row by row.
    np.testing.assert_array_equal(np.array(make_sampler(1.0, top_k=1)(mx.array(logits))), got)


def test_top_k_on_a_large_vocabulary_and_banned_tokens():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(5000).astype(np.float32) * 3
    logits[logits.argmax()] = -np.inf  # e.g. banned by logit_bias
    mx.random.seed(2)
    freq = draw(make_sampler(1.0, top_k=20, top_p=0.9), logits, n=5000)
    want = reference_probs(np.where(np.isinf(logits), -1e30, logits), 1.0, top_k=20, top_p=0.9)
    assert set(np.nonzero(freq)[0]) <= set(np.nonzero(want)[0])
    np.testing.assert_allclose(freq, want, atol=0.04)


def test_sampling_is_reproducible_with_a_seed():
    sampler = make_sampler(1.0, top_p=0.95)
    logprobs = mx.array(np.log(softmax(LOGITS)), mx.float32)[None]
    runs = []
    for _ in range(2):
        mx.random.seed(123)
        runs.append([sampler(logprobs).item() for _ in range(50)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 2}],
)
def test_sampler_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        make_sampler(**kwargs)


# --------------------------------------------------------------------------- logits processors

V = 50


def random_logits(seed=0, rows=2):
    return np.random.default_rng(seed).standard_normal((rows, V)).astype(np.float32) * 3


def apply(processors, tokens, logits):
    out = mx.array(logits)
    for proc in processors:
        out = proc(mx.array(tokens), out)
    return np.array(out)


def test_no_processors_by_default():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []


def test_repetition_penalty_like_transformers_over_the_recent_context():
    logits = random_logits()
    tokens = [49, 48] + [3, 7, 7, 10, 3, 40, 12, 0] * 8  # 49 and 48 fall outside the last 64
    got = apply(make_logits_processors(repetition_penalty=1.3), tokens, logits)
    want = logits.astype(np.float64).copy()
    for t in set(tokens[-64:]):  # once per distinct id, however often it repeats
        want[:, t] = np.where(want[:, t] < 0, want[:, t] * 1.3, want[:, t] / 1.3)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.array_equal(got[:, [48, 49]], logits[:, [48, 49]])
    short = apply(make_logits_processors(repetition_penalty=1.3, repetition_context_size=2), tokens, logits)
    changed = np.nonzero((short != logits).any(0))[0].tolist()
    assert changed == sorted(set(tokens[-2:]))


def test_presence_and_frequency_penalties_see_generated_tokens_only():
    logits = random_logits(1)
    prompt = [5, 5, 9, 20]
    generated = [9, 30, 30, 30, 2]
    procs = make_logits_processors(presence_penalty=0.5, frequency_penalty=0.25)
    # The first call of a request sees only the prompt: nothing is generated yet.
    np.testing.assert_array_equal(apply(procs, prompt, logits), logits)
    got = apply(procs, prompt + generated, logits)
    counts = np.bincount(generated, minlength=V)
    want = logits - 0.25 * counts - 0.5 * (counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got[0, 5] == logits[0, 5]  # only in the prompt: untouched


def test_logit_bias_is_added_after_the_penalties():
    logits = random_logits(2)
    tokens = [4, 11]
    procs = make_logits_processors(repetition_penalty=2.0, logit_bias={4: 10.0, "7": -100.0})
    got = apply(procs, tokens, logits)
    want = logits.astype(np.float64).copy()
    for t in (4, 11):
        want[:, t] = np.where(want[:, t] < 0, want[:, t] * 2, want[:, t] / 2)
    want[:, 4] += 10.0
    want[:, 7] -= 100.0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_processors_do_not_modify_their_input():
    logits = mx.array(random_logits(3))
    before = np.array(logits)
    procs = make_logits_processors(1.2, presence_penalty=1.0, logit_bias={1: 1.0})
    for proc in procs:
        proc(mx.array([1, 2, 3]), logits)
    np.testing.assert_array_equal(np.array(logits), before)


def test_processors_reject_bad_settings():
    with pytest.raises(ValueError):
        make_logits_processors(repetition_penalty=0.0)
    with pytest.raises(ValueError):
        make_logits_processors(repetition_penalty=1.1, repetition_context_size=0)
    with pytest.raises(ValueError):
        make_logits_processors(logit_bias={-1: 1.0})


def test_log_of_min_p_threshold_matches_probability_ratio():
    # A token exactly at the threshold in probability terms stays; just below it goes.
    p_max, min_p = 0.5, 0.2
    logits = np.log(np.array([p_max, p_max * min_p * 1.001, p_max * min_p * 0.999, 0.3]))
    mx.random.seed(3)
    freq = draw(make_sampler(1.0, min_p=min_p), logits.astype(np.float32), n=4000)
    assert freq[0] > 0 and freq[1] > 0 and freq[2] == 0 and freq[3] > 0
    assert math.isclose(freq.sum(), 1.0)
