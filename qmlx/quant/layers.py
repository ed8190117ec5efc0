"""Quantized Linear and Embedding layers, parameter-compatible with MLX's own.

Parameter names (`weight` packed uint32, `scales`, `biases`, optional `bias`) match
`mlx.nn.QuantizedLinear`/`QuantizedEmbedding`, so MLX-community checkpoints load as they are.

Why not use MLX's layers directly: on the CPU backend these layers run qmlx's own kernels
(`qmlx.kernels`: SIMD, multi-threaded, a blocked GEMM for many rows). Without them (not built, or
`QMLX_KERNELS=0`) MLX's CPU `mx.quantized_matmul` is slow for many rows (a 4864×896 4-bit layer with
128 tokens: ~400 ms, versus ~30 ms to dequantize and run a dense matmul through OpenBLAS), so the
layers then choose per call. On Metal, MLX's kernels always.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn

from .. import kernels
from .groups import check_params, packed_cols, quantize

# Above this many rows (tokens) the CPU backend dequantizes and runs a dense matmul. The
# dequantized matrix is a temporary (about twice its float size while MLX builds it); splitting
# it into blocks does not help, as MLX's scheduler dequantizes every block before multiplying.
DENSE_MIN_ROWS = 8


def on_cpu_backend() -> bool:
    """True when matmuls run on the CPU (no Metal, or the CPU chosen as default device)."""
    return kernels.on_cpu()


def use_kernels() -> bool:
    """Whether products run on qmlx's CPU kernels (CPU backend, extension built and enabled)."""
    return kernels.available() and on_cpu_backend()


def use_dense(rows: int) -> bool:
    """Whether a product with `rows` input rows should dequantize first."""
    return rows > DENSE_MIN_ROWS and on_cpu_backend()


def _rows(x: mx.array) -> int:
    return x.size // max(x.shape[-1], 1)


# Output rows dequantized at once by the dense path: a 152K-row tied head is 0.5 GB in float32
# for a 0.5B model (2.5 GB for 72B), so it is dequantized and multiplied a block at a time.
OUT_BLOCK = 16384


@cache
def _dense_product(group_size: int, bits: int):
    """x @ dequantize(W)ᵀ holding at most one block of W in float at a time, forward and back.

    Each block's dequantization is made to depend on the previous product: otherwise MLX's
    scheduler may dequantize every block (and every layer) before the first multiplication,
    which holds the whole model in float at once. Under autograd (LoRA over a frozen quantized
    base) the gradient dequantizes W again instead of keeping each layer's float copy from the
    forward pass to the backward one. The packed weights are frozen: their cotangents are
    zeros that nothing evaluates.
    """

    def dense(w, scales, biases, rows: slice, after):
        w, scales, biases = mx.depends([w[rows], scales[rows], biases[rows]], after)
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits).astype(after.dtype)

    def blocks(n: int):
        return [slice(i, min(i + OUT_BLOCK, n)) for i in range(0, n, OUT_BLOCK)]

    @mx.custom_function
    def product(x, w, scales, biases):
        outs, after = [], x
        for rows in blocks(w.shape[0]):
            after = x @ dense(w, scales, biases, rows, after).T
            outs.append(after)
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=-1)

    @product.vjp
    def product_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        dx = None
        for rows in blocks(w.shape[0]):
            part = cotangent[..., rows] @ dense(w, scales, biases, rows, cotangent if dx is None else dx)
            dx = part if dx is None else dx + part
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return product


def _quantized_product(layer, x: mx.array, bias: mx.array | None = None) -> mx.array:
    """x @ Wᵀ (+ bias) for a layer holding a packed W, by whichever path suits this call."""
    if use_kernels():
        return kernels.quantized_matmul(
            x,
            layer.weight,
            layer.scales,
            layer.biases,
            group_size=layer.group_size,
            bits=layer.bits,
            bias=bias,
        )
    y = _unfused_product(layer, x)
    return y + bias if bias is not None else y


