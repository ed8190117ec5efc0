"""Conversion time and peak memory: `qmlx convert` vs `mlx_lm.convert`, in one run.

    .venv/bin/python benchmarks/bench_convert.py [--model DIR] [--bits 4] [--group-size 64]
    .venv/bin/python benchmarks/bench_convert.py --gguf FILE.gguf      # also time a GGUF import
    .venv/bin/python benchmarks/bench_convert.py --7b [--work DIR]      # a 7B-shaped random checkpoint

Each conversion runs in its own process; peak RSS is that process's own high-water mark.
The 7B mode first writes random bf16 weights with Qwen2.5-7B-Instruct's shapes (~15 GB) as
sharded safetensors (once; reused afterwards), after checking free disk space.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from common import PEAK_RSS_SOURCE, model_dir, ratio, run_isolated, write_random_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("QMLX_SHARED", os.path.join(HERE, "..", "..", "shared"))
CONFIG_7B = os.path.join(SHARED, "fixtures", "configs", "qwen2.5-7b-instruct.json")

PEAK = "peak_rss()"

QMLX = (
    PEAK_RSS_SOURCE
    + f"""
import json, resource, sys, time
t0 = time.perf_counter()
import qmlx
from convert import convert
convert({{src!r}}, {{dst!r}}, bits={{bits}}, group_size={{group_size}}, progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_bytes={PEAK})))
"""
)

MLX_LM = (
    PEAK_RSS_SOURCE
    + f"""
import json, resource, sys, time
t0 = time.perf_counter()
from mlx_lm import convert
convert({{src!r}}, {{dst!r}}, quantize=True, q_bits={{bits}}, q_group_size={{group_size}})
print(json.dumps(dict(seconds=time.perf_counter() - t0, peak_bytes={PEAK})))
"""
)


def folder_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(path, f))
        for f in os.listdir(path)
        if f.endswith((".safetensors", ".gguf"))
    )


def run(tool: str, template: str, src: str, work: str, bits: int, group_size: int) -> dict:
    dst = os.path.join(work, tool.replace(" ", "-"))
    shutil.rmtree(dst, ignore_errors=True)
    r = run_isolated(template.format(src=src, dst=dst, bits=bits, group_size=group_size), timeout=7200)
    r["out_bytes"] = folder_bytes(dst)
    shutil.rmtree(dst, ignore_errors=True)
    return r


def report(title: str, src: str, rows: dict[str, dict]) -> None:
    size = folder_bytes(src)
    print(f"\n{title}: source {size / 1e9:.2f} GB ({src})")
    print(f"{'tool':<22}{'wall s':>9}{'peak RSS MB':>13}{'RSS / source':>14}{'output GB':>11}")
    for tool, r in rows.items():
        print(
            f"{tool:<22}{r['seconds']:>9.1f}{r['peak_bytes'] / 1e6:>13.0f}"
            f"{r['peak_bytes'] / size:>13.0%}{r['out_bytes'] / 1e9:>11.2f}"
        )
    if "qmlx convert" in rows and "mlx_lm.convert" in rows:
        q, m = rows["qmlx convert"], rows["mlx_lm.convert"]
        print(
            f"qmlx / mlx_lm: wall time {ratio(q['seconds'], m['seconds'])}, "
            f"peak RSS {ratio(q['peak_bytes'], m['peak_bytes'])}"
        )


def write_random_7b(folder: str) -> None:
    """Random bf16 weights with Qwen2.5-7B's shapes, streamed to 5 GB shards (~15 GB)."""
    with open(CONFIG_7B) as f:
        write_random_checkpoint(folder, json.load(f), outputs_bytes_per_source_byte=0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF folder (default: the shared fixture)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--gguf", help="also time `qmlx convert` of this GGUF file")
    ap.add_argument("--7b", dest="seven_b", action="store_true", help="run on a 7B-shaped random checkpoint")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/qmlx-bench"), help="where to write")
    ap.add_argument("--skip-mlx-lm", action="store_true", help="time qmlx only")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    work = tempfile.mkdtemp(dir=args.work, prefix="convert-")
    try:
        if args.seven_b:
            src = os.path.join(args.work, "qwen2.5-7b-random-bf16")
            if not os.path.exists(src):
                write_random_7b(src)
            title = "7B-shaped random checkpoint"
        else:
            src = model_dir(args.model)
            title = "fixture"
        rows = {"qmlx convert": run("qmlx convert", QMLX, src, work, args.bits, args.group_size)}
        if not args.skip_mlx_lm:
            rows["mlx_lm.convert"] = run("mlx_lm.convert", MLX_LM, src, work, args.bits, args.group_size)
        report(f"{title}, {args.bits}-bit g{args.group_size}", src, rows)
        if args.gguf:
            r = {"qmlx convert": run("qmlx convert", QMLX, args.gguf, work, args.bits, args.group_size)}
            report("GGUF import", args.gguf, r)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
