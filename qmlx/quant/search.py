"""Choosing each group's scale and bias by measured error, and packing integers MLX's way.

Round-to-nearest (`mx.quantize`) spans each group's full range [min, max]: one outlier stretches
the step for the whole group. Here a few shrunk ranges are tried per group and the one with the
smallest (optionally importance-weighted) squared reconstruction error is kept, then the scale
and bias are refitted by least squares for the chosen integers. The result is still one scale
and one bias per group, `w ≈ s·q + b`, so the output is an ordinary affine checkpoint.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# Fractions of each group's [min, max] range tried as the quantization range.
SHRINKS = tuple(1.0 - 0.04 * i for i in range(10))  # 1.0 … 0.64
# Rounds of alternating least-squares refinement after the range search.
REFITS = 1


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words holding integers q (rows, cols) as one little-endian bit stream per row.

    The layout `mx.quantize` writes: element j occupies bits [j·bits, (j+1)·bits) of its row.
    """
    rows, cols = q.shape
    q = np.ascontiguousarray(q, dtype=np.uint8)
    shifts = np.arange(bits, dtype=np.uint8)
    stream = ((q[:, :, None] >> shifts) & 1).reshape(rows, cols * bits)
    return np.packbits(stream, axis=1, bitorder="little").view("<u4")


def _rounded(a: mx.array, dtype) -> mx.array:
    """`a` as it will be stored (scales/biases are saved in the checkpoint's dtype)."""
    return a.astype(dtype).astype(mx.float32)


@mx.compile
def _codes(wg: mx.array, scale: mx.array, bias: mx.array, top: mx.array) -> mx.array:
    inv = mx.where(scale == 0, 0.0, 1.0 / scale)
    return mx.clip(mx.round((wg - bias) * inv), 0, top)


@mx.compile
def _error(wg: mx.array, imp: mx.array, scale: mx.array, bias: mx.array, top: mx.array):
    """Per-group weighted squared error of the codes nearest to wg on the grid (scale, bias)."""
    q = _codes(wg, scale, bias, top)
    return (mx.square(scale * q + bias - wg) * imp).sum(axis=-1, keepdims=True)


def fit_groups(
    w: mx.array,
    bits: int,
    group_size: int,
    importance: mx.array | None = None,
    dtype=mx.bfloat16,
    shrinks=SHRINKS,
    refits: int = REFITS,
) -> tuple[mx.array, mx.array, mx.array]:
    """(integer codes, scales, biases) for a 2-D float matrix, chosen per group by error.

    `importance` (cols,) weighs each input channel's squared error (e.g. the mean squared
    activation it multiplies); None weighs all equally. Codes are float32 holding integers.
    """
    rows, cols = w.shape
    groups = cols // group_size
    top = mx.array(2**bits - 1, dtype=mx.float32)
    wg = w.astype(mx.float32).reshape(rows, groups, group_size)
    imp = mx.ones((groups, group_size)) if importance is None else importance.reshape(groups, group_size)
    lo, hi = wg.min(axis=-1, keepdims=True), wg.max(axis=-1, keepdims=True)
    best_err = best_s = best_b = None
    for f in shrinks:
        s = _rounded((hi - lo) * f / top, dtype)
        b = _rounded(lo * f, dtype)
        if f != 1.0:
            # Keep the shrunk range centred where the mass is: shift it inside [lo, hi].
            b = _rounded(mx.clip(b, lo, hi - s * top), dtype)
        err = _error(wg, imp, s, b, top)
        if best_err is None:
            best_err, best_s, best_b = err, s, b
        else:
            better = err < best_err
            best_err = mx.where(better, err, best_err)
            best_s, best_b = mx.where(better, s, best_s), mx.where(better, b, best_b)
        mx.eval(best_err, best_s, best_b)
    # Alternate: least-squares scale and bias for the codes, then the codes for them; keep
    # each group's step only where it lowers that group's error.
    q = _codes(wg, best_s, best_b, top)
    for _ in range(refits):
        s, b = _refit(wg, q, imp, best_s, best_b, dtype)
        q_new = _codes(wg, s, b, top)
        err = _error(wg, imp, s, b, top)
        keep = err < best_err
        best_err = mx.where(keep, err, best_err)
        best_s, best_b = mx.where(keep, s, best_s), mx.where(keep, b, best_b)
        q = mx.where(keep, q_new, q)
        mx.eval(q, best_s, best_b, best_err)
    return q.reshape(rows, cols), best_s[..., 0], best_b[..., 0]


def _refit(wg, q, imp, s0, b0, dtype):
    """Weighted least-squares scale and bias for fixed codes (falls back where degenerate)."""
    sw = imp.sum(-1, keepdims=True)
    mq = (imp * q).sum(-1, keepdims=True) / sw
    mw = (imp * wg).sum(-1, keepdims=True) / sw
    var = (imp * mx.square(q - mq)).sum(-1, keepdims=True)
    cov = (imp * (q - mq) * (wg - mw)).sum(-1, keepdims=True)
    ok = var > 1e-12
    s = mx.where(ok, cov / mx.where(ok, var, 1.0), s0)
    b = mx.where(ok, mw - s * mq, b0)
    return _rounded(s, dtype), _rounded(b, dtype)


def quantize_searched(
    w: mx.array, bits: int, group_size: int, importance: mx.array | None = None, dtype=mx.bfloat16
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32, scales, biases) in `dtype`, like `mx.quantize` but with searched ranges."""
    q, s, b = fit_groups(w, bits, group_size, importance, dtype)
    mx.eval(q, s, b)
    packed = mx.array(pack(np.array(q).astype(np.uint8), bits))
    return packed, s.astype(dtype), b.astype(dtype)
