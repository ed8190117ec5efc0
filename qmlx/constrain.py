"""Constrained JSON decoding: only tokens that keep the output a valid JSON(-schema) prefix.

Two parts:

* `Grammar`: an incremental checker over bytes. `advance(state, data)` returns the state after
  `data`, or None when `data` cannot continue a value that matches the schema. States are
  immutable, so every candidate token can be tried from the same state. `closure(state)` is
  the shortest text that completes the value, used to finish in time when max_tokens runs out.
* `JsonLogitsProcessor`: a logits processor for `generate_step` that, at each step, tries the
  model's top candidate tokens in logit order and masks out every token that would break the
  output; the sampler then picks among the survivors with the request's temperature.

Supported JSON Schema subset (anything else is refused with `SchemaError`, naming it):
`type` (one or a list of object, array, string, number, integer, boolean, null),
`properties`, `required`, `additionalProperties` (bool or schema), `items`, `minItems`,
`maxItems`, `enum`, `const`, `anyOf`, and local `$ref` into `$defs`/`definitions`.
Annotations (`title`, `description`, `default`, `examples`, `format`, ...) are accepted and
ignored; `format` is an annotation in current JSON Schema, so it is not enforced.
Integers are written without fraction or exponent. Strings follow JSON's escaping rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np

MAX_WS = 48  # consecutive whitespace bytes allowed between tokens; stops endless blank runs
MAX_NUMBER = 24  # bytes in one number
MAX_KEY = 256  # bytes in one free-form object key
WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")

SUPPORTED = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions",
}  # fmt: skip
ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "format", "strict",
}  # fmt: skip
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class SchemaError(ValueError):
    """A schema outside the supported subset; the message names the keyword and where."""


# ---------------------------------------------------------------------- schema -> nodes


class Node:
    """A compiled schema: the alternatives a value may take (one per JSON type or literal set)."""

    def __init__(self):
        self.alts: list[Alt] = []
        self.min: bytes | None = None  # its shortest value, once computed (see `minimal`)


class Alt:
    """One concrete shape of value."""

    kind = ""


class AnyAlt(Alt):
    kind = "any"


class ObjectAlt(Alt):
    kind = "object"

    def __init__(self, properties: dict[str, Node], required: list[str], additional: Node | None):
        self.properties = properties
        self.keys = {k: json.dumps(k, ensure_ascii=False).encode() for k in properties}
        self.required = required
        self.additional = additional  # None: no other keys allowed

    def value_node(self, key: str) -> Node | None:
        return self.properties.get(key, self.additional)

    def more_keys(self, seen: frozenset) -> bool:
        return self.additional is not None or any(k not in seen for k in self.properties)


class ArrayAlt(Alt):
    kind = "array"

    def __init__(self, items: Node, min_items: int, max_items: int | None):
        self.items, self.min_items, self.max_items = items, min_items, max_items


class StringAlt(Alt):
    kind = "string"


class NumberAlt(Alt):
    kind = "number"

    def __init__(self, integer: bool):
        self.integer = integer


class LiteralAlt(Alt):
    """A fixed set of serialized values: true/false, null, enum, const."""

    kind = "literal"

    def __init__(self, options: Iterable[bytes]):
        self.options = tuple(sorted(set(options), key=lambda o: (len(o), o)))


def _literal(values: list) -> LiteralAlt:
    return LiteralAlt(json.dumps(v, ensure_ascii=False).encode() for v in values)


ANY = Node()
ANY.alts = [AnyAlt()]


class _Compiler:
    def __init__(self, root: dict, strict: bool):
        self.root, self.strict = root, strict
        self.refs: dict[str, Node] = {}
        self.unsupported: list[str] = []
        self.made: list[tuple[Node, str]] = []  # every node and where it came from

    def node(self, schema: Any, where: str) -> Node:
        if schema is True or schema == {}:
            return ANY
        if schema is False or not isinstance(schema, dict):
            raise SchemaError(f"{where or 'schema'}: expected a schema object, got {schema!r}")
        bad = sorted(k for k in schema if k not in SUPPORTED and k not in ANNOTATIONS)
        if bad:
            self.unsupported += [f"{k} (at {where or 'the root'})" for k in bad]
        if "$ref" in schema:
            return self.ref(schema["$ref"], where)
        node = Node()
        self.made.append((node, where))
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}.anyOf: expected a non-empty list")
            for i, sub in enumerate(options):
                node.alts += self.node(sub, f"{where}.anyOf.{i}").alts
            return node
        if "const" in schema:
            node.alts = [_literal([schema["const"]])]
            return node
        if "enum" in schema:
            if not isinstance(schema["enum"], list) or not schema["enum"]:
                raise SchemaError(f"{where}.enum: expected a non-empty list")
            node.alts = [_literal(schema["enum"])]
            return node
        types = schema.get("type")
        if types is None:
            # Untyped: infer from the keywords present, else any value.
            if "properties" in schema or "required" in schema or "additionalProperties" in schema:
                types = ["object"]
            elif "items" in schema:
                types = ["array"]
            else:
                return ANY
        types = [types] if isinstance(types, str) else types
        for t in types:
            if t not in TYPES:
                raise SchemaError(f"{where}.type: unknown type {t!r}")
            node.alts.append(self.alt(t, schema, where))
        return node

    def alt(self, t: str, s: dict, where: str) -> Alt:
        if t == "object":
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise SchemaError(f"{where}.properties: expected an object")
            properties = {k: self.node(v, f"{where}.properties.{k}") for k, v in props.items()}
            extra = s.get("additionalProperties", True)
            additional = None if extra is False else self.node(extra, f"{where}.additionalProperties")
            required = s.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise SchemaError(f"{where}.required: expected a list of property names")
            for r in required:
                if r not in properties and additional is None:
                    raise SchemaError(
                        f"{where}.required: {r!r} is required but not allowed "
                        "(not in properties, and additionalProperties is false)"
                    )
            return ObjectAlt(properties, list(dict.fromkeys(required)), additional)
        if t == "array":
            items = self.node(s.get("items", True), f"{where}.items")
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise SchemaError(
                    f"{where}: minItems/maxItems must be integers with 0 <= minItems <= maxItems"
                )
            return ArrayAlt(items, lo, hi)
        if t == "string":
            return StringAlt()
        if t in ("number", "integer"):
            return NumberAlt(t == "integer")
        if t == "boolean":
            return LiteralAlt([b"true", b"false"])
        return LiteralAlt([b"null"])

    def ref(self, ref: Any, where: str) -> Node:
        prefixes = ("#/$defs/", "#/definitions/")
        if not isinstance(ref, str) or not ref.startswith(prefixes):
            raise SchemaError(f"{where}.$ref: only local references to #/$defs/... are supported")
        if ref in self.refs:  # recursion or reuse: share the node, filled in once
            return self.refs[ref]
        node = self.refs[ref] = Node()
        section, name = ref[2:].split("/", 1)
        target = self.root.get(section, {}).get(name)
        if target is None:
            raise SchemaError(f"{where}.$ref: {ref} is not defined")
        node.alts = self.node(target, f"{section}.{name}").alts
        return node


def compile_schema(schema: Any, strict: bool = True) -> Node:
    """Compile a JSON schema; with strict=False, unsupported keywords are ignored (looser)."""
    c = _Compiler(schema if isinstance(schema, dict) else {}, strict)
    node = c.node(schema, "")
    if strict and c.unsupported:
        raise SchemaError("unsupported JSON Schema keywords: " + ", ".join(c.unsupported))
    # Every part must have a finite value, or an output that starts one could never end.
    for n, where in c.made:
        try:
            minimal(n)
        except SchemaError as e:
            raise SchemaError(f"{where or 'the root'}: {e}") from None
    return node


# ---------------------------------------------------------------------- the incremental parser
#
# A parse is a stack of frames (a linked list of (frame, parent) pairs). Feeding a byte to the
# top frame gives zero or more steps:
#   ("set", frame)            replace the top frame
#   ("push", frame, child)    replace the top frame, then push a child value
#   ("pop", result)           the value is complete; the parent is told (with the result, e.g.
#                             the key an object just read)
# plus a flag saying whether the byte must be fed again to the new top (a number only knows it
# has ended when the next byte is not part of it). Several steps mean several alternatives
# (anyOf, enum values that prefix one another); a state is the tuple of live stacks.


class Frame:
    def feed(self, b: int) -> list:
        raise NotImplementedError

    def child_done(self, result) -> Frame:
        raise NotImplementedError

    def finish(self) -> list[tuple[bytes, Any]]:
        """Ways to complete this frame (its child being done): (bytes, result) pairs.

        Several when the choice matters further up: which key an object key becomes decides
        what else the object still needs, so the shortest whole completion is picked above.
        """
        raise NotImplementedError


def minimal(node: Node, depth: int = 0) -> bytes:
    """The shortest serialized value of `node` (remembered on the node)."""
    if node.min is not None:
        return node.min
    if depth > 32:
        raise SchemaError("no finite value (required properties recurse forever)")
    best = None
    for alt in node.alts:
        try:
            v = _minimal_alt(alt, depth)
        except SchemaError:
            continue  # this alternative recurses forever; another one may not
        if best is None or len(v) < len(best):
            best = v
    if best is None:
        raise SchemaError("no finite value (required properties recurse forever)")
    node.min = best
    return best


def _minimal_alt(alt: Alt, depth: int) -> bytes:
    if alt.kind == "any" or alt.kind == "number":
        return b"0"
    if alt.kind == "string":
        return b'""'
    if alt.kind == "literal":
        return alt.options[0]
    if alt.kind == "array":
        return b"[" + b",".join([minimal(alt.items, depth + 1)] * alt.min_items) + b"]"
    return b"{" + _required_entries(alt, frozenset(), first=True, depth=depth) + b"}"


def _required_entries(alt: ObjectAlt, seen: frozenset, first: bool, depth: int = 0) -> bytes:
    out = b""
    for k in alt.required:
        if k in seen:
            continue
        key = alt.keys.get(k) or json.dumps(k, ensure_ascii=False).encode()
        out += (b"" if first else b",") + key + b":" + minimal(alt.value_node(k), depth + 1)
        first = False
    return out


def _start_frames(node: Node) -> list[Frame]:
    """Frames that begin a value of `node`, one per alternative (before its first byte)."""
    frames: list[Frame] = []
    for alt in node.alts:
        if alt.kind == "any":
            frames += [
                ObjectFrame(ObjectAlt({}, [], ANY), "start"),
                ArrayFrame(ArrayAlt(ANY, 0, None), "start"),
                StringFrame("start"),
                NumberFrame(False, "start"),
                LiteralFrame((b"true", b"false", b"null"), 0),
            ]
        elif alt.kind == "object":
            frames.append(ObjectFrame(alt, "start"))
        elif alt.kind == "array":
            frames.append(ArrayFrame(alt, "start"))
        elif alt.kind == "string":
            frames.append(StringFrame("start"))
        elif alt.kind == "number":
            frames.append(NumberFrame(alt.integer, "start"))
        else:
            frames.append(LiteralFrame(alt.options, 0))
    return frames


class ValueFrame(Frame):
    """Before a value: whitespace, then the first byte picks the alternative(s)."""

    __slots__ = ("node", "ws")

    def __init__(self, node: Node, ws: int = 0):
        self.node, self.ws = node, ws

    def feed(self, b):
        if b in WS:
            return [("set", ValueFrame(self.node, self.ws + 1), False)] if self.ws < MAX_WS else []
        steps = []
        for f in _start_frames(self.node):
            steps += f.feed(b)
        return steps

    def finish(self):
        return [(minimal(self.node), None)]


class LiteralFrame(Frame):
    __slots__ = ("options", "pos")

    def __init__(self, options: tuple[bytes, ...], pos: int):
        self.options, self.pos = options, pos

    def feed(self, b):
        p = self.pos
        live = tuple(o for o in self.options if len(o) > p and o[p] == b)
        steps = [("pop", o, False) for o in live if len(o) == p + 1]
        longer = tuple(o for o in live if len(o) > p + 1)
        if longer:
            steps.append(("set", LiteralFrame(longer, p + 1), False))
        return steps

    def finish(self):
        return [(o[self.pos :], o) for o in self.options]


def _utf8_lead(b: int) -> tuple[int, int, int] | None:
    """For a lead byte: (continuation bytes needed, range of the next byte), None if invalid."""
    if 0xC2 <= b <= 0xDF:
        return 1, 0x80, 0xBF
    if 0xE0 <= b <= 0xEF:  # E0: no overlong forms; ED: no surrogates
        return 2, 0xA0 if b == 0xE0 else 0x80, 0x9F if b == 0xED else 0xBF
    if 0xF0 <= b <= 0xF4:  # F0: no overlong forms; F4: nothing past U+10FFFF
        return 3, 0x90 if b == 0xF0 else 0x80, 0x8F if b == 0xF4 else 0xBF
    return None


class StringFrame(Frame):
    """A JSON string of valid UTF-8; with a `raw` buffer its bytes become the result (keys)."""

    __slots__ = ("hi", "lo", "need", "phase", "raw")

    def __init__(self, phase: str, raw: bytes | None = None, need: int = 0, lo: int = 0, hi: int = 0):
        # phase: start, text, esc, hex1..hex4; need/lo/hi: the rest of a multi-byte character
        self.phase, self.raw, self.need, self.lo, self.hi = phase, raw, need, lo, hi

    def _next(self, phase: str, b: int, need: int = 0, lo: int = 0x80, hi: int = 0xBF) -> StringFrame:
        raw = self.raw
        if raw is not None:
            raw += bytes([b])
        return StringFrame(phase, raw, need, lo, hi)

    def feed(self, b):
        ph = self.phase
        if ph == "start":
            return [("set", StringFrame("text", self.raw), False)] if b == 0x22 else []
        if ph == "text":
            if self.raw is not None and len(self.raw) >= MAX_KEY:
                return []
            if self.need:
                if not self.lo <= b <= self.hi:
                    return []
                return [("set", self._next("text", b, self.need - 1), False)]
            if b == 0x22:
                return [("pop", self.raw, False)]
            if b < 0x20:
                return []
            if b >= 0x80:
                lead = _utf8_lead(b)
                return [("set", self._next("text", b, *lead), False)] if lead else []
            return [("set", self._next("esc" if b == 0x5C else "text", b), False)]
        if ph == "esc":
            if b in b'"\\/bfnrt':
                return [("set", self._next("text", b), False)]
            return [("set", self._next("hex4", b), False)] if b == 0x75 else []
        if chr(b) in "0123456789abcdefABCDEF":
            n = int(ph[3]) - 1
            return [("set", self._next(f"hex{n}" if n else "text", b), False)]
        return []

    def finish(self):
        if self.phase == "start":
            return [(b'""', b"" if self.raw is not None else None)]
        if self.phase == "esc":
            tail = b"n"
        elif self.phase.startswith("hex"):
            tail = b"0" * int(self.phase[3])
        else:  # finish a half-written character with its smallest continuation
            tail = bytes([self.lo] + [0x80] * (self.need - 1)) if self.need else b""
        raw = None if self.raw is None else self.raw + tail
        return [(tail + b'"', raw)]


class NumberFrame(Frame):
    __slots__ = ("integer", "n", "phase")

    COMPLETE = frozenset({"zero", "int", "frac", "exp_int"})

    def __init__(self, integer: bool, phase: str, n: int = 0):
        self.integer, self.phase, self.n = integer, phase, n

    def _to(self, phase):
        if self.n >= MAX_NUMBER:
            return []
        return [("set", NumberFrame(self.integer, phase, self.n + 1), False)]

    def feed(self, b):
        ph, digit = self.phase, b in DIGITS
        if ph in ("start", "sign"):
            if b == 0x2D and ph == "start":
                return self._to("sign")
            return self._to("zero" if b == 0x30 else "int") if digit else []
        if ph == "int" and digit:
            return self._to("int")
        if ph in ("zero", "int") and not self.integer:
            if b == 0x2E:
                return self._to("dot")
            if b in (0x65, 0x45):
                return self._to("exp")
        if ph in ("dot", "frac") and digit:
            return self._to("frac")
        if ph == "frac" and b in (0x65, 0x45):
            return self._to("exp")
        if ph == "exp" and b in (0x2B, 0x2D):
            return self._to("exp_sign")
        if ph in ("exp", "exp_sign", "exp_int") and digit:
            return self._to("exp_int")
        if ph in self.COMPLETE:
            return [("pop", None, True)]  # the byte belongs to whatever follows the number
        return []

    def finish(self):
        return [(b"" if self.phase in self.COMPLETE else b"0", None)]


class ObjectFrame(Frame):
    __slots__ = ("alt", "key", "phase", "seen", "ws")

    def __init__(self, alt: ObjectAlt, phase: str, seen=frozenset(), key=None, ws: int = 0):
        # phase: start, first (after "{"), key (after ","), colon (after a key), value, after
        self.alt, self.phase, self.seen, self.key, self.ws = alt, phase, seen, key, ws

    def _key_frame(self) -> Frame:
        if self.alt.additional is None:
            return LiteralFrame(tuple(v for k, v in self.alt.keys.items() if k not in self.seen), 0)
        return StringFrame("start", b"")

    def feed(self, b):
        a, ph = self.alt, self.phase
        if ph == "start":
            return [("set", ObjectFrame(a, "first"), False)] if b == 0x7B else []
        if b in WS:
            if ph == "value" or self.ws >= MAX_WS:
                return []
            return [("set", ObjectFrame(a, ph, self.seen, self.key, self.ws + 1), False)]
        if ph in ("first", "key") and b == 0x22 and a.more_keys(self.seen):
            return [("push", ObjectFrame(a, "colon", self.seen), self._key_frame(), True)]
        if ph in ("first", "after") and b == 0x7D:
            return [("pop", None, False)] if all(r in self.seen for r in a.required) else []
        if ph == "after" and b == 0x2C and a.more_keys(self.seen):
            return [("set", ObjectFrame(a, "key", self.seen), False)]
        if ph == "colon" and b == 0x3A and self.key is not None:
            node = a.value_node(self.key)
            return [("push", ObjectFrame(a, "value", self.seen | {self.key}), ValueFrame(node), False)]
        return []

    def child_done(self, result):
        if self.phase == "colon":  # the key was read: quoted (a listed name) or raw (free)
            try:
                key = json.loads(result if self.alt.additional is None else b'"' + result + b'"')
            except ValueError:  # an invalid escape or UTF-8 sequence in a free key
                return DeadFrame()
            if key in self.seen or self.alt.value_node(key) is None:
                return DeadFrame()
            return ObjectFrame(self.alt, "colon", self.seen, key)
        return ObjectFrame(self.alt, "after", self.seen)

    def finish(self):
        a, ph = self.alt, self.phase
        if ph == "colon":
            seen = self.seen | {self.key}
            body = b":" + minimal(a.value_node(self.key)) + _required_entries(a, seen, first=False)
            return [(body + b"}", None)]
        if ph == "key":  # after a comma a key must follow: any one that may
            keys = [k for k in a.required if k not in self.seen]
            keys = keys or [k for k in a.properties if k not in self.seen] or [""]
            out = []
            for k in keys:
                key, seen = json.dumps(k, ensure_ascii=False).encode(), self.seen | {k}
                entry = key + b":" + minimal(a.value_node(k)) + _required_entries(a, seen, False)
                out.append((entry + b"}", None))
            return out
        head = b"{" if ph == "start" else b""
        first = ph in ("start", "first")
        return [(head + _required_entries(a, self.seen, first) + b"}", None)]


class ArrayFrame(Frame):
    __slots__ = ("alt", "count", "phase", "ws")

    def __init__(self, alt: ArrayAlt, phase: str, count: int = 0, ws: int = 0):
        self.alt, self.phase, self.count, self.ws = (
            alt,
            phase,
            count,
            ws,
        )  # phase: start, first, value, after

    def feed(self, b):
        a, ph = self.alt, self.phase
        if ph == "start":
            return [("set", ArrayFrame(a, "first"), False)] if b == 0x5B else []
        if b in WS and ph != "value":
            return [("set", ArrayFrame(a, ph, self.count, self.ws + 1), False)] if self.ws < MAX_WS else []
        if b == 0x5D and ph in ("first", "after"):
            return [("pop", None, False)] if self.count >= a.min_items else []
        room = a.max_items is None or self.count < a.max_items
        if ph == "first" and room:
            return [("push", ArrayFrame(a, "value", self.count), ValueFrame(a.items), True)]
        if ph == "after" and b == 0x2C and room:
            return [("push", ArrayFrame(a, "value", self.count), ValueFrame(a.items), False)]
        return []

    def child_done(self, result):
        return ArrayFrame(self.alt, "after", self.count + 1)

    def finish(self):
        a = self.alt
        need = max(0, a.min_items - self.count)
        items = [minimal(a.items)] * need
        lead = b"," if items and self.phase == "after" else b""
        return [((b"[" if self.phase == "start" else b"") + lead + b",".join(items) + b"]", None)]


class DeadFrame(Frame):
    """A branch that turned out invalid after the fact (e.g. a repeated key)."""

    def feed(self, b):
        return []

    def finish(self):
        return []


class RootFrame(Frame):
    __slots__ = ("done", "node")

    def __init__(self, node: Node, done: bool = False):
        self.node, self.done = node, done

    def feed(self, b):
        return []  # whitespace after the value is not needed: the processor ends with EOS

    def child_done(self, result):
        return RootFrame(self.node, True)

    def finish(self):
        return [(b"", None)]


# ---------------------------------------------------------------------- grammar over states


def _feed_stack(stack, b: int, out: list) -> None:
    frame, parent = stack
    for step in frame.feed(b):
        kind, refeed = step[0], step[-1]
        if kind == "set":
            new = (step[1], parent)
        elif kind == "push":
            new = (step[2], (step[1], parent))
        else:
            pframe, grand = parent
            new = (pframe.child_done(step[1]), grand)
            if isinstance(new[0], DeadFrame):
                continue
        if refeed:
            _feed_stack(new, b, out)
        else:
            out.append(new)


def _stack_finish(stack) -> bytes | None:
    """Shortest completion of one stack (None if the stack is a dead branch)."""
    frame, parent = stack
    best = None
    for text, result in frame.finish():
        if parent is not None:
            pframe, grand = parent
            rest = _stack_finish((pframe.child_done(result), grand))
            if rest is None:
                continue
            text += rest
        if best is None or len(text) < len(best):
            best = text
    return best


def _can_end(stack) -> bool:
    frame, parent = stack
    while isinstance(frame, NumberFrame) and frame.phase in NumberFrame.COMPLETE:
        frame, parent = parent
        frame = frame.child_done(None)
    return isinstance(frame, RootFrame) and frame.done


class Grammar:
    """A JSON value matching a compiled schema, checked incrementally over bytes."""

    def __init__(self, node: Node):
        self.node = node

    @classmethod
    def for_schema(cls, schema: Any, strict: bool = True) -> Grammar:
        return cls(compile_schema(schema, strict))

    @classmethod
    def json_object(cls) -> Grammar:
        """OpenAI's json_object mode: any JSON object."""
        return cls(compile_schema({"type": "object"}))

    def start(self) -> tuple:
        # No whitespace before the value: it would only be a way to waste tokens.
        return ((ValueFrame(self.node, ws=MAX_WS), (RootFrame(self.node), None)),)

    def advance(self, state: tuple, data: bytes) -> tuple | None:
        """The state after `data`, or None if `data` cannot continue a valid value."""
        stacks = state
        for b in data:
            nxt: list = []
            for s in stacks:
                _feed_stack(s, b, nxt)
            if not nxt:
                return None
            stacks = tuple(nxt)
        return stacks

    def can_end(self, state: tuple) -> bool:
        """True if the output so far is a complete value (generation may stop here)."""
        return any(_can_end(s) for s in state)

    def is_closed(self, state: tuple) -> bool:
        """True if nothing but the end can follow (the top-level value is closed)."""
        return all(isinstance(s[0], RootFrame) for s in state)

    def closure(self, state: tuple) -> bytes:
        """The shortest bytes that complete the value."""
        options = [t for t in (_stack_finish(s) for s in state) if t is not None]
        return min(options, key=len) if options else b""

    def matches(self, text: str) -> bool:
        state = self.advance(self.start(), text.encode())
        return state is not None and self.can_end(state)


