"""`qmlx serve`: an OpenAI-compatible HTTP server for one model.

    GET  /v1/models            the one model served
    POST /v1/chat/completions  chat, streamed (server-sent events) or not; tools; JSON output
    POST /v1/completions       raw text completion
    GET  /health               liveness and queue depth

How it is put together, top to bottom:

* errors: every refusal is an `APIError`, answered as OpenAI's `{"error": {...}}` object with
  a 4xx status. Anything a client sends is validated before it reaches the model, so a 500
  means a bug in qmlx, and even then the server keeps running.
* request models (pydantic, strict types): fields of the wrong type are refused, unknown
  fields are ignored (clients send many optional extras).
* `Engine`: MLX evaluation is not meant to be driven from many threads, so all model work
  runs on one generation thread. Up to `max_concurrency` requests are active at once and
  advance one token each in turn; the rest wait in FIFO order. A request whose client has gone
  is dropped at its next token, freeing its slot.
* preparation: messages -> chat template -> token ids, limits checked, tool choice and
  response_format turned into a constraint (see qmlx/constrain.py, qmlx/toolcalls.py).
* the FastAPI app: endpoints, streaming, auth, body-size limit.

Behaviour worth knowing:
* Each slot keeps the KV cache of its last request; a new request goes to the free slot
  sharing the longest token prefix with it, so follow-up turns prefill only what is new.
* `seed` makes sampling reproducible when a request runs alone; requests interleaved with it
  draw from the same MLX random state.
* With `response_format` (json_object / json_schema) or a required tool call, decoding is
  constrained (qmlx/constrain.py); stop strings do not apply, and an answer cut short by
  max_tokens is closed so it still parses (finish_reason stays "length").
* `tool_choice` "none" hides the tools from the model; "required" or a named function starts
  the answer inside `<tool_call>` and constrains the call's JSON to the tools' schemas.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .constrain import Grammar, JsonLogitsProcessor, Node, SchemaError, compile_schema
from .decode import common_prefix
from .errors import UserError
from .toolcalls import OPEN, MessageError, ToolCall, ToolCallParser, parse_call, template_messages

log = logging.getLogger("qmlx.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; a long-context prompt is well under this
DEFAULT_MAX_TOKENS = 2048  # when a request names no limit (OpenAI's "up to the context")
MAX_QUEUE = 256  # waiting requests beyond this get 429 rather than unbounded memory
POLL_SECONDS = 1.0  # how often a waiting handler checks that its client is still there


# ---------------------------------------------------------------------- errors


class APIError(Exception):
    """A refusal sent to the client as an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    async def __call__(self, scope, receive, send):  # answer directly as an ASGI app
        await self.response()(scope, receive, send)


# ---------------------------------------------------------------------- request models


class Strict(BaseModel):
    # Strict: "0.5" is not a number. Extra fields are ignored, as clients send many.
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(Strict):
    type: str
    text: str | None = None


class FunctionCallIn(Strict):
    name: str
    arguments: str | dict = "{}"


