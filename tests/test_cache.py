"""KV caches: growth, trimming, state, rotation, quantization and files, checked against
direct attention computations on random queries, keys and values."""

import mlx.core as mx
import numpy as np
import pytest

from qmlx.attention import quantized_attention
from qmlx.cache import (
    KVCache,
    QuantizedKVCache,
    QuantizedRotatingKVCache,
    RotatingKVCache,
    cache_nbytes,
    can_trim_cache,
    make_cache,
    trim_cache,
)
from qmlx.prompt_cache import load_cache, save_cache

B, N_HEADS, N_KV, D = 1, 4, 2, 64
SCALE = D**-0.5


def qkv(T, seed=0, batch=B):
    """Random queries (B, N_HEADS, T, D) and keys/values (B, N_KV, T, D)."""
    rng = np.random.default_rng(seed)
    q, k, v = (
        mx.array(rng.standard_normal((batch, h, T, D)).astype(np.float32)) for h in (N_HEADS, N_KV, N_KV)
    )
    return q, k, v


def attend(q, k, v, mask, cache=None):
    """What the model does with whatever a cache hands back."""
    if isinstance(k, tuple):
        return quantized_attention(q, k, v, SCALE, mask, cache.group_size, cache.key_bits, cache.value_bits)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=mask)


def run_chunks(cache, q, k, v, chunks):
    """Feed T tokens through `cache` in chunks, as the model does; return (B, H, T, D)."""
    assert sum(chunks) == q.shape[2]
    outs, pos = [], 0
    for n in chunks:
        sl = slice(pos, pos + n)
        mask = cache.make_mask(n)
        keys, values = cache.update_and_fetch(k[:, :, sl], v[:, :, sl])
        outs.append(attend(q[:, :, sl], keys, values, mask, cache))
        pos += n
    return mx.concatenate(outs, axis=2)


def window_mask(T, max_size, keep):
    """The rotating cache's semantics written out: sinks + the last max_size-keep tokens."""
    i, j = np.arange(T)[:, None], np.arange(T)[None]
    return mx.array((j <= i) & ((j < keep) | (j > i - (max_size - keep))))


def full_causal(q, k, v):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask="causal")


def close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.array(a), np.array(b), atol=atol, rtol=1e-4)


