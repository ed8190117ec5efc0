"""The tensors a Qwen2 checkpoint must hold, by Hugging Face name and shape, from its config.

The converter checks every source against this table before writing anything, so a missing,
extra or misshapen tensor is reported up front, naming the file and tensor.
"""

from __future__ import annotations

import mlx.core as mx

from qmlx.config import ModelConfig
from qmlx.model import ExpertLayoutError, expert_groups

from .errors import ConvertError
from .source_types import SourceTensor

# Tensors some exporters add that carry nothing the runtime needs (RoPE tables are recomputed).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every weight of a Qwen2ForCausalLM with this config, in file order."""
    d, h, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_dims = config.num_attention_heads * config.head_dim
    kv_dims = config.num_key_value_heads * config.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (q_dims, d),
                p + "self_attn.q_proj.bias": (q_dims,),
                p + "self_attn.k_proj.weight": (kv_dims, d),
                p + "self_attn.k_proj.bias": (kv_dims,),
                p + "self_attn.v_proj.weight": (kv_dims, d),
                p + "self_attn.v_proj.bias": (kv_dims,),
                p + "self_attn.o_proj.weight": (d, q_dims),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
        if not config.attention_bias:
            for proj in ("q", "k", "v"):
                out.pop(p + f"self_attn.{proj}_proj.bias")
        if config.sparse_layer(i):
            out.update(_moe_tensors(config, p + "mlp."))
        else:
            out.update(_mlp_tensors(p + "mlp.", d, h))
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def _mlp_tensors(p: str, d: int, h: int) -> dict[str, tuple[int, ...]]:
    return {p + "gate_proj.weight": (h, d), p + "up_proj.weight": (h, d), p + "down_proj.weight": (d, h)}


def _moe_tensors(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """A sparse block's tensors: router, routed experts stacked (MLX layout), shared expert and its gate."""
    d, h, e = config.hidden_size, config.moe_intermediate_size, config.num_experts
    out = {p + "gate.weight": (e, d)}
    out.update({k: (e, *shape) for k, shape in _mlp_tensors(p + "switch_mlp.", d, h).items()})
    out.update(_mlp_tensors(p + "shared_expert.", d, config.shared_expert_intermediate_size))
    out[p + "shared_expert_gate.weight"] = (1, d)
    return out


def stack_experts(tensors: dict[str, SourceTensor], config: ModelConfig) -> dict[str, SourceTensor]:
    """A source's Hugging Face per-expert tensors (`mlp.experts.{e}.*_proj.weight`) as one stacked tensor
    per projection (`mlp.switch_mlp.*_proj.weight`, leading expert axis), read an expert at a time: the
    converter never holds more than the block of experts it is quantizing."""
    try:
        groups = expert_groups(tensors, config.num_experts)
    except ExpertLayoutError as e:
        raise ConvertError(f"{tensors[e.tensor].where}: {e}") from None
    grouped = {n for names in groups.values() for n in names}
    out = {name: t for name, t in tensors.items() if name not in grouped}
    for name, names in groups.items():
        experts = [tensors[n] for n in names]
        odd = next((t for t in experts if tuple(t.shape) != tuple(experts[0].shape)), None)
        if odd is not None:
            raise ConvertError(
                f"{odd.where}: tensor {odd.name!r} has shape {list(odd.shape)}, "
                f"expert 0 has {list(experts[0].shape)}"
            )
        out[name] = _stacked(name, experts)
    return out


def _stacked(name: str, experts: list[SourceTensor]) -> SourceTensor:
    rows = experts[0].shape[0]

    def read(start: int, end: int) -> mx.array:
        return mx.stack([experts[e].read(0, rows) for e in range(start, end)])

    return SourceTensor(
        name, (len(experts), *experts[0].shape), sum(t.nbytes for t in experts), read, experts[0].where
    )


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is the weight of a Linear or Embedding layer (every 2-D weight in Qwen2) or of
    stacked experts (3-D)."""
    return name.endswith(".weight") and (len(shape) == 2 or (len(shape) == 3 and ".switch_mlp." in name))


def layer_sort_key(name: str) -> tuple:
    """Order tensors as a model reads them: embeddings, block 0, block 1, …, norm, head."""
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit():
        return (1, int(parts[2]), ".".join(parts[3:]))
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    return (2, 0, name)
