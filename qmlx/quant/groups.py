"""Affine group quantization: the math, on MLX's own packing.

Every `group_size` consecutive elements of a row share one scale and one bias, and each element
is stored as a `bits`-wide unsigned integer q, so that w ≈ scale·q + bias. The packed layout
(elements packed little-end first into uint32 words, shape (rows, cols·bits/32)) is exactly what
`mx.quantize` produces, which is what MLX-community checkpoints contain; keeping it means those
folders load unchanged and `mx.quantized_matmul` can use the packed weights directly.

Quantization is row-local, so a matrix may be quantized in blocks of rows (convert/ relies on
this to quantize a 152K-row embedding without holding it all in float32).
"""

from __future__ import annotations

import mlx.core as mx

from ..errors import UserError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


class QuantizationError(UserError):
    """Quantization settings qmlx cannot honour; the message names the field or flag."""


def check_params(bits, group_size, where: str = "quantization") -> None:
    """Refuse bits/group sizes outside the supported sets, naming `where` they came from."""
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise QuantizationError(
            f"{where}: bits {bits!r} is not supported (choose from {', '.join(map(str, SUPPORTED_BITS))})"
        )
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size not in SUPPORTED_GROUP_SIZES
    ):
        raise QuantizationError(
            f"{where}: group_size {group_size!r} is not supported "
            f"(choose from {', '.join(map(str, SUPPORTED_GROUP_SIZES))})"
        )


def packed_cols(cols: int, bits: int) -> int:
    """uint32 words per row once `cols` elements of `bits` bits are packed."""
    return cols * bits // 32


def quantize(w: mx.array, bits: int, group_size: int) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32, scales, biases) of a 2-D matrix, or of a stack of them (experts: 3-D), grouped
    along the last axis; scales/biases take w's dtype."""
    if w.ndim not in (2, 3) or w.shape[-1] % group_size:
        raise QuantizationError(
            f"cannot quantize a tensor of shape {list(w.shape)} with group_size {group_size}: "
            "it must be 2-D (or 3-D, stacked experts) with columns divisible by the group size"
        )
    return mx.quantize(w, group_size=group_size, bits=bits)


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """The dense matrix (in the scales' dtype) a packed triple stands for."""
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)


def bits_per_weight(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage per weight, counting each group's scale and bias (16-bit by default)."""
    return bits + 2 * scale_bits / group_size