class ToolCallIn(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint


# ---------------------------------------------------------------------- the generation engine


@dataclass
class Job:
    """One request's generation: what to run, and a channel back to its HTTP handler."""

    ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    grammar: Grammar | None = None
    top_logprobs: int = 0  # how many alternatives per token to report (0: none)
    loop: asyncio.AbstractEventLoop | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, kind: str, value: Any) -> None:
        """Hand an item to the handler (called from the generation thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


class Slot:
    """A place for one active request, with the KV cache its last request left behind.

    `Engine._pick_slot` sends a request to the free slot whose cache shares the longest prefix
    with its prompt, so a conversation's next turn (or another request with the same system
    prompt and tools) prefills only what is new.
    """

    def __init__(self):
        from .prompt_cache import PromptCache

        self.prompt_cache = PromptCache()


class Engine:
    """Runs every generation on one thread; up to `max_concurrency` interleave token by token."""

    def __init__(self, model, tokenizer, model_id: str, max_concurrency: int = 4, max_queue: int = MAX_QUEUE):
        if max_concurrency < 1:
            raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.context = int(model.config.max_position_embeddings)
        self.max_queue = max_queue
        self.free = [Slot() for _ in range(max_concurrency)]
        self.pending: collections.deque[Job] = collections.deque()
        self.active: list[tuple[Job, Slot, Iterator]] = []
        self.cond = threading.Condition()
        self.stats = collections.Counter()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="qmlx-generate", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.pending) >= self.max_queue:
                raise APIError(
                    429,
                    "the server is busy; retry later",
                    code="server_busy",
                    kind="rate_limit_error",
                )
            self.pending.append(job)
            self.cond.notify()

    def occupancy(self) -> dict[str, int]:
        with self.cond:
            return {"active": len(self.active), "queued": len(self.pending)}

    # -- the generation thread

    def _run(self) -> None:
        while not self._stop:
            try:
                self._turn()
            except Exception as e:  # a bug outside any one request: fail those running, go on
                log.exception("generation loop failed")
                for entry in list(self.active):
                    entry[0].post("error", APIError(500, f"generation failed: {type(e).__name__}"))
                    self._release(entry)

    def _turn(self) -> None:
        """Admit waiting requests into free slots, then advance every active one by a token."""
        import mlx.core as mx

        with self.cond:
            while not self._stop and not self.pending and not self.active:
                self.cond.wait()
            if self._stop:
                return
            while self.pending and self.free:
                job = self.pending.popleft()
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                slot = self._pick_slot(job)
                self.active.append((job, slot, self._generate(job, slot)))
        for entry in list(self.active):
            self._advance(entry)
        if not self.active and not self.pending:
            mx.clear_cache()  # idle: give the buffers of finished requests back

    def _pick_slot(self, job: Job) -> Slot:
        # The longest shared prefix wins; on a tie, overwrite the cache with least to lose.
        def score(s: Slot) -> tuple[int, int]:
            held = s.prompt_cache.tokens
            return common_prefix(held, job.ids), -len(held)

        best = max(self.free, key=score)
        self.free.remove(best)
        return best

    def _release(self, entry) -> None:
        _, slot, gen = entry
        try:
            gen.close()  # runs the generators' cleanup (the prompt cache records what it holds)
        finally:
            with self.cond:
                self.active.remove(entry)
                self.free.append(slot)

    def _advance(self, entry) -> None:
        job, slot, gen = entry
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            self._release(entry)
            return
        try:
            ev = next(gen)
        except Exception as e:  # a bug or an unexpected input: fail this request only
            log.exception("generation failed")
            self.stats["failed"] += 1
            job.post("error", APIError(500, f"generation failed: {type(e).__name__}: {e}"))
            self._release(entry)
            return
        if ev.generation_tokens == 1 and ev.token is not None:
            self.stats["prompt_tokens_reused"] += slot.prompt_cache.reused
        if ev.finish_reason is not None:
            self.stats["completed"] += 1  # before the client can see its last event
        job.post("event", ev)
        if ev.finish_reason is not None:
            self._release(entry)

    def _generate(self, job: Job, slot: Slot) -> Iterator:
        """The one place a request's generation starts (and where its slot's cache is used)."""
        from .generate import stream_generate

        # A grammar (JSON output, forced tool calls) masks the logits after the penalties;
        # stop strings do not apply to it: the output ends when the JSON value is complete.
        constraint = []
        if job.grammar is not None:
            constraint = [JsonLogitsProcessor(job.grammar, self.tokenizer, job.max_tokens)]
        return stream_generate(
            self.model,
            self.tokenizer,
            job.ids,
            job.max_tokens,
            top_logprobs=job.top_logprobs,
            prompt_cache=slot.prompt_cache,
            logits_processors=constraint,
            **job.sampling,
        )


# ---------------------------------------------------------------------- request preparation


@dataclass
class Prepared:
    """A validated request: the job to run and how to present its output."""

    job: Job
    parse_tools: bool = False  # split <tool_call> blocks out of the text
    forced_call: bool = False  # the output is the JSON of one call (tool_choice required/named)
    tool_names: set[str] = field(default_factory=set)  # offered tools, to recognise bare calls
    parallel_calls: bool = True  # False: keep only the first call


def _sampling_kwargs(req: Sampling, tokenizer) -> dict[str, Any]:
    if req.top_k is not None and req.top_k > tokenizer.vocab_size:
        raise APIError(400, f"top_k must be at most the vocabulary size ({tokenizer.vocab_size})", "top_k")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 16:
        raise APIError(400, "at most 16 stop strings are supported", "stop")
    bias = None
    if req.logit_bias:
        bias = {}
        for k, v in req.logit_bias.items():
            if not k.lstrip("-").isdigit() or not 0 <= int(k) < tokenizer.vocab_size:
                raise APIError(400, f"logit_bias key {k!r} is not a token id of this model", "logit_bias")
            if not -100 <= v <= 100:
                raise APIError(400, f"logit_bias values must be within [-100, 100], got {v}", "logit_bias")
            bias[int(k)] = float(v)
    return {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "logit_bias": bias,
        # MLX seeds are unsigned 64-bit; any integer a client sends maps onto one.
        "seed": None if req.seed is None else req.seed % (1 << 64),
        "stop": [s for s in stop if s] or None,
    }


def _encode(tok, text: str, param: str) -> list[int]:
    try:
        return tok.encode(text)
    except Exception as e:  # e.g. lone surrogates a JSON string can carry
        raise APIError(400, f"{param} cannot be tokenized: {e}", param) from None


def _limit_tokens(engine: Engine, ids: list[int], asked: int | None, param: str) -> int:
    """The generation budget, refusing prompts and requests that cannot fit the context."""
    ctx, n = engine.context, len(ids)
    if n == 0:
        raise APIError(400, "the prompt is empty", "prompt")
    if asked is not None and asked > ctx:
        raise APIError(400, f"{param} is {asked}, more than the model's context of {ctx} tokens", param)
    if n >= ctx or (asked is not None and n + asked > ctx):
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n + (asked or 1)} tokens ({n} in the prompt, {asked or 1} for the completion).",
            "messages",
            code="context_length_exceeded",
        )
    return asked if asked is not None else min(DEFAULT_MAX_TOKENS, ctx - n)


def _tool_call_grammar(tools: list[Tool]) -> Grammar:
    """The JSON of one call to one of `tools`, with its arguments' schema where supported."""
    node = Node()
    for t in tools:
        params = t.function.parameters or {"type": "object"}
        wrapper = {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": params},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        try:
            node.alts += compile_schema({**wrapper, "$defs": params.get("$defs", {})}, strict=False).alts
        except SchemaError:  # a schema we cannot follow: any object is still a valid call
            wrapper["properties"]["arguments"] = {"type": "object"}
            node.alts += compile_schema(wrapper).alts
    return Grammar(node)


def _response_grammar(fmt: ResponseFormat | None) -> Grammar | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar.json_object()
    if fmt.json_schema is None:
        raise APIError(
            400,
            "response_format of type json_schema needs a json_schema object",
            "response_format.json_schema",
        )
    try:
        return Grammar.for_schema(fmt.json_schema.schema_)
    except SchemaError as e:
        raise APIError(
            400, f"response_format.json_schema.schema: {e}", "response_format.json_schema.schema"
        ) from None


def prepare_chat(engine: Engine, req: ChatRequest) -> Prepared:
    """Validate a chat request and turn it into a job (runs in a worker thread)."""
    tok = engine.tokenizer
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    try:
        messages = template_messages([m.model_dump(exclude_none=True) for m in req.messages])
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None
    grammar = _response_grammar(req.response_format)
    choice = req.tool_choice or ("auto" if req.tools else "none")
    tools = req.tools or []
    if isinstance(choice, NamedToolChoice):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise APIError(
                400,
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                "tool_choice",
            )
        tools_forced = named
    else:
        tools_forced = tools if choice == "required" else []
    if choice != "none" and choice != "auto" and not tools:
        raise APIError(400, "tool_choice requires tools", "tool_choice")
    if tools_forced and grammar is not None:
        raise APIError(400, "response_format cannot be combined with a required tool call", "response_format")
    rendered_tools = [t.model_dump(exclude_none=True) for t in tools] if tools and choice != "none" else None
    try:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tools=rendered_tools)
    except Exception as e:  # the template refused these messages (raise_exception, bad types)
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    if tools_forced:
        # Start the answer inside a call, as the model itself would, then constrain its JSON.
        prompt += OPEN + "\n"
        grammar = _tool_call_grammar(tools_forced)
    ids = _encode(tok, prompt, "messages")
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _limit_tokens(engine, ids, asked, param)
    sampling = _sampling_kwargs(req, tok)
    if grammar is not None:
        sampling.pop("stop")  # JSON output ends when the value does
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    # The chosen token's logprob comes with the alternatives, so ask for at least one.
    n_top = max(req.top_logprobs or 0, 1) if req.logprobs else 0
    return Prepared(
        Job(ids, max_tokens, sampling, grammar, top_logprobs=n_top),
        parse_tools=bool(rendered_tools) and not tools_forced and grammar is None,
        forced_call=bool(tools_forced),
        tool_names={t.function.name for t in tools},
        parallel_calls=req.parallel_tool_calls,
    )


