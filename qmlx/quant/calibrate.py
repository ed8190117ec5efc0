"""Calibrated quantization of one decoder block at a time (AWQ, GPTQ, or both).

The caller feeds the block's input hidden states for the calibration samples (the output of
the already-quantized blocks before it), so each block is corrected for the errors upstream,
and only one block's weights and activations are ever held: memory stays bounded whatever the
depth of the model. Returns the block's new tensors and the hidden states for the next block.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import awq
from .gptq import Hessian, gptq
from .search import quantize_searched

METHODS = {
    "rtn": "round to nearest over each group's full range, as mlx-lm's convert (default)",
    "clip": "data-free: per-group range searched for the smallest weight error",
    "awq": "activation-aware channel scales folded into the previous norm/linear, then "
    "per layer rtn or an activation-weighted range search, whichever errs less (calibrated)",
    "gptq": "layer-wise Hessian-based rounding with error propagation (calibrated)",
    "awq-gptq": "AWQ scales, then GPTQ rounding (calibrated)",
}
CALIBRATED = ("awq", "gptq", "awq-gptq")
# Methods that round with GPTQ (with convert --calib-head, the output head too).
GPTQ_METHODS = ("gptq", "awq-gptq")
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Token rows kept per input site for AWQ's scale search (statistics use every token).
SEARCH_ROWS = 512
# Calibration samples run through a block at once.
CHUNK = 4


class Tap(nn.Module):
    """Wraps a linear layer and accumulates statistics of its inputs: XᵀX, mean|x|, E[x²]."""

    def __init__(self, linear: nn.Linear, hessian: bool):
        super().__init__()
        self.linear = linear
        self.hessian = hessian
        self.n = 0
        self.xtx = self.abs_sum = self.sq_sum = None
        self.rows: list[mx.array] = []

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        if self.n == 0:
            d = flat.shape[-1]
            self.abs_sum, self.sq_sum = mx.zeros((d,)), mx.zeros((d,))
            self.xtx = mx.zeros((d, d)) if self.hessian else None
        self.n += flat.shape[0]
        self.abs_sum = self.abs_sum + mx.abs(flat).sum(0)
        self.sq_sum = self.sq_sum + (flat * flat).sum(0)
        if self.hessian:
            self.xtx = self.xtx + flat.T @ flat
        kept = sum(r.shape[0] for r in self.rows)
        if kept < SEARCH_ROWS:
            self.rows.append(flat[: SEARCH_ROWS - kept])
        mx.eval(self.abs_sum, self.sq_sum, *([self.xtx] if self.hessian else []), *self.rows)
        return self.linear(x)

    @property
    def magnitude(self) -> mx.array:
        return self.abs_sum / self.n

    @property
    def sample(self) -> mx.array:
        return mx.concatenate(self.rows)


def _module(block: nn.Module, path: str) -> nn.Module:
    parent, name = path.split(".")
    return getattr(getattr(block, parent), name)


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, name = path.split(".")
    setattr(getattr(block, parent), name, module)


def run_block(block: nn.Module, h: mx.array) -> mx.array:
    """The block's output for hidden states h (samples, L, d), a few samples at a time."""
    out = []
    for i in range(0, h.shape[0], CHUNK):
        y = block(h[i : i + CHUNK], "causal")
        mx.eval(y)
        out.append(y)
    return mx.concatenate(out)


