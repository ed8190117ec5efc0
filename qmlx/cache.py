"""Per-layer key/value caches for incremental decoding (files of them: qmlx/prompt_cache.py).

The model sees one cache object per layer through a small interface:

    mask = caches[0].make_mask(L)                # before the update: None | "causal" | bool array
    keys, values = cache.update_and_fetch(k, v)  # k, v: (B, n_kv_heads, L, head_dim), RoPE'd
    cache.offset                                 # tokens seen so far = position of the next one

Kinds of cache:

    KVCache                   every token, in buffers that grow 256 tokens at a time
    RotatingKVCache           at most `max_size` tokens: the first `keep` ones plus the newest
    QuantizedKVCache          KVCache stored with mx.quantize (separate key and value bits)
    QuantizedRotatingKVCache  RotatingKVCache stored the same way

A quantized cache hands back (packed, scales, biases) triples instead of arrays; the model
then runs `qmlx.attention.quantized_attention` on them. Every cache stores keys and values as
tuples of "parts" that share the token axis (axis 2): one part for float storage, three for
quantized storage. That is what lets rotation and quantization compose: the ring-buffer code
only slices, writes and concatenates parts along axis 2 and never looks inside them.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .errors import UserError

Parts = tuple  # tuple[mx.array, ...] sharing axis 2 (tokens): (x,) or (packed, scales, biases)


# --------------------------------------------------------------------------- parts helpers


def _slice(parts: Parts, start: int, stop: int) -> Parts:
    return tuple(p[..., start:stop, :] for p in parts)


def _concat(*chunks: Parts) -> Parts:
    """Join parts along the token axis, skipping empty chunks (e.g. no sinks when keep=0)."""
    nonempty = [c for c in chunks if c[0].shape[2] > 0] or list(chunks[:1])
    if len(nonempty) == 1:
        return nonempty[0]
    return tuple(mx.concatenate(ps, axis=2) for ps in zip(*nonempty))


def _write(buffer: Parts, parts: Parts, start: int) -> None:
    """Write `parts` into `buffer` at token `start` (MLX slice assignment rebinds in place)."""
    for b, p in zip(buffer, parts):
        b[..., start : start + p.shape[2], :] = p


def _resize(buffer: Parts | None, like: Parts, used: int, capacity: int) -> Parts:
    """A buffer of `capacity` tokens shaped like `like`, holding the first `used` of `buffer`."""
    new = tuple(mx.zeros((*p.shape[:2], capacity, p.shape[3]), dtype=p.dtype) for p in like)
    if buffer is not None and used > 0:
        _write(new, _slice(buffer, 0, used), 0)
    return new


def _round_up(n: int, step: int) -> int:
    return (n + step - 1) // step * step


# --------------------------------------------------------------------------- the caches


class _Cache:
    """What every cache shares: storage as parts, meta_state, nbytes and rebuilding from state.

    Subclasses list the integer attributes that describe them in `_meta_fields`; meta_state
    is those attributes as strings, so prompt_cache.save_cache can store them as safetensors metadata.
    """

    step = 256  # tokens per buffer growth: one copy per 256 tokens, not one per token
    _meta_fields: tuple[str, ...] = ()

    def __init__(self):
        self._keys: Parts | None = None
        self._values: Parts | None = None
        self.offset = 0

    # Float storage; the quantized mixin overrides these four.
    def _encode_keys(self, x: mx.array) -> Parts:
        return (x,)

    def _encode_values(self, x: mx.array) -> Parts:
        return (x,)

    @staticmethod
    def _view(parts: Parts):
        return parts[0]

    @staticmethod
    def _as_parts(x) -> Parts:
        return (x,)

    def _validate(self) -> None:
        pass

    @property
    def meta_state(self) -> tuple[str, ...]:
        """The cache's configuration and positions as strings (saved next to `state`)."""
        return tuple(str(getattr(self, name)) for name in self._meta_fields)

    @meta_state.setter
    def meta_state(self, values: Sequence[str]) -> None:
        if len(values) != len(self._meta_fields):
            raise UserError(
                f"{type(self).__name__} meta_state needs {len(self._meta_fields)} values "
                f"{self._meta_fields}, got {len(values)}"
            )
        for name, value in zip(self._meta_fields, values):
            setattr(self, name, int(value))
        self._validate()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (their allocated capacity, not only the used part)."""
        if self._keys is None:
            return 0
        return sum(p.nbytes for p in self._keys + self._values)

    @classmethod
    def from_state(cls, state, meta_state: Sequence[str]):
        """Rebuild a cache of this class from its `state` and `meta_state` (see prompt_cache.load_cache)."""
        cache = cls.__new__(cls)
        _Cache.__init__(cache)
        cache.meta_state = meta_state
        cache.state = state
        return cache


class KVCache(_Cache):
    """Keeps every token's keys and values; buffers grow by `step` tokens when full."""

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys/values (B, n_kv_heads, L, head_dim); return everything cached so far."""
        k, v = self._encode_keys(keys), self._encode_values(values)
        start, end = self.offset, self.offset + keys.shape[2]
        if self._keys is None or end > self._keys[0].shape[2]:
            capacity = _round_up(end, self.step)
            self._keys = _resize(self._keys, k, start, capacity)
            self._values = _resize(self._values, v, start, capacity)
        _write(self._keys, k, start)
        _write(self._values, v, start)
        self.offset = end
        return self._view(_slice(self._keys, 0, end)), self._view(_slice(self._values, 0, end))

    def make_mask(self, L: int):
        """The mask for L new queries: the cache keeps everything, so plain causal."""
        # sdpa aligns "causal" to the lower right, i.e. the L queries are the last L keys.
        return None if L == 1 else "causal"

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last n tokens (the buffer is kept and overwritten); return how many."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self):
        """(keys, values) of the cached tokens, or None while the cache is empty."""
        if self._keys is None or self.offset == 0:
            return None
        return (
            self._view(_slice(self._keys, 0, self.offset)),
            self._view(_slice(self._values, 0, self.offset)),
        )

    @state.setter
    def state(self, state) -> None:
        if state is None:
            self._keys = self._values = None
            self.offset = 0
            return
        self._keys, self._values = self._as_parts(state[0]), self._as_parts(state[1])
        self.offset = self._keys[0].shape[2]


class RotatingKVCache(_Cache):
    """Keeps the first `keep` tokens forever plus a ring buffer of the newest ones.

    Semantics (the same whether tokens arrive one at a time or in chunks of any size): with
    W = max_size - keep, the query at position p attends to the sink tokens 0..keep-1 and to
    the W newest tokens p-W+1..p (itself included) -- max_size keys at most. While the
    context fits in max_size tokens this is plain causal attention, identical to KVCache.

    Single tokens overwrite the oldest non-sink slot in place, so the stored order is not
    temporal; that is fine because one query is indifferent to key order. A multi-token
    chunk that overflows is attended against [stored tokens in temporal order + the chunk]
    with an explicit sliding-window mask (make_mask), after which only the sinks and the
    newest W tokens are kept. RoPE was applied before caching, so dropping tokens never
    changes the rotation of the ones that stay; positions (`offset`) keep increasing.
    """

    _meta_fields = ("keep", "max_size", "offset", "_idx")

    def __init__(self, max_size: int, keep: int = 4):
        super().__init__()
        self.max_size = max_size
        self.keep = keep
        self._idx = keep  # ring slot the next single token overwrites once the buffer is full
        self._validate()

    def _validate(self) -> None:
        if not 0 <= self.keep < self.max_size:
            raise UserError(
                f"a rotating KV cache needs 0 <= keep < max_size, got keep={self.keep}, "
                f"max_size={self.max_size}"
            )

    @property
    def _window(self) -> int:
        return self.max_size - self.keep

    def _stored(self) -> int:
        return min(self.offset, self.max_size)

    def _temporal(self, buffer: Parts) -> Parts:
        """The stored tokens oldest first: sinks, then the ring from its oldest slot."""
        n, idx = self._stored(), self._idx
        if n < self.max_size or idx == self.keep:
            return _slice(buffer, 0, n)
        return _concat(_slice(buffer, 0, self.keep), _slice(buffer, idx, n), _slice(buffer, self.keep, idx))

    def _sinks_and_window(self, parts: Parts) -> Parts:
        """The first `keep` and the newest W tokens of temporally ordered `parts`."""
        total = parts[0].shape[2]
        return _concat(_slice(parts, 0, self.keep), _slice(parts, total - self._window, total))

    def _stored_positions(self) -> mx.array:
        """Absolute positions of the stored tokens, in the order _temporal returns them."""
        if self.offset <= self.max_size:
            return mx.arange(self.offset)
        return mx.concatenate([mx.arange(self.keep), mx.arange(self.offset - self._window, self.offset)])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Add keys/values (B, n_kv_heads, L, head_dim); return the keys the queries may see.

        The result is the stored tokens (plus the chunk); for a chunk that overflows it is
        longer than max_size and needs the mask from make_mask(L) called before this update.
        """
        k, v = self._encode_keys(keys), self._encode_values(values)
        L, n = keys.shape[2], self._stored()

        if n + L <= self.max_size:
            # Nothing gets dropped: append like KVCache, growing in steps up to max_size.
            if self._keys is None or n + L > self._keys[0].shape[2]:
                capacity = min(_round_up(n + L, self.step), self.max_size)
                self._keys = _resize(self._keys, k, n, capacity)
                self._values = _resize(self._values, v, n, capacity)
            _write(self._keys, k, n)
            _write(self._values, v, n)
            self.offset += L
            end = n + L
            return self._view(_slice(self._keys, 0, end)), self._view(_slice(self._values, 0, end))

        if L == 1:
            # Full: the new token replaces the oldest non-sink token.
            _write(self._keys, k, self._idx)
            _write(self._values, v, self._idx)
            self._idx = self._idx + 1 if self._idx + 1 < self.max_size else self.keep
            self.offset += 1
            return self._view(self._keys), self._view(self._values)

        # A chunk that overflows: attend over everything in temporal order, then keep only
        # the sinks and the newest W tokens, again in temporal order (so the ring starts at keep).
        all_k = k if self._keys is None else _concat(self._temporal(self._keys), k)
        all_v = v if self._values is None else _concat(self._temporal(self._values), v)
        self._keys, self._values = self._sinks_and_window(all_k), self._sinks_and_window(all_v)
        self._idx = self.keep
        self.offset += L
        return self._view(all_k), self._view(all_v)

    def make_mask(self, L: int):
        """The mask for L new queries over the keys update_and_fetch(L tokens) will return."""
        if L == 1:
            return None  # every returned key is visible to the single new query
        if self._stored() + L <= self.max_size:
            return "causal"
        q_pos = (self.offset + mx.arange(L))[:, None]
        k_pos = mx.concatenate([self._stored_positions(), self.offset + mx.arange(L)])[None]
        in_window = k_pos > q_pos - self._window
        return (k_pos <= q_pos) & ((k_pos < self.keep) | in_window)

    def is_trimmable(self) -> bool:
        """True until a token has been dropped (offset <= max_size)."""
        return self.offset <= self.max_size

    def trim(self, n: int) -> int:
        """Forget the last n tokens; return how many were forgotten.

        Only possible while nothing has been dropped: afterwards the tokens that trimming
        would bring back into the window are gone, so trim does nothing and returns 0.
        """
        if not self.is_trimmable():
            return 0
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def state(self):
        """(keys, values) as stored (ring order once full), or None while empty.

        The ring slot and offset live in meta_state; restore meta_state before state.
        """
        if self._keys is None or self.offset == 0:
            return None
        n = self._stored()
        return self._view(_slice(self._keys, 0, n)), self._view(_slice(self._values, 0, n))

    @state.setter
    def state(self, state) -> None:
        if state is None:
            self._keys = self._values = None
            self.offset, self._idx = 0, self.keep
            return
        self._keys, self._values = self._as_parts(state[0]), self._as_parts(state[1])
        n = self._keys[0].shape[2]
        if n > self.max_size:
            raise UserError(f"state holds {n} tokens, more than max_size={self.max_size}")
        if n < self.max_size:
            # A partly filled cache never dropped anything: its tokens are all there, in order.
            self.offset, self._idx = n, self.keep
        else:
            self.offset = max(self.offset, n)


