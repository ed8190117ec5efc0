"""An independent NumPy forward pass of Qwen2ForCausalLM, written from the transformers
formulas (rotate-half RoPE with cos/sin tables, repeated KV heads, float64 throughout).
Used only as a test oracle."""

from __future__ import annotations

import math

import numpy as np


def yarn_inv_freq(head_dim, base, rs, max_pos):
    """transformers' _compute_yarn_parameters, transcribed."""
    factor = rs["factor"]
    orig = rs.get("original_max_position_embeddings") or max_pos
    dim = head_dim
    att = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

    def corr(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = math.floor(corr(32)), math.ceil(corr(1))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, att


def forward(cfg: dict, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits (L, vocab) for one sequence, full causal attention."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads", H)
    hd = D // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    base = cfg.get("rope_theta", 10000.0)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("type", rs.get("rope_type")) == "yarn":
        inv_freq, att = yarn_inv_freq(hd, base, rs, cfg["max_position_embeddings"])
    else:
        inv_freq, att = 1.0 / base ** (np.arange(0, hd, 2) / hd), 1.0
    L = len(ids)
    freqs = np.outer(np.arange(L), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    cos, sin = np.cos(emb) * att, np.sin(emb) * att

    def rot(x):  # rotate_half
        return np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)

    def rms(x, g):
        return g * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    def lin(x, p, bias=False):
        y = x @ w[p + ".weight"].T
        return y + w[p + ".bias"] if bias else y

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((L, L), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj", True).reshape(L, H, hd).transpose(1, 0, 2)
        k = lin(h, p + "self_attn.k_proj", True).reshape(L, KV, hd).transpose(1, 0, 2)
        v = lin(h, p + "self_attn.v_proj", True).reshape(L, KV, hd).transpose(1, 0, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(L, D)
        x = x + lin(a, p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin((g / (1 + np.exp(-g))) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T
