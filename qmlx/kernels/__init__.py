"""qmlx's own CPU kernels for MLX's affine quantized matmul (a C++ extension, `_qmm`).

MLX's CPU `quantized_matmul` is scalar and single-threaded on x86-64; these kernels stream each packed
weight once per call (SIMD: AVX-512 / AVX2 chosen at run time on x86-64, NEON on arm64) over their own
thread pool, and multiply many rows with a blocked GEMM that dequantizes one small panel at a time.
The op is an MLX Primitive: lazy, differentiable in x (the product with W is the backward of the product
with Wᵀ), usable under `mx.compile`.

Used on the CPU backend only (Metal keeps MLX's kernels). Not used when `QMLX_KERNELS=0`, when the
extension was not built (no C++ compiler at install time), or when it was built for another mlx;
`status` says which, and `qmlx --version` prints it. Must be imported after `mlx.core`'s BLAS choice
(`qmlx/__init__.py` does that).
"""

from __future__ import annotations

import os

import mlx.core as mx

_ext = None
status = "not loaded"


def _load() -> None:
    global _ext, status
    if os.environ.get("QMLX_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        status = "off (QMLX_KERNELS=0): MLX's kernels"
        return
    try:
        from . import _qmm
    except ImportError as e:
        status = f"not built ({e}): MLX's kernels"
        return
    if _qmm.mlx_version != mx.__version__.split(".dev")[0]:
        status = (
            f"built for mlx {_qmm.mlx_version}, running mlx {mx.__version__}: MLX's kernels (reinstall qmlx)"
        )
        return
    _ext = _qmm
    status = f"qmlx {_qmm.isa()}, {_qmm.threads()} threads"


def available() -> bool:
    """Whether the extension is loaded and enabled."""
    return _ext is not None


def on_cpu() -> bool:
    """True when ops run on the CPU (no Metal, or the CPU chosen as the default device)."""
    return not mx.metal.is_available() or mx.default_device() == mx.cpu


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """mx.fast.rms_norm; one op on the CPU (MLX's CPU version is a chain of small ops)."""
    if _ext is not None and on_cpu():
        return _ext.rms_norm(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


def silu_mul(g: mx.array, u: mx.array) -> mx.array:
    """silu(g) * u (the SwiGLU of the MLP); one op with a vectorized exp on the CPU."""
    if _ext is not None and g.shape == u.shape and on_cpu():
        return _ext.silu_mul(g, u)
    return g * mx.sigmoid(g) * u


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """mx.fast.scaled_dot_product_attention for (B, H, L, D) queries over (B, H_kv, S, D) keys/values.

    On the CPU (mask None or "causal") as two matmuls around one softmax op that applies the causal
    mask itself, all on the kernels (no BLAS): MLX's CPU version builds the mask, runs a softmax with a
    scalar exp and its matmuls through whatever BLAS the wheel links.
    """
    if _ext is None or not on_cpu() or not (mask is None or (isinstance(mask, str) and mask == "causal")):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    B, H, L, D = q.shape
    if B == 1 and L == 1 and q.dtype == k.dtype == v.dtype == mx.float32:
        return _ext.attention_rows(q, [k], [v], scale)  # decode: one op, the batched decoder's own
    H_kv = k.shape[1]
    # GQA: the query heads of one KV head become rows of one product, (rep, L) -> rep * L
    qg = q.reshape(B, H_kv, (H // H_kv) * L, D)
    probs = _ext.softmax(_ext.matmul(qg, k.swapaxes(-1, -2)), scale, L if mask == "causal" and L > 1 else 0)
    return _ext.matmul(probs, v).reshape(B, H, L, v.shape[-1])


def attention_rows(q: mx.array, keys: list, values: list, scale: float) -> mx.array:
    """Decode attention for a batch whose row b has keys[b], values[b] of its own ((1, H_kv, S_b, D) each):
    q (B, H, 1, D) -> (B, H, 1, Dv). One op on the CPU for float32, each row exactly as `attention` computes
    it alone; elsewhere row by row."""
    if (
        _ext is not None
        and on_cpu()
        and q.dtype == mx.float32
        and all(x.dtype == mx.float32 for x in (*keys, *values))
    ):
        return _ext.attention_rows(q, list(keys), list(values), scale)
    return mx.concatenate(
        [attention(q[b : b + 1], k, v, scale) for b, (k, v) in enumerate(zip(keys, values))]
    )


# Rows from which a float x @ Wᵀ runs on the kernels' GEMM; fewer (decode) stay a BLAS GEMV.
GEMM_MIN_ROWS = 5


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ weightᵀ (+ bias) for a float layer (nn.Linear's result): prompts on the kernels' GEMM on the
    CPU, so a float model's prefill does not depend on the BLAS MLX links (the reference one on Linux)."""
    rows = x.size // max(x.shape[-1], 1)
    if _ext is None or rows < GEMM_MIN_ROWS or x.ndim < 2 or not on_cpu():
        return x @ weight.T + bias if bias is not None else x @ weight.T
    y = _ext.matmul(x.reshape(rows, x.shape[-1]), weight.T).reshape(*x.shape[:-1], weight.shape[0])
    return y + bias if bias is not None else y


def gather_linear(x: mx.array, weight: mx.array, indices: mx.array) -> mx.array:
    """out[t, j] = x[t] @ weight[indices[t, j]]ᵀ for stacked float weights (E, out, in): x (T, in) and
    indices (T, k) give (T, k, out), reading only the chosen experts' weights."""
    T, k = indices.shape
    y = mx.gather_mm(x.reshape(T, 1, 1, x.shape[-1]), weight.swapaxes(-1, -2), rhs_indices=indices)
    return y.reshape(T, k, weight.shape[1])


def rope(
    x: mx.array,
    dims: int,
    *,
    base: float | None,
    offset,
    freqs: mx.array | None = None,
    freq_list: list[float] | None = None,
) -> mx.array:
    """mx.fast.rope in the "rotate half" layout at scale 1; one op on the CPU for an integer offset, or a
    list of them, one per index of x's first axis (a batch of requests, each at its own position).
    `freq_list` is `freqs` as Python floats (kept by the caller so no call reads the array back)."""
    if _ext is not None and isinstance(offset, int | list) and on_cpu():
        if freqs is not None and freq_list is None:
            freq_list = freqs.tolist()
        offsets = offset if isinstance(offset, list) else [offset]
        return _ext.rope(x, dims, float(base or 0.0), 1.0, offsets, freq_list or [])
    if isinstance(offset, list):
        offset = mx.array(offset, dtype=mx.int32)
    return mx.fast.rope(x, dims, traditional=False, base=base, scale=1.0, offset=offset, freqs=freqs)


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    transpose: bool = True,
    group_size: int = 64,
    bits: int = 4,
    bias: mx.array | None = None,
) -> mx.array:
    """x · dequantize(w)ᵀ (transpose) or x · dequantize(w), as MLX's op of that name, on the CPU;
    `bias` (transposed product only) is added in the same op, in float32 before the result's rounding."""
    if _ext is None:
        raise RuntimeError(f"qmlx's kernels are not in use: {status}")
    return _ext.quantized_matmul(x, w, scales, biases, transpose, group_size, bits, bias)


def gather_quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    indices: mx.array,
    *,
    group_size: int = 64,
    bits: int = 4,
) -> mx.array:
    """out[t, j] = x[t] · dequantize(w[indices[t, j]])ᵀ for stacked quantized experts w (E, out, packed):
    x (T, in) and indices (T, k) give (T, k, out), as mx.gather_qmm, on the CPU in one op. The pairs are
    grouped by expert inside the op, so only the chosen experts' weights are read, each once per call."""
    if _ext is None:
        raise RuntimeError(f"qmlx's kernels are not in use: {status}")
    return _ext.gather_quantized_matmul(x, w, scales, biases, indices, True, group_size, bits)


def dequantize_rows(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    ids: mx.array,
    *,
    group_size: int,
    bits: int,
    dtype: mx.Dtype | None = None,
) -> mx.array:
    """dequantize(w)[ids] (an embedding lookup), dequantizing only the rows looked up: one op on the CPU.

    The rows come in `dtype` (default: the scales'); float32 rows from 16-bit scales are computed in
    float32, never rounded to the scales' dtype on the way."""
    dtype = dtype or scales.dtype
    if _ext is not None and on_cpu():
        rows = _ext.dequantize_rows(w, scales, biases, ids, group_size, bits, dtype == mx.float32)
    else:
        s, b = scales[ids], biases[ids]
        if s.dtype != dtype:  # computed in the rows' dtype, not rounded to the scales' on the way
            s, b = s.astype(dtype), b.astype(dtype)
        rows = mx.dequantize(w[ids], s, b, group_size=group_size, bits=bits)
    return rows if rows.dtype == dtype else rows.astype(dtype)


def log_softmax(x: mx.array) -> mx.array:
    """x - logsumexp(x) over the last axis, in float32 (log-probabilities from logits); one op with a
    vectorized exp on the CPU (MLX's CPU logsumexp over a 152K vocabulary took ~2 ms per decoded token)."""
    if _ext is not None and on_cpu():
        return _ext.log_softmax(x)
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


_load()
