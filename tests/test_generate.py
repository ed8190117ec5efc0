"""stream_generate: prompt-cache reuse, chunked prefill, stopping, top logprobs (tiny models)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from scripted import ScriptedModel
from tiny import tiny_config, write_folder

import qmlx
from qmlx.generate import generate_step
from qmlx.prompt_cache import PromptCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny"))
    write_folder(folder, tiny_config(), seed=0)
    return qmlx.load(folder)


def tokens(events):
    return [e.token for e in events if e.token is not None]


def run(model, tok, prompt, n, **kw):
    return list(qmlx.stream_generate(model, tok, prompt, n, temperature=0.0, **kw))


# --------------------------------------------------------------------------- prompt cache


def test_prompt_cache_reuse_equals_cold_run_and_prefills_only_new_tokens(tiny):
    model, tok = tiny
    turn1 = tok.encode("first question: what is a list?")
    pc = PromptCache()
    out1 = run(model, tok, turn1, 12, prompt_cache=pc)
    turn2 = turn1 + tokens(out1) + tok.encode(" and a tuple?")
    warm = run(model, tok, turn2, 12, prompt_cache=pc)
    # Everything the first call ran (prompt + its tokens but the last) is reused.
    assert pc.reused == len(turn1) + 11
    cold = run(model, tok, turn2, 12)
    assert tokens(warm) == tokens(cold)
    assert "".join(e.text for e in warm) == "".join(e.text for e in cold)


def test_prompt_cache_computes_only_the_new_suffix():
    script = list(range(10, 60))
    model = ScriptedModel(script)
    tok = _ByteTok()
    pc = PromptCache()
    run(model, tok, script[:20], 5, prompt_cache=pc)
    model.calls.clear()
    run(model, tok, script[:30], 5, prompt_cache=pc)
    assert pc.reused == 24  # 20 prompt + 4 generated tokens went through the model
    # Just the 6 new prompt tokens go through the model (the last one as the first decoding step),
    # then one token per step for the 4 other generated tokens.
    assert model.calls == [30 - 24 - 1, 1, 1, 1, 1, 1]


def test_prompt_cache_divergent_prompt_trims_back_to_the_common_prefix(tiny):
    model, tok = tiny
    pc = PromptCache()
    run(model, tok, tok.encode("shared start, then branch A"), 4, prompt_cache=pc)
    other = tok.encode("shared start, then branch B!")
    warm = run(model, tok, other, 8, prompt_cache=pc)
    assert pc.reused == len(tok.encode("shared start, then branch "))
    assert tokens(warm) == tokens(run(model, tok, other, 8))


def test_logits_processors_see_the_whole_prompt_when_part_of_it_is_cached(tiny):
    """A repetition penalty must act the same on a reused prompt cache as on a cold run."""
    model, tok = tiny
    seen = []

    def record(history, logits):
        seen.append(history.tolist())
        return logits

    pc = PromptCache()
    first = tok.encode("the same words, the same words, again")
    run(model, tok, first, 3, prompt_cache=pc)
    second = first + tok.encode(" and again the same words")
    seen.clear()
    warm = run(
        model,
        tok,
        second,
        6,
        prompt_cache=pc,
        logits_processors=[record],
        repetition_penalty=1.5,
        repetition_context_size=1000,
    )
    assert pc.reused > 0
    assert seen[0] == second  # the processors saw the cached prefix too
    cold = run(model, tok, second, 6, repetition_penalty=1.5, repetition_context_size=1000)
    assert tokens(warm) == tokens(cold)


# --------------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_bounds_peak_memory_and_keeps_output(tiny):
    model, _ = tiny
    prompt = mx.array(np.random.default_rng(0).integers(0, 256, 2048).tolist())

    def peak(step):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()  # other tests' arrays (e.g. the real model) stay resident
        out = [t for t, _ in generate_step(model, prompt, max_tokens=4, prefill_step=step)]
        return mx.get_peak_memory() - base, out

    whole, out_whole = peak(4096)
    chunked, out_chunked = peak(64)
    assert out_whole == out_chunked
    # Attention scores are O(chunk x context) instead of O(context^2).
    assert chunked * 4 < whole, (chunked, whole)


# --------------------------------------------------------------------------- stopping


class _ByteTok:
    """The tiny byte-level tokenizer's behaviour without files: token id = byte value."""

    def __init__(self):
        self.eos_token_ids = [258]
        self.generation_defaults = {}

    def encode(self, text):
        return list(text.encode("utf-8"))

    def detokenizer(self):
        from qmlx.tokenizer import StreamingDetokenizer

        return StreamingDetokenizer(self)

    def token_bytes(self, t):
        return bytes([t]) if t < 256 else b""


