"""The FastAPI app: routes, error objects, authentication and the body-size limit; `serve`.

    GET  /v1/models            the one model served
    POST /v1/chat/completions  chat, streamed (server-sent events) or not; tools; JSON output
    POST /v1/completions       raw text completion
    GET  /health               liveness, queue depth, counters
    GET  /metrics              Prometheus text (qmlx/server/engine.py lists the metrics)

Handlers only validate (qmlx/server/prepare.py), submit a job to the engine and hand it to
`respond` (qmlx/server/stream.py); all model work is the engine's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import socket
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..prompt_cache import check_cache_folder
from . import anthropic, ollama
from .engine import (
    DEFAULT_PROMPT_CACHE_BYTES,
    DEFAULT_PROMPT_CACHE_DISK_BYTES,
    MAX_QUEUE,
    Engine,
    Job,
    metrics_text,
)
from .prepare import Prepared, prepare_chat, prepare_completion, prepare_infill
from .schemas import APIError, ChatRequest, CompletionRequest, InfillRequest
from .stream import ChatFormat, CompletionFormat, InfillFormat, respond

log = logging.getLogger("qmlx.server")

DEFAULT_MAX_BODY = 8 * 1024 * 1024  # bytes; a long-context prompt is well under this


def error_response(e: APIError, path: str = "") -> JSONResponse:
    """The refusal in the shape the route's clients expect (OpenAI's, Anthropic's, Ollama's)."""
    if path.startswith("/v1/messages"):
        body = anthropic.error_body(e)
    elif path.startswith("/api/"):
        body = {"error": e.message}
    else:
        body = e.body()
    return JSONResponse(body, status_code=e.status, headers=e.headers or None)


def create_app(engine: Engine, api_key: str | None = None, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The FastAPI app around a started (or to-be-started) engine."""
    app = FastAPI(title="qmlx", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    tok = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = err.get("ctx", {}).get("error", "")
            msg = f"the request body is not valid JSON: {detail}".rstrip(": ")
            return error_response(APIError(400, msg), request.url.path)
        msg = err.get("msg", "invalid request")
        where = ".".join(loc)
        return error_response(
            APIError(400, f"{where}: {msg}" if where else msg, where or None), request.url.path
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = None if exc.status_code != 404 else "not_found"
        return error_response(APIError(exc.status_code, str(exc.detail), code=code), request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, f"internal error: {type(exc).__name__}"), request.url.path)

    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    @app.get("/health")
    async def health():
        ok = engine.thread.is_alive()
        body = {"status": "ok" if ok else "generation thread stopped", "model": engine.model_id}
        return JSONResponse({**body, **engine.occupancy(), **engine.stats}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(metrics_text(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(engine)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_id:
            raise APIError(404, f"the model {model_id!r} does not exist", "model", code="model_not_found")
        return model_card(engine)

    def start(prep: Prepared) -> Job:
        prep.job.loop = asyncio.get_running_loop()
        engine.submit(prep.job)
        return prep.job

    def head(prefix: str) -> dict[str, Any]:
        return {"id": prefix + secrets.token_hex(12), "created": int(time.time()), "model": engine.model_id}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        prep = await run_in_threadpool(prepare_chat, engine, req)
        job = start(prep)
        return await respond(job, ChatFormat(prep, req, tok, head("chatcmpl-")), request, req.stream)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prep = await run_in_threadpool(prepare_completion, engine, req)
        job = start(prep)
        return await respond(job, CompletionFormat(prep, req, tok, head("cmpl-")), request, req.stream)

    @app.post("/infill")
    async def infill(req: InfillRequest, request: Request):
        prep = await run_in_threadpool(prepare_infill, engine, req)
        job = start(prep)
        return await respond(job, InfillFormat(prep, tok, engine.model_id), request, req.stream)

    @app.post("/v1/messages")
    async def messages(req: anthropic.MessagesRequest, request: Request):
        chat_req = anthropic.to_chat(req)
        prep = await run_in_threadpool(prepare_chat, engine, chat_req)
        job = start(prep)
        fmt = anthropic.MessagesFormat(prep, req, tok, engine.model_id)
        return await respond(job, fmt, request, req.stream)

    @app.post("/api/generate")
    async def ollama_generate(req: ollama.GenerateRequest, request: Request):
        creq = ollama.generate_request(req, tok)
        prep = await run_in_threadpool(prepare_completion, engine, creq)
        job = start(prep)
        return await respond(job, ollama.GenerateFormat(prep, tok, engine.model_id), request, req.stream)

    @app.post("/api/chat")
    async def ollama_chat(req: ollama.OChatRequest, request: Request):
        prep = await run_in_threadpool(prepare_chat, engine, ollama.chat_request(req))
        job = start(prep)
        return await respond(job, ollama.ChatFormatOllama(prep, tok, engine.model_id), request, req.stream)

    @app.get("/api/tags")
    async def ollama_tags():
        return ollama.tags(engine)

    @app.post("/api/show")
    async def ollama_show(body: dict):
        return ollama.show(engine, body.get("model") or body.get("name"))

    @app.get("/api/version")
    async def ollama_version():
        return {"version": "0.6.0"}

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(req: anthropic.CountRequest):
        return await run_in_threadpool(anthropic.count_tokens, engine, req)

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
        path = scope.get("path", "")
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth[:7].lower() == "bearer " else ""
            given = given or headers.get(b"x-api-key", b"").decode("latin-1")  # Anthropic's clients
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                msg = "missing or invalid API key (send Authorization: Bearer KEY or x-api-key: KEY)"
                return await error_response(APIError(401, msg, code="invalid_api_key"), path)(
                    scope, receive, send
                )
        too_big = error_response(
            APIError(413, f"the request body is larger than {self.max_body} bytes", code="request_too_large"),
            path,
        )
        size = headers.get(b"content-length", b"0").decode("latin-1")
        if not size.isdigit():
            return await error_response(APIError(400, "invalid Content-Length header"), path)(
                scope, receive, send
            )
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
    max_concurrency: int = 8,
    dtype=None,
    max_body: int = DEFAULT_MAX_BODY,
    loaded: tuple | None = None,
    adapter: str | None = None,
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
    request_timeout: float | None = None,
    max_queue: int = MAX_QUEUE,
    drain_timeout: float = 60.0,
    prompt_cache_dir: str | None = None,
    prompt_cache_disk_bytes: int = DEFAULT_PROMPT_CACHE_DISK_BYTES,
) -> None:
    """Load `model` (with a LoRA `adapter`) and serve it until interrupted (`qmlx serve`).

    `loaded` is an already loaded (model, tokenizer), e.g. rank 0 of a pipeline. On SIGTERM the
    server stops accepting connections, finishes the requests in flight (up to `drain_timeout`
    seconds), then exits.
    """
    import uvicorn

    from .. import load  # qmlx.load: the loader's load, plus the adapter

    if max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    if request_timeout is not None and request_timeout <= 0:
        raise UserError(f"--request-timeout must be a positive number of seconds, got {request_timeout:g}")
    if drain_timeout < 0:
        raise UserError(f"--drain-timeout must be >= 0 seconds, got {drain_timeout:g}")
    if prompt_cache_dir is not None:
        prompt_cache_dir = check_cache_folder(prompt_cache_dir, create=False)  # before the model loads
    sock = listen(host, port)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(
            f"warning: serving on {host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    m, tokenizer = loaded or load(model, dtype=dtype, adapter=adapter)
    model_id = os.path.basename(model.rstrip("/")) if os.path.isdir(model) else model
    engine = Engine(
        m,
        tokenizer,
        model_id=model_id,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        prompt_cache_bytes=prompt_cache_bytes,
        request_timeout=request_timeout,
        prompt_cache_dir=prompt_cache_dir,
        prompt_cache_disk_bytes=prompt_cache_disk_bytes,
    )
    engine.start()
    app = create_app(engine, api_key=api_key, max_body=max_body)
    # SIGTERM / Ctrl-C: stop accepting, let the requests in flight finish (up to drain_timeout), then exit.
    config = uvicorn.Config(
        app, log_level="info", timeout_keep_alive=30, timeout_graceful_shutdown=drain_timeout
    )
    where = f"[{host}]" if ":" in host else host
    print(f"serving {model_id} on http://{where}:{sock.getsockname()[1]}/v1", file=sys.stderr)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.stop()
        sock.close()
