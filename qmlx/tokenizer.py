"""Tokenizer: `tokenizer.json` through `tokenizers`, the chat template through jinja2, and a
streaming detokenizer that never yields part of a UTF-8 character.

The chat template is rendered the way transformers renders it (sandboxed jinja2 with
trim_blocks/lstrip_blocks, `tojson`, `raise_exception`, `strftime_now`, the special tokens as
variables), so prompts match token for token.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .errors import UserError
from .folder import read_json


class TokenizerError(UserError):
    """A tokenizer folder that cannot be used; the message names the file."""


class TemplateError(UserError):
    """The chat template refused the messages (e.g. through `raise_exception`)."""


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class StreamingDetokenizer:
    """Turns tokens into text incrementally with O(1) work per token.

    For byte-level BPE (Qwen) each token maps to raw bytes, fed to an incremental UTF-8
    decoder, which holds back an incomplete character until its last byte arrives. Other
    tokenizers fall back to decoding the tokens since the last complete character.
    The concatenation of everything yielded equals `tokenizer.decode(all_tokens)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[int] = []  # fallback path only
        self._emitted = ""  # fallback path only
        self.tokens: list[int] = []

    def add(self, token: int) -> str:
        """Feed one token; return the newly completed text (possibly "")."""
        self.tokens.append(token)
        raw = self._tok.token_bytes(token)
        if raw is not None:
            return self._utf8.decode(raw)
        self._pending.append(token)
        text = self._tok.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        new = text[len(self._emitted) :]
        self._pending, self._emitted = [], ""
        return new

    def finalize(self) -> str:
        """Flush whatever is held back at the end of a generation."""
        out = self._utf8.decode(b"", final=True)
        if self._pending:
            out += self._tok.decode(self._pending)[len(self._emitted) :]
            self._pending, self._emitted = [], ""
        return out


class Tokenizer:
    """A model's tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        generation_defaults: dict[str, Any] | None = None,
        source: str = "",
    ):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.generation_defaults = dict(generation_defaults or {})
        self.source = source
        self._template = None
        added = tokenizer.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self._special_ids = {i for i, t in added.items() if t.special}
        decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"
        self._bytes_cache: dict[int, bytes] = {}
        self._plain: HFTokenizer | None = None  # a copy that reads special tokens as text

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(
        cls, folder: str, eos_token_ids: Iterable[int] = (), generation_defaults=None
    ) -> Tokenizer:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{path}: not found (qmlx needs the model's tokenizer.json)")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust library raises plain Exceptions
            raise TokenizerError(f"{path}: cannot be read ({e})") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(cfg_path, TokenizerError) if os.path.exists(cfg_path) else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(folder, "chat_template.jinja")
        if template is None and os.path.exists(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = cfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                special[key] = v
        eos = set(eos_token_ids)
        if "eos_token" in special and tok.token_to_id(special["eos_token"]) is not None:
            eos.add(tok.token_to_id(special["eos_token"]))
        return cls(tok, template, special, eos, generation_defaults, source=folder)

    # ------------------------------------------------------------------ text <-> ids
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised, none added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with special tokens written in it taken as plain text (user content
        that may quote them, e.g. code between fill-in-the-middle markers)."""
        if self._plain is None:
            plain = HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (added and special tokens included)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token: int) -> bytes | None:
        """The raw bytes one token stands for (byte-level tokenizers), else None."""
        if not self._byte_level:
            return None
        b = self._bytes_cache.get(token)
        if b is None:
            if token in self._added:
                b = self._added[token].encode("utf-8")
            else:
                piece = self._tok.id_to_token(token)
                if piece is None:
                    b = b""  # ids past the vocabulary (padding rows of the embedding)
                else:
                    table = byte_decoder()
                    b = bytes(table[c] for c in piece if c in table)
            self._bytes_cache[token] = b
        return b

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)

    def is_special(self, token: int) -> bool:
        return token in self._special_ids

    # ------------------------------------------------------------------ chat template
    def _compiled_template(self):
        if self._template is None or self._template[0] != self.chat_template:
            if not self.chat_template:
                raise TemplateError(
                    f"{self.source}: the tokenizer has no chat template "
                    "(tokenizer_config.json 'chat_template' or chat_template.jinja); use raw prompts"
                )
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(f"chat template: {message}")

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = (self.chat_template, env.from_string(self.chat_template))
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"{self.source}: chat template does not parse ({e})") from None
        return self._template[1]

    def user_prompt(self, text: str, system: str | None = None) -> str:
        """The prompt text for one user message (after an optional system one), ready for the answer."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": text})
        return self.apply_chat_template(messages, add_generation_prompt=True)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """Render a conversation to the model's prompt text (as transformers would)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TemplateError("messages must be a list of {'role': ..., 'content': ...} objects")
        for i, m in enumerate(messages):
            if "role" not in m:
                raise TemplateError(f"messages[{i}] has no 'role'")
        variables = {**self.special_tokens, **kwargs}
        return self._compiled_template().render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **variables
        )