def scripted(text: str, tail: list[int] = ()):
    """A model whose greedy continuation of the prompt "P" is `text` (then `tail`)."""
    script = [ord("P")] + list(text.encode("utf-8")) + list(tail)
    return ScriptedModel(script), _ByteTok()


@pytest.mark.parametrize("stop", ["STOP", "élan", "ü!", "t"])
def test_stop_string_across_tokens_is_never_shown(stop):
    text = "Grüße! Das élan vital ü! STOP danach"
    model, tok = scripted(text)
    events = run(model, tok, [ord("P")], 100, stop=[stop, "never-there"])
    want, shown = text[: text.index(stop)], ""
    for e in events:
        shown += e.text
        assert want.startswith(shown)  # at no point was any part of the stop string shown
    assert shown == want
    assert events[-1].finish_reason == "stop"


def test_partial_stop_string_is_flushed_when_it_never_completes():
    text = "abc STO"
    model, tok = scripted(text, tail=[258])
    events = run(model, tok, [ord("P")], 100, stop="STOP")
    assert "".join(e.text for e in events) == text
    assert events[-1].finish_reason == "stop"  # by EOS
    # the held-back "STO" only appeared at the end
    assert "".join(e.text for e in events[:-1]) == "abc "


def test_every_eos_id_stops():
    model, tok = scripted("hello", tail=[259, 258])
    tok.eos_token_ids = [258, 259]
    events = run(model, tok, [ord("P")], 100)
    assert "".join(e.text for e in events) == "hello"
    assert tokens(events) == list(b"hello") and events[-1].finish_reason == "stop"


def test_max_tokens_reports_length():
    model, tok = scripted("hello world")
    events = run(model, tok, [ord("P")], 5)
    assert tokens(events) == list(b"hello") and events[-1].finish_reason == "length"
    assert "".join(e.text for e in events) == "hello"
    assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)


def test_timing_fields_are_filled():
    model, tok = scripted("hello world")
    last = run(model, tok, [ord("P")], 8)[-1]
    assert last.prompt_tokens == 1 and last.generation_tokens == 8
    assert last.time_to_first_token > 0 and last.generation_tps > 0 and last.peak_memory_gb > 0


# --------------------------------------------------------------------------- top logprobs


def test_top_logprobs_match_a_full_forward_pass(tiny):
    model, tok = tiny
    prompt = tok.encode("top logprobs test")
    events = run(model, tok, prompt, 6, top_logprobs=5, repetition_penalty=1.0)
    ids = list(prompt)
    for e in events:
        if e.token is None:
            continue
        logits = model(mx.array(ids)[None])[0, -1].astype(mx.float32)
        ref = np.array(logits - mx.logsumexp(logits))
        order = np.argsort(-ref)[:5]
        assert [t for t, _ in e.top_logprobs] == order.tolist()
        np.testing.assert_allclose([v for _, v in e.top_logprobs], ref[order], atol=1e-4)
        assert e.top_logprobs[0][0] == e.token  # greedy picks the top one
        assert math.isclose(e.logprob, ref[e.token], abs_tol=1e-4)
        ids.append(e.token)
    assert all(e.top_logprobs is None for e in run(model, tok, prompt, 3))
