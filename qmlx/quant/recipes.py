"""Which layer gets which bits: recipes, and the config.json `"quantization"` dict they produce.

The dict follows the MLX-community convention, so mlx-lm and qmlx read each other's folders:

    {"group_size": 64, "bits": 4, "mode": "affine",
     "model.embed_tokens": {"group_size": 64, "bits": 6},     # a layer that differs
     "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
     "some.layer": false}                                      # left unquantized

Layers are named by module path (the weight name without `.weight`). Recipes work from the
paths alone, so the offline converter can plan without building the model.
"""

from __future__ import annotations

import re

from .groups import QuantizationError, check_params

# Recipes with fixed names; `mixed-L-H` also works for any supported L < H.
RECIPES = {
    "uniform": "every layer at --bits",
    "head-8": "embeddings and output head at 8 bits, the rest at --bits",
    "kv-8": "every block's k_proj and v_proj at 8 bits, the rest at --bits (Qwen2.5's grouped "
    "k/v projections are ~1% of the weights: +0.05 bits/weight)",
    "dense-8": "mixture of experts: every layer but the routed experts at 8 bits (router, shared expert, "
    "attention, embeddings, head: what every token reads; ~14% of Qwen2-57B-A14B's weights, +0.6 "
    "bits/weight), the routed experts at --bits",
    "mixed-2-6": "2 bits; sensitive layers, embeddings and head at 6",
    "mixed-3-4": "3 bits; sensitive layers, embeddings and head at 4",
    "mixed-3-6": "3 bits; sensitive layers, embeddings and head at 6",
    "mixed-4-6": "4 bits; sensitive layers, embeddings and head at 6",
    "mixed-4-8": "4 bits; sensitive layers, embeddings and head at 8",
    "auto-L-H": "like mixed-L-H and the same size, but the block layers that get H bits are "
    "the ones whose quantization error was measured to hurt most (calibrated)",
}
_MIXED = re.compile(r"^mixed-(\d)-(\d)$")
_AUTO = re.compile(r"^auto-(\d)-(\d)$")
# Projections whose errors hurt most: v_proj feeds every attention output unchanged by RoPE
# or softmax, down_proj sums the widest activations of the block.
SENSITIVE_PROJECTIONS = ("self_attn.v_proj", "mlp.down_proj")
HEAD_PATHS = ("model.embed_tokens", "lm_head")
# The kv-8 recipe's layers: on the fixture at 4-bit g64, v_proj alone costs +2.0% perplexity for
# ~0.5% of the weights (docs/quantization.md); k_proj, as small, comes along.
KV_PROJECTIONS = ("self_attn.k_proj", "self_attn.v_proj")
GLOBAL_KEYS = ("group_size", "bits", "mode")


