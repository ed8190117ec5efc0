"""Speculative decoding: greedy output identical to plain decoding, and sampling that keeps
the model's distribution (tiny models and direct checks of the acceptance rule)."""

import mlx.core as mx
import numpy as np
import pytest
from scripted import ScriptedModel
from tiny import random_model, tiny_config, write_folder

import qmlx
from qmlx.cache import make_cache
from qmlx.errors import UserError
from qmlx.prompt_cache import PromptCache
from qmlx.sample import make_distribution
from qmlx.speculative import PromptLookup, SpeculativeStats, _verify, speculative_generate_step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config(), seed=0)
    model, tok = qmlx.load(folder)
    return model, tok, random_model(tiny_config(), seed=1)


def tokens(events):
    return [e.token for e in events if e.token is not None]


PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(", "x", "hello hello hello hello"]


@pytest.mark.parametrize("how", ["same-model draft", "other draft", "prompt lookup"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_output_is_identical_to_plain_decoding(tiny, how, penalty):
    model, tok, other = tiny
    kw = {
        "same-model draft": {"draft_model": model, "num_draft_tokens": 4},
        "other draft": {"draft_model": other, "num_draft_tokens": 2},
        "prompt lookup": {"prompt_lookup": 3, "num_draft_tokens": 5},
    }[how]
    for prompt in PROMPTS:
        common = {"temperature": 0.0, "repetition_penalty": penalty}
        plain = list(qmlx.stream_generate(model, tok, prompt, 30, **common))
        spec = list(qmlx.stream_generate(model, tok, prompt, 30, **common, **kw))
        assert tokens(spec) == tokens(plain), prompt
        assert "".join(e.text for e in spec) == "".join(e.text for e in plain)
        assert spec[-1].finish_reason == plain[-1].finish_reason
        if how == "same-model draft":
            assert sum(e.from_draft for e in spec) >= 20  # a model agrees with itself


def test_prompt_lookup_drafts_copied_text():
    text = list(b"class A:\n    def f(self):\n        return 1\n") * 3
    model = ScriptedModel(text)
    stats = SpeculativeStats()
    steps = speculative_generate_step(
        model, text[:60], distribution=make_distribution(0.0), prompt_lookup=4,
        num_draft_tokens=6, max_tokens=60, stats=stats,
    )  # fmt: skip
    out = [t for t, _, _ in steps]
    assert out == (text + [text[-1]] * 60)[60:120]
    assert stats.acceptance_rate > 0.8
    assert stats.passes < 60 / 3  # several tokens per model pass


def test_prompt_lookup_index_finds_the_latest_longest_match():
    look = PromptLookup(3)
    seq = [1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3]
    assert look.propose(seq, 2) == [7, 8]  # "2 3" last seen before 7 8
    seq += [4, 1, 2]
    assert look.propose(seq, 3) == [3, 9, 2]  # "1 2" only at the start
    assert PromptLookup(2).propose([5, 6], 3) == []


def test_early_exit_leaves_the_prompt_cache_consistent(tiny):
    model, tok, _ = tiny
    prompt = tok.encode(PROMPTS[0])
    pc = PromptCache()
    gen = qmlx.stream_generate(model, tok, prompt, 30, temperature=0.0, prompt_lookup=2,
                               draft_model=None, prompt_cache=pc)  # fmt: skip
    first = [next(gen) for _ in range(3)]
    gen.close()  # a client that went away mid-round
    # the cache holds exactly the recorded tokens, none the caller never saw
    assert len(pc.tokens) == pc.caches[0].offset <= len(prompt) + 3
    assert pc.tokens == (prompt + tokens(first))[: len(pc.tokens)]
    follow = prompt + tokens(first) + tok.encode(" more")
    warm = qmlx.stream_generate(model, tok, follow, 10, temperature=0.0, prompt_cache=pc)
    assert tokens(warm) == tokens(qmlx.stream_generate(model, tok, follow, 10, temperature=0.0))
    assert pc.reused >= len(prompt) + 2


def test_a_rotating_cache_is_refused(tiny):
    model, tok, _ = tiny
    with pytest.raises(UserError, match="max-kv-size"):
        list(qmlx.stream_generate(model, tok, "x", 4, prompt_lookup=2,
                                  cache=make_cache(2, max_kv_size=64)))  # fmt: skip


# --------------------------------------------------------------------------- distribution


def _probs(rng, shape):
    x = rng.gamma(0.7, size=shape)
    return x / x.sum(-1, keepdims=True)


@pytest.mark.parametrize("draft", ["sampled", "one-hot"])
def test_acceptance_rule_keeps_the_target_distribution(draft):
    """Draw drafts from q, run one verification round; the emitted tokens follow p."""
    rng = np.random.default_rng(0)
    V, N = 6, 6000
    p = _probs(rng, (3, V))
    q = _probs(rng, (2, V))
    mx.random.seed(0)
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(N):
        if draft == "sampled":
            d = [int(rng.choice(V, p=q[0])), int(rng.choice(V, p=q[1]))]
            qq = q
        else:  # prompt lookup: a fixed proposal, q one-hot
            d = [1, 2]
            qq = np.eye(V)[d]
        n, token = _verify(mx.array(p, mx.float32), mx.array(qq, mx.float32), d)
        emitted = d[:n] + [token.item()]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    np.testing.assert_allclose(first / N, p[0], atol=0.025)
    np.testing.assert_allclose(second / second.sum(), p[1], atol=0.035)


def test_sampled_speculative_generation_keeps_the_models_distribution():
    """First two tokens of a tiny 8-token-vocabulary model, drafted by another model."""
    cfg = tiny_config(vocab_size=8)
    target, draft = random_model(cfg, seed=3), random_model(cfg, seed=4)
    prompt = [1, 2, 3]
    dist = make_distribution(1.0)

    def p_next(ids):
        return np.array(mx.softmax(target(mx.array(ids)[None])[0, -1].astype(mx.float32)))

    p1 = p_next(prompt)
    p2 = sum(p1[a] * p_next(prompt + [a]) for a in range(8))
    mx.random.seed(1)
    N = 1000
    c1, c2 = np.zeros(8), np.zeros(8)
    stats = SpeculativeStats()
    for _ in range(N):
        a, b = [t for t, _, _ in speculative_generate_step(
            target, prompt, distribution=dist, draft_model=draft, num_draft_tokens=2,
            max_tokens=2, stats=stats,
        )]  # fmt: skip
        c1[a] += 1
        c2[b] += 1
    assert 0 < stats.acceptance_rate < 1  # both paths (accept, resample) were exercised
    np.testing.assert_allclose(c1 / N, p1, atol=0.06)  # ~4 standard errors
    np.testing.assert_allclose(c2 / N, p2, atol=0.06)