# Each distinct input site of a block and the layers that share its input.
SITES = {
    "self_attn.q_proj": ("self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": (),
    "mlp.gate_proj": ("mlp.up_proj",),
    "mlp.down_proj": (),
}
# With quantize_block(sequential=True), GPTQ quantizes the sites in this order, each calibrated on
# the outputs of the ones before, already quantized ("true sequential" in the GPTQ paper's code).
# Off by default: it lowers the block's error on the calibration tokens but raised the fixture's
# perplexity gap (4-bit kv-8, 32 samples, GPTQ'd head: +4.27% -> +5.09%;
# benchmarks/gptq_ablation.py --sequential).


def collect(block: nn.Module, h: mx.array, hessian: bool, sites=None) -> dict[str, Tap]:
    """Run the block over h with a Tap on each distinct input site (or those of `sites`);
    returns {path: Tap}."""
    sites = {k: v for k, v in SITES.items() if sites is None or k in sites}
    taps = {}
    for path in sites:
        taps[path] = Tap(_module(block, path), hessian)
        _set(block, path, taps[path])
    try:
        run_block(block, h)
    finally:
        for path, tap in taps.items():
            _set(block, path, tap.linear)
    return {p: taps[site] for site, shared in sites.items() for p in (site, *shared)}


def scale_block(block: nn.Module, taps: dict[str, Tap], params: dict, n_heads: int, n_kv: int):
    """Search and fold AWQ scales for the four input sites of a block (in place)."""

    def search(site: str, paths: list[str], magnitude: mx.array) -> mx.array | None:
        ps = [params[p] for p in paths]
        if any(p is None for p in ps):
            return None  # an unquantized layer gains nothing; keep it exact
        ws = [_module(block, p).weight for p in paths]
        # One search for layers quantized alike; the lowest bits decide otherwise.
        bits, gs = min(p["bits"] for p in ps), ps[0]["group_size"]
        return awq.search_scales(taps[site].sample, magnitude, ws, bits, gs)

    attn, mlp = block.self_attn, block.mlp
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    s = search("self_attn.q_proj", qkv, taps["self_attn.q_proj"].magnitude)
    if s is not None:
        awq.fold_into_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s)
    s = search("mlp.gate_proj", ["mlp.gate_proj", "mlp.up_proj"], taps["mlp.gate_proj"].magnitude)
    if s is not None:
        awq.fold_into_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s)
    # The v_proj/up_proj weights were just rescaled above; folding further scales into their
    # rows composes with that (column and row scalings commute).
    s_v, s_o = awq.tie_heads(taps["self_attn.o_proj"].magnitude, n_heads, n_kv)
    s = search("self_attn.o_proj", ["self_attn.o_proj"], s_o)
    if s is not None and params["self_attn.v_proj"] is not None:
        s_v_fold = awq.tie_heads(s, n_heads, n_kv)[0]  # s is tied, so this recovers it per kv
        awq.fold_into_linear(attn.v_proj, attn.o_proj, s_v_fold, s)
    s = search("mlp.down_proj", ["mlp.down_proj"], taps["mlp.down_proj"].magnitude)
    if s is not None and params["mlp.up_proj"] is not None:
        awq.fold_into_linear(mlp.up_proj, mlp.down_proj, s, s)
    mx.eval(block.parameters())


def best_rounding(w: mx.array, tap: Tap, bits: int, group_size: int, dtype):
    """Round-to-nearest or the activation-weighted range search, whichever gives the smaller
    output error on the calibration sample (weight error alone can mislead: see clip)."""
    x = tap.sample
    ref = x @ w.T
    best, best_err = None, None
    for triple in (
        mx.quantize(w.astype(dtype), group_size=group_size, bits=bits),
        quantize_searched(w, bits, group_size, tap.sq_sum / tap.n, dtype),
    ):
        wq = mx.dequantize(*triple, group_size=group_size, bits=bits).astype(mx.float32)
        err = mx.square(x @ wq.T - ref).mean().item()
        if best_err is None or err < best_err:
            best, best_err = triple, err
    return best


def _gptq_layers(block: nn.Module, taps: dict[str, Tap], params: dict, dtype) -> dict:
    """{path: (packed, scales, biases)} by GPTQ for every quantized layer.

    Layers fed the same inputs and quantized alike (q/k/v, gate/up) share H and are run as one
    stacked matrix: GPTQ treats rows independently, so the result is the same as one by one,
    in a third of the column steps.
    """
    groups: dict[tuple, list[str]] = {}
    for path in LINEARS:
        p = params[path]
        if p is not None:
            groups.setdefault((id(taps[path]), p["bits"], p["group_size"]), []).append(path)
    hessians: dict[int, Hessian] = {}
    out = {}
    for (tap_id, bits, group_size), paths in groups.items():
        if tap_id not in hessians:
            hessians[tap_id] = Hessian(taps[paths[0]].xtx)
        weights = [_module(block, p).weight for p in paths]
        packed, s, b = gptq(mx.concatenate(weights), hessians[tap_id], bits, group_size, dtype)
        start = 0
        for path, w in zip(paths, weights):
            end = start + w.shape[0]
            out[path] = (packed[start:end], s[start:end], b[start:end])
            start = end
    return out


