"""Output: generation events -> OpenAI response bodies and server-sent events.

`job_events` is the one loop that consumes a job (its events, client disconnects, heartbeats);
`ChatOutput` splits tool calls out of the text and closes JSON cut short by max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from ..toolcalls import ToolCall, ToolCallParser, parse_call
from .engine import Job
from .prepare import Prepared
from .schemas import APIError, ChatRequest, CompletionRequest

POLL_SECONDS = 1.0  # how often a waiting handler checks that its client is still there


def _token_text(tok, t: int) -> tuple[str, list[int]]:
    raw = tok.token_bytes(t)
    if raw is None:
        text = tok.decode([t])
        raw = text.encode()
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tok, ev, n_top: int) -> dict[str, Any]:
    text, raw = _token_text(tok, ev.token)
    tops = []
    for t, lp in (ev.top_logprobs or [])[:n_top]:
        tt, rb = _token_text(tok, t)
        tops.append({"token": tt, "logprob": lp, "bytes": rb})
    return {"token": text, "logprob": ev.logprob, "bytes": raw, "top_logprobs": tops}


def usage(job: Job, ev) -> dict[str, Any]:
    """OpenAI's usage object; cached_tokens: prompt tokens a shared prefix cache already held."""
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.generation_tokens,
        "total_tokens": ev.prompt_tokens + ev.generation_tokens,
        "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
    }


def completed(job: Job, ev, tokens: list[int]) -> str:
    """The text of event `ev`; at the last event of a constrained output cut short by the token limit,
    completed so that it still parses (`tokens`: every token generated, this event's included)."""
    if ev.finish_reason != "length" or job.constraint is None:
        return ev.text
    return job.constraint.finish_text(ev.text, tokens)


async def job_events(job: Job, request: Request | None, heartbeat: bool = False) -> AsyncIterator:
    """The job's events as they arrive; None marks a quiet second (streams send a ping).

    Non-streaming handlers pass `request`, so a client that hangs up is noticed (once a second,
    busy or not) and its generation cancelled.
    """
    getter, checked = None, time.monotonic()
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(job.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=POLL_SECONDS)
            if request is not None and time.monotonic() - checked >= POLL_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancel()
                    return
            if not done:
                if heartbeat:
                    yield None
                continue
            kind, value = getter.result()
            getter = None
            if kind == "error":
                raise value
            yield value
            if value.finish_reason is not None:
                return
    finally:
        if getter is not None:
            getter.cancel()


class EventStream(StreamingResponse):
    """Server-sent events; a client that hangs up just ends the stream (and its generation)."""

    def __init__(self, content, media_type: str = "text/event-stream", **kw):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"}, **kw)

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()  # its `finally` cancels the job now, not at GC


def sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


class ChatOutput:
    """Turns generation events into OpenAI chat message deltas (content, tool calls)."""

    def __init__(self, prep: Prepared, tok):
        self.prep, self.tok = prep, tok
        self.parser = ToolCallParser(prep.tool_names) if prep.parse_tools else None
        self.text = ""  # all generated text (for the forced call and JSON completion)
        self.tokens: list[int] = []  # and its tokens (for the completion of a constrained output)
        self.calls: list[ToolCall] = []

    def feed(self, ev) -> tuple[str, list[ToolCall]]:
        """(content to show, completed tool calls) for a generation event."""
        if ev.token is not None:
            self.tokens.append(ev.token)
        text = completed(self.prep.job, ev, self.tokens)
        self.text += text
        if self.prep.forced_call:
            return "", []
        if self.parser is None:
            return text, []
        return self._split(self.parser.feed(text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        job = self.prep.job
        if self.prep.forced_call:
            call = parse_call(self.text)
            if call is None:  # cannot happen with the grammar; never answer with nothing
                return self.text, []
            self.calls.append(call)
            return "", [call]
        if job.constraint is not None:
            return "", []
        if self.parser is None:
            return "", []
        return self._split(self.parser.finish())

    def _split(self, events) -> tuple[str, list[ToolCall]]:
        content = "".join(v for k, v in events if k == "content")
        calls = [v for k, v in events if k == "tool_call"]
        if not self.prep.parallel_calls:
            calls = calls[: max(0, 1 - len(self.calls))]
        self.calls += calls
        return content, calls

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls else reason


# ---------------------------------------------------------------------- one response, streamed or whole


class ChatFormat:
    """A chat completion: chunks of message deltas as events arrive, or one message at the end."""

    def __init__(self, prep: Prepared, req: ChatRequest, tok, head: dict):
        self.out, self.req, self.tok, self.job = ChatOutput(prep, tok), req, tok, prep.job
        self.head = {**head, "system_fingerprint": "qmlx"}
        self.n_top = req.top_logprobs or 0
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.text: list[str] = []
        self.lps: list[dict] = []

    def _chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return {**self.head, "object": "chat.completion.chunk", "choices": [choice], **extra}

    def _calls(self, calls: list[ToolCall]) -> list[dict]:
        first = len(self.out.calls) - len(calls)
        return [self._chunk({"tool_calls": [c.to_openai(first + i)]}) for i, c in enumerate(calls)]

    def opening(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""})]

    def feed(self, ev) -> list[dict]:
        content, calls = self.out.feed(ev)
        self.text.append(content)
        lp = None
        if self.req.logprobs and ev.token is not None:
            entry = chat_logprobs(self.tok, ev, self.n_top)
            self.lps.append(entry)
            lp = {"content": [entry]}
        chunks = [self._chunk({"content": content}, logprobs=lp)] if content or lp else []
        return chunks + self._calls(calls)

    def finish(self, last) -> list[dict]:
        content, calls = self.out.finish()
        self.text.append(content)
        chunks = [self._chunk({"content": content})] if content else []
        chunks += self._calls(calls) + [self._chunk({}, self.out.finish_reason(last.finish_reason))]
        if self.include_usage:
            chunks.append(
                {
                    **self.head,
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": usage(self.job, last),
                }
            )
        return chunks

    def whole(self, last) -> dict:
        body = "".join(self.text)
        calls = self.out.calls
        if calls:
            body = body.strip()
        msg: dict[str, Any] = {"role": "assistant", "content": body or (None if calls else "")}
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
        choice = {
            "index": 0,
            "message": msg,
            "logprobs": {"content": self.lps} if self.req.logprobs else None,
            "finish_reason": self.out.finish_reason(last.finish_reason),
        }
        return {**self.head, "object": "chat.completion", "choices": [choice], "usage": usage(self.job, last)}


