"""Swap a model's dense layers for quantized ones, following a `"quantization"` config.

The model declares plain `nn.Linear`/`nn.Embedding`; this is the only place that replaces
them, so the model file never knows about quantization.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx.utils import tree_unflatten

from ..model import SwitchLinear
from .groups import check_params
from .layers import QuantizedEmbedding, QuantizedLinear, QuantizedSwitchLinear
from .recipes import layer_params


def quantize_model(
    model: nn.Module,
    quantization: dict,
    weight_names: set[str] | None = None,
    source: str = "config.json",
) -> nn.Module:
    """Replace Linear/Embedding modules in place according to `quantization`.

    With `weight_names` (a checkpoint's tensor names), layers are rebuilt empty, ready for
    `load_weights`: a layer is quantized when its `<path>.scales` is present, or when a
    per-layer entry asks for it (then a missing `.scales` is reported by the loader). Without
    `weight_names`, the model's current weights are quantized (layers whose input dims do not
    divide into groups stay dense).
    """
    if not isinstance(quantization, dict):
        raise TypeError("quantization must be a dict")
    check_params(quantization.get("bits"), quantization.get("group_size"), f"{source}: quantization")
    swaps = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)) and not _is_switch(module):
            continue
        params = layer_params(quantization, path, source)
        if params is None:
            continue
        if weight_names is not None:
            if f"{path}.scales" not in weight_names and not isinstance(quantization.get(path), dict):
                continue
            swaps.append((path, _empty_like(module, **params)))
        elif module.weight.shape[-1] % params["group_size"] == 0:
            swaps.append((path, _quantized_copy(module, **params)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return model


def _is_switch(module: nn.Module) -> bool:
    """Stacked float experts (E, out, in): the model's SwitchLinear."""
    return isinstance(module, SwitchLinear)


def _empty_like(module: nn.Module, bits: int, group_size: int) -> nn.Module:
    if _is_switch(module):
        e, rows, cols = module.weight.shape
        return QuantizedSwitchLinear(cols, rows, e, group_size, bits)
    rows, cols = module.weight.shape
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(rows, cols, group_size, bits)
    return QuantizedLinear(cols, rows, "bias" in module, group_size, bits)


def _quantized_copy(module: nn.Module, bits: int, group_size: int) -> nn.Module:
    if _is_switch(module):
        return QuantizedSwitchLinear.from_switch(module, group_size, bits)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding.from_embedding(module, group_size, bits)
    return QuantizedLinear.from_linear(module, group_size, bits)
