"""Continuous batching: many generations advanced together, one model pass per step for all.

    decoder = BatchDecoder(model, tokenizer, max_rows=8)
    decoder.add("a", ids_a, max_tokens=100, temperature=0.7, seed=1)
    decoder.add("b", ids_b, max_tokens=20, stop=["\\n\\n"])
    while decoder.busy:
        for key, event in decoder.step():   # GenerationEvents, as stream_generate yields them
            ...
    decoder.cancel("a")                      # between steps: the row leaves at once

Each request is a row with its own KV cache (or a PromptCache it continues). A step first
prefills one chunk (`prefill_step` tokens) of the oldest request still reading its prompt, so a
long prompt holds the others up by one chunk at most, then runs one (B, 1) forward pass over
every row that is decoding: the matmuls read each weight once for all rows; attention runs per
row over its own cache (qmlx.cache.RowsCache), each row at its own position. Rows join between
steps as their prompt is read and leave as they finish or are cancelled, without touching any
other row's cache.

Every row keeps its own sampling settings, penalties, logits processors (a JSON grammar), stop
strings and top logprobs, and yields exactly the events stream_generate would: its greedy output
is the same, token for token, whatever else is in the batch, because the kernels compute each row
of a product as they would alone (tests/test_kernels.py). A `seed` gives a row its own random
key sequence, so seeded sampling is reproducible in a batch too.

This is the server's engine (qmlx/server/engine.py) and `batch_generate`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import batch_caches, make_cache
from .decode import Clock, GenerationEvent, TextStream, logprobs, prefill, token_logprobs
from .generate import sampling_settings
from .sample import make_logits_processors, make_sampler

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


class _Row:
    """One request: its cache, what it still has to read, its sampling, its text and its clock."""

    def __init__(
        self, key, ids, caches, todo, prompt_cache, max_tokens, sampler, greedy, processors, text, top
    ):
        self.key, self.ids, self.caches, self.todo = key, ids, caches, todo
        self.prompt_cache, self.max_tokens = prompt_cache, max_tokens
        self.sampler, self.greedy, self.processors = sampler, greedy, processors
        self.text, self.top = text, top
        self.clock = Clock(len(ids))
        self.clock.computed = len(todo)
        self.generated: list[int] = []
        self.fed = False  # whether a pass has read this row yet
        self.closed = False
        # What the logits processors see: the whole sequence so far (also the part a prompt cache held).
        self.history = mx.array(ids, dtype=mx.int32) if processors else None

    def close(self) -> None:
        """Tell the prompt cache what the caches hold (also after a cancel, mid-generation)."""
        self.closed = True
        if self.prompt_cache is not None:
            self.prompt_cache.commit(self.ids + self.generated)


class BatchDecoder:
    """Requests in, GenerationEvents out, all rows advanced by one batched forward pass per step.

    Not thread-safe: one thread calls add, cancel and step (the server's generation thread).
    """

    def __init__(self, model, tokenizer, *, max_rows: int = 8, prefill_step: int = 512, cache_kwargs=None):
        if max_rows < 1 or prefill_step < 1:
            raise ValueError("max_rows and prefill_step must be at least 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.prefill_step = max_rows, prefill_step
        self.cache_kwargs = dict(cache_kwargs or {})
        self.reading: list[_Row] = []  # still prefilling their prompt, oldest first
        self.decoding: list[_Row] = []
        self._inflight: tuple | None = None  # the queued pass: (rows, tokens, logprobs, failures)
        self.steps = 0  # decode steps run, for metrics
        self.last_batch = 0  # rows in the last decode step

    # -- requests in and out

    @property
    def rows(self) -> int:
        return len(self.reading) + len(self.decoding)

    @property
    def busy(self) -> bool:
        return self.rows > 0

    @property
    def free(self) -> int:
        return self.max_rows - self.rows

    def keys(self) -> list:
        return [r.key for r in self.reading + self.decoding]

    def add(
        self,
        key: Hashable,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        repetition_context_size: int = 64,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        stop_tokens: Sequence[int] = (),
        top_logprobs: int = 0,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        prompt_cache=None,
    ) -> None:
        """Queue a request (arguments as stream_generate's); its events come out of step() under `key`.

        `sampler` replaces the one the sampling arguments describe. With a `prompt_cache` (a
        qmlx.prompt_cache.PromptCache) the longest prefix it holds is not computed again, and it
        records what the row's caches hold when the row ends.
        """
        if self.free <= 0:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        if key in self.keys():
            raise ValueError(f"a request with key {key!r} is already in the batch")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("the prompt is empty: nothing to continue")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        s = sampling_settings(
            self.tokenizer.generation_defaults,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        greedy = sampler is None and s["temperature"] == 0
        if sampler is None:
            sampler = make_sampler(s["temperature"], s["top_p"], s["top_k"], s["min_p"], seed=seed)
        processors = make_logits_processors(
            repetition_penalty=s["repetition_penalty"],
            repetition_context_size=repetition_context_size,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=logit_bias,
        ) + list(logits_processors)
        if prompt_cache is not None:
            caches, todo = prompt_cache.prepare(self.model, ids)
        else:
            caches, todo = make_cache(len(self.model.layers), **self.cache_kwargs), ids
        text = TextStream(self.tokenizer, stop, stop_tokens)
        row = _Row(
            key, ids, caches, todo, prompt_cache, max_tokens, sampler, greedy, processors, text, top_logprobs
        )
        self.reading.append(row)

    def cancel(self, key: Hashable) -> bool:
        """Drop a request between steps (a client gone); whether it was in the batch."""
        for rows in (self.reading, self.decoding):
            for row in rows:
                if row.key == key:
                    rows.remove(row)
                    row.close()
                    return True
        return False

    def clear(self) -> list:
        """Drop every request (after a failed step); return their keys."""
        keys = self.keys()
        for row in self.reading + self.decoding:
            row.closed = True
            if row.prompt_cache is not None:
                row.prompt_cache.reset()  # a step broke off halfway: what the caches hold is unknown
        self.reading, self.decoding, self._inflight = [], [], None
        return keys

    # -- one step

    def step(self) -> list[tuple[Hashable, GenerationEvent | Exception]]:
        """One prompt chunk of the oldest reading request, then one decode step of every decoding row.

        Returns (key, event) pairs. A row whose own part of the step fails (its logits processor,
        its sampler) gets (key, the exception) instead and leaves; the others go on. An exception
        from the batched forward pass itself propagates: then call clear().

        Decoding is pipelined: a step queues the next forward pass (fed with the tokens still being
        computed) before it reads the previous one's tokens, so building the graph and handling
        text overlap the model. Events therefore come one call after the pass that made them, and
        a row that has just finished costs one pass whose result is dropped.
        """
        self._read()
        done, self._inflight = self._inflight, None
        if self.decoding:
            self._inflight = self._launch(self.decoding, done)
        events = self._collect(done) if done is not None else []
        if self.steps % 256 == 0:
            mx.clear_cache()
        return events

    def _launch(self, rows: list[_Row], prev) -> tuple:
        """Queue one forward pass of `rows`; rows of the pass `prev` are fed its (lazy) tokens."""
        rows = list(rows)
        if prev is not None and prev[0] == rows:
            y = prev[1].reshape(-1, 1)  # the same rows as last time: feed the tokens as they are
        else:
            at = {id(r): b for b, r in enumerate(prev[0])} if prev is not None else {}
            parts = [
                prev[1][at[id(r)] : at[id(r)] + 1] if id(r) in at else mx.array([r.todo[-1]]) for r in rows
            ]
            y = mx.concatenate([p.astype(mx.int32) for p in parts]).reshape(-1, 1)
        cache = batch_caches([r.caches for r in rows]) if len(rows) > 1 else rows[0].caches
        logits = self.model(y, cache=cache)[:, -1, :].astype(mx.float32)
        failed: dict[int, Exception] = {}  # row -> what broke its own part of the step
        if any(r.processors for r in rows):
            mx.async_eval(logits)  # the pass runs while the processors (a grammar's mask) work on the host
            parts = []
            for b, r in enumerate(rows):
                try:
                    parts.append(self._process(r, y[b], logits[b : b + 1]))
                except Exception as e:  # a bug or bad input of this request only
                    failed[b] = e
                    parts.append(logits[b : b + 1])
            logits = mx.concatenate(parts)
        lps = logprobs(logits)
        tokens = mx.argmax(lps, axis=-1)
        if not all(r.greedy for r in rows):
            parts = []
            for b, r in enumerate(rows):
                try:
                    if not (r.greedy or b in failed):
                        parts.append(r.sampler(lps[b : b + 1]).reshape(1).astype(tokens.dtype))
                        continue
                except Exception as e:
                    failed[b] = e
                parts.append(tokens[b : b + 1])
            tokens = mx.concatenate(parts)
        mx.async_eval(tokens, lps)
        for r in rows:
            r.fed = True
        self.steps += 1
        self.last_batch = len(rows)
        return rows, tokens, lps, failed

    def _collect(self, done: tuple) -> list:
        """The events of a finished pass; rows that finish (or failed) leave the batch."""
        rows, tokens, lps, failed = done
        events = []
        for b, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if row.closed:
                continue  # cancelled, or finished in the pass before: this token is not its
            if b not in failed:
                try:
                    self._take(row, token, lps[b], events)
                except Exception as e:
                    failed[b] = e
            if b in failed:
                events.append((row.key, failed[b]))
            if b in failed or row.text.finish or len(row.generated) >= row.max_tokens:
                self.decoding.remove(row)
                row.close()
        return events

    def _read(self) -> None:
        """Prefill one chunk of the oldest reading row; a row whose prompt is read starts decoding."""
        while self.reading:
            row = self.reading[0]
            chunk = row.todo[: min(self.prefill_step, len(row.todo) - 1)]
            if chunk:
                prefill(self.model, chunk, row.caches, self.prefill_step)
                row.todo = row.todo[len(chunk) :]
            if len(row.todo) == 1:  # only the last prompt token left: it is the row's first decode input
                self.decoding.append(self.reading.pop(0))
            if chunk:
                return  # one chunk per step; a row whose prompt was all cached costs nothing, so go on

    def _process(self, row: _Row, fed: mx.array, logits: mx.array) -> mx.array:
        """The row's logits processors; `fed` is the token this pass read (lazy: the previous pass's)."""
        if not row.processors:
            return logits
        if row.fed:  # from the second pass on, the sequence grows by the token fed
            row.history = mx.concatenate([row.history, fed.astype(mx.int32)])
        for proc in row.processors:
            logits = proc(row.history, logits)
        return logits

    def _take(self, row: _Row, token: int, lps: mx.array, events: list) -> None:
        """Give a row its new token; collect the events it releases."""
        row.generated.append(token)
        row.clock.tick()
        text = row.text
        out = text.add(token)
        if token not in text.eos:  # EOS ends the text and is not shown
            lp, tops = token_logprobs(lps, token, row.top) if row.top else (None, None)
            events.append((row.key, row.clock.event(out, token, None, lp, tops)))
        if text.finish or len(row.generated) >= row.max_tokens:
            # Text held back for a stop string that never completed is real output; flush it.
            events.append((row.key, row.clock.event(text.rest(), None, text.finish or "length")))


# ---------------------------------------------------------------------- a batch of prompts at once


@dataclass
class BatchResult:
    """One prompt's completion."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def stream_batch_generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    max_tokens: int | Sequence[int] = 256,
    *,
    sampler: Sampler | Sequence[Sampler] | None = None,
    prefill_step: int = 512,
    **kwargs,
) -> Iterator[tuple[int, GenerationEvent]]:
    """Yield (prompt index, GenerationEvent) as tokens of the batch arrive.

    `max_tokens` may differ per prompt; `sampler` (one, or one per prompt) overrides the
    sampling arguments; other keyword arguments (temperature, stop, seed, penalties, ...) are
    BatchDecoder.add's, the same for every prompt. A row's last event carries its finish_reason.
    """
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not ids or any(not x for x in ids):
        raise ValueError("batch_generate needs at least one prompt, and no empty prompt")
    B = len(ids)
    limits = [max_tokens] * B if isinstance(max_tokens, int) else list(max_tokens)
    samplers = list(sampler) if isinstance(sampler, Sequence) else [sampler] * B
    if len(limits) != B or min(limits) < 1:
        raise ValueError("max_tokens must be >= 1, one value or one per prompt")
    if len(samplers) != B:
        raise ValueError("give one sampler, or one per prompt")
    decoder = BatchDecoder(model, tokenizer, max_rows=B, prefill_step=prefill_step)
    for i, x in enumerate(ids):
        decoder.add(i, x, limits[i], sampler=samplers[i], **kwargs)
    while decoder.busy:
        for i, ev in decoder.step():
            if isinstance(ev, Exception):
                raise ev
            yield i, ev


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
