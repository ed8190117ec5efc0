"""Prompt caches: a KV cache kept with the token ids it holds, in memory and on disk.

`PromptCache` is the in-memory kind: the chat and the server keep one per conversation, and
stream_generate reuses the longest prefix it holds. On disk:

    qmlx cache-prompt --model M --prompt LONG_DOCUMENT --out doc.safetensors
    qmlx generate --model M --prompt-cache doc.safetensors --prompt "Summarise it."

`save_cache` / `load_cache` are the file format of the per-layer caches (safetensors with
each layer's class and meta_state). A prompt cache file is only valid for the model, compute
dtype and cache kind (rotating size, KV bits) that made it; anything else would silently
produce wrong text. So the file also records a model identity (a hash of the config and of
weight shapes plus a few small weights' values), the dtype, and the cache settings, and
loading refuses any mismatch with a UserError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import CACHE_CLASSES, can_trim_cache, make_cache, trim_cache
from .decode import common_prefix, prefill
from .errors import UserError
from .safetensors import WeightsError, read_header

log = logging.getLogger("qmlx.prompt_cache")


class PromptCache:
    """A KV cache kept across calls, with the token ids it holds.

    Each call reuses the longest common prefix of the cached tokens and the new prompt, so a
    new chat turn prefills only its new tokens. The chat and the server keep one per
    conversation. `cache_kwargs` go to `make_cache` (max_kv_size, kv_bits, ...).
    """

    def __init__(self, **cache_kwargs):
        self.cache_kwargs = cache_kwargs
        self.caches: list | None = None
        self.tokens: list[int] = []
        self.reused = 0  # tokens reused by the last call, for stats and tests

    def prepare(self, model, ids: list[int]) -> tuple[list, list[int]]:
        """Caches ready for `ids`, and the suffix of `ids` still to prefill (never empty)."""
        common = min(common_prefix(self.tokens, ids), len(ids) - 1)  # the last token must run for logits
        drop = len(self.tokens) - common
        if self.caches is None or (
            drop and not (can_trim_cache(self.caches) and trim_cache(self.caches, drop) == drop)
        ):
            self.caches = make_cache(len(model.layers), **self.cache_kwargs)
            common = 0
        self.reused = common
        self.tokens = list(ids[:common])
        return self.caches, list(ids[common:])

    def commit(self, ids: list[int]) -> None:
        """Record what the caches hold after a generation: the first `offset` of `ids`."""
        if not self.caches:
            self.tokens = []
        elif len({c.offset for c in self.caches}) > 1:
            # Interrupted halfway through a forward pass: layers disagree, start afresh.
            self.reset()
        else:
            self.tokens = list(ids[: self.caches[0].offset])

    def reset(self) -> None:
        self.caches, self.tokens, self.reused = None, [], 0


class PrefixCache:
    """Prompt caches shared across requests: an LRU of (tokens, caches) bounded in bytes.

    `checkout(model, ids)` hands a request its own PromptCache, already holding the longest prefix
    of `ids` that any stored entry holds (a system prompt, the earlier turns of a conversation, an
    agent's growing tool loop); the entry itself stays stored for other requests. The copy costs
    nothing until the request writes: its caches start as views of the entry's arrays, and the
    first new token moves them into buffers of their own. `checkin(pc)` stores what a finished
    request's cache holds, replacing entries it extends (a conversation's previous turn), then
    evicts the least recently used entries until at most `max_bytes` are held.
    Only caches that can be cut at any token (not rotating ones) are shared at a partial prefix.

    With a `disk` tier (`DiskPrefixes`), evicted entries are written there instead of dropped, and a
    request whose longest prefix is on disk reads it back into memory.
    """

    def __init__(self, max_bytes: int, disk: DiskPrefixes | None = None, **cache_kwargs):
        if max_bytes < 0:
            raise UserError(f"the prompt cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.disk = disk
        self.cache_kwargs = cache_kwargs
        self.entries: list[tuple[list[int], list]] = []  # least recently used first
        self.hits = self.misses = 0
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for _, caches in self.entries for c in caches)

    def checkout(self, model, ids: list[int]) -> PromptCache:
        """A new PromptCache for `ids`, holding the longest stored prefix of them (in memory or on disk)."""
        pc = PromptCache(**self.cache_kwargs)
        best, n = None, 0
        for i, (tokens, caches) in enumerate(self.entries):
            m = _usable(tokens, ids, can_trim_cache(caches))
            if m > n:
                best, n = i, m
        if self.disk is not None:
            j, m = self.disk.best(ids)
            if m > n:
                got = self.disk.take(j)
                if got is not None:
                    self.entries.append(got)
                    best, n = len(self.entries) - 1, m
        if best is None:
            self.misses += 1
            return pc
        tokens, caches = self.entries.pop(best)
        self.entries.append((tokens, caches))  # most recently used
        pc.caches = [_fork(c, n) for c in caches]
        pc.tokens = list(ids[:n])
        self.hits += 1
        self.reused_tokens += n
        self._evict()  # an entry read back from disk may push others out (to disk); pc keeps its views
        return pc

    def checkin(self, pc: PromptCache) -> None:
        """Keep what `pc` holds for later requests (pc must not be used again)."""
        tokens, caches = list(pc.tokens), pc.caches
        if not tokens or not caches or (self.max_bytes == 0 and self.disk is None):
            return
        kept = []
        for old, c in self.entries:
            if common_prefix(old, tokens) == len(old):
                continue  # the new entry holds all of it and more
            if common_prefix(old, tokens) == len(tokens):
                return  # an entry already holds all of this
            kept.append((old, c))
        self.entries = kept + [(tokens, caches)]
        self._evict()

    def _evict(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            tokens, caches = self.entries.pop(0)
            if self.disk is not None:
                self.disk.put(tokens, caches)

    def flush(self) -> None:
        """Write every entry held in memory to the disk tier (at shutdown: they outlive the process)."""
        if self.disk is not None:
            for tokens, caches in self.entries:
                self.disk.put(tokens, caches)

    def clear(self) -> None:
        self.entries = []


def _usable(tokens: list[int], ids: list[int], trimmable: bool) -> int:
    """How many of `ids` an entry holding `tokens` can serve (the last token of ids always runs)."""
    m = min(common_prefix(tokens, ids), len(ids) - 1)
    return m if m == len(tokens) or trimmable else 0  # a rotated cache cannot be cut short


def check_cache_folder(folder: str, option: str = "--prompt-cache-dir", create: bool = True) -> str:
    """`folder` as an absolute path, created if missing (`create`; else only checked to be creatable);
    a UserError naming it if it cannot hold files."""
    path = os.path.abspath(os.path.expanduser(folder))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{option} {folder}: is a file, not a folder")
    if not create:
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise UserError(f"{option} {folder}: cannot create the folder ({probe} is a file)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UserError(f"{option} {folder}: {probe} is not writable")
        return path
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {folder}: cannot create the folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {folder}: the folder is not writable")
    return path


_SPILL_PREFIX = "prefix-"  # the disk tier's files; other files in its folder are left alone


class DiskPrefixes:
    """The disk tier of a PrefixCache: prompt-cache files in one folder, an LRU bounded in bytes.

    Each file is a `save_prompt_cache` file (token ids, model identity, dtype, cache settings). An
    entry read back keeps its file, so the same entry evicted again costs no second write, and
    entries survive a restart: the folder is indexed at start-up from the files' headers, and files
    another model, dtype or cache kind wrote are passed over (left in place, not counted). A file
    that cannot be written or read back is logged and dropped; it never fails a request.
    """

    def __init__(self, folder: str, max_bytes: int, model, **cache_kwargs):
        if max_bytes < 0:
            raise UserError(f"the prompt cache's disk size must be >= 0 bytes, got {max_bytes}")
        self.folder = check_cache_folder(folder)
        self.max_bytes, self.model, self.cache_kwargs = max_bytes, model, cache_kwargs
        self.identity, self.dtype = model_identity(model), compute_dtype(model)
        self.settings = cache_settings(make_cache(1, **cache_kwargs)[0])
        self.entries: list[
            tuple[list[int], str, int, bool]
        ] = []  # (tokens, path, bytes, trimmable), LRU first
        self.hits = self.writes = self.failures = 0
        for path in sorted(self._files(), key=_mtime):
            entry = self._indexed(path)
            if entry is not None:
                self.entries.append(entry)
        self._trim()

    @property
    def nbytes(self) -> int:
        return sum(e[2] for e in self.entries)

    def _files(self) -> list[str]:
        return [
            os.path.join(self.folder, f)
            for f in os.listdir(self.folder)
            if f.startswith(_SPILL_PREFIX) and f.endswith(".safetensors")
        ]

    def _indexed(self, path: str):
        try:
            _, meta = read_header(path)
            tokens = json.loads(meta[_KEY + "tokens"])
            if (
                meta.get(_KEY + "model") != self.identity
                or meta.get(_KEY + "dtype") != self.dtype
                or json.loads(meta[_KEY + "settings"]) != self.settings
            ):
                return None  # another model's (or another cache kind's) entry
            if not tokens or not all(isinstance(t, int) for t in tokens):
                raise ValueError("no token ids")
            trimmable = meta.get(_KEY + "extra.trimmable") == "1"
            return list(tokens), path, os.path.getsize(path), trimmable
        except (WeightsError, OSError, KeyError, TypeError, ValueError) as e:
            log.warning("prompt cache: passing over %s (%s)", path, e)
            return None

    def best(self, ids: list[int]) -> tuple[int | None, int]:
        """(index, tokens) of the entry that serves the most of `ids`; (None, 0) if none does."""
        best, n = None, 0
        for i, (tokens, _, _, trimmable) in enumerate(self.entries):
            m = _usable(tokens, ids, trimmable)
            if m > n:
                best, n = i, m
        return best, n

    def take(self, i: int):
        """Entry i read back as (tokens, caches); its file stays, now the most recently used. None
        (and the file removed) if it cannot be read back."""
        entry = self.entries.pop(i)
        tokens, path = entry[0], entry[1]
        try:
            pc, _ = load_prompt_cache(path, self.model, self.cache_kwargs)
            if pc.tokens != tokens:
                raise UserError(f"{path}: its token ids changed since it was indexed")
            mx.eval([c.state for c in pc.caches if c.state is not None])
        except Exception as e:  # damaged or changed behind our back: the request computes its prompt
            log.warning("prompt cache: could not read %s back (%s); dropped", path, e)
            self.failures += 1
            _remove(path)
            return None
        self.entries.append(entry)
        try:
            os.utime(path)  # the order survives a restart
        except OSError:
            pass
        self.hits += 1
        return pc.tokens, pc.caches

    def put(self, tokens: list[int], caches: list) -> None:
        """Write an entry evicted from memory (unless an entry on disk already holds all of it)."""
        if self.max_bytes == 0:
            return
        kept = []
        for entry in self.entries:
            old, path = entry[0], entry[1]
            if common_prefix(old, tokens) == len(tokens):
                return
            if common_prefix(old, tokens) == len(old):
                _remove(path)  # the new entry holds all of it and more
                continue
            kept.append(entry)
        self.entries = kept
        name = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:24]
        path = os.path.join(self.folder, f"{_SPILL_PREFIX}{name}.safetensors")
        pc = PromptCache(**self.cache_kwargs)
        pc.caches, pc.tokens = caches, list(tokens)
        trimmable = can_trim_cache(caches)
        try:
            save_prompt_cache(path, pc, self.model, {"trimmable": "1" if trimmable else "0"})
            size = os.path.getsize(path)
        except Exception as e:  # a full disk, a cache kind files cannot hold: never a request's failure
            log.warning("prompt cache: could not write %s (%s); the entry is dropped", path, e)
            self.failures += 1
            _remove(path)
            return
        self.writes += 1
        self.entries.append((list(tokens), path, size, trimmable))
        self._trim()

    def _trim(self) -> None:
        while self.entries and self.nbytes > self.max_bytes:
            _remove(self.entries.pop(0)[1])


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:
        return 0.0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("prompt cache: could not remove %s (%s)", path, e)


def _fork(cache, n: int):
    """A cache of the same kind holding the first n tokens of `cache`, sharing its arrays until written.

    A cut short (n < offset) is only asked of caches that can trim, whose state is in token order."""
    state = cache.state
    if n < cache.offset:
        state = tuple(
            tuple(p[..., :n, :] for p in x) if isinstance(x, tuple) else x[..., :n, :] for x in state
        )
    fork = type(cache).from_state(state, cache.meta_state)
    fork.offset = n
    return fork


# --------------------------------------------------------------------------- KV-cache files

_FORMAT_KEY = "qmlx.kv_cache.format"
_FORMAT_VERSION = "1"
_LAYERS_KEY = "qmlx.kv_cache.layers"
_RESERVED = "qmlx.kv_cache."


def save_cache(path: str, caches: Sequence, metadata: dict[str, str] | None = None) -> None:
    """Write the caches to a safetensors file at exactly `path`.

    Arrays are named layers.{i}.keys / layers.{i}.values (or .keys.0/.1/.2 for the
    (packed, scales, biases) parts of a quantized cache). The safetensors metadata holds each
    layer's class and meta_state, plus the caller's string `metadata` (model identity, token
    ids as JSON, ...) under its own keys. The file is written to a temporary name and then
    renamed, so a crash never leaves a half-written cache behind.
    """
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"cache metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key.startswith(_RESERVED):
            raise UserError(f"cache metadata key {key!r} is reserved for qmlx")
    arrays: dict[str, mx.array] = {}
    layers = []
    for i, cache in enumerate(caches):
        name = type(cache).__name__
        if name not in CACHE_CLASSES:
            raise TypeError(f"layer {i}: cannot save a {name}")
        layers.append({"class": name, "meta_state": list(cache.meta_state)})
        state = cache.state
        if state is None:
            continue
        for kind, x in zip(("keys", "values"), state):
            if isinstance(x, tuple):
                arrays.update({f"layers.{i}.{kind}.{j}": p for j, p in enumerate(x)})
            else:
                arrays[f"layers.{i}.{kind}"] = x
    metadata[_FORMAT_KEY] = _FORMAT_VERSION
    metadata[_LAYERS_KEY] = json.dumps(layers)
    # mx.save_safetensors appends ".safetensors" to other names; write there, then rename.
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"{path}: its folder {parent} does not exist")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; give the name of the .safetensors file to write")
    tmp = f"{path}.tmp-{os.getpid()}.safetensors"
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_cache(path: str) -> tuple[list, dict[str, str]]:
    """Read caches written by save_cache; return (caches, the caller's metadata).

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for a file
    that is not a qmlx KV-cache file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no KV-cache file at {path}")
    try:
        arrays, metadata = mx.load(path, format="safetensors", return_metadata=True)
    except Exception as e:  # MLX reports unreadable files as RuntimeError
        raise UserError(f"{path} is not a KV-cache file: not a readable safetensors file ({e})") from e
    version = metadata.get(_FORMAT_KEY)
    if version is None or _LAYERS_KEY not in metadata:
        raise UserError(f"{path} is not a qmlx KV-cache file (its metadata has no {_FORMAT_KEY})")
    if version != _FORMAT_VERSION:
        raise UserError(f"{path} is a KV-cache file of format {version}; this qmlx reads {_FORMAT_VERSION}")
    try:
        layers = json.loads(metadata[_LAYERS_KEY])
        caches = [_load_layer(i, layer, arrays) for i, layer in enumerate(layers)]
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: damaged KV-cache file ({e})") from e
    user = {k: v for k, v in metadata.items() if not k.startswith(_RESERVED)}
    return caches, user


def _load_layer(i: int, layer: dict[str, Any], arrays: dict[str, mx.array]):
    name = layer["class"]
    if name not in CACHE_CLASSES:
        raise UserError(f"layer {i} has unknown cache class {name!r}")

    def fetch(kind: str):
        if f"layers.{i}.{kind}" in arrays:
            return arrays[f"layers.{i}.{kind}"]
        parts = []
        while f"layers.{i}.{kind}.{len(parts)}" in arrays:
            parts.append(arrays[f"layers.{i}.{kind}.{len(parts)}"])
        return tuple(parts) if parts else None

    keys, values = fetch("keys"), fetch("values")
    if (keys is None) != (values is None):
        raise UserError(f"layer {i} has keys without values or values without keys")
    state = None if keys is None else (keys, values)
    return CACHE_CLASSES[name].from_state(state, layer["meta_state"])


# --------------------------------------------------------------------------- prompt cache files

_KEY = "qmlx.prompt_cache."  # prefix of the metadata keys this module writes


def model_identity(model) -> str:
    """A short hash naming the model's weights, independent of the compute dtype.

    Hashing every weight would take seconds for a large model; the config, every tensor's
    name and shape, and the values of a few small tensors (norms, biases) tell checkpoints
    apart in practice, including fine-tunes of the same architecture.
    """
    h = hashlib.sha256()
    config = model.config.to_dict()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = tree_flatten(model.parameters())
    for name, w in params:
        integer = not mx.issubdtype(w.dtype, mx.floating)
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype if integer else 'float'}\n".encode())
    for name, w in params:
        if name.endswith(("norm.weight", "k_proj.bias")) and w.size <= 65536:
            # bfloat16 is exact for a bf16 checkpoint whether it was loaded as bf16 or fp32.
            h.update(bytes(memoryview(w.astype(mx.bfloat16).view(mx.uint16))))
    return h.hexdigest()[:32]


