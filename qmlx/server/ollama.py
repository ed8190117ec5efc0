"""The Ollama API (`/api/generate`, `/api/chat`, `/api/tags`, `/api/show`) over the same engine.

Requests are translated into the chat and completion requests the rest of the server knows:
`options` (temperature, top_p, top_k, min_p, num_predict, stop, seed, repeat_penalty, presence and
frequency penalties) become sampling fields, `format` ("json" or a JSON Schema) a constraint,
`suffix` fill in the middle, `raw: false` the chat template. Answers stream as newline-delimited
JSON (the default, as in Ollama) or come as one object; errors are `{"error": "..."}`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from pydantic import Field, ValidationError

from .prepare import Prepared
from .schemas import APIError, ChatRequest, CompletionRequest, Strict
from .stream import ChatOutput, TextOutput

OPTION_FIELDS = {  # Ollama option -> our sampling field
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class OMessage(Strict):
    role: str
    content: str = ""
    tool_calls: list[dict] | None = None
    images: list[str] | None = None


class GenerateRequest(Strict):
    model: str | None = None
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    raw: bool = False
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    images: list[str] | None = None


class OChatRequest(Strict):
    model: str | None = None
    messages: list[OMessage] = Field(default_factory=list)
    tools: list[dict] | None = None
    stream: bool = True
    format: str | dict | None = None
    options: dict[str, Any] = Field(default_factory=dict)


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in opts.items():
        if k in OPTION_FIELDS and v is not None:
            if k == "num_predict" and isinstance(v, int) and v < 0:
                continue  # -1: no limit (up to the context)
            if k == "seed" and isinstance(v, int) and v < 0:
                continue
            out[OPTION_FIELDS[k]] = (
                float(v)
                if k in ("temperature", "top_p", "min_p", "repeat_penalty") and isinstance(v, int)
                else v
            )
    return out


def _format(fmt) -> dict[str, Any]:
    if fmt is None or fmt == "":
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise APIError(400, f'format must be "json" or a JSON Schema object, got {fmt!r}', "format")


def _validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(400, f"{where}: {err.get('msg')}", where or None) from None


def _no_images(images, where: str) -> None:
    if images:
        raise APIError(400, "images are not supported: this is a text model", where)


def generate_request(req: GenerateRequest, tokenizer) -> CompletionRequest:
    """/api/generate as a text completion: the chat template unless raw, fill in the middle with a suffix."""
    _no_images(req.images, "images")
    prompt = req.prompt
    if req.suffix is None and not req.raw:
        prompt = tokenizer.user_prompt(req.prompt, req.system)
    body = {
        "prompt": prompt,
        "suffix": req.suffix,
        "max_tokens": None,
        **_options(req.options),
        **_format(req.format),
    }
    return _validate(CompletionRequest, {k: v for k, v in body.items() if v is not None or k == "max_tokens"})


def chat_request(req: OChatRequest) -> ChatRequest:
    messages = []
    for i, m in enumerate(req.messages):
        _no_images(m.images, f"messages.{i}.images")
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {"id": f"call_{i}_{j}", "type": "function", "function": {"name": c.get("function", {}).get("name", ""),
                 "arguments": c.get("function", {}).get("arguments", {})}}
                for j, c in enumerate(m.tool_calls)
            ]  # fmt: skip
        messages.append(msg)
    if not messages:
        raise APIError(400, "messages must not be empty", "messages")
    body = {"messages": messages, "tools": req.tools or None, **_options(req.options), **_format(req.format)}
    return _validate(ChatRequest, {k: v for k, v in body.items() if v is not None})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Ollama(TextOutput):
    """What /api/generate and /api/chat answers share: NDJSON lines and the final statistics."""

    DONE = ""
    PING = None  # NDJSON has no comment lines: no heartbeat
    MEDIA = "application/x-ndjson"

    def __init__(self, prep: Prepared, tok, model_id: str):
        super().__init__(prep.job)
        self.tok, self.model_id = tok, model_id
        self.start = time.monotonic_ns()

    @staticmethod
    def encode(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    @staticmethod
    def error_body(e: APIError) -> dict:
        return {"error": e.message}

    def _head(self) -> dict:
        return {"model": self.model_id, "created_at": _now()}

    def _stats(self, last) -> dict:
        total = time.monotonic_ns() - self.start
        prompt_ns = int(last.time_to_first_token * 1e9)
        return {
            "done": True,
            "done_reason": "length" if last.finish_reason == "length" else "stop",
            "total_duration": total,
            "load_duration": 0,
            "prompt_eval_count": last.prompt_tokens,
            "prompt_eval_duration": prompt_ns,
            "eval_count": last.generation_tokens,
            "eval_duration": max(total - prompt_ns, 0),
        }


class GenerateFormat(_Ollama):
    def feed(self, ev) -> list[dict]:
        text = self._text(ev)
        return [{**self._head(), "response": text, "done": False}] if text else []

    def finish(self, last) -> list[dict]:
        return [{**self._head(), "response": "", **self._stats(last)}]

    def whole(self, last) -> dict:
        return {**self._head(), "response": "".join(self.texts), **self._stats(last)}


class ChatFormatOllama(_Ollama):
    def __init__(self, prep: Prepared, tok, model_id: str):
        super().__init__(prep, tok, model_id)
        self.out = ChatOutput(prep, tok)

    def _message(self, content: str, calls) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            msg["tool_calls"] = [
                {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in calls
            ]
        return msg

    def feed(self, ev) -> list[dict]:
        content, calls = self.out.feed(ev)
        self.texts.append(content)
        if not (content or calls):
            return []
        return [{**self._head(), "message": self._message(content, calls), "done": False}]

    def finish(self, last) -> list[dict]:
        content, calls = self.out.finish()
        self.texts.append(content)
        out = (
            [{**self._head(), "message": self._message(content, calls), "done": False}]
            if content or calls
            else []
        )
        return out + [{**self._head(), "message": self._message("", []), **self._stats(last)}]

    def whole(self, last) -> dict:
        body = "".join(self.texts)
        if self.out.calls:
            body = body.strip()
        return {**self._head(), "message": self._message(body, self.out.calls), **self._stats(last)}


def tags(engine) -> dict:
    return {"models": [model_entry(engine)]}


def model_entry(engine) -> dict:
    cfg = engine.model.config
    q = getattr(cfg, "quantization", None) or {}
    bits = q.get("bits") if isinstance(q, dict) else None
    return {
        "name": engine.model_id,
        "model": engine.model_id,
        "modified_at": _now(),
        "size": 0,
        "digest": "",
        "details": {
            "format": "safetensors",
            "family": "qwen2",
            "families": ["qwen2"],
            "parameter_size": "",
            "quantization_level": f"Q{bits}" if bits else "F16",
        },
    }


def show(engine, model: str | None) -> dict:
    if model and model != engine.model_id:
        raise APIError(404, f"model '{model}' not found", "model")
    from ..fim import MIDDLE, PREFIX, SUFFIX

    tok = engine.tokenizer
    caps = ["completion", "tools"]
    if all(tok.token_to_id(t) is not None for t in (PREFIX, SUFFIX, MIDDLE)):
        caps.append("insert")  # fill in the middle
    return {
        "modelfile": "",
        "parameters": "",
        "template": tok.chat_template or "",
        "details": model_entry(engine)["details"],
        "model_info": {"general.architecture": "qwen2", "qwen2.context_length": engine.context},
        "capabilities": caps,
    }
