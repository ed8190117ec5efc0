"""The parts every decoding loop is made of: plain (generate.py), speculative, batched.

    prefill(model, ids, cache, step)    run a prompt into the cache, `step` tokens per pass
    logprobs(logits)                    float32 log-probabilities over the vocabulary
    token_logprobs(logprobs, token, k)  the chosen token's log-probability and the k most likely
    StopMatcher(stops)                  stop strings in streamed text, partial matches held back
    TextStream(tokenizer, stops)        token ids -> released text: detokenizer, EOS ids, stop strings
    stop_holdback(text, stops)          how much of the end of `text` could start a stop string
    common_prefix(a, b)                 how many leading items two sequences share

Only MLX and qmlx.kernels are imported here: no front end, no loader, no model code (models and
tokenizers are passed in).
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def __init__(self, tokenizer, stops: Sequence[str] | str | None):
        self.detok = tokenizer.detokenizer()
        self.eos = set(tokenizer.eos_token_ids)
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
