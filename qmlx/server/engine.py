"""The generation engine: every request's tokens, on one thread, in one batch (no HTTP here).

MLX evaluation is not meant to be driven from many threads, so all model work runs on one
generation thread, around one `qmlx.batch.BatchDecoder`:

    submit(job) -> a bounded FIFO queue (full: 429 with Retry-After)
    each turn:   drop cancelled and timed-out jobs (their rows leave the batch at once)
                 admit waiting jobs into free rows, each starting from the longest prefix the
                 shared PrefixCache holds (usage.prompt_tokens_details.cached_tokens)
                 decoder.step(): one prompt chunk of a joining request, then one batched
                 decode step of every running request
                 events go back to each job's HTTP handler through its asyncio queue

A failure inside a step fails the requests it was serving with a 500 error object and the
engine goes on with new ones; the thread only ends with `stop()`. `metrics()` counts what a
server that runs for days should show (served as Prometheus text at /metrics).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..batch import BatchDecoder
from ..constrain import ConstraintProcessor
from ..errors import UserError
from ..prompt_cache import DiskPrefixes, PrefixCache
from .schemas import APIError

log = logging.getLogger("qmlx.server")

MAX_QUEUE = 256  # waiting requests beyond this get 429 rather than unbounded memory
DEFAULT_PROMPT_CACHE_BYTES = 1 << 30  # shared prefix caches kept between requests
DEFAULT_PROMPT_CACHE_DISK_BYTES = 8 << 30  # with --prompt-cache-dir: what they may hold on disk
RETRY_AFTER = 1  # seconds a refused client is told to wait
_keys = itertools.count()


@dataclass
class Job:
    """One request's generation: what to run, and a channel back to its HTTP handler."""

    ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    constraint: ConstraintProcessor | None = None  # the output's grammar (JSON, regex, tool call)
    top_logprobs: int = 0  # how many alternatives per token to report (0: none)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    key: int = field(default_factory=lambda: next(_keys))
    cached_tokens: int = 0  # prompt tokens a shared prefix cache held (set when admitted)
    deadline: float | None = None  # time.monotonic() after which the job fails as timed out

    def post(self, kind: str, value: Any) -> None:
        """Hand an item to the handler (called from the generation thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except (RuntimeError, AttributeError):  # the event loop is closed (shutting down) or never set
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """Runs every generation on one thread; up to `max_concurrency` requests decode as one batch."""

    def __init__(
        self,
        model,
        tokenizer,
        model_id: str,
        max_concurrency: int = 8,
        max_queue: int = MAX_QUEUE,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        request_timeout: float | None = None,
        prefill_step: int = 512,
        prompt_cache_dir: str | None = None,
        prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES,
    ):
        if max_concurrency < 1:
            raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        if request_timeout is not None and request_timeout <= 0:
            raise UserError(f"--request-timeout must be a positive number of seconds, got {request_timeout}")
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.context = int(model.config.max_position_embeddings)
        self.vocab = int(model.config.vocab_size)  # the logits' width (>= the tokenizer's vocabulary)
        self.max_queue, self.request_timeout = max_queue, request_timeout
        self.decoder = BatchDecoder(model, tokenizer, max_rows=max_concurrency, prefill_step=prefill_step)
        disk = DiskPrefixes(prompt_cache_dir, prompt_cache_disk_bytes, model) if prompt_cache_dir else None
        self.prefixes = PrefixCache(prompt_cache_bytes, disk)
        self.pending: collections.deque[Job] = collections.deque()
        self.running: dict[int, tuple[Job, Any]] = {}  # key -> (job, its PromptCache)
        self.cond = threading.Condition()
        self.stats = collections.Counter()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of steps
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="qmlx-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            try:  # what the memory tier holds outlives the process on disk (--prompt-cache-dir)
                self.prefixes.flush()
            except Exception:  # never let shutdown fail over a cache
                log.exception("could not write the prefix caches to disk")

    def submit(self, job: Job) -> None:
        if self.request_timeout is not None:
            job.deadline = time.monotonic() + self.request_timeout
        with self.cond:
            if len(self.pending) >= self.max_queue:
                self.stats["rejected"] += 1
                raise APIError(
                    429,
                    f"the server is busy ({len(self.running)} requests running, {len(self.pending)} waiting); "
                    f"retry in {RETRY_AFTER} s",
                    code="server_busy",
                    kind="rate_limit_error",
                    headers={"Retry-After": str(RETRY_AFTER)},
                )
            self.pending.append(job)
            self.cond.notify()

    def occupancy(self) -> dict[str, int]:
        with self.cond:
            return {"active": len(self.running), "queued": len(self.pending)}

    # -- the generation thread

    def _run(self) -> None:
        while not self._stop:
            try:
                self._turn()
            except Exception as e:  # a failed step: fail the requests it served, keep serving
                log.exception("generation step failed")
                self._fail_running(APIError(500, f"generation failed: {type(e).__name__}: {e}"))

    def _fail_running(self, error: APIError) -> None:
        self.decoder.clear()
        with self.cond:
            failed, self.running = list(self.running.values()), {}
        for job, _ in failed:
            self.stats["failed"] += 1
            job.post("error", error)

    def _turn(self) -> None:
        import mlx.core as mx

        with self.cond:
            while not self._stop and not self.pending and not self.running:
                self.cond.wait()
            if self._stop:
                return
            admit = []
            while self.pending and self.decoder.free > len(admit):
                job = self.pending.popleft()
                if self._gone(job):
                    continue
                admit.append(job)
        for job in list(j for j, _ in self.running.values()):
            if self._gone(job):
                self._leave(job, finished=False)
        for job in admit:
            try:
                self._admit(job)
            except Exception as e:  # e.g. a sampler refusing its settings: this request alone fails
                log.exception("request could not start")
                self.stats["failed"] += 1
                with self.cond:
                    self.running.pop(job.key, None)
                job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
        events = self.decoder.step()
        now = time.monotonic()
        self._recent.append((now, sum(1 for _, ev in events if getattr(ev, "token", None) is not None)))
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()
        self.stats["decode_steps"] = self.decoder.steps
        for key, ev in events:
            job, _ = self.running[key]
            if isinstance(ev, Exception):  # this request's own part of the step broke: it alone fails
                log.error("generation failed", exc_info=ev)
                self.stats["failed"] += 1
                self._leave(job, finished=True)
                job.post("error", APIError(500, f"generation failed: {type(ev).__name__}: {ev}"))
                continue
            if ev.finish_reason is not None:
                self.stats["completed"] += 1  # before the client can see its last event
                self.stats["prompt_tokens"] += ev.prompt_tokens
                self.stats["generated_tokens"] += ev.generation_tokens
                self._leave(job, finished=True)
            job.post("event", ev)
        if not self.running and not self.pending:
            mx.clear_cache()  # idle: give the buffers of finished requests back

    def _gone(self, job: Job) -> bool:
        """Whether a job's client left, or its time ran out (then it is told so)."""
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            self.stats["timed_out"] += 1
            job.post(
                "error",
                APIError(504, f"the request took longer than {self.request_timeout:g} s", code="timeout"),
            )
            return True
        return False

    def _admit(self, job: Job) -> None:
        pc = self.prefixes.checkout(self.model, job.ids)
        job.cached_tokens = len(pc.tokens)
        self.stats["prompt_tokens_reused"] += job.cached_tokens
        # A grammar (JSON output, forced tool calls, regex) masks the logits after the penalties.
        constraint = [job.constraint] if job.constraint is not None else []
        with self.cond:
            self.running[job.key] = (job, pc)
        self.decoder.add(
            job.key,
            job.ids,
            job.max_tokens,
            top_logprobs=job.top_logprobs,
            logits_processors=constraint,
            prompt_cache=pc,
            **job.sampling,
        )

    def _leave(self, job: Job, finished: bool) -> None:
        """A job's row leaves the batch; what its cache holds goes to the shared prefix caches."""
        if not finished:
            self.decoder.cancel(job.key)
        with self.cond:
            _, pc = self.running.pop(job.key)
        self.prefixes.checkin(pc)

    # -- what /metrics shows

    def metrics(self) -> dict[str, float]:
        with self.cond:
            active, queued = len(self.running), len(self.pending)
        recent = list(self._recent)
        span = recent[-1][0] - recent[0][0] if len(recent) > 1 else 0.0
        tps = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        s = self.stats
        return {
            "requests_completed": s["completed"],
            "requests_failed": s["failed"],
            "requests_cancelled": s["cancelled"],
            "requests_timed_out": s["timed_out"],
            "requests_rejected": s["rejected"],
            "prompt_tokens": s["prompt_tokens"],
            "generated_tokens": s["generated_tokens"],
            "cached_prompt_tokens": s["prompt_tokens_reused"],
            "decode_steps": s["decode_steps"],
            "active_requests": active,
            "queued_requests": queued,
            "batch_size": self.decoder.last_batch if active else 0,
            "generation_tokens_per_second": tps,
            "prefix_cache_hits": self.prefixes.hits,
            "prefix_cache_misses": self.prefixes.misses,
            "prefix_cache_entries": len(self.prefixes.entries),
            "prefix_cache_bytes": self.prefixes.nbytes,
            **self._disk_metrics(),
        }

    def _disk_metrics(self) -> dict[str, float]:
        disk = self.prefixes.disk
        if disk is None:
            return {}
        return {
            "prefix_cache_disk_hits": disk.hits,
            "prefix_cache_disk_writes": disk.writes,
            "prefix_cache_disk_failures": disk.failures,
            "prefix_cache_disk_entries": len(disk.entries),
            "prefix_cache_disk_bytes": disk.nbytes,
        }


