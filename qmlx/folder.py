"""Model-folder helpers shared by the loader, the converter and the lora room.

A model folder is config.json + safetensors + the tokenizer's side files. Here: finding one
(`resolve`: a local path or a Hugging Face hub id), the files that travel with the weights
(`SIDE_FILES`), the names of the floating dtypes (`DTYPES`, `parse_dtype`), and reading a JSON
file with an error that names it (`read_json`). This module depends on nothing of qmlx but its
errors, so every room can use it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlx.core as mx

from .errors import UserError

# What a hub snapshot downloads: weights, configs, tokenizer and template files, licences.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer*", "*.model", "LICENSE*"]
# The files besides config.json and the weights that a model folder may hold, copied as they are
# into a folder made from it (a conversion, a fused model).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "LICENSE",
    "LICENSE.txt",
)
# The floating dtypes weights are written and computed in, by the names flags and configs use.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# What to do when a hub id cannot be downloaded, for `qmlx generate|chat|serve` and the like.
LOAD_OFFLINE_HINT = "pass the path of a downloaded model folder, e.g. --model ~/models/Qwen2.5-0.5B-Instruct"


class ModelNotFound(UserError):
    """A path or hub id that does not lead to a model folder."""


def looks_like_repo(text: str) -> bool:
    """Whether `text` has the shape of a hub repo id (`owner/name`) rather than a path."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text


def resolve(
    path_or_repo: str,
    allow_file: bool = False,
    error: type[UserError] = ModelNotFound,
    offline_hint: str = LOAD_OFFLINE_HINT,
) -> str:
    """A local model folder for a path or a hub repo id (downloaded through huggingface_hub).

    With `allow_file`, an existing file is returned as it is (the converter reads .gguf files);
    without, it is refused. Failures raise `error`; `offline_hint` ends the message when the
    hub cannot provide the repo.
    """
    p = os.path.expanduser(str(path_or_repo))
    if os.path.isdir(p) or (allow_file and os.path.exists(p)):
        return p
    if os.path.exists(p):
        raise error(
            f"{p}: is a file; qmlx loads a model folder (config.json + safetensors). "
            "For a GGUF file, run `qmlx convert FILE.gguf OUT_DIR` first."
        )
    if not looks_like_repo(p):
        raise error(f"{p}: no such file or folder" if allow_file else f"{p}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise error(f"{p}: not a local folder, and huggingface_hub is not installed") from None
    try:
        return snapshot_download(p, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise error(
            f"{p}: not a local folder, and the Hugging Face hub could not provide it "
            f"({type(e).__name__}). If you are offline, {offline_hint}"
        ) from None


def parse_dtype(name: str, what: str = "--dtype", error: type[UserError] = UserError) -> mx.Dtype:
    """The MLX dtype called `name` (a key of `DTYPES`); `what` names the flag or field in the error."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise error(f"{what} {name!r} is not one of {', '.join(DTYPES)}") from None


def read_json(path: str, error: type[UserError] = UserError, missing: str | None = None) -> Any:
    """The JSON value in `path`, or `error` naming the file when it is not valid JSON.

    With `missing`, an absent file is `error` too, with `missing` saying what was expected;
    without, FileNotFoundError goes up as it is.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if missing is None:
            raise
        raise error(f"{path}: not found ({missing})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None
