"""Which layers each machine of a pipeline holds, and how much memory that takes.

Sizes come from the model's own module tree built lazily (no weight is ever materialised), so
a plan needs only a config.json: `qmlx shard-plan` can tell whether a 72B model fits on three
Macs before anything is downloaded. The runtime (qmlx/distributed.py) uses the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import UserError

GB = 2**30


class PlanError(UserError):
    """A layer split that cannot work: bad --layers/--hosts, or a rank short of memory."""


@dataclass(frozen=True)
class Sizes:
    """Bytes once loaded: per decoder block, the "ends" rank 0 holds, and KV cache per block."""

    layers: list[int]
    ends: int  # embedding + final norm + output head (rank 0 both embeds and projects)
    kv: int = 0  # KV-cache bytes per block for the planned context (0: weights only)

    @property
    def per_layer(self) -> list[int]:
        return [b + self.kv for b in self.layers]

    @property
    def total(self) -> int:
        return self.ends + sum(self.per_layer)


def kv_bytes_per_layer(config: ModelConfig, context: int, dtype: mx.Dtype) -> int:
    """Keys and values of `context` tokens in one block, unquantized."""
    return 2 * context * config.num_key_value_heads * config.head_dim * dtype.size


def weight_sizes(config: ModelConfig, dtype: mx.Dtype, weight_names: set[str] | None = None) -> Sizes:
    """Loaded sizes in compute `dtype` (packed quantized weights keep their integer size).

    `weight_names` (a checkpoint's tensor names) decides which layers are quantized, as the
    loader does; without it, every layer the config's `"quantization"` covers is.
    """
    from .model import Model
    from .quant import quantize_model

    model = Model(config)  # lazy random init: shapes only, nothing is computed
    if config.quantization is not None:
        quantize_model(model, config.quantization, weight_names)
    layers = [0] * config.num_hidden_layers
    ends = 0
    for name, p in tree_flatten(model.parameters()):
        size = p.size * (dtype.size if mx.issubdtype(p.dtype, mx.floating) else p.dtype.size)
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            layers[int(parts[2])] += size
        else:
            ends += size
    return Sizes(layers, ends)


def parse_layers(text: str, n_layers: int, n_ranks: int) -> list[range]:
    """`--layers 0-13,14-23` → one contiguous range per rank, covering every layer once."""
    ranges = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            start, stop = int(a), int(b if sep else a) + 1
        except ValueError:
            raise PlanError(f"--layers: {part!r} is not a range like 0-13") from None
        ranges.append(range(start, stop))
    if len(ranges) != n_ranks:
        raise PlanError(f"--layers gives {len(ranges)} ranges but the pipeline has {n_ranks} ranks")
    expect = 0
    for r in ranges:
        if r.start != expect or r.stop <= r.start:
            raise PlanError(
                f"--layers {text}: ranges must be in order, non-empty and contiguous from 0 "
                f"(expected one starting at {expect})"
            )
        expect = r.stop
    if expect != n_layers:
        raise PlanError(
            f"--layers {text}: the model has layers 0-{n_layers - 1}, the ranges end at {expect - 1}"
        )
    return ranges


def split_layers(sizes: Sizes, memory: list[int]) -> list[range]:
    """Contiguous layer ranges, one per rank, in proportion to each rank's memory.

    Minimises the largest fraction of its memory any rank must fill (so the split moves away
    from rank 0 by the size of the embedding and head it also holds). Every rank gets a layer.
    """
    n, n_layers, per_layer = len(memory), len(sizes.layers), sizes.per_layer
    if n > n_layers:
        raise PlanError(f"{n} ranks but the model has only {n_layers} layers: use at most {n_layers}")
    if min(memory) <= 0:
        raise PlanError("every rank needs some free memory to hold its layers")

    def fill(limit: float) -> list[range] | None:
        start, out = 0, []
        for r, mem in enumerate(memory):
            load, stop = (sizes.ends if r == 0 else 0), start
            last_allowed = n_layers - (n - r - 1)  # leave one layer for each later rank
            while stop < last_allowed and (stop == start or load + per_layer[stop] <= limit * mem):
                load += per_layer[stop]
                stop += 1
            if load > limit * mem:
                return None
            out.append(range(start, stop))
            start = stop
        return out if start == n_layers else None

    lo, hi = 0.0, sizes.total / min(memory) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fill(mid) else (mid, hi)
    return fill(hi)


def rank_bytes(sizes: Sizes, ranges: list[range]) -> list[int]:
    """Bytes each rank holds: its blocks (with their KV cache), plus the ends on rank 0."""
    per_layer = sizes.per_layer
    return [sum(per_layer[i] for i in r) + (sizes.ends if k == 0 else 0) for k, r in enumerate(ranges)]


def check_fits(sizes: Sizes, ranges: list[range], memory: list[int], names: list[str]) -> None:
    """Refuse a plan in which some rank's weights exceed its memory, naming the rank."""
    need = rank_bytes(sizes, ranges)
    for k, (b, mem) in enumerate(zip(need, memory)):
        if b > mem:
            r = ranges[k]
            raise PlanError(
                f"rank {k} ({names[k]}) needs {b / GB:.1f} GB for layers {r.start}-{r.stop - 1}"
                f"{' and the embedding/head' if k == 0 else ''} but has {mem / GB:.1f} GB free; "
                f"the model needs {sizes.total / GB:.1f} GB and all ranks have "
                f"{sum(memory) / GB:.1f} GB: add a machine, use fewer bits, or move layers with --layers"
            )


def parse_hosts(text: str) -> tuple[list[str], list[int]]:
    """`--hosts mini1:24,mini2:24,air:16` → (names, memory in bytes)."""
    names, memory = [], []
    for part in text.split(","):
        name, _, gb = part.strip().rpartition(":")
        try:
            value = float(gb)
        except ValueError:
            raise PlanError(f"--hosts: {part!r} is not NAME:GB (e.g. mini1:24)") from None
        if not name or value <= 0:
            raise PlanError(f"--hosts: {part!r} is not NAME:GB with GB > 0")
        names.append(name)
        memory.append(int(value * GB))
    return names, memory


def format_plan(sizes: Sizes, ranges: list[range], memory: list[int], names: list[str]) -> str:
    """The table `qmlx shard-plan` prints (and rank 0 logs when a pipeline starts)."""
    need = rank_bytes(sizes, ranges)
    width = max(4, *(len(n) for n in names))
    kv = [sizes.kv * len(r) for r in ranges]
    lines = [
        (
            f"{'rank':<5}{'host':<{width + 2}}{'layers':<14}{'weights':>10}{'KV cache':>10}"
            f"{'memory':>10}{'use':>6}"
        )
    ]
    for k, r in enumerate(ranges):
        span = f"{r.start}-{r.stop - 1} ({len(r)})"
        extra = "  + embedding, norm, head" if k == 0 else ""
        lines.append(
            f"{k:<5}{names[k]:<{width + 2}}{span:<14}{(need[k] - kv[k]) / GB:>7.2f} GB{kv[k] / GB:>7.2f} GB"
            f"{memory[k] / GB:>7.1f} GB{100 * need[k] / memory[k]:>5.0f}%{extra}"
        )
    lines.append(f"total {sizes.total / GB:.2f} GB of {sum(memory) / GB:.1f} GB")
    return "\n".join(lines)


def plan_for(
    model: str,
    hosts: str,
    bits: int | None = None,
    group_size: int = 64,
    dtype="bfloat16",
    layers: str | None = None,
    context: int = 0,
) -> tuple[str, PlanError | None]:
    """The `qmlx shard-plan` report for a model folder, hub id or bare config.json.

    Also returns the PlanError for a rank short of memory, so the table can be shown first.
    """
    import os

    from .device import parse_dtype
    from .safetensors import folder_index

    names, memory = parse_hosts(hosts)
    weight_names = None
    if model.endswith(".json") and os.path.isfile(model):
        config = ModelConfig.from_file(model)
    else:
        from .loader import load_config, resolve

        folder = resolve(model)
        config = load_config(folder)
        if bits is None:
            weight_names = set(folder_index(folder))
    if bits is not None:
        if config.quantization is not None:
            raise PlanError(f"--bits: {model} is already quantized ({config.quantization.get('bits')}-bit)")
        from .quant.groups import check_params

        check_params(bits, group_size, "--bits/--group-size")
        config.quantization = {"bits": bits, "group_size": group_size}
    if context < 0:
        raise PlanError(f"--context must be at least 0, got {context}")
    sizes = weight_sizes(config, parse_dtype(dtype), weight_names)
    sizes = Sizes(sizes.layers, sizes.ends, kv_bytes_per_layer(config, context, parse_dtype(dtype)))
    n_layers = len(sizes.layers)
    ranges = parse_layers(layers, n_layers, len(memory)) if layers else split_layers(sizes, memory)
    quant = config.quantization
    what = f"{quant['bits']}-bit (group {quant['group_size']})" if quant else "unquantized"
    head = (
        f"{model}: {config.summary()}\n"
        f"{n_layers} layers, {what}, {str(parse_dtype(dtype)).split('.')[-1]} compute: "
        f"{(sizes.total - sizes.kv * n_layers) / GB:.2f} GB of weights"
        + (f", KV cache for {context} tokens {sizes.kv * n_layers / GB:.2f} GB" if context else "")
    )
    try:
        check_fits(sizes, ranges, memory, names)
        problem = None
    except PlanError as e:
        problem = e
    return f"{head}\n{format_plan(sizes, ranges, memory, names)}", problem
