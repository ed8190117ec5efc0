"""Constrained decoding on llguidance: JSON Schema, regular expressions, Lark/GBNF grammars, choices.

The grammar engine is llguidance (Rust, from PyPI): it compiles a grammar against the model's
vocabulary and computes, at each step, the whole vocabulary's mask of tokens that keep the output
a valid prefix (~0.1 ms on Qwen's 152K tokens). This module is the thin adapter around it:

* `Constraint`: a compiled, checked grammar (immutable; one per request). Grammar errors and JSON
  Schema keywords llguidance does not implement raise `ConstraintError`, which names them:
  nothing is silently ignored. `uniqueItems` is the one keyword added here: over a small finite
  item domain (enum / const / boolean items) it is expanded into the allowed arrays.
* `bridge(tokenizer, n_vocab)`: the tokenizer handed to llguidance (its `tokenizer.json`: the
  byte-level BPE with every added and special token; EOS = the model's end tokens; ids past the
  tokenizer's vocabulary up to the model's logit width are never allowed). Built once per
  tokenizer (~1.5 s), then shared by every request.
* `ConstraintProcessor`: a logits processor `(history, logits) -> logits` for `generate_step` and
  the batch decoder: it feeds the matcher the tokens it has not seen, then masks the logits. Its
  `completion()` is text that closes an output cut short by `max_tokens`, so it still parses.
"""

from __future__ import annotations

import codecs
import itertools
import json
import threading
import weakref
from typing import Any

import llguidance as lg
import mlx.core as mx
import numpy as np

from .tokenizer import byte_decoder

# Whitespace between JSON tokens: bounded, so a model cannot wander into an endless blank run.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}
UNIQUE_LIMIT = 512  # at most this many arrays when uniqueItems is expanded
CLOSE_STEPS = 512  # tokens completion() may add before giving up
REPEAT = 4  # completion() prefers another character after this many of one in a row


def _closers() -> bytes:
    """The order in which completion() tries single characters: closers, punctuation, digits, letters."""
    first = b'"}])'
    punct = bytes(b for b in range(0x21, 0x7F) if not chr(b).isalnum() and b not in first)
    return first + punct + b"0123456789" + b"abcdefghijklmnopqrstuvwxyz"


_CLOSERS = _closers()


class ConstraintError(ValueError):
    """A grammar, regex or schema that cannot be used; the message names the keyword or position."""


def _unique_arrays(node: dict, where: str) -> dict:
    """An array schema with uniqueItems: true over a finite item domain, as the list of its arrays."""
    items = node.get("items", {})
    if isinstance(items, dict) and "enum" in items and set(items) <= {"enum", "type", "description", "title"}:
        domain = list(items["enum"])
    elif (
        isinstance(items, dict)
        and "const" in items
        and set(items) <= {"const", "type", "description", "title"}
    ):
        domain = [items["const"]]
    elif isinstance(items, dict) and items.get("type") == "boolean" and set(items) <= {"type", "description"}:
        domain = [False, True]
    else:
        raise ConstraintError(
            f"{where}: uniqueItems is supported only over enum, const or boolean items (a finite set)"
        )
    extra = set(node) - {"type", "items", "uniqueItems", "minItems", "maxItems", "description", "title"}
    if extra:
        raise ConstraintError(f"{where}: uniqueItems cannot be combined with {sorted(extra)[0]}")
    lo, hi = node.get("minItems", 0), min(node.get("maxItems", len(domain)), len(domain))
    arrays = []
    for n in range(lo, hi + 1):
        for combo in itertools.permutations(domain, n):
            arrays.append(list(combo))
            if len(arrays) > UNIQUE_LIMIT:
                raise ConstraintError(f"{where}: uniqueItems allows more than {UNIQUE_LIMIT} arrays here")
    if not arrays:
        raise ConstraintError(f"{where}: no array satisfies minItems/maxItems with uniqueItems")
    return {"enum": arrays}


