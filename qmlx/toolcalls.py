"""Tool calls the way Qwen2.5 is trained to make them, translated to and from OpenAI's format.

Qwen2.5's chat template lists the tools in the system prompt and asks the model to answer with

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

blocks. `ToolCallParser` splits the model's streamed text into plain content and such calls,
even when a tag arrives split over several deltas. Small Qwen2.5 models (the 0.5B coder among
them) sometimes answer with the bare call object instead, often in a ```json fence; when the
whole answer is exactly such an object naming one of the offered tools, it counts as a call
too (the parser holds back an answer that starts like one until it is decided).
`template_messages` turns OpenAI-style
messages (tool calls with JSON-string arguments, tool results, content parts) into the dicts
the template expects.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from .decode import stop_holdback

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One parsed call: `arguments` is a JSON string, as OpenAI clients expect."""

    name: str
    arguments: str
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = new_call_id()

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out["index"] = index
        return out


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def parse_call(body: str) -> ToolCall | None:
    """The call in the text between the tags, or None if it is not a usable call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    # Some fine-tunes say "parameters"; an absent argument object means "no arguments".
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # A model that writes the arguments as a JSON string: pass it on if it is JSON.
        try:
            json.loads(args)
        except ValueError:
            return None
        return ToolCall(obj["name"], args)
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


FENCE = re.compile(r"```(?:json)?[ \t]*\n")


def _bare_call_undecided(text: str) -> bool:
    """Could `text` (an answer so far) still turn out to be a bare call object?"""
    s = text.lstrip()
    if not s or "```json".startswith(s):
        return True
    if s.startswith("```"):
        m = FENCE.match(s)
        if m is None:
            return "\n" not in s and "json".startswith(s[3:].rstrip(" \t"))
        s = s[m.end() :].lstrip()
        if not s:
            return True
    return s.startswith("{")


def parse_bare_call(text: str, names: set[str]) -> ToolCall | None:
    """The call if the whole answer is one call object (possibly fenced) naming a known tool."""
    s = text.strip()
    m = FENCE.match(s)
    if m:
        s = s[m.end() :].rstrip()
        if not s.endswith("```"):
            return None
        s = s[:-3]
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    if (
        not isinstance(obj, dict)
        or obj.get("name") not in names
        or not ({"arguments", "parameters"} & set(obj))
    ):
        return None
    return parse_call(s)


class ToolCallParser:
    """Incremental splitter of model output into content text and tool calls.

    `feed(delta)` and `finish()` return a list of events, each ("content", str) or
    ("tool_call", ToolCall). Text that might be the start of `<tool_call>` is held back until
    it is decided. A block whose body is not a valid call is passed through as content, so
    nothing the model wrote is lost. Whitespace between and after calls is dropped.
    With `names` (the offered tools), a whole answer that is a bare call object counts too.
    """

    def __init__(self, names: set[str] | None = None):
        self._buf = ""
        self._in_call = False
        self.calls: list[ToolCall] = []
        self._names = names
        self._bare: str | None = "" if names else None  # an answer that may be a bare call

    def feed(self, delta: str) -> list[tuple[str, Any]]:
        if self._bare is not None:
            self._bare += delta
            if _bare_call_undecided(self._bare):
                return []
            delta, self._bare = self._bare, None  # not a bare call: parse it as usual
        self._buf += delta
        events: list[tuple[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return events
                self._emit_call(self._buf[:end], events)
                self._buf = self._buf[end + len(CLOSE) :]
                self._in_call = False
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                self._content(self._buf[:start], events)
                self._buf = self._buf[start + len(OPEN) :]
                self._in_call = True
                continue
            keep = stop_holdback(self._buf, (OPEN,))  # what may be the start of a tag
            ready, self._buf = (
                self._buf[: len(self._buf) - keep],
                self._buf[len(self._buf) - keep :],
            )
            if self.calls and not ready.strip():
                # Only whitespace so far after a call: keep it until we know more follows.
                self._buf = ready + self._buf
                return events
            self._content(ready, events)
            return events

    def finish(self) -> list[tuple[str, Any]]:
        """Flush at the end of generation; an unclosed last block still counts if it parses."""
        events: list[tuple[str, Any]] = []
        if self._bare is not None:
            text, self._bare = self._bare, None
            call = parse_bare_call(text, self._names)
            if call is not None:
                self.calls.append(call)
                return [("tool_call", call)]
            events = self.feed(text)
        if self._in_call:
            self._emit_call(self._buf, events, closed=False)
        elif not (self.calls and not self._buf.strip()):
            self._content(self._buf, events)
        self._buf, self._in_call = "", False
        return events

    def _content(self, text: str, events: list) -> None:
        if text:
            events.append(("content", text))

    def _emit_call(self, body: str, events: list, closed: bool = True) -> None:
        call = parse_call(body.strip())
        if call is None:
            self._content(OPEN + body + (CLOSE if closed else ""), events)
            return
        self.calls.append(call)
        events.append(("tool_call", call))


# ---------------------------------------------------------------------- messages -> template


class MessageError(ValueError):
    """A message the template cannot be given; `param` names the offending field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def content_text(content: Any, param: str) -> str:
    """A message's content as plain text: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise MessageError(f"only text content parts are supported (got type {kind!r})", f"{param}.{i}")
        parts.append(part["text"])
    return "".join(parts)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> the dicts Qwen's chat template renders.

    Tool-call arguments arrive as JSON strings; the template applies `tojson` to them, so they
    are parsed back to objects first (otherwise the prompt would show a doubly-encoded
    string, unlike anything the model saw in training).
    """
    out = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "developer":  # newer OpenAI clients' name for the system role
            role = "system"
        msg: dict[str, Any] = {
            "role": role,
            "content": content_text(m.get("content"), f"messages.{i}.content"),
        }
        if role == "assistant" and m.get("tool_calls"):
            calls = []
            for j, tc in enumerate(m["tool_calls"]):
                fn = tc["function"]
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise MessageError(
                            "tool call arguments must be a JSON string",
                            f"messages.{i}.tool_calls.{j}.function.arguments",
                        ) from None
                calls.append(
                    {
                        "id": tc.get("id"),
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": args},
                    }
                )
            msg["tool_calls"] = calls
        if role == "tool" and m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out