class TextOutput:
    """What every plain-text answer format keeps: the events, and each one's text (the last one
    completed if a constraint's output was cut short)."""

    def __init__(self, job: Job):
        self.job = job
        self.events: list = []
        self.texts: list[str] = []
        self.tokens: list[int] = []  # every token generated so far

    def _text(self, ev) -> str:
        self.events.append(ev)
        if ev.token is not None:
            self.tokens.append(ev.token)
        text = completed(self.job, ev, self.tokens)
        self.texts.append(text)
        return text

    def opening(self) -> list[dict]:
        return []


class CompletionFormat(TextOutput):
    """A text completion: a chunk per event with text, or the whole text at the end."""

    def __init__(self, prep: Prepared, req: CompletionRequest, tok, head: dict):
        super().__init__(prep.job)
        self.req, self.tok = req, tok
        self.head = {**head, "object": "text_completion"}
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _logprobs(self, evs) -> dict | None:
        if self.req.logprobs is None:
            return None
        evs = [e for e in evs if e.token is not None]
        return {
            "tokens": [_token_text(self.tok, e.token)[0] for e in evs],
            "token_logprobs": [e.logprob for e in evs],
            "top_logprobs": [
                {_token_text(self.tok, t)[0]: lp for t, lp in (e.top_logprobs or [])[: self.req.logprobs]}
                for e in evs
            ],
        }

    def feed(self, ev) -> list[dict]:
        text = self._text(ev)
        if not (text or ev.finish_reason):
            return []
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self._logprobs([ev]),
            "finish_reason": ev.finish_reason,
        }
        return [{**self.head, "choices": [choice]}]

    def finish(self, last) -> list[dict]:
        return [{**self.head, "choices": [], "usage": usage(self.job, last)}] if self.include_usage else []

    def whole(self, last) -> dict:
        choice = {
            "index": 0,
            "text": "".join(self.texts),
            "logprobs": self._logprobs(self.events),
            "finish_reason": last.finish_reason,
        }
        return {**self.head, "choices": [choice], "usage": usage(self.job, last)}


class InfillFormat(TextOutput):
    """llama.cpp's /infill answer: {"content", "stop", ...}; streamed, one such object per event, no [DONE]."""

    DONE = ""

    def __init__(self, prep: Prepared, tok, model_id: str):
        super().__init__(prep.job)
        self.tok, self.model_id = tok, model_id

    def feed(self, ev) -> list[dict]:
        text = self._text(ev)
        return [{"content": text, "stop": False}] if text else []

    def _stats(self, last) -> dict:
        return {
            "model": self.model_id,
            "stop": True,
            "stop_type": "limit" if last.finish_reason == "length" else "eos",
            "tokens_predicted": last.generation_tokens,
            "tokens_evaluated": last.prompt_tokens,
            "tokens_cached": self.job.cached_tokens,
            "timings": {
                "prompt_n": last.prompt_tokens - self.job.cached_tokens,
                "prompt_per_second": last.prompt_tps,
                "predicted_n": last.generation_tokens,
                "predicted_per_second": last.generation_tps,
            },
        }

    def finish(self, last) -> list[dict]:
        return [{"content": "", **self._stats(last)}]

    def whole(self, last) -> dict:
        return {"content": "".join(self.texts), **self._stats(last)}


async def respond(job: Job, fmt, request: Request, stream: bool):
    """The one way a job becomes a response: server-sent events, or one body when it is done.

    However it ends (done, failed, client gone), the job is cancelled on the way out, so its row
    leaves the batch at once; an error after the stream began is sent as an error event.
    """
    if stream:
        # A dialect may name its events, shape its errors and end without OpenAI's [DONE] line.
        encode = getattr(fmt, "encode", sse)
        error_body = getattr(fmt, "error_body", APIError.body)
        done = getattr(fmt, "DONE", "data: [DONE]\n\n")
        ping = getattr(fmt, "PING", ": ping\n\n")  # None: the format has no comment lines

        async def events():
            try:
                for c in fmt.opening():
                    yield encode(c)
                last = None
                try:
                    async for ev in job_events(job, None, heartbeat=True):
                        if ev is None:
                            if ping:
                                yield ping  # writing is how a vanished client is noticed
                            continue
                        last = ev
                        for c in fmt.feed(ev):
                            yield encode(c)
                except APIError as e:
                    yield encode(error_body(e))
                    yield done
                    return
                for c in fmt.finish(last):
                    yield encode(c)
                yield done
            finally:
                job.cancel()

        return EventStream(events(), media_type=getattr(fmt, "MEDIA", "text/event-stream"))
    last = None
    try:
        async for ev in job_events(job, request):
            last = ev
            fmt.feed(ev)
    finally:
        job.cancel()  # a no-op when finished; stops generation if the handler was cancelled
    if last is None:  # the client left
        return JSONResponse({}, status_code=499)
    fmt.finish(last)
    return fmt.whole(last)