def prepare_completion(engine: Engine, req: CompletionRequest) -> Prepared:
    tok = engine.tokenizer
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    if req.echo or req.suffix:
        raise APIError(400, "echo and suffix are not supported", "echo" if req.echo else "suffix")
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], int):
        if not all(0 <= t < tok.vocab_size for t in p):
            raise APIError(400, "prompt token ids must be within the vocabulary", "prompt")
        ids = list(p)
    else:
        if isinstance(p, list):
            if len(p) != 1:
                raise APIError(400, "exactly one prompt per request is supported", "prompt")
            p = p[0]
        ids = _encode(tok, p, "prompt")
    max_tokens = _limit_tokens(engine, ids, req.max_tokens, "max_tokens")
    n_top = 0 if req.logprobs is None else max(req.logprobs, 1)
    return Prepared(Job(ids, max_tokens, _sampling_kwargs(req, tok), top_logprobs=n_top))


# ---------------------------------------------------------------------- response formatting


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


def usage(ev) -> dict[str, int]:
    return {
        "prompt_tokens": ev.prompt_tokens,
        "completion_tokens": ev.generation_tokens,
        "total_tokens": ev.prompt_tokens + ev.generation_tokens,
    }


def _finish_json(grammar: Grammar, text: str) -> str:
    """Complete a constrained output cut short (by the token limit) so it always parses."""
    state = grammar.advance(grammar.start(), text.encode())
    if state is None or grammar.can_end(state):
        return ""
    return grammar.closure(state).decode("utf-8", errors="replace")


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

    def __init__(self, content, **kw):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}, **kw)

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
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content to show, completed tool calls) for a text delta."""
        self.text += text
        if self.prep.forced_call:
            return "", []
        if self.parser is None:
            return text, []
        return self._split(self.parser.feed(text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        job = self.prep.job
        if self.prep.forced_call:
            tail = _finish_json(job.grammar, self.text)
            call = parse_call(self.text + tail)
            if call is None:  # cannot happen with the grammar; never answer with nothing
                return self.text + tail, []
            self.calls.append(call)
            return "", [call]
        if job.grammar is not None:
            tail = _finish_json(job.grammar, self.text)
            self.text += tail
            return tail, []
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


# ---------------------------------------------------------------------- the app


def create_app(engine: Engine, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The FastAPI app around a started (or to-be-started) engine."""
    app = FastAPI(title="qmlx", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return APIError(
                400,
                f"the request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "),
            ).response()
        msg = err.get("msg", "invalid request")
        where = ".".join(loc)
        return APIError(400, f"{where}: {msg}" if where else msg, where or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return APIError(
            exc.status_code, str(exc.detail), code=None if exc.status_code != 404 else "not_found"
        ).response()

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error")
        return APIError(500, f"internal error: {type(exc).__name__}").response()

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.get("/health")
    async def health():
        ok = engine.thread.is_alive()
        body = {"status": "ok" if ok else "generation thread stopped", "model": engine.model_id}
        return JSONResponse({**body, **engine.occupancy(), **engine.stats}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist", "model", code="model_not_found")
        return model_card(engine)

    async def start(prep: Prepared) -> Job:
        prep.job.loop = asyncio.get_running_loop()
        engine.submit(prep.job)
        return prep.job

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prep = await run_in_threadpool(prepare_chat, engine, req)
        job = await start(prep)
        rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        head = {
            "id": rid,
            "created": created,
            "model": engine.model_id,
            "system_fingerprint": "qmlx",
        }
        out = ChatOutput(prep, tok)
        n_top = req.top_logprobs or 0
        if req.stream:
            return EventStream(chat_stream(job, out, head, req, n_top))
        text, lps, last = [], [], None
        try:
            async for ev in job_events(job, request):
                last = ev
                content, _ = out.feed(ev.text)
                text.append(content)
                if req.logprobs and ev.token is not None:
                    lps.append(chat_logprobs(tok, ev, n_top))
        finally:
            job.cancel()  # a no-op when finished; stops generation if the handler was cancelled
        if last is None:  # the client left
            return JSONResponse({}, status_code=499)
        content, _ = out.finish()
        text.append(content)
        body = "".join(text)
        if out.calls:
            body = body.strip()
        msg: dict[str, Any] = {"role": "assistant", "content": body or (None if out.calls else "")}
        if out.calls:
            msg["tool_calls"] = [c.to_openai() for c in out.calls]
        choice = {
            "index": 0,
            "message": msg,
            "logprobs": {"content": lps} if req.logprobs else None,
            "finish_reason": out.finish_reason(last.finish_reason),
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(last)}

    async def chat_stream(job: Job, out: ChatOutput, head: dict, req: ChatRequest, n_top: int):
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish: str | None = None, logprobs=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice], **extra})

        def call_deltas(calls: list[ToolCall]) -> list[str]:
            first = len(out.calls) - len(calls)
            return [chunk({"tool_calls": [c.to_openai(first + i)]}) for i, c in enumerate(calls)]

        try:
            yield chunk({"role": "assistant", "content": ""})
            last = None
            try:
                async for ev in job_events(job, None, heartbeat=True):
                    if ev is None:
                        yield ": ping\n\n"  # writing is how a vanished client is noticed
                        continue
                    last = ev
                    content, calls = out.feed(ev.text)
                    lp = None
                    if req.logprobs and ev.token is not None:
                        lp = {"content": [chat_logprobs(tok, ev, n_top)]}
                    if content or lp:
                        yield chunk({"content": content}, logprobs=lp)
                    for c in call_deltas(calls):
                        yield c
            except APIError as e:
                yield sse(e.body())
                yield "data: [DONE]\n\n"
                return
            content, calls = out.finish()
            if content:
                yield chunk({"content": content})
            for c in call_deltas(calls):
                yield c
            yield chunk({}, out.finish_reason(last.finish_reason))
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(last)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prep = await run_in_threadpool(prepare_completion, engine, req)
        job = await start(prep)
        rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
        head = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": engine.model_id,
        }
        want_lp = req.logprobs is not None

        def logprobs_of(evs) -> dict | None:
            if not want_lp:
                return None
            evs = [e for e in evs if e.token is not None]
            return {
                "tokens": [_token_text(tok, e.token)[0] for e in evs],
                "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [
                    {_token_text(tok, t)[0]: lp for t, lp in (e.top_logprobs or [])[: req.logprobs]}
                    for e in evs
                ],
            }

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                try:
                    last = None
                    try:
                        async for ev in job_events(job, None, heartbeat=True):
                            if ev is None:
                                yield ": ping\n\n"
                                continue
                            last = ev
                            if ev.text or ev.finish_reason:
                                choice = {
                                    "index": 0,
                                    "text": ev.text,
                                    "logprobs": logprobs_of([ev]),
                                    "finish_reason": ev.finish_reason,
                                }
                                yield sse({**head, "choices": [choice]})
                    except APIError as e:
                        yield sse(e.body())
                        yield "data: [DONE]\n\n"
                        return
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(last)})
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancel()

            return EventStream(stream())
        evs = []
        try:
            async for ev in job_events(job, request):
                evs.append(ev)
        finally:
            job.cancel()
        if not evs:
            return JSONResponse({}, status_code=499)
        last = evs[-1]
        choice = {
            "index": 0,
            "text": "".join(e.text for e in evs),
            "logprobs": logprobs_of(evs),
            "finish_reason": last.finish_reason,
        }
        return {**head, "choices": [choice], "usage": usage(last)}

    return app


