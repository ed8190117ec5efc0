"""`qmlx fuse`: merge an adapter into its base model and write a model folder.

Each adapted projection becomes W + scale·B·A. A quantized base is dequantized, merged and
re-quantized (with its own bits, or `bits`); with `bits` a dense base is quantized whole. The
folder is written beside DST and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil

import mlx.core as mx
from mlx.utils import tree_flatten

from ..errors import UserError
from ..folder import SIDE_FILES, parse_dtype, read_json, resolve
from ..loader import load_model
from ..quant import check_params, quantize_model
from .adapters import load_adapter
from .apply import fuse_model, lora_modules

SHARD_BYTES = 5 * 10**9


def fuse(
    model: str,
    adapter: str,
    dst: str,
    bits: int | None = None,
    group_size: int | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> str:
    """Merge `adapter` into the base `model` (folder or hub id) and write the folder DST."""
    folder = resolve(model)
    config = read_json(os.path.join(folder, "config.json"), missing="a model folder needs a config.json")
    _check_destination(folder, dst, force)
    if bits is not None:
        group_size = group_size or 64
        check_params(bits, group_size, "--bits/--group-size")
    out_name = dtype or config.get("torch_dtype") or "bfloat16"
    out_dtype = parse_dtype(out_name, "--dtype")
    base = load_model(folder)
    load_adapter(base, adapter)
    quant = config.get("quantization")
    fused_paths = [p for p, _ in lora_modules(base)]
    fuse_model(base, bits, group_size)
    if quant is None and bits is not None:
        quantize_model(base, {"bits": bits, "group_size": group_size})
        quant = {"group_size": group_size, "bits": bits}
    elif quant is not None and bits is not None:
        quant = dict(quant)
        for p in fused_paths:
            if (bits, group_size) != (quant.get("bits"), quant.get("group_size")):
                quant[p] = {"group_size": group_size, "bits": bits}
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    config["torch_dtype"] = out_name
    if quant is not None:
        config["quantization"] = config["quantization_config"] = quant
    _write_folder(base, folder, dst, config, out_dtype)
    return dst


def _check_destination(src: str, dst: str, force: bool) -> None:
    if os.path.abspath(dst) == os.path.abspath(src):
        raise UserError(f"{dst}: DST must not be the base model's folder")
    if os.path.exists(dst) and not force:
        raise UserError(f"{dst}: already exists (use --force to replace it)")


def _write_folder(model, src: str, dst: str, config: dict, dtype) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in tree_flatten(model.parameters())
        }
        shards, size = [[]], 0
        for k in sorted(weights):
            if size + weights[k].nbytes > SHARD_BYTES and shards[-1]:
                shards.append([])
                size = 0
            shards[-1].append(k)
            size += weights[k].nbytes
        weight_map = {}
        for i, names in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(
                os.path.join(tmp, file), {k: weights[k] for k in names}, metadata={"format": "mlx"}
            )
            weight_map.update({k: file for k in names})
        total = sum(v.nbytes for v in weights.values())
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        for name in SIDE_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