def compute_dtype(model) -> str:
    """The dtype activations (and so the cached keys and values) have."""
    return str(model.model.norm.weight.dtype).removeprefix("mlx.core.")


def cache_settings(cache) -> dict[str, Any]:
    """The make_cache arguments that build a cache of this kind (for one layer's cache)."""
    out: dict[str, Any] = {"kind": type(cache).__name__}
    if hasattr(cache, "max_size"):
        out.update(max_kv_size=cache.max_size, keep=cache.keep)
    if hasattr(cache, "key_bits"):
        out.update(kv_group_size=cache.group_size, key_bits=cache.key_bits, value_bits=cache.value_bits)
    return out


def _make_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k != "kind"}


def fill_prompt_cache(model, ids: list[int], prefill_step: int = 512, **cache_kwargs) -> PromptCache:
    """A PromptCache holding `ids`, computed `prefill_step` tokens at a time."""
    if not ids:
        raise UserError("--prompt: the prompt to cache is empty")
    pc = PromptCache(**cache_kwargs)
    pc.caches = make_cache(len(model.layers), **cache_kwargs)
    prefill(model, ids, pc.caches, prefill_step)
    pc.tokens = list(ids)
    return pc


def save_prompt_cache(
    path: str, prompt_cache: PromptCache, model, extra: dict[str, str] | None = None
) -> None:
    """Write a PromptCache with its token ids and the identity of `model` to `path`.

    `extra` is kept as is (e.g. the prompt text and system prompt, for `qmlx generate`).
    """
    if not prompt_cache.caches or not prompt_cache.tokens:
        raise UserError(f"{path}: nothing to save, the prompt cache is empty")
    metadata = {
        _KEY + "tokens": json.dumps(prompt_cache.tokens),
        _KEY + "model": model_identity(model),
        _KEY + "model_path": str(model.config.source),
        _KEY + "dtype": compute_dtype(model),
        _KEY + "settings": json.dumps(cache_settings(prompt_cache.caches[0])),
    }
    metadata.update({_KEY + "extra." + k: v for k, v in (extra or {}).items()})
    save_cache(path, prompt_cache.caches, metadata)