def rel_err(a, b):
    a, b = np.array(a), np.array(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- KVCache

CHUNKINGS = [[1] * 20, [7, 1, 1, 11], [20], [3, 17]]


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_kvcache_attention_equals_full_causal(chunks):
    q, k, v = qkv(20)
    close(run_chunks(KVCache(), q, k, v, chunks), full_causal(q, k, v))


def test_kvcache_offsets_and_contents_across_growth_boundaries():
    cache = KVCache()
    _, k, v = qkv(600)
    pos = 0
    for n in [3, 250, 2, 1, 5, 300, 39]:  # crosses 256 and 512
        keys, values = cache.update_and_fetch(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos += n
        assert cache.offset == pos
        assert keys.shape == (B, N_KV, pos, D)
        close(keys, k[:, :, :pos], atol=0)
        close(values, v[:, :, :pos], atol=0)
        # Buffers grow a whole step at a time.
        capacity = -(-pos // cache.step) * cache.step
        assert cache.nbytes == 2 * B * N_KV * capacity * D * 4


def test_kvcache_trim_and_continue():
    q, k, v = qkv(12)
    cache = KVCache()
    run_chunks(cache, q, k, v, [10, 2])
    assert cache.is_trimmable()
    assert cache.trim(3) == 3 and cache.offset == 9
    # Re-feeding tokens 9..11 after the trim gives the same as never having trimmed.
    out = run_chunks(cache, q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], [3])
    close(out, full_causal(q, k, v)[:, :, 9:])
    assert cache.trim(100) == 12 and cache.offset == 0


def test_kvcache_state_round_trip():
    q, k, v = qkv(30)
    a = KVCache()
    run_chunks(a, q[:, :, :20], k[:, :, :20], v[:, :, :20], [20])
    b = KVCache()
    b.state = a.state
    b.meta_state = a.meta_state
    assert b.offset == 20
    tail = (q[:, :, 20:], k[:, :, 20:], v[:, :, 20:])
    close(run_chunks(b, *tail, [1] * 10), run_chunks(a, *tail, [4, 6]))
    assert KVCache().state is None


# --------------------------------------------------------------------------- RotatingKVCache


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_rotating_equals_kvcache_while_it_fits(chunks):
    q, k, v = qkv(20)
    for max_size in (20, 32):
        out = run_chunks(RotatingKVCache(max_size, keep=4), q, k, v, chunks)
        close(out, full_causal(q, k, v))


@pytest.mark.parametrize("keep", [0, 4])
@pytest.mark.parametrize(
    "chunks",
    [
        [1] * 70,  # token by token through several wraps
        [20, 1, 1, 1, 30, 17],  # chunks that overflow a full ring
        [70],  # one chunk much bigger than the window
        [5, 40, 3, 1, 21],  # a chunk bigger than the window after a partial fill
        [16, 2, 16, 1, 35],
    ],
)
def test_rotating_attention_equals_sliding_window_with_sinks(chunks, keep):
    max_size, T = 16, 70
    q, k, v = qkv(T, seed=1)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=window_mask(T, max_size, keep))
    cache = RotatingKVCache(max_size, keep=keep)
    close(run_chunks(cache, q, k, v, chunks), want)
    assert cache.offset == T


@pytest.mark.parametrize("chunks", [[1] * 50, [10, 25, 1, 14], [50], [16, 1, 33]])
def test_rotating_contents_are_sinks_plus_newest(chunks):
    max_size, keep, T = 16, 4, 50
    # Key vectors that spell their own position, so the stored set is easy to read back.
    k = mx.broadcast_to(mx.arange(T, dtype=mx.float32)[None, None, :, None], (1, 1, T, 8))
    cache, pos = RotatingKVCache(max_size, keep=keep), 0
    for n in chunks:
        cache.update_and_fetch(k[:, :, pos : pos + n], k[:, :, pos : pos + n])
        pos += n
        stored = sorted(np.array(cache.state[0])[0, 0, :, 0].astype(int).tolist())
        expected = (
            list(range(pos))
            if pos <= max_size
            else (list(range(keep)) + list(range(pos - (max_size - keep), pos)))
        )
        assert stored == expected
        assert cache.offset == pos


def test_rotating_trim_only_before_anything_is_dropped():
    q, k, v = qkv(30)
    cache = RotatingKVCache(16, keep=4)
    run_chunks(cache, q[:, :, :16], k[:, :, :16], v[:, :, :16], [10, 6])
    assert cache.is_trimmable() and cache.trim(6) == 6 and cache.offset == 10
    out = run_chunks(cache, q[:, :, 10:16], k[:, :, 10:16], v[:, :, 10:16], [6])
    close(out, full_causal(q[:, :, :16], k[:, :, :16], v[:, :, :16])[:, :, 10:])
    run_chunks(cache, q[:, :, 16:17], k[:, :, 16:17], v[:, :, 16:17], [1])
    assert not cache.is_trimmable()
    assert cache.trim(1) == 0 and cache.offset == 17


def test_rotating_state_round_trip_mid_ring():
    max_size, keep, T = 16, 4, 40
    q, k, v = qkv(T, seed=2)
    a = RotatingKVCache(max_size, keep=keep)
    run_chunks(a, q[:, :, :23], k[:, :, :23], v[:, :, :23], [1] * 23)  # ring slot not at keep
    b = RotatingKVCache.from_state(a.state, a.meta_state)
    assert b.offset == 23 and b.meta_state == a.meta_state
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=window_mask(T, max_size, keep))[
        :, :, 23:
    ]
    tail = (q[:, :, 23:], k[:, :, 23:], v[:, :, 23:])
    close(run_chunks(b, *tail, [2, 1, 14]), want)
    close(run_chunks(a, *tail, [1] * 17), want)


def test_rotating_rejects_keep_not_below_max_size():
    with pytest.raises(ValueError, match="keep"):
        RotatingKVCache(4, keep=4)


# --------------------------------------------------------------------------- quantized

# Relative error (Frobenius norm) of attention outputs against the float cache.
# Measured on these seeds: 0.0065, 0.088 and 0.108 -- the error of the 4-bit side dominates.
QUANT_TOLERANCE = {(8, 8): 0.01, (8, 4): 0.12, (4, 4): 0.15}


def dequantized(parts, bits, group_size=64):
    return mx.dequantize(*parts, group_size=group_size, bits=bits)


@pytest.mark.parametrize("n_heads", [4, 2])  # grouped-query and one query head per kv head
@pytest.mark.parametrize("key_bits,value_bits", [(4, 8), (8, 4)])
def test_quantized_attention_equals_attention_on_dequantized_keys(n_heads, key_bits, value_bits):
    q, k, v = qkv(24, seed=3)
    q = q[:, :n_heads]
    kq = mx.quantize(k, group_size=64, bits=key_bits)
    vq = mx.quantize(v, group_size=64, bits=value_bits)
    kd, vd = dequantized(kq, key_bits), dequantized(vq, value_bits)
    # A mask that differs per head checks that heads are grouped the way sdpa groups them.
    per_head = np.random.default_rng(0).random((1, n_heads, 24, 24)) < 0.8
    per_head = mx.array(per_head | np.eye(24, dtype=bool))
    masks = [
        None,
        "causal",
        window_mask(24, 10, 2),
        per_head,
        mx.where(window_mask(24, 10, 2), 0.0, -1e9),
    ]
    for mask in masks:
        got = quantized_attention(q, kq, vq, SCALE, mask, 64, key_bits, value_bits)
        want = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=SCALE, mask=mask)
        assert got.shape == q.shape
        close(got, want, atol=2e-5)


