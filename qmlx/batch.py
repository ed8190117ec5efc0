"""Batched generation: several prompts decoded together, one model pass per step for all.

Prompts of different lengths are left-padded to a common length, so every row's newest token
sits in the same column and one (B, 1) step feeds them all. A padded KV cache masks each row's
padding out of attention. RoPE then numbers a row's tokens from its padding width rather than
from 0, which changes nothing: attention scores depend only on relative positions.

Each row stops on its own (EOS, a stop string, max_tokens) and is dropped from the batch, so
finished rows cost nothing. Each row's greedy output equals its single-prompt output.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache
from .decode import TextStream, logprobs, prefill
from .generate import GenerationEvent, sampling_settings
from .sample import make_sampler, seed_generator

Sampler = Callable[[mx.array], mx.array]


class PaddedKVCache(KVCache):
    """A KVCache for a left-padded batch: row b's first `padding[b]` tokens are never attended."""

    def __init__(self, padding: mx.array):
        super().__init__()
        self.padding = padding  # (B,) int32

    def make_mask(self, L: int) -> mx.array:
        """(B, 1, L, offset + L): causal, minus each row's padding."""
        q = self.offset + mx.arange(L)[:, None]
        k = mx.arange(self.offset + L)[None]
        real = k[None] >= self.padding[:, None, None]
        # A padding query may see itself: a row of all -inf would give NaN, which would then
        # leak through 0 * NaN into every later query of the row.
        return ((k <= q)[None] & (real | (k == q)[None]))[:, None]

    def keep_rows(self, rows: mx.array) -> None:
        """Drop every batch row not in `rows` (finished requests)."""
        self.padding = self.padding[rows]
        if self._keys is not None:
            self._keys = tuple(p[rows] for p in self._keys)
            self._values = tuple(p[rows] for p in self._values)


@dataclass
class BatchResult:
    """One prompt's completion."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class _Row:
    """Per-request state: its text (detokenizer, EOS, stop strings), token count, finish reason."""

    def __init__(self, tokenizer, stop: Sequence[str] | str | None, max_tokens: int):
        self.text = TextStream(tokenizer, stop)
        self.max_tokens = max_tokens
        self.n = 0
        self.finish: str | None = None

    def add(self, token: int) -> str:
        """Take one token; return the text it releases, setting `finish` when done."""
        self.n += 1
        out = self.text.add(token)
        self.finish = self.text.finish or ("length" if self.n >= self.max_tokens else None)
        return out + self.text.rest() if self.finish else out


def stream_batch_generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: int | Sequence[int] = 256,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    sampler: Sampler | Sequence[Sampler] | None = None,
    stop: Sequence[str] | str | None = None,
    seed: int | None = None,
    prefill_step: int = 512,
) -> Iterator[tuple[int, GenerationEvent]]:
    """Yield (prompt index, GenerationEvent) as tokens of the batch arrive.

    `max_tokens` may differ per prompt; `sampler` (one, or one per prompt) overrides the
    sampling arguments. A row's last event carries its finish_reason ("stop" or "length").
    Repetition penalties and other logits processors are not applied in a batch.
    """
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not ids or any(not x for x in ids):
        raise ValueError("batch_generate needs at least one prompt, and no empty prompt")
    B = len(ids)
    limits = [max_tokens] * B if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != B or min(limits) < 1:
        raise ValueError("max_tokens must be >= 1, one value or one per prompt")
    if seed is not None:
        seed_generator(seed)
    if sampler is None:
        s = sampling_settings(tokenizer.generation_defaults, temperature=temperature, top_p=top_p,
                              top_k=top_k, min_p=min_p)  # fmt: skip
        sampler = make_sampler(s["temperature"], top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"])
    samplers = list(sampler) if isinstance(sampler, Sequence) else None
    rows = [_Row(tokenizer, stop, m) for m in limits]
    mx.reset_peak_memory()
    start = time.perf_counter()

    # Left-pad to a common length; prefill all but the last column in chunks.
    width = max(len(x) for x in ids)
    padding = mx.array([width - len(x) for x in ids], dtype=mx.int32)
    tokens = mx.array([[0] * (width - len(x)) + x for x in ids], dtype=mx.int32)
    cache = [PaddedKVCache(padding) for _ in model.layers]
    prefill(model, tokens[:, : width - 1], cache, prefill_step)
    y = tokens[:, -1:]
    active = list(range(B))  # prompt index of each batch row
    first = None
    generated = 0
    while active:
        lps = logprobs(model(y, cache=cache)[:, -1, :])
        if samplers is None:
            next_y = sampler(lps)
        else:
            next_y = mx.concatenate([samplers[i](lps[r : r + 1]) for r, i in enumerate(active)])
        new = next_y.tolist()
        now = time.perf_counter()
        first = first or now
        generated += len(new)
        keep = []
        for r, (i, token) in enumerate(zip(active, new)):
            row = rows[i]
            text = row.add(token)
            ttft = first - start
            yield (
                i,
                GenerationEvent(
                    text=text,
                    token=None if token in row.text.eos else token,  # as stream_generate: EOS is not output
                    finish_reason=row.finish,
                    prompt_tokens=len(ids[i]),
                    generation_tokens=row.n,
                    time_to_first_token=ttft,
                    prompt_tps=sum(len(x) for x in ids) / ttft if ttft > 0 else 0.0,
                    generation_tps=generated / (now - start - ttft) if now - start > ttft else 0.0,
                    peak_memory_gb=mx.get_peak_memory() / 1e9,
                ),
            )
            if row.finish is None:
                keep.append(r)
        if len(keep) < len(active):
            index = mx.array(keep, dtype=mx.int32)
            for c in cache:
                c.keep_rows(index)
            active = [active[r] for r in keep]
            next_y = next_y[index] if keep else next_y
        y = next_y.reshape(-1, 1)


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: int | Sequence[int] = 256,
    **kwargs,
) -> list[BatchResult]:
    """Complete every prompt; return one BatchResult per prompt, in order (see
    stream_batch_generate for the arguments)."""
    results = [BatchResult() for _ in prompts]
    for i, ev in stream_batch_generate(model, tokenizer, prompts, max_tokens, **kwargs):
        r = results[i]
        r.text += ev.text
        if ev.token is not None:
            r.tokens.append(ev.token)
        r.finish_reason = ev.finish_reason
    return results