class Guard:
    """ASGI middleware run before any parsing: the API key, then the body-size limit.

    The body is read here with a cap (a chunked upload has no length header to trust) and then
    replayed to the app, so nothing downstream ever holds more than `max_body` bytes.
    """

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                msg = "missing or invalid API key (send Authorization: Bearer KEY)"
                return await APIError(401, msg, code="invalid_api_key")(scope, receive, send)
        too_big = APIError(
            413, f"the request body is larger than {self.max_body} bytes", code="request_too_large"
        )
        size = headers.get(b"content-length", b"0").decode("latin-1")
        if not size.isdigit():
            return await APIError(400, "invalid Content-Length header")(scope, receive, send)
        if int(size) > self.max_body:
            return await too_big(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect notice, when it comes

        await self.app(scope, replay, send)


def model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "qmlx"}


# ---------------------------------------------------------------------- running it


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so a taken port is a one-line user error rather than a log line."""
    if not 0 <= port < 65536:
        raise UserError(f"--port must be within 0..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    max_concurrency: int = 4,
    dtype=None,
    max_body: int = DEFAULT_MAX_BODY,
    loaded: tuple | None = None,
    adapter: str | None = None,
) -> None:
    """Load `model` (with a LoRA `adapter`) and serve it until interrupted (`qmlx serve`).

    `loaded` is an already loaded (model, tokenizer), e.g. rank 0 of a pipeline.
    """
    import uvicorn

    from . import load  # qmlx.load: the loader's load, plus the adapter

    if max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    sock = listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    m, tokenizer = loaded or load(model, dtype=dtype, adapter=adapter)
    model_id = os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model
    engine = Engine(m, tokenizer, model_id=model_id, max_concurrency=max_concurrency)
    engine.start()
    app = create_app(engine, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(app, log_level="info", timeout_keep_alive=30)
    where = f"[{host}]" if ":" in host else host
    print(f"serving {model_id} on http://{where}:{sock.getsockname()[1]}/v1", file=sys.stderr)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
