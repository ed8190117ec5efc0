"""GPTQ: quantize a layer column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a linear layer y = W·x the output error over calibration inputs X is tr(ΔW·H·ΔWᵀ) with
H = XᵀX. Rounding column j alone leaves an error that the remaining columns can partly cancel;
the optimal correction uses the Cholesky factor of H⁻¹ (Frantar et al., 2022). Group scales and
biases are chosen when the first column of a group is reached, from the already-corrected
weights, so the output is an ordinary affine group-quantized matrix.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .search import fit_groups, pack

# Columns corrected together before the lazy update of the rest (a multiple of every group size).
BLOCK = 128


def inverse_cholesky(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = `damp` × mean diagonal (keeps H invertible)."""
    h = h.astype(np.float64, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.inv(h)
    return np.linalg.cholesky(hinv).T.astype(np.float32)


class Hessian:
    """What GPTQ needs from H = XᵀX, computed once for all the layers fed the same inputs."""

    def __init__(self, hessian: mx.array, damp: float = 0.01):
        h = np.array(hessian.astype(mx.float32), dtype=np.float32)
        self.diag = np.diag(h).copy()
        self.u = inverse_cholesky(h, damp)
        self.importance = mx.array(np.maximum(self.diag, 0) + 1e-8)


def gptq(
    w: mx.array, hessian: mx.array | Hessian, bits: int, group_size: int, dtype=mx.bfloat16
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32, scales, biases) of W (rows, cols) given H = XᵀX (cols, cols)."""
    hs = hessian if isinstance(hessian, Hessian) else Hessian(hessian)
    W = np.array(w.astype(mx.float32), dtype=np.float32, copy=True)
    rows, cols = W.shape
    W[:, hs.diag <= 0] = 0.0
    U, importance = hs.u, hs.importance
    top = 2**bits - 1
    Q = np.zeros((rows, cols), dtype=np.uint8)
    S = np.zeros((rows, cols // group_size), dtype=np.float32)
    B = np.zeros_like(S)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                g = col // group_size
                _, s, b = fit_groups(
                    mx.array(W1[:, j : j + group_size]),
                    bits,
                    group_size,
                    importance[col : col + group_size],
                    dtype,
                )
                S[:, g], B[:, g] = np.array(s)[:, 0], np.array(b)[:, 0]
                safe = np.where(S[:, g] == 0, 1.0, S[:, g])
            q = np.clip(np.rint((W1[:, j] - B[:, g]) / safe), 0, top)
            Q[:, col] = q
            err = (W1[:, j] - (q * S[:, g] + B[:, g])) / U[col, col]
            W1[:, j:] -= err[:, None] * U[col, col:i2][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    packed = mx.array(pack(Q, bits))
    return packed, mx.array(S).astype(dtype), mx.array(B).astype(dtype)
