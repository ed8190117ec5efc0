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

    def silu(g):
        return g / (1 + np.exp(-g))

    def mlp(h, p):
        return lin(silu(lin(h, p + "gate_proj")) * lin(h, p + "up_proj"), p + "down_proj")

    def moe(h, p):
        """Every token through its top-k experts, one token and one expert at a time."""
        logits = h @ w[p + "gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.zeros_like(h)
        for t in range(h.shape[0]):
            top = np.argsort(-probs[t], kind="stable")[: cfg["num_experts_per_tok"]]
            weights = probs[t, top]
            if cfg.get("norm_topk_prob"):
                weights = weights / weights.sum()
            for e, wt in zip(top, weights):
                g, u, d = (w[f"{p}switch_mlp.{n}.weight"][e] for n in ("gate_proj", "up_proj", "down_proj"))
                out[t] += wt * ((silu(h[t] @ g.T) * (h[t] @ u.T)) @ d.T)
        gate = 1 / (1 + np.exp(-(h @ w[p + "shared_expert_gate.weight"].T)))
        return out + gate * mlp(h, p + "shared_expert.")

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((L, L), -np.inf), 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv_bias = cfg.get("qkv_bias", True) or cfg.get("model_type") != "qwen2_moe"
        q = lin(h, p + "self_attn.q_proj", qkv_bias).reshape(L, H, hd).transpose(1, 0, 2)
        k = lin(h, p + "self_attn.k_proj", qkv_bias).reshape(L, KV, hd).transpose(1, 0, 2)
        v = lin(h, p + "self_attn.v_proj", qkv_bias).reshape(L, KV, hd).transpose(1, 0, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(L, D)
        x = x + lin(a, p + "self_attn.o_proj")
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" in w:
            x = x + moe(h, p + "mlp.")
            continue
        x = x + mlp(h, p + "mlp.")
    x = rms(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else w["lm_head.weight"]
    return x @ head.T
