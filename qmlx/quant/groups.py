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
    """(packed uint32, scales, biases) of a 2-D matrix; scales/biases take w's dtype."""
    if w.ndim != 2 or w.shape[-1] % group_size:
        raise QuantizationError(
            f"cannot quantize a tensor of shape {list(w.shape)} with group_size {group_size}: "
            "it must be 2-D with columns divisible by the group size"
        )
    return mx.quantize(w, group_size=group_size, bits=bits)


def dequantize(packed: mx.array, scales: mx.array, biases: mx.array, bits: int, group_size: int) -> mx.array:
    """The dense matrix (in the scales' dtype) a packed triple stands for."""
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)


def quantize_rows(
    w: mx.array, bits: int, group_size: int, block_rows: int = 16384
) -> tuple[mx.array, mx.array, mx.array]:
    """`quantize`, evaluated one block of rows at a time to bound the temporary memory.

    The result is identical to quantizing the whole matrix at once (groups never span rows).
    """
    if w.shape[0] <= block_rows:
        out = quantize(w, bits, group_size)
        mx.eval(out)
        return out
    parts = []
    for start in range(0, w.shape[0], block_rows):
        part = quantize(w[start : start + block_rows], bits, group_size)
        mx.eval(part)
        parts.append(part)
    return tuple(mx.concatenate([p[i] for p in parts]) for i in range(3))


def bits_per_weight(bits: int, group_size: int, scale_bits: int = 16) -> float:
    """Storage per weight, counting each group's scale and bias (16-bit by default)."""
    return bits + 2 * scale_bits / group_size


def group_error_bound(scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """The largest reconstruction error the format allows, per group.

    One quantization step (the scale), not half of one: MLX shifts each group's grid so that
    zero is exactly representable, which can move the nearest level up to a full step away.
    Storing scale and bias in a 16-bit dtype adds their rounding: up to one unit in the last
    place of the bias and of the largest level, scale·(2^bits − 1).
    """
    s, b = mx.abs(scales.astype(mx.float32)), mx.abs(biases.astype(mx.float32))
    ulp = {mx.float32: 2.0**-23, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}[scales.dtype]
    return s + ulp * (b + s * (2**bits - 1))
