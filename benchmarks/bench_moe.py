"""Qwen2-MoE at Qwen2-57B-A14B's real layer shapes with few layers: conversion memory and decode time.

    flock /tmp/qmlx-heavy.lock .venv/bin/python benchmarks/bench_moe.py [--layers 1,4] [--work DIR]
        [--skip-mlx-lm] [--keep]

1. Convert. Random bf16 checkpoints in Hugging Face's per-expert layout with 57B's shapes and N decoder
   layers (N=4: ~18 GB; written once under --work and reused), converted to 4-bit g64 by `qmlx convert`
   and by `mlx_lm.convert`, each in its own process: wall time and peak RSS. Streaming shows as a
   peak flat in N (57B's source is ~115 GB; a 24 GB Mac holds ~1/5 of it).
2. Decode. On the deepest 4-bit output, the time of one MoE block per decoded token (a new random hidden
   state each token, so the router picks different experts) against a dense Qwen2 block with the same
   active parameters (intermediate 8·2560 + 20480 = 40960: the 8 routed experts and the shared expert),
   4-bit g64 too, and against mlx-lm's MoE block loaded from the same folder. If the MoE block read
   all 64 experts its time would be its whole bytes / the dense block's bandwidth (printed).
"""

from __future__ import annotations

import argparse
import os
import shutil

from common import PEAK_RSS_SOURCE, ratio, run_isolated, write_random_checkpoint

# Qwen2-57B-A14B's config.json (the shapes; the layer count is the benchmark's).
CONFIG_57B = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "model_type": "qwen2_moe",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": False,
    "vocab_size": 151936,
    "max_position_embeddings": 65536,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

# Children: the OOM killer picks a child first (mlx-lm's convert may want more than the machine).
OOM_FIRST = "open('/proc/self/oom_score_adj', 'w').write('1000')\n"

CONVERT = {
    "qmlx convert": OOM_FIRST
    + PEAK_RSS_SOURCE
    + """
import json, time
t0 = time.perf_counter()
import qmlx
from convert import convert
convert({src!r}, {dst!r}, bits=4, group_size=64, progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_bytes=peak_rss())))
""",
    "mlx_lm.convert": OOM_FIRST
    + PEAK_RSS_SOURCE
    + """
import json, time
t0 = time.perf_counter()
from mlx_lm import convert
convert({src!r}, {dst!r}, quantize=True, q_bits=4, q_group_size=64)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_bytes=peak_rss())))
""",
}

# Per-token block time: median over STEPS decoded tokens after WARM ones, a KV cache growing as in decoding.
TIMING = """
import json, statistics, time
import mlx.core as mx
STEPS, WARM = 24, 4

def per_token(block, make_cache, dtype, d):
    cache = make_cache()
    mx.random.seed(1)
    xs = [mx.random.normal((1, 1, d)).astype(dtype) for _ in range(STEPS + WARM)]
    mx.eval(xs)
    times = []
    for i, x in enumerate(xs):
        t = time.perf_counter()
        mx.eval(block(x, None, cache))
        if i >= WARM:
            times.append(time.perf_counter() - t)
    return statistics.median(times)

def nbytes(module):
    from mlx.utils import tree_flatten
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))
"""

QMLX_DECODE = (
    TIMING
    + """
import qmlx
from qmlx.cache import make_cache
from qmlx.config import ModelConfig
from qmlx.loader import load_model
from qmlx.model import Block
from qmlx.quant import quantize_model
model = load_model({dst!r}, lazy=True)
dtype = model.model.norm.weight.dtype
c = model.config
out = dict(dtype=str(dtype).split(".")[-1], moe=[], moe_bytes=0, active_bytes=0)
for layer in model.layers:
    mx.eval(layer.parameters())
    out["moe"].append(per_token(layer, lambda: make_cache(1)[0], dtype, c.hidden_size))
moe = model.layers[0].mlp
expert = sum(p.weight.nbytes + p.scales.nbytes + p.biases.nbytes for p in
             (moe.switch_mlp.gate_proj, moe.switch_mlp.up_proj, moe.switch_mlp.down_proj)) // c.num_experts
out["moe_bytes"] = nbytes(model.layers[0])
out["active_bytes"] = out["moe_bytes"] - (c.num_experts - c.num_experts_per_tok) * expert
active_inter = c.num_experts_per_tok * c.moe_intermediate_size + c.shared_expert_intermediate_size
dense_config = ModelConfig.from_dict({{**json.load(open({dst!r} + "/config.json")),
    "model_type": "qwen2", "intermediate_size": active_inter, "quantization": None}})
dense = Block(dense_config, 0)
quantize_model(dense, {{"bits": 4, "group_size": 64}})
dense.set_dtype(dtype)
mx.eval(dense.parameters())
out["dense"] = per_token(dense, lambda: make_cache(1)[0], dtype, c.hidden_size)
out["dense_bytes"] = nbytes(dense)
print(json.dumps(out))
"""
)

