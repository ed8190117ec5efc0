"""The Qwen2 decoder in MLX: `Model(config)(ids, cache=None) -> logits`.

Attribute names match the Hugging Face weight names, so loading is a plain name→array map.
The model is pure: no tokenizer, sampling, files or flags. It sees a cache only through
`make_mask`, `offset` and `update_and_fetch` (see qmlx/cache.py).
"""

from __future__ import annotations

import re
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .attention import attend
from .config import ModelConfig
from .errors import UserError


class RoPE(nn.Module):
    """Rotary embedding in the "rotate half" layout Qwen2 uses (not the interleaved one)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dims = config.head_dim
        self.base = float(config.rope_theta)
        inv_freq, self.attention_factor = config.rope_frequencies()
        # mx.fast.rope takes wavelengths (1/inv_freq) when frequencies are custom.
        self._freq_list = None if inv_freq is None else [1.0 / f for f in inv_freq]
        self._freqs = None if inv_freq is None else mx.array(self._freq_list, mx.float32)

    def __call__(self, x: mx.array, offset: int | list[int] | mx.array = 0) -> mx.array:
        if self.attention_factor != 1.0:
            # YaRN scales cos and sin; RoPE is linear, so scaling x is the same.
            x = x * self.attention_factor
        if self._freqs is None:
            return kernels.rope(x, self.dims, base=self.base, offset=offset)
        return kernels.rope(
            x, self.dims, base=None, offset=offset, freqs=self._freqs, freq_list=self._freq_list
        )


class Linear(nn.Linear):
    """nn.Linear (same parameters, same result) computed through qmlx.kernels on the CPU."""

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.linear(x, self.weight, self.bias if "bias" in self else None)


class RMSNorm(nn.Module):
    """nn.RMSNorm's parameters and result, through qmlx.kernels (one op on the CPU)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return kernels.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, bias = config.hidden_size, config.attention_bias
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = Linear(d, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(d, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, d, bias=False)
        self.rope = RoPE(config)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, n*hd) -> (B, n, L, hd)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attend(q, k, v, self.scale, mask, cache)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        d, h = (
            config.hidden_size,
            config.intermediate_size if intermediate_size is None else intermediate_size,
        )
        self.gate_proj = Linear(d, h, bias=False)
        self.up_proj = Linear(d, h, bias=False)
        self.down_proj = Linear(h, d, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class SwitchLinear(nn.Module):
    """`num_experts` linears stacked on a leading axis (weight (E, out, in), no bias), applied per row to
    the experts a router chose. Quantized as `qmlx.quant.QuantizedSwitchLinear` (same parameter names as
    the MLX community's layer, so stacked checkpoints load as they are)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = input_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        return kernels.gather_linear(x, self.weight, indices)


class Experts(nn.Module):
    """The routed SwiGLU experts of a Qwen2-MoE block, stacked (the MLX community's `switch_mlp`).

    x (T, d) and the chosen experts (T, k) give (T, k, d): only the chosen experts' weights are read.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
        self.gate_proj = SwitchLinear(d, h, e)
        self.up_proj = SwitchLinear(d, h, e)
        self.down_proj = SwitchLinear(h, d, e)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        T, k = indices.shape
        h = kernels.silu_mul(self.gate_proj(x, indices), self.up_proj(x, indices))  # (T, k, h)
        return self.down_proj(h.reshape(T * k, -1), indices.reshape(T * k, 1)).reshape(T, k, -1)


class SparseMoE(nn.Module):
    """Qwen2-MoE's sparse block: a softmax router (float32) picks `num_experts_per_tok` experts per token,
    their outputs are summed with the router's weights (renormalised when `norm_topk_prob`), plus the
    shared expert scaled by sigmoid(shared_expert_gate(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = Linear(d, config.num_experts, bias=False)
        self.switch_mlp = Experts(config)
        self.shared_expert = MLP(config, config.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(d, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        # The k largest, ties to the lower expert number as torch.topk does.
        indices = mx.stop_gradient(mx.argsort(-probs, axis=-1)[:, :k]).astype(mx.int32)
        weights = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        y = self.switch_mlp(x, indices)
        y = (y * weights.astype(y.dtype)[..., None]).sum(axis=1)
        y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = SparseMoE(config) if config.sparse_layer(index) else MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen2Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, i) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        return self.norm(self.blocks(h, cache))

    def blocks(self, h: mx.array, cache=None) -> mx.array:
        """Run the decoder blocks this module holds: all of them, or a pipeline stage's share."""
        L = h.shape[1]
        if cache is None:
            cache = [None] * len(self.layers)
            mask = "causal" if L > 1 else None
        else:
            mask = cache[0].make_mask(L)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return h


class Model(nn.Module):
    """Qwen2ForCausalLM (or Qwen2MoeForCausalLM): token ids (B, L) [+ per-layer caches] -> logits (B, L, vocab)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        return self.head(self.model(inputs, cache, input_embeddings))

    def head(self, h: mx.array) -> mx.array:
        """Project hidden states to logits (through the embedding when the head is tied)."""
        if self.config.tie_word_embeddings:
            emb = self.model.embed_tokens
            return kernels.linear(h, emb.weight) if isinstance(emb, nn.Embedding) else emb.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[Block]:
        return self.model.layers

    def sanitize(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Every fix-up of checkpoint names in one place."""
        out = {}
        for k, v in weights.items():
            # RoPE tables are recomputed, never loaded; a tied head is the embedding.
            if "rotary_emb.inv_freq" in k:
                continue
            if k == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            out[k] = v
        return stack_experts(out, self.config) if self.config.is_moe else out


_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


class ExpertLayoutError(UserError):
    """Per-expert tensors that do not make whole stacks; `tensor` is the one the message is about (or, for
    a missing one, a tensor of its stack: where to look)."""

    def __init__(self, message: str, tensor: str):
        super().__init__(message)
        self.tensor = tensor


def expert_groups(names, num_experts: int) -> dict[str, list[str]]:
    """Hugging Face per-expert tensor names (`mlp.experts.{e}.{gate,up,down}_proj.*`) by the stacked name
    they make (`mlp.switch_mlp.*`), in expert order; a missing or surplus expert is an ExpertLayoutError."""
    groups: dict[str, dict[int, str]] = {}
    for k in names:
        m = _EXPERT.match(k)
        if m is not None:
            groups.setdefault(f"{m[1]}.switch_mlp.{m[3]}.{m[4]}", {})[int(m[2])] = k
    out = {}
    for name, experts in groups.items():
        prefix, rest = name.split(".switch_mlp.")
        missing = sorted(set(range(num_experts)) - set(experts))
        if missing:
            raise ExpertLayoutError(
                f"tensor {f'{prefix}.experts.{missing[0]}.{rest}'!r} is missing", next(iter(experts.values()))
            )
        if len(experts) != num_experts:
            extra = experts[max(experts)]
            raise ExpertLayoutError(
                f"unexpected tensor {extra!r} (the config has {num_experts} experts)", extra
            )
        out[name] = [experts[e] for e in range(num_experts)]
    return out


def stack_experts(weights: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """The Hugging Face per-expert tensors stacked on a leading expert axis under `mlp.switch_mlp.*`
    (lazily: nothing is read until the stack is evaluated). Names already stacked pass through."""
    groups = expert_groups(weights, config.num_experts)
    grouped = {n for names in groups.values() for n in names}
    out = {k: v for k, v in weights.items() if k not in grouped}
    out.update({name: mx.stack([weights[n] for n in names]) for name, names in groups.items()})
    return out
