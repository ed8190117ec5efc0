"""The parts every decoding loop is made of: plain (generate.py), speculative, batched.

    prefill(model, ids, cache, step)    run a prompt into the cache, `step` tokens per pass
    logprobs(logits)                    float32 log-probabilities over the vocabulary
    token_logprobs(logprobs, token, k)  the chosen token's log-probability and the k most likely
    StopMatcher(stops)                  stop strings in streamed text, partial matches held back
    TextStream(tokenizer, stops)        token ids -> released text: detokenizer, EOS ids, stop strings
    stop_holdback(text, stops)          how much of the end of `text` could start a stop string
    common_prefix(a, b)                 how many leading items two sequences share
    GenerationEvent, Clock              what a generation streams, and the timing every event carries

Only MLX and qmlx.kernels are imported here: no front end, no loader, no model code (models and
tokenizers are passed in).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from . import kernels


def prefill(model, ids: Sequence[int] | mx.array, cache: list, step: int) -> None:
    """Run `ids` through `model` into `cache`, `step` tokens per pass; the logits are unused.

    `ids` is one sequence (a list, or a 1-D array) or a batch of rows (a 2-D array, chunked
    along its columns). Each chunk is evaluated before the next is queued, so a long prompt's
    peak memory is bounded by the chunk.
    """
    tokens = ids if isinstance(ids, mx.array) else mx.array(ids)
    if tokens.ndim == 1:
        tokens = tokens[None]
    for i in range(0, tokens.shape[1], step):
        model(tokens[:, i : i + step], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def logprobs(logits: mx.array) -> mx.array:
    """Log-softmax over the last axis, in float32."""
    return kernels.log_softmax(logits)


def token_logprobs(logprobs: mx.array, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability in the 1-D `logprobs`, and the k most likely (id, logprob), best first."""
    chosen = logprobs[token].item()
    order = mx.argpartition(-logprobs, k - 1)[:k]
    tops = sorted(zip(order.tolist(), logprobs[order].tolist()), key=lambda t: -t[1])
    return chosen, tops


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `stops`."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if s.startswith(text[-n:]):
                best = n
                break
    return best


class StopMatcher:
    """Stop strings in text that arrives piece by piece (a stop string may span pieces).

    `feed(text)` returns the text that may be shown now: once a stop string is complete,
    everything before it (and `stopped` turns True); otherwise everything but the longest tail
    that could still start a stop string, which is held back. `flush()` returns what is held
    back, for the end of a generation that did not stop on a string.
    """

    def __init__(self, stops: Sequence[str] | str | None):
        self.stops = [stops] if isinstance(stops, str) else [s for s in (stops or []) if s]
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        text = self.held + text
        hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            self.held, self.stopped = "", True
            return text[:hit]
        keep = stop_holdback(text, self.stops)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


class TextStream:
    """One generation's token ids as the text it may show: detokenized, cut at EOS and stop strings.

    `add(token)` returns the text the token releases; `finish` turns "stop" at an EOS id
    (which releases nothing itself) or when a stop string completes. `rest()` is the text still
    held back (an incomplete character, the start of a stop string), shown at the end; nothing
    after a stop string.
    """

    def __init__(self, tokenizer, stops: Sequence[str] | str | None, stop_tokens: Sequence[int] = ()):
        self.detok = tokenizer.detokenizer()
        self.eos = set(tokenizer.eos_token_ids) | set(stop_tokens)  # ids that end the text unseen
        self.stops = StopMatcher(stops)
        self.finish: str | None = None

    def add(self, token: int) -> str:
        if token in self.eos:
            self.finish = "stop"
            return ""
        text = self.stops.feed(self.detok.add(token))
        if self.stops.stopped:
            self.finish = "stop"
        return text

    def rest(self) -> str:
        return "" if self.stops.stopped else self.stops.flush() + self.detok.finalize()


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class GenerationEvent:
    """One step of a streamed generation.

    `text` is the new text (never a partial UTF-8 character), `token` the token id (None on
    a final flush event), `finish_reason` None until the last event, then "stop" or "length".
    Timing fields are cumulative and present on every event.
    """

    text: str
    token: int | None
    finish_reason: str | None = None
    from_draft: bool = False  # speculative decoding: a drafted token the model accepted
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: float = 0.0  # seconds
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def summary(self) -> str:
        """The run's figures as of this event, for a person (what `qmlx generate` shows)."""
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s "
            f"(first token after {self.time_to_first_token:.2f} s)\n"
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s "
            f"[{self.finish_reason}]\npeak memory: {self.peak_memory_gb:.2f} GB"
        )


class Clock:
    """The timing and counts every GenerationEvent of one generation carries."""

    def __init__(self, prompt_tokens: int):
        mx.reset_peak_memory()
        self.start, self.first = time.perf_counter(), None
        self.prompt_tokens = prompt_tokens
        self.computed = prompt_tokens  # prompt tokens the model runs (fewer with a prompt cache)
        self.n = 0  # tokens generated

    def tick(self) -> None:
        """Count a generated token; the first one ends the time to first token."""
        if self.first is None:
            self.first = time.perf_counter()
        self.n += 1

    def event(self, text, token, finish=None, lp=None, tops=None, drafted=False) -> GenerationEvent:
        now = time.perf_counter()
        ttft = (self.first or now) - self.start
        gen_time = now - (self.first or now)
        return GenerationEvent(
            text=text,
            token=token,
            finish_reason=finish,
            from_draft=drafted,
            logprob=lp,
            top_logprobs=tops,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.n,
            time_to_first_token=ttft,
            prompt_tps=self.computed / ttft if ttft > 0 else 0.0,
            generation_tps=(self.n - 1) / gen_time if self.n > 1 and gen_time > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
