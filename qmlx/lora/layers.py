"""LoRA as a wrapper around a frozen linear layer, dense or quantized (QLoRA).

y = base(x) + scale · B·A·dropout(x), with A (rank, in) and B (out, rank). B starts at zero,
so a fresh adapter leaves the model unchanged; scale = alpha / rank, the convention of
Hugging Face PEFT, so exported adapters mean the same thing there. The base layer is frozen:
only A and B are trained and saved.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..quant.groups import dequantize, quantize
from ..quant.layers import QuantizedLinear, use_kernels


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` or `QuantizedLinear` plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = base_shape(base)
        base.freeze()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout)
        # A: Kaiming-uniform like PEFT's default; B: zeros (the adapter starts as a no-op).
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_A = mx.random.uniform(-bound, bound, (rank, in_dims))
        self.lora_B = mx.zeros((out_dims, rank))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (self.dropout(x) @ self.lora_A.T.astype(x.dtype)) @ self.lora_B.T.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The dense update scale·B·A this adapter adds to the base weight, (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def fuse(self, bits: int | None = None, group_size: int | None = None) -> nn.Module:
        """A plain layer computing base + update: dense, or quantized with `bits`.

        A quantized base keeps its own bits and group size unless others are given; a dense
        base stays dense unless `bits` is given.
        """
        base = self.base
        if isinstance(base, QuantizedLinear):
            # In float32: on the CPU kernels the scales are the checkpoint's 16-bit ones, and the compute
            # dtype there is float32 (elsewhere the scales' dtype is the compute dtype).
            f32 = mx.float32
            w = dequantize(
                base.weight, base.scales.astype(f32), base.biases.astype(f32), base.bits, base.group_size
            )
            bits = bits or base.bits
            group_size = group_size or base.group_size
            dtype = f32 if use_kernels() else base.scales.dtype
        else:
            w = base.weight
            dtype = w.dtype
        w = (w.astype(mx.float32) + self.delta().astype(mx.float32)).astype(dtype)
        out_dims, in_dims = w.shape
        has_bias = "bias" in base
        if bits is None:
            fused = nn.Linear(in_dims, out_dims, bias=has_bias)
            fused.weight = w
        else:
            fused = QuantizedLinear(in_dims, out_dims, has_bias, group_size, bits)
            fused.weight, fused.scales, fused.biases = quantize(w, bits, group_size)
        if has_bias:
            fused.bias = base.bias
        return fused


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a dense or quantized linear layer."""
    if isinstance(layer, QuantizedLinear):
        out_dims, packed = layer.weight.shape
        return out_dims, packed * 32 // layer.bits
    if isinstance(layer, nn.Linear):
        return tuple(layer.weight.shape)
    raise TypeError(f"LoRA wraps linear layers, not {type(layer).__name__}")
