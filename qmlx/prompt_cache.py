"""Prompt caches on disk: a KV cache, the token ids it holds, and who may use it.

    qmlx cache-prompt --model M --prompt LONG_DOCUMENT --out doc.safetensors
    qmlx generate --model M --prompt-cache doc.safetensors --prompt "Summarise it."

A cache is only valid for the model, compute dtype and cache kind (rotating size, KV bits)
that made it; anything else would silently produce wrong text. So the file records a model
identity (a hash of the config and of weight shapes plus a few small weights' values), the
dtype, and the cache settings, and loading refuses any mismatch with a UserError.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import load_cache, make_cache, save_cache
from .decode import prefill
from .errors import UserError
from .generate import PromptCache

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
