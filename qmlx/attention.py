"""Attention math: scaled dot-product attention over what a KV cache hands back.

The model side of the cache interface (qmlx/cache.py stores keys and values; this file computes with
them). Float keys and values go through qmlx.kernels; a quantized cache's (packed, scales, biases)
triples through `quantized_attention`, which never dequantizes the whole cache.
"""

from __future__ import annotations

import mlx.core as mx

from . import kernels

Parts = tuple  # (x,) or (packed, scales, biases), as qmlx.cache stores them


def attend(queries, keys, values, scale: float, mask, cache=None) -> mx.array:
    """Scaled dot-product attention over whatever the cache handed back."""
    if isinstance(keys, list):
        # A batch of rows with a cache each (qmlx.cache.RowsCache), each over its own keys.
        if all(m is None for m in mask) and not any(isinstance(k, tuple) for k in keys):
            return kernels.attention_rows(queries, keys, values, scale)
        return mx.concatenate(
            [
                attend(queries[b : b + 1], k, v, scale, m, c)
                for b, (k, v, m, c) in enumerate(zip(keys, values, mask, cache.rows))
            ]
        )
    if isinstance(keys, tuple):
        # A quantized KV cache returns (packed, scales, biases) triples.
        return quantized_attention(
            queries, keys, values, scale, mask, cache.group_size, cache.key_bits, cache.value_bits
        )
    return kernels.attention(queries, keys, values, scale, mask)


def quantized_attention(
    queries: mx.array,
    keys: Parts,
    values: Parts,
    scale: float,
    mask,
    group_size: int,
    key_bits: int,
    value_bits: int,
) -> mx.array:
    """Scaled dot-product attention over quantized keys and values, computed in float32.

    queries: (B, n_heads, L, D); keys, values: (packed, scales, biases) triples from
    mx.quantize of (B, n_kv_heads, S, D) arrays. mask: None, "causal" (queries are the last
    L of the S keys), or an array broadcastable to (B, n_heads, L, S): bool (True = may
    attend) or additive. Grouped-query attention is handled by viewing the queries as
    (B, n_kv_heads, n_rep, L, D) against keys broadcast over n_rep, so keys are never
    repeated. Returns (B, n_heads, L, D) in the queries' dtype.
    """
    B, n_heads, L, D = queries.shape
    n_kv = keys[0].shape[1]
    S = keys[0].shape[2]
    n_rep = n_heads // n_kv
    # float32 everywhere: on MLX's CPU backend quantized matmuls are slow in half precision,
    # and the softmax wants the precision anyway.
    q = (queries.astype(mx.float32) * scale).reshape(B, n_kv, n_rep, L, D)
    keys = tuple(_float32_or_packed(p)[:, :, None] for p in keys)
    values = tuple(_float32_or_packed(p)[:, :, None] for p in values)

    scores = mx.quantized_matmul(q, *keys, transpose=True, group_size=group_size, bits=key_bits)
    if mask is not None:
        if isinstance(mask, str):
            if mask != "causal":
                raise ValueError(f"unknown attention mask {mask!r}")
            mask = mx.arange(S)[None] <= (S - L + mx.arange(L))[:, None]
        mask = _mask_for_groups(mask, n_kv, n_rep)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
        else:
            scores = scores + mask.astype(mx.float32)
    probs = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(probs, *values, transpose=False, group_size=group_size, bits=value_bits)
    return out.reshape(B, n_heads, L, -1).astype(queries.dtype)


def _float32_or_packed(p: mx.array) -> mx.array:
    # Packed words stay uint32; scales and biases follow the float32 queries.
    return p if p.dtype == mx.uint32 else p.astype(mx.float32)


def _mask_for_groups(mask: mx.array, n_kv: int, n_rep: int) -> mx.array:
    """A mask broadcastable to (B, n_heads, L, S) made broadcastable to (B, n_kv, n_rep, L, S)."""
    if mask.ndim < 4:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    b, h, q_len, s = mask.shape
    if h == 1:
        return mask[:, :, None]
    return mask.reshape(b, n_kv, n_rep, q_len, s)