# ---------------------------------------------------------------------- the logits processor


class JsonLogitsProcessor:
    """Masks logits so the generated text stays a valid prefix of a schema-matching value.

    Called by `generate_step` as `(history, logits) -> logits` once per step, in order; it
    learns the previous step's token from the tail of `history`. It must come after any
    penalty processors so it sees the final logits. `candidates` is how many of the most
    likely tokens are tried per step (trying all 150k would cost seconds per token); if none
    of them fits, the next byte of the shortest completion is forced, which always fits.
    """

    def __init__(self, grammar: Grammar, tokenizer, max_tokens: int, candidates: int = 128):
        self.grammar, self.tok, self.max_tokens = grammar, tokenizer, max_tokens
        self.candidates = candidates
        self.eos = list(tokenizer.eos_token_ids)
        self.state = grammar.start()
        self.steps = 0  # tokens generated so far
        self._seen: int | None = None  # history length already consumed

    def _consume(self, history) -> None:
        if self._seen is None:
            self._seen = int(history.size)
            return
        new = history[self._seen :].tolist()
        self._seen += len(new)
        for t in new:
            self.steps += 1
            if t in self.eos:
                continue
            nxt = self.grammar.advance(self.state, self.tok.token_bytes(t) or b"")
            # Cannot happen for tokens this processor allowed; keep the last good state if so.
            self.state = nxt if nxt is not None else self.state

    def allowed(self, logits_row: np.ndarray) -> list[int]:
        """Token ids allowed next, given the (1-D, float) logits of this step."""
        g, state = self.grammar, self.state
        if g.is_closed(state):
            return self.eos[:1]
        remaining = self.max_tokens - self.steps  # including this step's token
        close = g.closure(state)
        if remaining <= len(close):
            return [self._forced(close)]
        k = min(self.candidates, logits_row.size - 1)
        top = np.argpartition(-logits_row, k)[:k]
        top = top[np.argsort(-logits_row[top], kind="stable")]
        out = []
        check_budget = remaining <= 4 * len(close) + 256
        for t in top.tolist():
            if t in self.eos:
                if g.can_end(state):
                    out.append(t)
                continue
            if self.tok.is_special(t):
                continue
            data = self.tok.token_bytes(t)
            if not data:
                continue
            nxt = g.advance(state, data)
            if nxt is None:
                continue
            if check_budget and len(g.closure(nxt)) > remaining - 1:
                continue
            out.append(t)
        return out or [self._forced(close)]

    def _forced(self, close: bytes) -> int:
        """A token whose bytes start the shortest completion (always a valid continuation)."""
        ids = self.tok.encode(close.decode("utf-8", errors="replace"))
        if ids and close.startswith(self.tok.token_bytes(ids[0]) or b"\xff"):
            return ids[0]
        # A byte-level vocabulary has a token for every single byte.
        from .tokenizer import byte_decoder

        char = next(c for c, b in byte_decoder().items() if b == close[0])
        t = self.tok.token_to_id(char)
        return t if t is not None else ids[0]

    def __call__(self, history, logits):
        import mlx.core as mx

        self._consume(history)
        row = np.array(logits[0].astype(mx.float32))
        allowed = self.allowed(row)
        bias = np.full(row.shape, -np.inf, dtype=np.float32)
        bias[allowed] = 0.0
        return logits + mx.array(bias)[None]