class _QuantizedStorage:
    """Mixin: store keys and values with mx.quantize along head_dim (affine, per group).

    update_and_fetch then hands back (packed, scales, biases) triples, and the cache carries
    `group_size`, `key_bits` and `value_bits` for quantized_attention.
    """

    _quant_fields = ("group_size", "key_bits", "value_bits")
    _GROUP_SIZES = (32, 64, 128)  # what mx.quantize supports
    _BITS = (2, 3, 4, 5, 6, 8)

    def _check_quantization(self) -> None:
        if self.group_size not in self._GROUP_SIZES:
            raise UserError(
                f"KV cache group size (--kv-group-size) must be one of {self._GROUP_SIZES}, "
                f"got {self.group_size}"
            )
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in self._BITS:
                raise UserError(
                    f"KV cache {name} (--kv-bits, --{name.replace('_', '-')}) must be one of "
                    f"{self._BITS}, got {getattr(self, name)}"
                )

    def _quantize(self, x: mx.array, bits: int) -> Parts:
        if x.shape[-1] % self.group_size:
            raise UserError(
                f"head_dim {x.shape[-1]} is not a multiple of the KV cache group size "
                f"{self.group_size}; choose a --kv-group-size that divides it"
            )
        return tuple(mx.quantize(x, group_size=self.group_size, bits=bits))

    def _encode_keys(self, x: mx.array) -> Parts:
        return self._quantize(x, self.key_bits)

    def _encode_values(self, x: mx.array) -> Parts:
        return self._quantize(x, self.value_bits)

    @staticmethod
    def _view(parts: Parts):
        return parts

    @staticmethod
    def _as_parts(x) -> Parts:
        parts = tuple(x)
        if len(parts) != 3:
            raise ValueError("quantized keys/values are (packed, scales, biases) triples")
        return parts