def _rewrite(node: Any, where: str) -> Any:
    """The schema with uniqueItems expanded (everything else is llguidance's to judge)."""
    if isinstance(node, list):
        return [_rewrite(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if node.get("uniqueItems") is True:
        return _unique_arrays(node, where)
    out = {}
    for k, v in node.items():
        if k in ("enum", "const", "default", "examples"):
            out[k] = v
        elif k == "uniqueItems":
            continue  # false: no constraint
        else:
            out[k] = _rewrite(v, f"{where}.{k}")
    return out


def _checked(grammar: str, what: str) -> str:
    bad, messages = lg.LLMatcher.validate_grammar_with_warnings(grammar, None)
    if bad:
        lines = [ln.strip() for ln in (messages[0] if messages else "invalid").splitlines()]
        msg = " ".join(ln for ln in lines if ln and not ln.startswith("^"))[:400]
        msg = msg.replace("Unimplemented keys:", "unsupported JSON Schema keyword(s):")
        raise ConstraintError(f"{what}: {msg}")
    return grammar


class Constraint:
    """What an output must match: a grammar llguidance has compiled and checked."""

    def __init__(self, grammar: str, json_output: bool = False):
        self.grammar = grammar
        self.json_output = json_output  # the output is one JSON value (stop strings do not apply)

    @classmethod
    def json_schema(cls, schema: Any, what: str = "schema") -> Constraint:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"{what} is not valid JSON: {e}") from None
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, dict):
            raise ConstraintError(f"{what} must be a JSON object")
        schema = _rewrite(schema, what)
        try:
            g = lg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except ValueError as e:
            raise ConstraintError(f"{what}: {e}") from None
        return cls(_checked(g, what), json_output=True)

    @classmethod
    def json_object(cls) -> Constraint:
        """OpenAI's json_object mode: any JSON object."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern: str, what: str = "regex") -> Constraint:
        return cls(_checked(lg.LLMatcher.grammar_from_regex(pattern), what))

    @classmethod
    def choice(cls, options: list[str], what: str = "choice") -> Constraint:
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ConstraintError(f"{what} must be a non-empty list of non-empty strings")
        lark = "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options)
        return cls(_checked(lg.LLMatcher.grammar_from_lark(lark), what))

    @classmethod
    def grammar_text(cls, text: str, what: str = "grammar") -> Constraint:
        """A Lark grammar (llguidance's dialect) or a GBNF one (llama.cpp's), told apart by `::=`."""
        fmt = "gbnf" if "::=" in text else "lark"
        try:
            g = lg.grammar_from(fmt, text)
        except ValueError as e:
            raise ConstraintError(f"{what}: {e}") from None
        return cls(_checked(g, what))

    @classmethod
    def tool_call(cls, tools: list[tuple[str, dict]], what: str = "tools") -> Constraint:
        """The JSON of one call {"name", "arguments"} to one of `tools` ((name, parameters schema))."""
        rules, alts = [], []
        for i, (name, params) in enumerate(tools):
            params = _rewrite(params or {"type": "object"}, f"{what}[{i}].function.parameters")
            defs = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
            call = {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
                **defs,
            }
            # Each tool's schema is its own JSON grammar, so its $refs resolve against itself; checked
            # alone first so that a refusal names the tool.
            _checked(
                lg.LLMatcher.grammar_from_json_schema(json.dumps(call), defaults=JSON_OPTIONS), f"{what}[{i}]"
            )
            rules.append(f"call{i}: %json {json.dumps(call)}")
            alts.append(f"call{i}")
        if not alts:
            raise ConstraintError(f"{what}: no tool to call")
        lark = f"start: {' | '.join(alts)}\n" + "\n".join(rules)
        return cls(_checked(lg.LLMatcher.grammar_from_lark(lark), what), json_output=True)

    def processor(self, tokenizer, n_vocab: int) -> ConstraintProcessor:
        return ConstraintProcessor(self, bridge(tokenizer, n_vocab))


class _Bridge:
    """A tokenizer as llguidance sees it, plus what completion() needs (the token of each single byte)."""

    def __init__(self, tokenizer, n_vocab: int):
        eos = list(tokenizer.eos_token_ids)
        self.n_vocab = n_vocab
        self.lltok = lg.LLTokenizer(tokenizer.to_json(), n_vocab=n_vocab, eos_token=eos)
        self.eos = eos
        self.words = (n_vocab + 31) // 32
        # One token per single byte, for completion(): byte-level BPE has all 256.
        ids = ((b, tokenizer.token_to_id(c)) for c, b in byte_decoder().items())
        self.byte_token = {b: t for b, t in ids if t is not None}


_bridges: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_bridges_lock = threading.Lock()


def bridge(tokenizer, n_vocab: int) -> _Bridge:
    """The llguidance view of `tokenizer` for logits `n_vocab` wide, built once and shared."""
    with _bridges_lock:
        per = _bridges.setdefault(tokenizer, {})
        if n_vocab not in per:
            per[n_vocab] = _Bridge(tokenizer, n_vocab)
        return per[n_vocab]


class ConstraintProcessor:
    """Masks each step's logits to the tokens the grammar allows next.

    Called as `(history, logits) -> logits` once per step, in order, after any penalty processors.
    The first call sees the prompt; each later call feeds the matcher the tokens added to
    `history` since (the previous step's sample). The mask depends only on those tokens, never
    on the logits, so the model's forward pass can run while it is computed.
    """

    drafting_safe = False  # it follows one sequence: speculative decoding's drafts would derail it

    def __init__(self, constraint: Constraint, bridge_: _Bridge):
        self.constraint, self.bridge = constraint, bridge_
        self.matcher = lg.LLMatcher(bridge_.lltok, constraint.grammar, log_level=0)
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error())
        self._seen: int | None = None
        self._mask = np.full(bridge_.words, -1, dtype=np.int32)
        self._neg = None

    def feed(self, tokens: list[int]) -> None:
        for t in tokens:
            if t in self.bridge.eos and self.matcher.is_accepting():
                continue
            if not self.matcher.consume_token(t):
                raise ConstraintError(f"token {t} breaks the grammar: {self.matcher.get_error()[:200]}")

    def _catch_up(self, history: mx.array) -> None:
        n = int(history.size)
        if self._seen is None:
            self._seen = n
            return
        if n > self._seen:
            self.feed(history[self._seen :].tolist())
            self._seen = n

    def allowed(self) -> np.ndarray:
        """Boolean mask over the model's vocabulary for the next token."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        return bits[: self.bridge.n_vocab].astype(bool)

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        self._catch_up(history)
        mask = mx.array(self.allowed())
        if self._neg is None:
            self._neg = mx.array(-np.inf, dtype=logits.dtype)
        return mx.where(mask, logits, self._neg)

    @property
    def done(self) -> bool:
        """True when the output so far is complete (only the end may follow, or it may stop here)."""
        return self.matcher.is_accepting()

    def completion(self, generated: list[int]) -> tuple[int, str]:
        """How to complete an output cut short after the tokens `generated`: (cut, text).

        The completed output is `decode(generated)` without its last `cut` characters, then `text`:
        a character the cut split in two (decoded as one U+FFFD) is finished, not replaced.
        (0, "") when the output is already complete.
        """
        ids = [t for t in generated if t not in self.bridge.eos]
        tail = self._close(ids)
        if not tail:
            return 0, ""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.decode(self.bridge.lltok.decode_bytes(ids))
        split = utf8.getstate()[0]  # the bytes of a character not finished yet
        return (1 if split else 0), (split + tail).decode("utf-8", errors="replace")

    def finish_text(self, text: str, generated: list[int]) -> str:
        """`text`, the end of an output (its last event's text), completed if the cut left it unfinished."""
        cut, add = self.completion(generated)
        if cut and text.endswith("\ufffd"):  # the split character, flushed by the detokenizer at the end
            text = text[:-1]
        return text + add

    def _close(self, ids: list[int]) -> bytes:
        """Bytes that complete the output after `ids`, b"" if it is complete.

        Forced bytes first (a required key, a closing quote), otherwise the first character of
        `_CLOSERS` the grammar allows; gives up (returns what it has) after CLOSE_STEPS tokens.
        """
        m = lg.LLMatcher(self.bridge.lltok, self.constraint.grammar, log_level=0)
        if not m.consume_tokens(ids):
            return b""
        out = b""
        mask = np.zeros(self.bridge.words, dtype=np.int32)
        for _ in range(CLOSE_STEPS):
            if m.is_accepting():
                return out
            ff = m.compute_ff_tokens()
            if ff:
                m.consume_tokens(ff)
                out += self.bridge.lltok.decode_bytes(ff)
                continue
            m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
            bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
            # A character picked REPEAT times in a row goes last, so "0.000…" cannot run forever.
            order = sorted(_CLOSERS, key=lambda b: out.endswith(bytes([b]) * REPEAT))
            pick = next((t for b in order if bits[t := self.bridge.byte_token.get(b, 0)]), None)
            if pick is None:
                ok = np.nonzero(bits[: self.bridge.n_vocab])[0]
                ok = [t for t in ok.tolist() if t not in self.bridge.eos]
                if not ok:
                    return out
                pick = ok[0]
            m.consume_token(pick)
            out += self.bridge.lltok.decode_bytes([pick])
        return out
