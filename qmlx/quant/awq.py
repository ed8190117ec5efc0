"""Activation-aware scaling (AWQ): protect the input channels that carry large activations.

A linear layer's output is unchanged if input channel j of its weight is multiplied by s_j and
the activation feeding it divided by s_j. Dividing the activation is free when the producer is
an RMSNorm (divide its weight) or another linear layer (divide its output rows). Scaling up the
weight columns that meet large activations gives them finer steps relative to their size once
quantized, at the expense of channels that matter less (Lin et al., 2023). The scale is
s = mean|x|^α, with α searched on calibration activations for the smallest output error.

The folds, for a Qwen2 block:
  input_layernorm → q_proj, k_proj, v_proj;   post_attention_layernorm → gate_proj, up_proj;
  v_proj → o_proj (per kv head: heads sharing a kv head share its scales); up_proj → down_proj.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

GRID = 20


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """w rounded to the nearest affine group grid, back in float (for measuring errors)."""
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def search_scales(
    x: mx.array,
    magnitude: mx.array,
    weights: list[mx.array],
    bits: int,
    group_size: int,
    grid: int = GRID,
) -> mx.array:
    """Per-input-channel scales s for `weights` (all fed by activations x, rows × cols).

    `magnitude` is mean|x| per channel over all calibration tokens (x may be a subset); scales
    that must be equal (tied channels) stay equal because s is a power of the magnitude. α = 0
    (no scaling, plain rounding) is among the candidates, so the chosen s never does worse
    than rounding on the sample.
    """
    ref = [x @ w.T for w in weights]
    mag = mx.maximum(magnitude.astype(mx.float32), 1e-6)
    best, best_err = mx.ones_like(mag), None
    for i in range(grid):
        alpha = i / grid
        s = mag**alpha
        s = s / mx.sqrt(s.max() * s.min())
        err = sum(
            mx.square(x @ (fake_quantize(w * s, bits, group_size) / s).T - r).mean()
            for w, r in zip(weights, ref)
        )
        mx.eval(err)
        if best_err is None or err.item() < best_err:
            best, best_err = s, err.item()
    return best


def fold_into_norm(norm: nn.RMSNorm, linears: list[nn.Linear], s: mx.array) -> None:
    """norm(x)/s feeds linears whose columns are scaled by s: the same function."""
    norm.weight = norm.weight / s
    for lin in linears:
        lin.weight = lin.weight * s


def fold_into_linear(prev: nn.Linear, nxt: nn.Linear, s_prev: mx.array, s_next: mx.array) -> None:
    """prev's output rows divided by s_prev, nxt's input columns multiplied by s_next.

    s_next is s_prev laid out on nxt's inputs (the same vector unless channels are shared).
    """
    prev.weight = prev.weight / s_prev[:, None]
    if "bias" in prev:
        prev.bias = prev.bias / s_prev
    nxt.weight = nxt.weight * s_next


def tie_heads(magnitude: mx.array, n_heads: int, n_kv_heads: int) -> tuple[mx.array, mx.array]:
    """(per v_proj output, per o_proj input) magnitudes, averaged over the query heads that
    share a kv head: o_proj's input for head h is v_proj's output for kv head h // rep."""
    rep = n_heads // n_kv_heads
    per_kv = magnitude.reshape(n_kv_heads, rep, -1).mean(axis=1)  # (n_kv, head_dim)
    expanded = mx.broadcast_to(per_kv[:, None, :], (n_kv_heads, rep, per_kv.shape[-1]))
    return per_kv.reshape(-1), expanded.reshape(-1)
