"""Pipeline-parallel generation across machines with MLX distributed (`mlx.launch`).

Every rank runs the same `qmlx generate|chat|serve` command. Each loads only its own share
of the layers (see qmlx/shard_plan.py and `load_model(layers=...)`); rank 0 also holds the
embedding, final norm and head, the tokenizer and the user interface. One model call on
rank 0 sends a header and the embedded tokens round the ring 0 → 1 → … → n-1 → 0:

    header  int32 [command, L, cache offset, cache slot]   forwarded rank to rank
    hidden  (1, L, hidden_size) in the compute dtype       each rank runs its blocks on it

Followers keep one set of KV caches per rank-0 cache ("slot"), kept at rank 0's offset, so
prompt-cache reuse (trimming), several server conversations and fresh caches all stay in
lockstep without the front ends knowing they drive a pipeline.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import socket
import subprocess
import sys
import weakref

import mlx.core as mx

from .cache import make_cache, trim_cache
from .device import parse_dtype, tree_nbytes
from .errors import UserError
from .loader import folder_index, load, load_config, load_model, resolve, tokenizer_for
from .shard_plan import check_fits, format_plan, parse_layers, split_layers, weight_sizes

FORWARD, FREE, STOP = 1, 2, 3
INIT_TIMEOUT = float(os.environ.get("QMLX_DIST_TIMEOUT", "120"))


class DistributedError(UserError):
    """Ranks that cannot reach each other or do not agree on the model."""


def launched() -> bool:
    """True under `mlx.launch` (ring or MPI) with more than one process."""
    if "MLX_RANK" in os.environ and "MLX_HOSTFILE" in os.environ:
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def init_group(timeout: float = INIT_TIMEOUT):
    """`mx.distributed.init`, failing with a clear message when a neighbour never answers.

    MLX's ring init blocks forever (holding the GIL) while a neighbour is unreachable, so
    no thread of this process can time it out: a small watchdog process prints the error
    and ends this one unless init returns in time.
    """
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (
        f"qmlx: error: rank {rank} ({socket.gethostname()}) could not connect to its neighbours "
        f"within {timeout:.0f} s: check that every host in the mlx.launch --hosts list is up and "
        "reachable (QMLX_DIST_TIMEOUT sets the wait)"
    )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), message],
        stdin=subprocess.DEVNULL,
    )
    try:
        backend = "mpi" if "OMPI_COMM_WORLD_SIZE" in os.environ else "ring"
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as e:
        raise DistributedError(f"rank {rank}: MLX distributed could not start ({e})") from None
    finally:
        watchdog.kill()
        watchdog.wait()
    return group


_WATCHDOG = """
import os, signal, sys, time
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(timeout)
print(message, file=sys.stderr, flush=True)
os.kill(pid, signal.SIGTERM)
"""


def _gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's `values` (same length on all ranks), as Python ints, in rank order."""
    x = mx.array(values, dtype=mx.int32)[None]
    out = mx.distributed.all_gather(x, group=group, stream=mx.cpu)
    return out.tolist()


def _words(n: int) -> list[int]:
    """A non-negative int as 31-bit words (all_gather of int32 keeps them exact)."""
    return [(n >> s) & 0x7FFFFFFF for s in (0, 31, 62)]


def _from_words(w: list[int]) -> int:
    return w[0] | (w[1] << 31) | (w[2] << 62)


def model_digest(folder: str, infos: dict, dtype: mx.Dtype) -> list[int]:
    """A fingerprint of config.json, every tensor's name/shape/dtype and the compute dtype."""
    with open(os.path.join(folder, "config.json"), "rb") as f:
        config = json.loads(f.read())
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(infos):
        i = infos[name]
        h.update(f"{name}:{i.dtype}:{list(i.shape)};".encode())
    h.update(str(dtype).encode())
    return [int.from_bytes(h.digest()[k : k + 3], "little") for k in range(0, 24, 3)]


def free_memory() -> int:
    """Bytes this machine can give to weights: Metal's recommended working set, else RAM free."""
    if mx.metal.is_available():
        info = mx.metal.device_info()
        return int(info.get("max_recommended_working_set_size", info.get("memory_size", 0)))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Pipeline:
    """Rank 0's model: called like `Model` (B = 1), it runs every rank's blocks in turn.

    It holds the embedding, norm, head and the first blocks; `layers` are only rank 0's, so
    `make_cache(len(model.layers))` gives rank 0's caches, and followers mirror them.
    """

    def __init__(self, stage, group, ranges: list[range], hosts: list[str]):
        self.stage, self.group = stage, group
        self.config = stage.config
        self.ranges, self.hosts = ranges, hosts
        self._next_slot = 0
        self._freed: list[int] = []
        self._pending: mx.array | None = None  # the last hidden states received, maybe unevaluated
        self.closed = False

    @property
    def layers(self):
        return self.stage.layers

    def _header(self, cmd: int, L: int = 0, offset: int = 0, slot: int = -1) -> mx.array:
        """A lazy send of one header, ordered after the previous call's receive."""
        header = mx.array([cmd, L, offset, slot], dtype=mx.int32)
        if self._pending is not None:
            # Whether or not the caller used the last logits, that receive must run first.
            header, self._pending = mx.depends(header, self._pending), None
        return mx.distributed.send(header, 1, group=self.group)

    def _slot(self, cache: list) -> int:
        """A number for this cache list; followers drop theirs when rank 0's is collected."""
        slot = getattr(cache[0], "_pipeline_slot", None)
        if slot is None:
            slot = cache[0]._pipeline_slot = self._next_slot
            self._next_slot += 1
            weakref.finalize(cache[0], self._freed.append, slot)
        return slot

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        if input_embeddings is not None or inputs.shape[0] != 1:
            raise ValueError("a pipeline runs one sequence of token ids at a time")
        while self._freed:
            mx.eval(self._header(FREE, slot=self._freed.pop()))
        L = inputs.shape[1]
        if cache is None:
            sent = self._header(FORWARD, L, 0, -1)
        else:
            sent = self._header(FORWARD, L, cache[0].offset, self._slot(cache))
        h = self.stage.model.blocks(self.stage.model.embed_tokens(inputs), cache)
        # One evaluation sends the header, then the hidden states (the receive must not be in
        # it: MLX could schedule it before the sends, and both ranks would wait).
        mx.eval(mx.distributed.send(mx.depends(h, sent), 1, group=self.group))
        h = mx.distributed.recv(h.shape, h.dtype, self.group.size() - 1, group=self.group)
        self._pending = h
        return self.stage.head(self.stage.model.norm(h))

    def close(self) -> None:
        """Tell the followers to exit (once; also at interpreter exit)."""
        if not self.closed:
            self.closed = True
            mx.eval(self._header(STOP))