def layer_index(path: str) -> int | None:
    """N for a path under `model.layers.N.`, else None."""
    m = re.match(r"^model\.layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def is_sensitive_layer(index: int, n_layers: int) -> bool:
    """The first and last eighth of the blocks, and every third block between them.

    The ends of the stack are where quantization error is known to cost the most perplexity
    (the same rule of thumb as llama.cpp's Q4_K_M); every third block spreads the extra bits
    through the middle at a modest cost in size.
    """
    eighth = n_layers // 8
    return index < eighth or index >= n_layers - eighth or (index - eighth) % 3 == 2


def measured_recipe(recipe: str | None) -> tuple[int, int] | None:
    """(low, high) bits of an `auto-L-H` recipe (which needs measured sensitivities), else None."""
    m = _AUTO.match(recipe or "")
    if not m:
        return None
    low, high = int(m.group(1)), int(m.group(2))
    check_params(low, 64, f"--recipe {recipe}")
    check_params(high, 64, f"--recipe {recipe}")
    if low >= high:
        raise QuantizationError(f"--recipe {recipe!r}: the first bits must be lower (auto-L-H)")
    return low, high


def choose_by_sensitivity(
    layers: dict[str, int], n_layers: int, low: int, high: int, group_size: int, sensitivity: dict
) -> dict:
    """The `auto-L-H` plan: mixed-L-H's extra bits moved onto the measured-worst block layers.

    `sensitivity` maps block-layer paths to the damage measured with that layer alone at `low`
    bits; `layers` maps paths to input dims. The high-bit budget is the number of block weights
    mixed-L-H would give high bits (so both recipes have the same size), spent greedily on the
    layers with the most damage per weight.
    """
    fixed = plan(layers, n_layers, low, group_size, f"mixed-{low}-{high}")
    budget = sum(sensitivity.get(p, {}).get("numel", 0) for p in fixed if p in sensitivity and fixed[p])
    config = {k: v for k, v in fixed.items() if k in GLOBAL_KEYS or layer_index(k) is None}
    ranked = sorted(sensitivity, key=lambda p: -sensitivity[p]["damage"] / sensitivity[p]["numel"])
    for path in ranked:
        numel = sensitivity[path]["numel"]
        if numel <= budget and layers.get(path, 1) % group_size == 0:
            config[path] = {"group_size": group_size, "bits": high}
            budget -= numel
    for path, in_dims in layers.items():
        if in_dims % group_size:
            config[path] = False
    return config


def _is_head(path: str, n_layers: int) -> bool:
    return path in HEAD_PATHS


def _is_kv(path: str, n_layers: int) -> bool:
    return path.endswith(KV_PROJECTIONS)


def _is_dense(path: str, n_layers: int) -> bool:
    return ".switch_mlp." not in path


def _is_head_or_sensitive(path: str, n_layers: int) -> bool:
    index = layer_index(path)
    return _is_head(path, n_layers) or (
        index is not None and path.endswith(SENSITIVE_PROJECTIONS) and is_sensitive_layer(index, n_layers)
    )


def parse_recipe(recipe: str | None, bits: int):
    """(low bits, high bits or None, rule(path, n_layers) → whether the layer gets high bits)."""
    if recipe in (None, "uniform"):
        return bits, None, None
    if recipe == "head-8":
        return bits, 8, _is_head
    if recipe == "kv-8":
        return bits, 8, _is_kv
    if recipe == "dense-8":
        return bits, 8, _is_dense
    m = _MIXED.match(recipe)
    if m:
        low, high = int(m.group(1)), int(m.group(2))
        check_params(low, 64, f"--recipe {recipe}")
        check_params(high, 64, f"--recipe {recipe}")
        if low < high:
            return low, high, _is_head_or_sensitive
    raise QuantizationError(
        f"--recipe {recipe!r} is unknown; choose from {', '.join(RECIPES)} "
        "(mixed-L-H and auto-L-H with L < H)"
    )


def plan(
    layers: dict[str, int],
    n_layers: int,
    bits: int = 4,
    group_size: int = 64,
    recipe: str | None = None,
) -> dict:
    """The `"quantization"` config for quantizable layers {path: input dims}.

    Layers whose input dims do not divide into groups stay unquantized (recorded as false).
    """
    check_params(bits, group_size, "--bits/--group-size")
    low, high, gets_high = parse_recipe(recipe, bits)
    config: dict = {"group_size": group_size, "bits": low, "mode": "affine"}
    for path, in_dims in sorted(layers.items()):
        if in_dims % group_size:
            config[path] = False
        elif gets_high is not None and gets_high(path, n_layers):
            config[path] = {"group_size": group_size, "bits": high}
    return config


def layer_params(quantization: dict, path: str, source: str = "config.json") -> dict | None:
    """{"bits", "group_size"} for one layer under a `"quantization"` dict, or None if left dense.

    A per-layer entry overrides the global settings; missing keys fall back to them.
    """
    entry = quantization.get(path, True)
    if entry is False:
        return None
    bits, group_size = quantization.get("bits"), quantization.get("group_size")
    if isinstance(entry, dict):
        if entry.get("mode", "affine") != "affine":
            raise QuantizationError(
                f"{source}: quantization entry {path!r} has mode {entry.get('mode')!r}; "
                "qmlx supports 'affine'"
            )
        bits, group_size = entry.get("bits", bits), entry.get("group_size", group_size)
    elif entry is not True:
        raise QuantizationError(
            f"{source}: quantization entry {path!r} must be an object or false, got {entry!r}"
        )
    check_params(bits, group_size, f"{source}: quantization entry {path!r}")
    return {"bits": bits, "group_size": group_size}


def summarize(quantization: dict, layers: dict[str, int]) -> dict[int, int]:
    """{bits: number of layers} under a plan (0 counts unquantized layers), for model cards."""
    counts: dict[int, int] = {}
    for path in layers:
        p = layer_params(quantization, path)
        key = 0 if p is None else p["bits"]
        counts[key] = counts.get(key, 0) + 1
    return counts