_METRIC_HELP = {
    "requests_completed": ("counter", "requests answered in full"),
    "requests_failed": ("counter", "requests failed by an error inside the engine"),
    "requests_cancelled": ("counter", "requests whose client left before the end"),
    "requests_timed_out": ("counter", "requests stopped by --request-timeout"),
    "requests_rejected": ("counter", "requests refused with 429 (queue full)"),
    "prompt_tokens": ("counter", "prompt tokens of completed requests"),
    "generated_tokens": ("counter", "tokens generated for completed requests"),
    "cached_prompt_tokens": ("counter", "prompt tokens served from the shared prefix caches"),
    "decode_steps": ("counter", "batched decode steps run"),
    "active_requests": ("gauge", "requests in the batch"),
    "queued_requests": ("gauge", "requests waiting for a row"),
    "batch_size": ("gauge", "rows in the last decode step"),
    "generation_tokens_per_second": ("gauge", "tokens generated per second over the last 10 s"),
    "prefix_cache_hits": ("counter", "requests that started from a shared prefix cache"),
    "prefix_cache_misses": ("counter", "requests that found no shared prefix"),
    "prefix_cache_entries": ("gauge", "prefix caches held"),
    "prefix_cache_bytes": ("gauge", "bytes the prefix caches hold"),
    "prefix_cache_disk_hits": ("counter", "prefix caches read back from --prompt-cache-dir"),
    "prefix_cache_disk_writes": ("counter", "prefix caches written to --prompt-cache-dir"),
    "prefix_cache_disk_failures": ("counter", "prefix-cache files that could not be written or read back"),
    "prefix_cache_disk_entries": ("gauge", "prefix caches held on disk"),
    "prefix_cache_disk_bytes": ("gauge", "bytes the prefix caches hold on disk"),
}


def metrics_text(values: dict[str, float]) -> str:
    """Prometheus text exposition of Engine.metrics()."""
    lines = []
    for name, value in values.items():
        kind, help_ = _METRIC_HELP[name]
        full = f"qmlx_{name}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}", f"{full} {value:g}"]
    return "\n".join(lines) + "\n"