def _gptq_sequential(block: nn.Module, h: mx.array, params: dict, dtype) -> dict:
    """GPTQ site by site, each site's H taken with the sites before it already quantized, so
    o_proj and down_proj also correct the rounding error of the layers that feed them."""
    out, originals = {}, {}
    try:
        for site, shared in SITES.items():
            taps = collect(block, h, hessian=True, sites=(site,))
            here = {p: params[p] if p in (site, *shared) else None for p in LINEARS}
            part = _gptq_layers(block, taps, here, dtype)
            for path, (packed, s, b) in part.items():
                lin, p = _module(block, path), here[path]
                originals[path] = lin.weight
                w = mx.dequantize(packed, s, b, group_size=p["group_size"], bits=p["bits"])
                lin.weight = w.astype(mx.float32)
            out.update(part)
    finally:
        for path, w in originals.items():
            _module(block, path).weight = w
    return out


def quantize_block(
    block: nn.Module,
    h: mx.array,
    params: dict,
    method: str,
    n_heads: int,
    n_kv_heads: int,
    dtype=mx.bfloat16,
    sequential: bool = False,
) -> tuple[dict[str, tuple], mx.array]:
    """Quantize one block calibrated on its inputs h (samples, L, d).

    `params` maps each path of LINEARS to {"bits", "group_size"} or None (left dense).
    Returns ({path: (packed, scales, biases) or (weight,)}, the block's output for h computed
    with the quantized weights) and leaves the block holding its (AWQ-rescaled) float weights.
    """
    use_gptq = method in GPTQ_METHODS
    if method in ("awq", "awq-gptq"):
        taps = collect(block, h, hessian=False)
        scale_block(block, taps, params, n_heads, n_kv_heads)
    out: dict[str, tuple] = {}
    if use_gptq and sequential:
        taps, by_gptq = {}, _gptq_sequential(block, h, params, dtype)
    else:
        taps = collect(block, h, hessian=use_gptq)
        by_gptq = _gptq_layers(block, taps, params, dtype) if use_gptq else {}
    for path in LINEARS:
        lin, p = _module(block, path), params[path]
        if p is None:
            out[path] = (lin.weight.astype(dtype),)
            continue
        if use_gptq:
            packed, s, b = by_gptq[path]
        else:
            packed, s, b = best_rounding(lin.weight, taps[path], p["bits"], p["group_size"], dtype)
        mx.eval(packed, s, b)
        out[path] = (packed, s, b)
    taps.clear()
    return out, run_quantized(block, h, out, params)


def run_quantized(block: nn.Module, h: mx.array, out: dict, params: dict) -> mx.array:
    """The block's output for h with its quantized layers' weights as `out` stores them."""
    originals = {}
    for path, arrays in out.items():
        if len(arrays) == 3:
            p = params[path]
            w = mx.dequantize(*arrays, group_size=p["group_size"], bits=p["bits"])
            originals[path] = _module(block, path).weight
            _module(block, path).weight = w.astype(mx.float32)
    try:
        return run_block(block, h)
    finally:
        for path, w in originals.items():
            _module(block, path).weight = w


def head_hessian(h: mx.array, norm_weight: mx.array, eps: float) -> mx.array:
    """XᵀX of the output head's inputs: the final RMSNorm of the last block's outputs h."""
    xtx = mx.zeros((h.shape[-1], h.shape[-1]))
    for i in range(0, h.shape[0], CHUNK):
        x = mx.fast.rms_norm(h[i : i + CHUNK], norm_weight, eps).reshape(-1, h.shape[-1])
        xtx = xtx + x.T @ x
        mx.eval(xtx)
    return xtx


def layer_damage(block: nn.Module, h: mx.array, bits: int, group_size: int):
    """({path: damage}, the block's output): how much rounding each linear layer alone to
    `bits` changes the block's output, relative to how much the block changes its input."""
    y = run_block(block, h)
    base = mx.square(y - h).mean()
    damage = {}
    for path in LINEARS:
        lin = _module(block, path)
        if lin.weight.shape[-1] % group_size:
            continue
        w = lin.weight
        lin.weight = awq.fake_quantize(w, bits, group_size)
        damage[path] = (mx.square(run_block(block, h) - y).mean() / base).item()
        lin.weight = w
    return damage, y