@pytest.mark.parametrize("chunks", [[1] * 40, [13, 1, 26], [40]])
@pytest.mark.parametrize("bits", list(QUANT_TOLERANCE))
def test_quantized_cache_close_to_float(chunks, bits):
    key_bits, value_bits = bits
    q, k, v = qkv(40, seed=4)
    cache = QuantizedKVCache(group_size=64, key_bits=key_bits, value_bits=value_bits)
    got = run_chunks(cache, q, k, v, chunks)
    assert rel_err(got, full_causal(q, k, v)) < QUANT_TOLERANCE[bits]
    # and exactly what attention over the dequantized cache gives
    keys, values = cache.state
    want = mx.fast.scaled_dot_product_attention(
        q, dequantized(keys, key_bits), dequantized(values, value_bits), scale=SCALE, mask="causal"
    )
    close(got, want, atol=2e-5)


def test_quantized_cache_growth_trim_and_state():
    q, k, v = qkv(300, seed=5)
    cache = QuantizedKVCache(key_bits=8, value_bits=4)
    run_chunks(cache, q, k, v, [250, 1, 10, 39])
    assert cache.offset == 300
    keys, values = cache.state
    assert keys[0].shape == (B, N_KV, 300, D * 8 // 32) and values[0].shape == (
        B,
        N_KV,
        300,
        D * 4 // 32,
    )
    assert cache.trim(50) == 50 and cache.offset == 250
    other = QuantizedKVCache.from_state(cache.state, cache.meta_state)
    assert (other.group_size, other.key_bits, other.value_bits) == (64, 8, 4)
    tail = (q[:, :, 250:], k[:, :, 250:], v[:, :, 250:])
    close(run_chunks(other, *tail, [50]), run_chunks(cache, *tail, [1] * 50), atol=1e-6)


@pytest.mark.parametrize("chunks", [[1] * 60, [20, 1, 39], [60], [16, 1, 1, 42]])
def test_quantized_rotating_close_to_float_rotating(chunks):
    max_size, keep, T = 16, 4, 60
    q, k, v = qkv(T, seed=6)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=window_mask(T, max_size, keep))
    cache = QuantizedRotatingKVCache(max_size, keep=keep, key_bits=8, value_bits=8)
    assert rel_err(run_chunks(cache, q, k, v, chunks), want) < QUANT_TOLERANCE[(8, 8)]
    assert cache.offset == T and cache.state[0][0].shape[2] == max_size


def test_quantized_cache_rejects_bad_settings():
    with pytest.raises(ValueError, match="key_bits"):
        QuantizedKVCache(key_bits=7)
    with pytest.raises(ValueError, match="group size"):
        QuantizedKVCache(group_size=16)
    cache = QuantizedKVCache(group_size=128)
    with pytest.raises(ValueError, match="head_dim 64"):
        cache.update_and_fetch(*qkv(2)[1:])


# --------------------------------------------------------------------------- helpers and files


def test_make_cache_kinds():
    assert all(type(c) is KVCache for c in make_cache(3))
    assert len(make_cache(3)) == 3
    rot = make_cache(2, max_kv_size=32, keep=2)
    assert type(rot[0]) is RotatingKVCache and (rot[0].max_size, rot[0].keep) == (32, 2)
    qc = make_cache(2, kv_bits=4, kv_group_size=32)[0]
    assert type(qc) is QuantizedKVCache and (qc.group_size, qc.key_bits, qc.value_bits) == (
        32,
        4,
        4,
    )
    kv = make_cache(2, key_bits=8, value_bits=4)[0]
    assert (kv.key_bits, kv.value_bits) == (8, 4)
    assert make_cache(1, value_bits=4)[0].key_bits == 8
    qr = make_cache(2, max_kv_size=64, kv_bits=8)[0]
    assert type(qr) is QuantizedRotatingKVCache and qr.max_size == 64
    with pytest.raises(ValueError, match="max_kv_size"):
        make_cache(2, max_kv_size=4, keep=4)