def _scales_for(layer, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """The layer's scales and biases in `dtype` for MLX's ops: the loader keeps checkpoint 16-bit ones for
    the CPU kernels, and MLX's quantized matmul would compute in 16 bits with them."""
    s, b = layer.scales, layer.biases
    if mx.issubdtype(dtype, mx.floating) and s.dtype != dtype:
        s, b = s.astype(dtype), b.astype(dtype)
    return s, b


def _unfused_product(layer, x: mx.array) -> mx.array:
    scales, biases = _scales_for(layer, x.dtype)
    if not use_dense(_rows(x)):
        return mx.quantized_matmul(
            x,
            layer.weight,
            scales,
            biases,
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
        )
    return _dense_product(layer.group_size, layer.bits)(x, layer.weight, scales, biases)


class QuantizedLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W stored as affine groups."""

    def __init__(self, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int):
        super().__init__()
        check_params(bits, group_size)
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((output_dims, packed_cols(input_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // group_size))
        self.biases = mx.zeros((output_dims, input_dims // group_size))
        if bias:
            self.bias = mx.zeros((output_dims,))
        # Packed weights cannot be trained; adapters (LoRA) wrap these layers instead.
        self.freeze()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, bits: int) -> QuantizedLinear:
        """Quantize an existing dense layer."""
        out_dims, in_dims = linear.weight.shape
        layer = cls(in_dims, out_dims, "bias" in linear, group_size, bits)
        layer.weight, layer.scales, layer.biases = quantize(linear.weight, bits, group_size)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def _extra_repr(self) -> str:
        out_dims, packed = self.weight.shape
        return f"{packed * 32 // self.bits}, {out_dims}, bits={self.bits}, group_size={self.group_size}"

    def __call__(self, x: mx.array) -> mx.array:
        return _quantized_product(self, x, self.bias if "bias" in self else None)


class QuantizedEmbedding(nn.Module):
    """A lookup table stored as affine groups; `as_linear` serves as a tied output head."""

    def __init__(self, num_embeddings: int, dims: int, group_size: int, bits: int):
        super().__init__()
        check_params(bits, group_size)
        self.group_size, self.bits = group_size, bits
        self.weight = mx.zeros((num_embeddings, packed_cols(dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((num_embeddings, dims // group_size))
        self.biases = mx.zeros((num_embeddings, dims // group_size))
        # The looked-up rows' dtype when it is not the scales' (the loader keeps 16-bit scales for the CPU
        # kernels under a float32 model): None is the scales' dtype.
        self.out_dtype: mx.Dtype | None = None
        self.freeze()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int, bits: int) -> QuantizedEmbedding:
        """Quantize an existing embedding table."""
        n, dims = emb.weight.shape
        layer = cls(n, dims, group_size, bits)
        layer.weight, layer.scales, layer.biases = quantize(emb.weight, bits, group_size)
        return layer

    def _extra_repr(self) -> str:
        n, packed = self.weight.shape
        return f"{n}, {packed * 32 // self.bits}, bits={self.bits}, group_size={self.group_size}"

    def __call__(self, ids: mx.array) -> mx.array:
        # Only the looked-up rows are dequantized.
        return kernels.dequantize_rows(
            self.weight, self.scales, self.biases, ids, group_size=self.group_size, bits=self.bits,
            dtype=self.out_dtype,
        )  # fmt: skip

    def as_linear(self, x: mx.array) -> mx.array:
        """x @ Eᵀ: the logits of a head tied to this embedding."""
        return _quantized_product(self, x)


class QuantizedSwitchLinear(nn.Module):
    """Stacked experts (E, out, in) stored as affine groups, applied per row to the chosen experts.

    Parameter names and shapes match the MLX community's `QuantizedSwitchLinear` (weight (E, out,
    in·bits/32), scales and biases (E, out, in/group)). On the CPU with qmlx's kernels one op groups the
    (token, choice) pairs by expert and streams each chosen expert once (`kernels.gather_quantized_matmul`);
    elsewhere `mx.gather_qmm`.
    """

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int, bits: int):
        super().__init__()
        check_params(bits, group_size)
        self.group_size, self.bits = group_size, bits
        e, o = num_experts, output_dims
        self.weight = mx.zeros((e, o, packed_cols(input_dims, bits)), dtype=mx.uint32)
        self.scales = mx.zeros((e, o, input_dims // group_size))
        self.biases = mx.zeros((e, o, input_dims // group_size))
        self.freeze()

    @classmethod
    def from_switch(cls, layer: nn.Module, group_size: int, bits: int) -> QuantizedSwitchLinear:
        e, out_dims, in_dims = layer.weight.shape
        q = cls(in_dims, out_dims, e, group_size, bits)
        q.weight, q.scales, q.biases = quantize(layer.weight, bits, group_size)
        return q

    def _extra_repr(self) -> str:
        e, out_dims, packed = self.weight.shape
        return f"{e} experts, {packed * 32 // self.bits}, {out_dims}, bits={self.bits}, group_size={self.group_size}"

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        if use_kernels():
            return kernels.gather_quantized_matmul(
                x, self.weight, self.scales, self.biases, indices, group_size=self.group_size, bits=self.bits
            )
        T, k = indices.shape
        scales, biases = _scales_for(self, x.dtype)
        y = mx.gather_qmm(
            x.reshape(T, 1, 1, x.shape[-1]),
            self.weight,
            scales,
            biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
        )
        return y.reshape(T, k, self.weight.shape[1])
