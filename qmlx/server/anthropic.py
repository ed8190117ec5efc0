"""The Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`) over the same engine.

A Messages request is translated into the chat request the rest of the server knows (content blocks
-> messages, `tool_use` -> tool calls, `tool_result` -> tool messages, `input_schema` -> parameters,
`tool_choice` any/tool -> required/named), prepared the same way, and its events come back as
Anthropic content blocks: one response body, or the event stream `message_start`,
`content_block_start` / `_delta` / `_stop` (text deltas, `input_json_delta` for a tool call),
`message_delta` (stop_reason, usage), `message_stop`. Refusals use Anthropic's error shape.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Literal

from pydantic import Field, ValidationError

from .prepare import Prepared
from .schemas import APIError, ChatRequest, Strict
from .stream import ChatOutput

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               504: "timeout_error"}  # fmt: skip


def error_body(e: APIError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(e.status, "invalid_request_error" if e.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


class Block(Strict):
    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[Block] | None = None
    is_error: bool = False


class AMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ATool(Strict):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object"})


class AToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class MessagesRequest(Strict):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[ATool] | None = None
    tool_choice: AToolChoice | None = None


class CountRequest(Strict):
    model: str | None = None
    messages: list[AMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    tools: list[ATool] | None = None


def _text(content, where: str) -> str:
    """The text of a string or a list of text blocks."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, b in enumerate(content):
        if b.type != "text":
            raise APIError(
                400, f"{where}.{i}: content blocks of type {b.type!r} are not supported here", where
            )
        parts.append(b.text or "")
    return "".join(parts)


def _messages(req) -> list[dict[str, Any]]:
    """Anthropic messages (and system) as OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, calls = [], []
        for j, b in enumerate(m.content):
            if b.type == "text":
                text.append(b.text or "")
            elif b.type == "tool_use" and m.role == "assistant":
                args = json.dumps(b.input or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": b.id or "",
                        "type": "function",
                        "function": {"name": b.name or "", "arguments": args},
                    }
                )
            elif b.type == "tool_result" and m.role == "user":
                result = _text(b.content, f"{where}.{j}.content")
                out.append({"role": "tool", "tool_call_id": b.tool_use_id or "", "content": result})
            else:
                raise APIError(
                    400, f"{where}.{j}: a {m.role} message cannot hold a {b.type!r} block here", where
                )
        if text or calls or m.role == "user":
            msg: dict[str, Any] = {"role": m.role, "content": "".join(text) if text or not calls else None}
            if calls:
                msg["tool_calls"] = calls
            if msg["content"] is not None or calls:
                out.append(msg)
    return out


def _tools(req) -> tuple[list[dict] | None, Any]:
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
        }
        for t in req.tools or []
    ] or None
    choice = getattr(req, "tool_choice", None)
    if choice is None or tools is None:
        return tools, None
    if choice.type == "tool":
        if not choice.name:
            raise APIError(400, "tool_choice of type tool needs a name", "tool_choice.name")
        return tools, {"type": "function", "function": {"name": choice.name}}
    return tools, {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat(req: MessagesRequest) -> ChatRequest:
    """The chat request a Messages request means."""
    tools, choice = _tools(req)
    body = {
        "messages": _messages(req),
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences,
        "tools": tools,
        "tool_choice": choice,
        "parallel_tool_calls": not (req.tool_choice and req.tool_choice.disable_parallel_tool_use),
    }
    try:
        return ChatRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise APIError(400, f"{where}: {err.get('msg')}", where or None) from None


def count_tokens(engine, req: CountRequest) -> dict[str, int]:
    """/v1/messages/count_tokens: the prompt's length, template and tools included."""
    from ..toolcalls import MessageError, template_messages

    tools, _ = _tools(req)
    try:
        messages = template_messages(_messages(req))
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None
    except APIError:
        raise
    except Exception as e:
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
    return {"input_tokens": len(engine.tokenizer.encode(prompt))}


def _stop(req: MessagesRequest, tok, tokens: list[int], reason: str, calls) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for a finished generation."""
    if calls:
        return "tool_use", None
    if reason == "length":
        return "max_tokens", None
    if req.stop_sequences:
        text = tok.decode(tokens)  # the tokens of a stop string were generated, only not shown
        hits = [(text.find(s), s) for s in req.stop_sequences if s and s in text]
        if hits:
            return "stop_sequence", min(hits)[1]
    return "end_turn", None


class MessagesFormat:
    """Generation events -> an Anthropic message, or its stream of named events."""

    DONE = ""

    def __init__(self, prep: Prepared, req: MessagesRequest, tok, model_id: str):
        self.out, self.req, self.tok, self.job = ChatOutput(prep, tok), req, tok, prep.job
        self.model_id = model_id
        self.id = "msg_" + secrets.token_hex(12)
        self.blocks: list[dict[str, Any]] = []  # the whole message's content
        self.open = False  # a text block is open (streaming)

    @staticmethod
    def encode(event: dict) -> str:
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"

    error_body = staticmethod(error_body)

    def _usage(self, output: int) -> dict[str, int]:
        return {
            "input_tokens": len(self.job.ids),
            "output_tokens": output,
            "cache_read_input_tokens": self.job.cached_tokens,
        }

    def opening(self) -> list[dict]:
        message = {"id": self.id, "type": "message", "role": "assistant", "model": self.model_id, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": self._usage(0)}  # fmt: skip
        return [{"type": "message_start", "message": message}]

    def _add(self, content: str, calls) -> list[dict]:
        events = []
        if content:
            if not self.blocks or self.blocks[-1]["type"] != "text":
                self.blocks.append({"type": "text", "text": ""})
                events.append({"type": "content_block_start", "index": len(self.blocks) - 1,
                               "content_block": {"type": "text", "text": ""}})  # fmt: skip
                self.open = True
            self.blocks[-1]["text"] += content
            delta = {"type": "text_delta", "text": content}
            events.append({"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta})
        for c in calls:
            events += self._close()
            try:
                args = json.loads(c.arguments)
            except ValueError:
                args = {}
            self.blocks.append({"type": "tool_use", "id": c.id, "name": c.name, "input": args})
            i = len(self.blocks) - 1
            events += [
                {"type": "content_block_start", "index": i,
                 "content_block": {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}},
                {"type": "content_block_delta", "index": i,
                 "delta": {"type": "input_json_delta", "partial_json": json.dumps(args, ensure_ascii=False)}},
                {"type": "content_block_stop", "index": i},
            ]  # fmt: skip
        return events

    def _close(self) -> list[dict]:
        if not self.open:
            return []
        self.open = False
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def feed(self, ev) -> list[dict]:
        return self._add(*self.out.feed(ev))

    def finish(self, last) -> list[dict]:
        events = self._add(*self.out.finish()) + self._close()
        reason, seq = _stop(self.req, self.tok, self.out.tokens, last.finish_reason, self.out.calls)
        return events + [
            {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq},
             "usage": {"output_tokens": last.generation_tokens}},
            {"type": "message_stop"},
        ]  # fmt: skip

    def whole(self, last) -> dict:
        reason, seq = _stop(self.req, self.tok, self.out.tokens, last.finish_reason, self.out.calls)
        content = [b for b in self.blocks if b["type"] != "text" or b["text"]]
        if self.out.calls:  # text around a call is the model thinking aloud: keep it, trimmed
            content = [{**b, "text": b["text"].strip()} if b["type"] == "text" else b for b in content]
            content = [b for b in content if b["type"] != "text" or b["text"]]
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model_id, "content": content,
                "stop_reason": reason, "stop_sequence": seq, "usage": self._usage(last.generation_tokens)}  # fmt: skip
