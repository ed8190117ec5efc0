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
# λ = DAMP × mean diag(H) is added to H's diagonal. 0.1 rather than the paper's 0.01: with the few
# thousand calibration tokens a CPU conversion can afford, H of a 4864-input layer is nearly
# singular, and the stronger damping pulls GPTQ toward plain rounding where the data are thin
# (fixture, 4-bit g64, 8 x 512 stdlib tokens: mean perplexity gap +10.3% -> +9.3%).
DAMP = 0.1


def group_grid(w: mx.array, bits: int, group_size: int, dtype):
    """(scales, biases) spanning each group's [min, max], as round-to-nearest does.

    GPTQ's error feedback does better on the full range than on a searched, shrunk one: on the
    fixture (4-bit g64) the weighted range search gave +10.3% mean perplexity gap, min/max +9.4%.
    """
    _, s, b = fit_groups(w, bits, group_size, None, dtype, shrinks=(1.0,), refits=0)
    return s, b


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = `damp` × mean diagonal.

    With J the order-reversing permutation and J(H + λI)J = CCᵀ (C lower), U = J·C⁻¹·J: one
    Cholesky factorization and one triangular inverse in float32 (MLX's CPU linear algebra),
    ~6x faster than inverting H in float64 and factoring the inverse. Falls back to that
    float64 route if float32 loses positive definiteness.
    """
    h = h.astype(np.float32, copy=True)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * np.mean(np.diag(h))
    flipped = mx.array(np.ascontiguousarray(h[::-1, ::-1]))
    c = mx.linalg.cholesky(flipped, stream=mx.cpu)
    u = np.array(mx.linalg.tri_inv(c, upper=False, stream=mx.cpu))[::-1, ::-1]
    if np.all(np.isfinite(u)) and np.all(np.diag(u) > 0):
        return np.ascontiguousarray(np.triu(u))
    hinv = np.linalg.inv(h.astype(np.float64))
    return np.linalg.cholesky(hinv).T.astype(np.float32)


class Hessian:
    """What GPTQ needs from H = XᵀX, computed once for all the layers fed the same inputs.

    With `act_order`, columns are quantized in order of decreasing diag(H) (the inputs with
    the most energy first, while the most columns remain to absorb their error); `perm` is that
    order and `u` the inverse Cholesky factor of the permuted H.
    """

    def __init__(self, hessian: mx.array, damp: float = DAMP, act_order: bool = False):
        h = np.array(hessian.astype(mx.float32), dtype=np.float32)
        self.diag = np.diag(h).copy()
        cols = h.shape[0]
        self.perm = np.argsort(-self.diag, kind="stable") if act_order else np.arange(cols)
        self.u = inverse_cholesky(h[np.ix_(self.perm, self.perm)], damp)


def gptq(
    w: mx.array, hessian: mx.array | Hessian, bits: int, group_size: int, dtype=mx.bfloat16
) -> tuple[mx.array, mx.array, mx.array]:
    """(packed uint32, scales, biases) of W (rows, cols) given H = XᵀX (cols, cols).

    Columns go in `hessian.perm` order. In natural order each group's scale and bias are
    fitted when its first column is reached, from the already-corrected weights; in any other
    order ("static groups") they are fitted on the original weights before the pass, since a
    group's columns are then reached at scattered times.
    """
    hs = hessian if isinstance(hessian, Hessian) else Hessian(hessian)
    W = np.array(w.astype(mx.float32), dtype=np.float32, copy=True)
    rows, cols = W.shape
    W[:, hs.diag <= 0] = 0.0
    U, perm = hs.u, hs.perm
    natural = bool(np.all(perm == np.arange(cols)))
    top = 2**bits - 1
    groups = cols // group_size
    S = np.zeros((rows, groups), dtype=np.float32)
    B = np.zeros_like(S)
    if not natural:
        s, b = group_grid(mx.array(W), bits, group_size, dtype)
        S[:], B[:] = np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))
        W = W[:, perm]
    group_of = perm // group_size
    Qp = np.zeros((rows, cols), dtype=np.uint8)
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        for j in range(i2 - i1):
            col = i1 + j
            g = group_of[col]
            if natural and col % group_size == 0:
                s, b = group_grid(mx.array(W1[:, j : j + group_size]), bits, group_size, dtype)
                S[:, g] = np.array(s.astype(mx.float32))[:, 0]
                B[:, g] = np.array(b.astype(mx.float32))[:, 0]
            safe = np.where(S[:, g] == 0, 1.0, S[:, g])
            q = np.clip(np.rint((W1[:, j] - B[:, g]) / safe), 0, top)
            Qp[:, col] = q
            err = (W1[:, j] - (q * S[:, g] + B[:, g])) / U[col, col]
            W1[:, j:] -= err[:, None] * U[col, col:i2][None, :]
            E1[:, j] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    Q = np.empty_like(Qp)
    Q[:, perm] = Qp
    packed = mx.array(pack(Q, bits))
    return packed, mx.array(S).astype(dtype), mx.array(B).astype(dtype)
