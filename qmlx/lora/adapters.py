"""Adapter files: `adapters.safetensors` (A and B by parameter path) + `adapter_config.json`.

Only the trainable matrices are saved, so an adapter for a 7B model is a few tens of MB. The
config records how to rebuild the wrappers (rank, alpha, dropout, targets, layers) and the
base model it was trained on.
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..folder import read_json
from .apply import adapter_weights, apply_lora

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"


class AdapterError(UserError):
    """An adapter folder that cannot be used with this model; the message names the file."""


def save_adapter(model: nn.Module, folder: str, config: dict, weights_name: str = WEIGHTS) -> None:
    """Write the adapters' weights and config; each file appears whole or not at all."""
    os.makedirs(folder, exist_ok=True)
    weights = adapter_weights(model)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{weights_name}")
    try:
        mx.save_safetensors(tmp, weights, metadata={"format": "mlx"})
        os.replace(tmp, os.path.join(folder, weights_name))
    finally:  # an interrupted save leaves no temporary file
        if os.path.exists(tmp):
            os.remove(tmp)
    write_json(os.path.join(folder, CONFIG), config)


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_adapter_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise AdapterError(f"--adapter {folder}: no such folder")
    cfg = read_json(path, AdapterError, missing=f"an adapter folder holds {WEIGHTS} and {CONFIG}")
    if cfg.get("peft_type") is not None:
        raise AdapterError(f"{path}: a PEFT adapter; qmlx loads the adapters it trains ({WEIGHTS})")
    for key in ("rank", "alpha", "targets"):
        if key not in cfg:
            raise AdapterError(f"{path}: field {key!r} is missing")
    return cfg


def load_adapter(model: nn.Module, folder: str, weights_name: str = WEIGHTS) -> dict:
    """Wrap `model`'s layers as the adapter's config says and load its weights."""
    cfg = read_adapter_config(folder)
    path = os.path.join(folder, weights_name)
    if not os.path.exists(path):
        raise AdapterError(f"{path}: not found")
    num_layers = cfg.get("num_layers")
    if num_layers is not None and not 0 < num_layers <= len(model.layers):
        raise AdapterError(
            f"{folder}/{CONFIG}: num_layers {num_layers} does not fit a model of {len(model.layers)} layers"
        )
    apply_lora(model, cfg["rank"], cfg["alpha"], cfg.get("dropout", 0.0), cfg["targets"], num_layers)
    weights = mx.load(path)
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has unexpected {extra[0]!r}"
        raise AdapterError(f"{path}: {what} (trained for another model or --targets?)")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise AdapterError(
                f"{path}: {k!r} has shape {list(v.shape)}, this model needs {list(expected[k].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return cfg