def test_trim_and_nbytes_helpers():
    q, k, v = qkv(20)
    caches = make_cache(2, max_kv_size=16)
    assert cache_nbytes(caches) == 0
    for c in caches:
        run_chunks(c, q[:, :, :12], k[:, :, :12], v[:, :, :12], [12])
    assert cache_nbytes(caches) == 2 * 2 * B * N_KV * 16 * D * 4  # capacity capped at max_size
    assert can_trim_cache(caches) and trim_cache(caches, 2) == 2
    assert all(c.offset == 10 for c in caches)
    for c in caches:
        run_chunks(c, q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], [10])
    assert not can_trim_cache(caches) and trim_cache(caches, 2) == 0
    assert all(c.offset == 20 for c in caches)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"max_kv_size": 16}, {"key_bits": 8, "value_bits": 4}, {"max_kv_size": 16, "kv_bits": 8}],
)
def test_save_load_round_trip(tmp_path, kwargs):
    T = 40
    q, k, v = qkv(T, seed=7)
    caches = make_cache(2, **kwargs)
    for c in caches:
        run_chunks(c, q[:, :, :27], k[:, :, :27], v[:, :, :27], [20, 1, 1, 5])
    path = str(tmp_path / "prompt.cache")  # no .safetensors suffix: written exactly here
    meta = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "tokens": "[1, 2, 3]"}
    save_cache(path, caches, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.cache"]
    loaded, got_meta = load_cache(path)
    assert got_meta == meta
    assert [type(c) for c in loaded] == [type(c) for c in caches]
    for a, b in zip(caches, loaded):
        assert a.meta_state == b.meta_state and a.offset == b.offset
        tail = (q[:, :, 27:], k[:, :, 27:], v[:, :, 27:])
        close(run_chunks(b, *tail, [13]), run_chunks(a, *tail, [13]), atol=1e-6)


def test_save_load_empty_and_mixed(tmp_path):
    q, k, v = qkv(4)
    caches = [KVCache(), RotatingKVCache(8, keep=0), QuantizedKVCache(key_bits=4)]
    run_chunks(caches[1], q, k, v, [4])
    save_cache(str(tmp_path / "c.safetensors"), caches)
    loaded, meta = load_cache(str(tmp_path / "c.safetensors"))
    assert meta == {}
    assert loaded[0].state is None and loaded[0].offset == 0
    assert loaded[1].offset == 4 and loaded[1].keep == 0
    assert loaded[2].state is None and loaded[2].key_bits == 4


def test_load_refuses_other_files(tmp_path):
    weights = tmp_path / "model.safetensors"
    mx.save_safetensors(str(weights), {"w": mx.zeros((2, 2))}, metadata={"format": "mlx"})
    with pytest.raises(ValueError, match="model.safetensors is not a qmlx KV-cache file"):
        load_cache(str(weights))
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a cache")
    with pytest.raises(ValueError, match="notes.txt is not a KV-cache file"):
        load_cache(str(text))
    with pytest.raises(FileNotFoundError, match="missing.cache"):
        load_cache(str(tmp_path / "missing.cache"))


def test_save_refuses_reserved_or_non_string_metadata(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_cache(str(tmp_path / "a"), [KVCache()], {"qmlx.kv_cache.layers": "x"})
    with pytest.raises(TypeError):
        save_cache(str(tmp_path / "a"), [KVCache()], {"tokens": [1, 2]})


# --------------------------------------------------------------------------- through the model


def test_model_logits_through_rotating_and_quantized_caches():
    # head_dim 64 so the default group size applies; 2 query heads share 1 kv head.
    from tiny import random_model, tiny_config

    model = random_model(tiny_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1))
    ids = np.random.default_rng(8).integers(0, 256, size=40).tolist()
    full = np.array(model(mx.array([ids]))[0])

    def cached(caches, chunks):
        outs, pos = [], 0
        for n in chunks:
            outs.append(np.array(model(mx.array([ids[pos : pos + n]]), cache=caches)[0]))
            pos += n
        return np.concatenate(outs)

    n = len(model.layers)
    # A window the context fits in: exactly the full forward.
    np.testing.assert_allclose(cached(make_cache(n, max_kv_size=64), [30, 1, 9]), full, atol=1e-4)
    # Quantized: logits within a relative error of the float forward. Random weights amplify
    # the error layer by layer (measured 0.021 and 0.18); a broken path would be off by ~1.
    assert rel_err(cached(make_cache(n, kv_bits=8), [30, 1, 9]), full) < 0.05
    assert rel_err(cached(make_cache(n, key_bits=8, value_bits=4), [30, 1, 9]), full) < 0.3
    # An overflowing window changes the logits only after the first max_kv_size tokens.
    small = cached(make_cache(n, max_kv_size=16), [10, 1, 29])
    np.testing.assert_allclose(small[:16], full[:16], atol=1e-4)
    assert np.abs(small[16:] - full[16:]).max() > 1e-3
    np.testing.assert_allclose(cached(make_cache(n, max_kv_size=16), [1] * 40), small, atol=1e-4)
