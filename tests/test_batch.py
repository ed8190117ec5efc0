"""Batched generation: each row equals its own single-prompt generation."""

import mlx.core as mx
import numpy as np
import pytest
from test_generate import _ByteTok
from tiny import tiny_config, write_folder

import qmlx
from qmlx.batch import BatchDecoder, batch_generate, stream_batch_generate
from qmlx.cache import batch_caches, make_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config(), seed=0)
    return qmlx.load(folder)


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    """The tiny model with 4-bit layers: the kernels' integer GEMV, whose rows are exact whatever the batch."""
    from qmlx.quant.apply import quantize_model

    folder = str(tmp_path_factory.mktemp("tinyq"))
    write_folder(folder, tiny_config(), seed=0)
    model, tok = qmlx.load(folder)
    quantize_model(model, {"group_size": 32, "bits": 4})
    return model, tok


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


def test_rows_cache_logits_are_each_row_alone(tiny):
    """A (B, 1) step over rows that each keep their own cache at their own position: every row's
    logits bit for bit as the row's own (1, 1) step."""
    model, _ = tiny
    prompts = [[5, 6, 7], list(range(20, 32)), [9]]
    rows, want = [], []
    for ids in prompts:
        c = make_cache(len(model.layers))
        model(mx.array([ids[:-1] or [3]]), cache=c)
        rows.append(c)
        alone = make_cache(len(model.layers))
        model(mx.array([ids[:-1] or [3]]), cache=alone)
        want.append(model(mx.array([[ids[-1]]]), cache=alone)[0, -1])
    got = model(mx.array([[p[-1]] for p in prompts]), cache=batch_caches(rows))[:, -1]
    for b in range(len(prompts)):
        assert mx.array_equal(got[b], want[b]).item(), b
    assert [c.offset for c in rows[0]] == [3] * len(model.layers)


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


def _drain(decoder, joins=None):
    """Run a decoder to the end; `joins` maps a step number to requests (key, ids, kwargs) added then."""
    events, n = {}, 0
    joins = dict(joins or {})
    while decoder.busy or joins:
        for key, ids, kw in joins.pop(n, []):
            decoder.add(key, ids, **kw)
        for key, ev in decoder.step():
            events.setdefault(key, []).append(ev)
        n += 1
    return events


def _summary(events):
    return [(e.text, e.token, e.finish_reason, e.logprob, e.top_logprobs) for e in events]


MIXED = {  # per-request settings mixed in one batch
    "plain": dict(max_tokens=20),
    "penalised": dict(max_tokens=16, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
    "biased": dict(max_tokens=12, logit_bias={65: 5.0, 66: -100.0}),
    "stop": dict(max_tokens=30, stop=["e"]),
    "logprobs": dict(max_tokens=10, top_logprobs=3),
}


@pytest.mark.parametrize("which", ["tiny_q", "tiny"])
@pytest.mark.parametrize("prefill_step", [512, 5])
def test_batched_greedy_is_each_request_alone(which, prefill_step, request):
    """Mixed prompt lengths and settings, requests joining while others decode: each request's events
    (text, tokens, logprobs, finish) are exactly stream_generate's for it alone. A float model's matmuls
    of 5+ rows take another kernel (kernels.linear's GEMM), so there the logprobs agree within 1e-5."""
    model, tok = request.getfixturevalue(which)
    prompts = dict(zip(MIXED, PROMPTS + ["another prompt"]))
    decoder = BatchDecoder(model, tok, max_rows=8, prefill_step=prefill_step)
    joins = {0: [], 3: [], 7: []}
    for i, key in enumerate(MIXED):
        joins[(0, 3, 7)[i % 3]].append((key, tok.encode(prompts[key]), dict(MIXED[key], temperature=0.0)))
    got = _drain(decoder, joins)
    for key, kw in MIXED.items():
        alone = list(qmlx.stream_generate(model, tok, prompts[key], temperature=0.0, **kw))
        if which == "tiny_q":
            assert _summary(got[key]) == _summary(alone), key
        else:
            assert [(e.text, e.token, e.finish_reason) for e in got[key]] == [
                (e.text, e.token, e.finish_reason) for e in alone
            ], key
            lp = [(e.logprob, *(v for _, v in e.top_logprobs or [])) for e in got[key] if e.logprob]
            want = [(e.logprob, *(v for _, v in e.top_logprobs or [])) for e in alone if e.logprob]
            assert np.allclose(lp, want, atol=1e-5, rtol=0)
    assert not decoder.busy


def test_seeded_sampling_is_the_same_in_a_batch(tiny):
    model, tok = tiny
    kw = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    alone = _drain_one(model, tok, "hello world, how are", kw)
    decoder = BatchDecoder(model, tok, max_rows=4)
    decoder.add("other", tok.encode("x y"), max_tokens=12, temperature=1.5, seed=3)
    decoder.add("other2", tok.encode("a"), max_tokens=5, temperature=0.8)  # the global generator
    decoder.add("mine", tok.encode("hello world, how are"), **kw)
    got = _drain(decoder)
    assert _summary(got["mine"]) == _summary(alone)


def _drain_one(model, tok, prompt, kw):
    decoder = BatchDecoder(model, tok, max_rows=1)
    decoder.add("k", tok.encode(prompt), **kw)
    return _drain(decoder)["k"]


def test_cancel_frees_the_row_and_the_others_go_on(tiny):
    model, tok = tiny
    decoder = BatchDecoder(model, tok, max_rows=2)
    decoder.add("a", tok.encode(PROMPTS[1]), max_tokens=50, temperature=0.0)
    decoder.add("b", tok.encode(PROMPTS[2]), max_tokens=8, temperature=0.0)
    for _ in range(3):
        decoder.step()
    assert decoder.cancel("a") and decoder.keys() == ["b"] and decoder.free == 1
    assert not decoder.cancel("a")
    decoder.add("c", tok.encode(PROMPTS[0]), max_tokens=4, temperature=0.0)
    got = _drain(decoder)
    assert "a" not in got and got["c"][-1].finish_reason == "length"
    with pytest.raises(RuntimeError, match="full"):
        full = BatchDecoder(model, tok, max_rows=1)
        full.add(1, [1, 2], 3)
        full.add(2, [1, 2], 3)


def test_prompt_cache_rows_reuse_and_record(tiny):
    """A row continuing a PromptCache reads only the new tokens and leaves the cache recording what it holds."""
    from qmlx.prompt_cache import PromptCache

    model, tok = tiny
    pc = PromptCache()
    first = tok.encode(PROMPTS[2])
    _drain_row(model, tok, first, pc)
    assert pc.tokens[: len(first)] == first
    follow = pc.tokens + tok.encode(" and then")
    events = _drain_row(model, tok, follow, pc)
    assert pc.reused == len(follow) - len(tok.encode(" and then")) - 0
    alone = list(qmlx.stream_generate(model, tok, follow, 10, temperature=0.0))
    assert _summary(events) == _summary(alone)


def _drain_row(model, tok, ids, pc):
    decoder = BatchDecoder(model, tok, max_rows=2)
    decoder.add("k", ids, max_tokens=10, temperature=0.0, prompt_cache=pc)
    return _drain(decoder)["k"]
