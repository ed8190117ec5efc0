"""`qmlx fuse`: merge an adapter into its base model and write a model folder.

Each adapted projection becomes W + scale·B·A. A quantized base is dequantized, merged and
re-quantized (with its own bits, or `bits`); with `bits` a dense base is quantized whole. The
folder is written through the converter's writer (convert/writer.py): beside DST, renamed into
place only when complete, with the same side files (tokenizer, chat template, generation
config) as a converted folder.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from convert import card
from convert.layout import expected_tensors, layer_sort_key
from convert.writer import (
    check_destination,
    complete_side_files,
    copy_side_files,
    output_folder,
    write_arrays,
)

from ..folder import parse_dtype, read_json, resolve
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
    check_destination(folder, dst, force)
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
    with output_folder(dst) as tmp:
        copy_side_files(folder, tmp)
        complete_side_files(tmp, config)
        weight_map, total_size = write_arrays(
            tmp, _weight_groups(base, out_dtype), SHARD_BYTES, {"format": "mlx"}
        )
        n_params = sum(math.prod(shape) for shape in expected_tensors(base.config).values())
        card.write_index(tmp, weight_map, total_size, n_params)
        card.write_config(tmp, config, quant, out_name)
    return dst


def _weight_groups(model: nn.Module, dtype) -> list[dict[str, mx.array]]:
    """The model's tensors in file order, floating ones cast to `dtype`, one group per layer
    (a packed weight stays in one shard with its scales and biases)."""
    groups: dict[str, dict[str, mx.array]] = {}
    for name, v in sorted(tree_flatten(model.parameters()), key=lambda kv: layer_sort_key(kv[0])):
        groups.setdefault(name.rsplit(".", 1)[0], {})[name] = (
            v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
        )
    return list(groups.values())