def _caches_for(caches: dict, slot: int, offset: int, make) -> list | None:
    """This rank's caches for rank 0's `slot`, brought to rank 0's `offset`."""
    if slot < 0:
        return None
    if offset == 0 or slot not in caches:
        caches[slot] = make()
    c = caches[slot]
    have = c[0].offset
    if have > offset:
        trim_cache(c, have - offset)
    if c[0].offset != offset:
        raise RuntimeError(f"pipeline cache slot {slot} is at {c[0].offset} tokens, rank 0 at {offset}")
    return c


def follow(stage, group, cache_kwargs: dict) -> None:
    """A follower rank's loop: run its blocks on whatever arrives, until rank 0 says stop."""
    rank, n = group.rank(), group.size()
    prev, nxt = rank - 1, (rank + 1) % n
    dim, dtype = stage.config.hidden_size, stage.layers[0].input_layernorm.weight.dtype
    caches: dict[int, list] = {}
    make = lambda: make_cache(len(stage.layers), **cache_kwargs)
    while True:
        header = mx.distributed.recv((4,), mx.int32, prev, group=group)
        mx.eval(header)
        if nxt != 0:
            mx.eval(mx.distributed.send(header, nxt, group=group))
        cmd, L, offset, slot = header.tolist()
        if cmd == STOP:
            return
        if cmd == FREE:
            caches.pop(slot, None)
            continue
        c = _caches_for(caches, slot, offset, make)
        h = mx.distributed.recv((1, L, dim), dtype, prev, group=group)
        mx.eval(mx.distributed.send(stage.model.blocks(h, c), nxt, group=group))


def start(path: str, dtype=None, layers: str | None = None, cache_kwargs: dict | None = None):
    """Join the pipeline: (Pipeline, tokenizer) on rank 0; on a follower, serve and return None.

    Ranks first agree on the model (a fingerprint of config, tensors and dtype) and share
    their free memory, so every rank computes the same split; `layers` ("0-13,14-23")
    overrides the split.
    """
    group = init_group()
    rank, n = group.rank(), group.size()
    if n == 1:
        return load(path, dtype=dtype)
    host = socket.gethostname()
    try:
        dtype = parse_dtype(dtype)
        folder = resolve(path)
        config, infos = load_config(folder), folder_index(folder)
        digest, problem = model_digest(folder, infos, dtype), None
    except UserError as e:
        # Still take part in the exchange, so the other ranks stop too instead of waiting.
        digest, problem = [-1] * 8, e
    digests = _gather_ints(digest, group)
    if problem is not None:
        raise problem
    failed = [r for r, d in enumerate(digests) if d[0] == -1]
    if failed:
        raise DistributedError(f"rank {failed[0]} could not open the model (its own error says why)")
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise DistributedError(
            f"ranks disagree on the model: rank {bad[0]} has a different config.json, weights or "
            f"--dtype than rank 0 (this is rank {rank}, {host}, model {folder}); "
            "give every host the same model folder"
        )
    name = list(host.encode()[:48].ljust(48))
    shared = _gather_ints(_words(free_memory()) + name, group)
    memory = [_from_words(row[:3]) for row in shared]
    hosts = [bytes(row[3:]).rstrip(b" ").decode(errors="replace") for row in shared]
    sizes = weight_sizes(config, dtype, set(infos))
    ranges = parse_layers(layers, len(sizes.layers), n) if layers else split_layers(sizes, memory)
    check_fits(sizes, ranges, memory, hosts)
    stage = load_model(folder, dtype=dtype, layers=ranges[rank], ends=rank == 0)
    loaded = [row[0] for row in _gather_ints([tree_nbytes(stage.parameters()) // 1024], group)]
    if rank != 0:
        follow(stage, group, cache_kwargs or {})
        return None
    print(f"pipeline over {n} ranks:\n{format_plan(sizes, ranges, memory, hosts)}", file=sys.stderr)
    held = ", ".join(f"rank {r} {k * 1024 / 2**30:.3f} GB" for r, k in enumerate(loaded))
    print(f"weights loaded: {held}", file=sys.stderr)
    pipe = Pipeline(stage, group, ranges, hosts)
    atexit.register(pipe.close)
    return pipe, tokenizer_for(folder, config)
