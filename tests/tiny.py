"""Tiny random Qwen2 checkpoints in Hugging Face layout, for fast tests."""

from __future__ import annotations

import json
import os

import mlx.core as mx
from mlx.utils import tree_flatten

from qmlx.config import ModelConfig
from qmlx.model import Model

TOKENIZER_VOCAB = 300


def tiny_config(**overrides) -> dict:
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": TOKENIZER_VOCAB,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "torch_dtype": "float32",
        "eos_token_id": 258,  # <|im_end|> in the tiny tokenizer
    }
    cfg.update(overrides)
    return cfg


def tiny_moe_config(**overrides) -> dict:
    """A tiny Qwen2-MoE: 8 experts, top 2, a shared expert, every second layer sparse."""
    cfg = tiny_config(
        architectures=["Qwen2MoeForCausalLM"],
        model_type="qwen2_moe",
        num_hidden_layers=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        decoder_sparse_step=1,
        norm_topk_prob=False,
        mlp_only_layers=[],
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return cfg


def hf_expert_names(weights: dict) -> dict:
    """Stacked experts (`mlp.switch_mlp.*`, leading expert axis) as Hugging Face's per-expert tensors."""
    out = {}
    for name, w in weights.items():
        if ".mlp.switch_mlp." not in name:
            out[name] = w
            continue
        prefix, rest = name.split(".switch_mlp.")
        for e in range(w.shape[0]):
            out[f"{prefix}.experts.{e}.{rest}"] = w[e]
    return out


def random_model(cfg: dict, seed: int = 0) -> Model:
    """A model with random weights large enough to give non-trivial logits."""
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(cfg))
    params = tree_flatten(model.parameters())
    new = []
    for name, p in params:
        if name.endswith("norm.weight"):
            new.append((name, 1.0 + 0.1 * mx.random.normal(p.shape)))
        else:
            new.append((name, 0.2 * mx.random.normal(p.shape)))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


def write_folder(folder: str, cfg: dict, seed: int = 0, shards: int = 2, dtype=mx.float32) -> Model:
    """Write a random model as a sharded HF folder (config, index, shards, byte-level tokenizer); a
    Qwen2-MoE's experts in Hugging Face's per-expert layout."""
    os.makedirs(folder, exist_ok=True)
    model = random_model(cfg, seed)
    weights = hf_expert_names(dict(tree_flatten(model.parameters())))
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        if not part:
            continue
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        mx.save_safetensors(os.path.join(folder, file), {k: weights[k].astype(dtype) for k in part})
        weight_map.update({k: file for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    write_tokenizer(folder)
    return model


FIM_TOKENS = [
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]


def write_tokenizer(folder: str, fim: bool = False) -> None:
    """A byte-level BPE tokenizer with no merges plus Qwen-style special tokens (and Qwen2.5-Coder's
    fill-in-the-middle tokens after them with `fim`: a model for it needs vocab_size TOKENIZER_VOCAB + 6)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from qmlx.tokenizer import byte_decoder

    alphabet = sorted(byte_decoder(), key=byte_decoder().get)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if fim:
        tok.add_special_tokens(FIM_TOKENS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "chat_template": template}, f)
