"""Affine group quantization: the math, quantized layers, recipes, and the model swap."""

from .apply import quantize_model
from .groups import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizationError,
    bits_per_weight,
    check_params,
    dequantize,
    quantize,
)
from .layers import QuantizedEmbedding, QuantizedLinear, QuantizedSwitchLinear
from .recipes import RECIPES, layer_params, plan

__all__ = [
    "RECIPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantizationError",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "QuantizedSwitchLinear",
    "bits_per_weight",
    "check_params",
    "dequantize",
    "layer_params",
    "plan",
    "quantize",
    "quantize_model",
]