class QuantizedKVCache(_QuantizedStorage, KVCache):
    """KVCache with quantized storage; keys and values may use different bits (e.g. 8 and 4)."""

    _meta_fields = _QuantizedStorage._quant_fields + KVCache._meta_fields

    def __init__(self, group_size: int = 64, key_bits: int = 8, value_bits: int = 8):
        KVCache.__init__(self)
        self.group_size, self.key_bits, self.value_bits = group_size, key_bits, value_bits
        self._validate()

    def _validate(self) -> None:
        self._check_quantization()


class QuantizedRotatingKVCache(_QuantizedStorage, RotatingKVCache):
    """RotatingKVCache with quantized storage (same window semantics, see RotatingKVCache)."""

    _meta_fields = _QuantizedStorage._quant_fields + RotatingKVCache._meta_fields

    def __init__(
        self,
        max_size: int,
        keep: int = 4,
        group_size: int = 64,
        key_bits: int = 8,
        value_bits: int = 8,
    ):
        self.group_size, self.key_bits, self.value_bits = group_size, key_bits, value_bits
        RotatingKVCache.__init__(self, max_size, keep)

    def _validate(self) -> None:
        self._check_quantization()
        RotatingKVCache._validate(self)


CACHE_CLASSES = {
    cls.__name__: cls for cls in (KVCache, RotatingKVCache, QuantizedKVCache, QuantizedRotatingKVCache)
}