def load_prompt_cache(
    path: str, model, cache_kwargs: dict[str, Any] | None = None
) -> tuple[PromptCache, dict[str, str]]:
    """Read a file written by save_prompt_cache for use with `model`; return it and its extras.

    Raises UserError, naming the file, if another model, dtype or (when `cache_kwargs` is
    given) another kind of KV cache made it.
    """
    caches, meta = load_cache(path)
    try:
        tokens = json.loads(meta[_KEY + "tokens"])
        settings = json.loads(meta[_KEY + "settings"])
        identity, dtype = meta[_KEY + "model"], meta[_KEY + "dtype"]
    except (KeyError, json.JSONDecodeError):
        raise UserError(
            f"{path}: a KV-cache file, but not a prompt cache (no token ids or model identity)"
        ) from None
    made_by = meta.get(_KEY + "model_path", "another model")
    if len(caches) != len(model.layers) or identity != model_identity(model):
        raise UserError(f"{path}: this prompt cache was made by another model ({made_by})")
    if dtype != compute_dtype(model):
        raise UserError(
            f"{path}: this prompt cache was made with --dtype {dtype}, the model runs in "
            f"{compute_dtype(model)}; pass --dtype {dtype} or cache the prompt again"
        )
    if cache_kwargs is not None:
        wanted = cache_settings(make_cache(1, **cache_kwargs)[0])
        if wanted != settings:
            raise UserError(
                f"{path}: this prompt cache has KV-cache settings {_describe(settings)}, but "
                f"{_describe(wanted)} were asked for (--max-kv-size/--kv-bits/--kv-group-size/"
                "--key-bits/--value-bits must match those given to cache-prompt)"
            )
    if caches and caches[0].offset != len(tokens):
        raise UserError(f"{path}: damaged prompt cache ({len(tokens)} token ids, {caches[0].offset} cached)")
    pc = PromptCache(**_make_kwargs(settings))
    pc.caches, pc.tokens = caches, list(tokens)
    extras = {k[len(_KEY + "extra.") :]: v for k, v in meta.items() if k.startswith(_KEY + "extra.")}
    return pc, extras