MLX_LM_DECODE = (
    TIMING
    + """
import mlx_lm
from mlx_lm.models.cache import KVCache
model, _ = mlx_lm.load({dst!r}, lazy=True)
layers = model.model.layers
dtype = layers[0].input_layernorm.weight.dtype
out = dict(dtype=str(dtype).split(".")[-1], moe=[])
for layer in layers:
    mx.eval(layer.parameters())
    out["moe"].append(per_token(layer, KVCache, dtype, model.args.hidden_size))
print(json.dumps(out))
"""
)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def convert_rows(src: str, work: str, tools: list[str]) -> dict:
    rows = {}
    for tool in tools:
        dst = os.path.join(work, f"{os.path.basename(src)}-{tool.split()[0].replace('.', '-')}-4bit")
        shutil.rmtree(dst, ignore_errors=True)
        try:
            rows[tool] = run_isolated(CONVERT[tool].format(src=src, dst=dst), timeout=7200)
            rows[tool]["dst"] = dst
            rows[tool]["out_bytes"] = folder_bytes(dst)
        except RuntimeError as e:  # killed (out of memory) or failed: reported, not fatal
            rows[tool] = {"error": str(e).strip().splitlines()[-1][:120]}
            shutil.rmtree(dst, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="1,4", help="decoder-layer counts of the checkpoints (default 1,4)")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/qmlx-bench"), help="where to write")
    ap.add_argument("--skip-mlx-lm", action="store_true", help="measure qmlx only")
    ap.add_argument("--keep", action="store_true", help="keep the converted folders")
    args = ap.parse_args()
    counts = sorted({int(n) for n in args.layers.split(",")})
    if not counts or counts[0] < 1 or counts[-1] > 28:
        ap.error(f"--layers {args.layers}: layer counts must be in 1..28")
    os.makedirs(args.work, exist_ok=True)
    tools = ["qmlx convert"] + ([] if args.skip_mlx_lm else ["mlx_lm.convert"])

    results = {}
    for n in counts:
        src = os.path.join(args.work, f"qwen2-57b-a14b-shaped-{n}-layers-bf16")
        if not os.path.exists(src):
            write_random_checkpoint(
                src, {**CONFIG_57B, "num_hidden_layers": n}, outputs_bytes_per_source_byte=0.6
            )
        results[n] = (src, convert_rows(src, args.work, tools))

    print("\nConvert to 4-bit g64, Qwen2-57B-A14B layer shapes (64 experts, top 8), one process per run")
    print(f"{'layers':>6} {'source GB':>10}  {'tool':<16}{'wall s':>8}{'peak RSS GB':>13}{'output GB':>11}")
    for n, (src, rows) in results.items():
        for tool, r in rows.items():
            if "error" in r:
                print(f"{n:>6} {folder_bytes(src) / 1e9:>10.2f}  {tool:<16}  failed: {r['error']}")
                continue
            print(
                f"{n:>6} {folder_bytes(src) / 1e9:>10.2f}  {tool:<16}{r['seconds']:>8.0f}"
                f"{r['peak_bytes'] / 1e9:>13.2f}{r['out_bytes'] / 1e9:>11.2f}"
            )
    for tool in tools:
        peaks = [rows[tool].get("peak_bytes") for _, rows in results.values()]
        if len(counts) > 1 and all(peaks):
            print(f"{tool}: peak RSS at {counts[-1]} layers / at {counts[0]}: {ratio(peaks[-1], peaks[0])}")
    last = results[counts[-1]][1]
    if all("peak_bytes" in last.get(t, {}) for t in ("qmlx convert", "mlx_lm.convert")):
        q, m = last["qmlx convert"], last["mlx_lm.convert"]
        print(
            f"qmlx / mlx_lm at {counts[-1]} layers: peak RSS {ratio(q['peak_bytes'], m['peak_bytes'])}, "
            f"wall time {ratio(q['seconds'], m['seconds'])}"
        )

    dst = last.get("qmlx convert", {}).get("dst")
    if dst:
        q = run_isolated(QMLX_DECODE.format(dst=dst), timeout=3600)
        moe = sum(q["moe"]) / len(q["moe"])
        print(f"\nDecode, one block per token ({counts[-1]}-layer 4-bit g64 checkpoint, median of 24 tokens)")
        print(f"{'block':<44}{'ms/token':>9}{'GB held':>9}{'GB/token':>10}{'GB/s':>7}")
        rows = [
            (f"qmlx MoE block ({q['dtype']})", moe, q["moe_bytes"], q["active_bytes"]),
            (
                f"qmlx dense block, same active size ({q['dtype']})",
                q["dense"],
                q["dense_bytes"],
                q["dense_bytes"],
            ),
        ]
        if not args.skip_mlx_lm:
            m = run_isolated(MLX_LM_DECODE.format(dst=dst), timeout=3600)
            rows.append(
                (
                    f"mlx-lm MoE block ({m['dtype']})",
                    sum(m["moe"]) / len(m["moe"]),
                    q["moe_bytes"],
                    q["active_bytes"],
                )
            )
        for label, t, held, read in rows:
            print(f"{label:<44}{t * 1e3:>9.1f}{held / 1e9:>9.2f}{read / 1e9:>10.3f}{read / t / 1e9:>7.1f}")
        all_experts = q["moe_bytes"] / (q["dense_bytes"] / q["dense"])
        print(
            f"qmlx MoE / dense of the same active size: {ratio(moe, q['dense'])} "
            f"(reading all {CONFIG_57B['num_experts']} experts at the dense block's bandwidth: "
            f"{all_experts * 1e3:.0f} ms, {ratio(all_experts, q['dense'])})"
        )
        if not args.skip_mlx_lm:
            print(f"qmlx / mlx-lm MoE block time: {ratio(moe, rows[2][1])}")
        print("per-layer qmlx ms/token: " + ", ".join(f"{t * 1e3:.1f}" for t in q["moe"]))
    if not args.keep:
        for _, rows in results.values():
            for r in rows.values():
                if r.get("dst"):
                    shutil.rmtree(r["dst"], ignore_errors=True)


if __name__ == "__main__":
    main()