class RowsCache:
    """One layer's view of a batch of requests that each keep their own cache (continuous batching).

    Row b of the batch is request b, at its own position in its own sequence: `offset` is one
    position per row (RoPE rotates each row at its own), `update_and_fetch` appends row b's keys
    and values to row b's cache and hands back one (keys, values) per row, which attention takes
    row by row. Rows can therefore join and leave between steps without copying any other row's
    cache, and each row computes exactly what it would alone. Any cache kind works per row.
    """

    def __init__(self, rows: Sequence):
        self.rows = list(rows)

    @property
    def offset(self) -> list[int]:
        return [c.offset for c in self.rows]

    def make_mask(self, L: int) -> list:
        """Each row's own mask for its L new tokens."""
        return [c.make_mask(L) for c in self.rows]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[list, list]:
        fetched = [c.update_and_fetch(keys[b : b + 1], values[b : b + 1]) for b, c in enumerate(self.rows)]
        return [k for k, _ in fetched], [v for _, v in fetched]

    @property
    def state(self) -> list:
        return [c.state for c in self.rows]


def batch_caches(rows: Sequence[Sequence]) -> list[RowsCache]:
    """Per-layer RowsCaches for a batch whose row b keeps the per-layer caches `rows[b]`."""
    return [RowsCache(layer) for layer in zip(*rows)]


# --------------------------------------------------------------------------- building and helpers


def make_cache(
    n_layers: int,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    key_bits: int | None = None,
    value_bits: int | None = None,
    keep: int = 4,
) -> list:
    """One cache per layer.

    max_kv_size: keep at most this many tokens per layer (a rotating cache that always keeps
    the first `keep`). kv_bits quantizes keys and values; key_bits / value_bits set them
    separately and win over kv_bits. Giving only one of key_bits / value_bits quantizes both,
    the other with kv_bits or else 8 bits.
    """
    if n_layers < 1:
        raise UserError(f"n_layers must be at least 1, got {n_layers}")
    if max_kv_size is not None and max_kv_size <= keep:
        raise UserError(f"max_kv_size must be larger than keep={keep}, got {max_kv_size}")
    quantized = any(b is not None for b in (kv_bits, key_bits, value_bits))
    if quantized:
        kb = key_bits if key_bits is not None else (kv_bits or 8)
        vb = value_bits if value_bits is not None else (kv_bits or 8)
        q = {"group_size": kv_group_size, "key_bits": kb, "value_bits": vb}
        if max_kv_size is not None:
            return [QuantizedRotatingKVCache(max_kv_size, keep, **q) for _ in range(n_layers)]
        return [QuantizedKVCache(**q) for _ in range(n_layers)]
    if max_kv_size is not None:
        return [RotatingKVCache(max_kv_size, keep) for _ in range(n_layers)]
    return [KVCache() for _ in range(n_layers)]


def can_trim_cache(caches: Sequence) -> bool:
    """Whether every layer's cache can still forget its last tokens."""
    return all(c.is_trimmable() for c in caches)


def trim_cache(caches: Sequence, n: int) -> int:
    """Forget the last n tokens in every layer; return how many were forgotten.

    Returns 0 and changes nothing if any layer cannot trim (a rotating cache that dropped).
    """
    if not caches or not can_trim_cache(caches):
        return 0
    trimmed = [c.trim(n) for c in caches]  # every layer, not just the first
    return trimmed[0]


def cache_nbytes(caches: Sequence) -> int:
    """Total bytes held by the caches' buffers."""
    return sum(c.nbytes for c in caches)