def _describe(settings: dict[str, Any]) -> str:
    args = _make_kwargs(settings)
    return "(" + (", ".join(f"{k}={v}" for k, v in args.items()) or "full precision, unbounded") + ")"


def cache_prompt(
    model,
    tokenizer,
    prompt: str,
    out: str,
    system: str | None = None,
    raw: bool = False,
    prefill_step: int = 512,
    **cache_kwargs,
) -> int:
    """Compute the KV cache of `prompt` and save it to `out`; return the number of tokens.

    Without `raw`, what is cached is the chat-template rendering up to the end of `prompt` as
    the (start of the) user message, so `qmlx generate --prompt-cache out --prompt MORE`
    can continue that message with MORE. Prefix reuse then recomputes only the new tokens
    (and the last cached token or two, where the tokenization of the join may differ).
    """
    text = prompt
    if not raw:
        mark = "\ue000"  # a private-use character: never in real text, survives templates
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt + mark})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        if rendered.count(mark) != 1:
            raise UserError(
                "the model's chat template changes the user message; use --raw to cache a raw prompt"
            )
        text = rendered[: rendered.index(mark)]
    pc = fill_prompt_cache(model, tokenizer.encode(text), prefill_step, **cache_kwargs)
    extra = {"prompt": prompt, "system": system or "", "raw": "1" if raw else "0"}
    save_prompt_cache(out, pc, model, extra)
    return len(pc.tokens)


@dataclass
class Continuation:
    """A prompt that continues a cached one (`qmlx generate --prompt-cache FILE --prompt MORE`)."""

    cache: PromptCache
    prompt: str  # the cached prompt + MORE
    system: str | None
    raw: bool


def continue_prompt(
    path: str,
    model,
    prompt: str,
    system: str | None = None,
    raw: bool = False,
    cache_kwargs: dict[str, Any] | None = None,
) -> Continuation:
    """Load a file written by `cache_prompt` and extend its prompt with `prompt`.

    The cached prompt is the start of the new one; its system prompt and raw flag apply unless
    `system` / `raw` are given. Raises UserError naming the file as load_prompt_cache does.
    """
    pc, extra = load_prompt_cache(path, model, cache_kwargs or None)
    return Continuation(
        cache=pc,
        prompt=extra.get("prompt", "") + prompt,
        system=system if system is not None else extra.get("system") or None,
        raw=raw or extra.get("raw") == "1",
    )
