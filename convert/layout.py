"""The tensors a Qwen2 checkpoint must hold, by Hugging Face name and shape, from its config.

The converter checks every source against this table before writing anything, so a missing,
extra or misshapen tensor is reported up front, naming the file and tensor.
"""

from __future__ import annotations

from qmlx.config import ModelConfig

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
                p + "mlp.gate_proj.weight": (h, d),
                p + "mlp.up_proj.weight": (h, d),
                p + "mlp.down_proj.weight": (d, h),
            }
        )
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is the weight of a Linear or Embedding layer (all 2-D weights in Qwen2)."""
    return name.endswith(".weight") and len(shape) == 2


def layer_sort_key(name: str) -> tuple:
    """Order tensors as a model reads them: embeddings, block 0, block 1, …, norm, head."""
    parts = name.split(".")
    if name.startswith("model.layers.") and parts[2].isdigit():
        return (1, int(parts[2]), ".".join(parts[3:]))
    if name.startswith("model.embed_tokens"):
        return (0, 0, name)
    return (2, 0, name)
