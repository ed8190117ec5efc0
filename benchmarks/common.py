"""Helpers for benchmarks: run a snippet in a fresh process and collect its JSON result."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

# Source for scripts run in a child process: `peak_rss()` is that process's peak resident
# memory in bytes. On Linux it reads VmHWM, which starts afresh at exec; ru_maxrss would also
# count the memory of the (possibly large) process the child was forked from.
PEAK_RSS_SOURCE = """
def peak_rss():
    import resource, sys
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
"""


def fixture_dir() -> str:
    if os.environ.get("QMLX_FIXTURE_DIR"):
        return os.environ["QMLX_FIXTURE_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "shared", "fixtures", "qwen-fixture")
    return (
        subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )


def model_dir(given: str | None) -> str:
    """--model's folder, or the shared fixture; exits with one line if it is not a model folder."""
    folder = given or fixture_dir()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        sys.exit(f"--model {folder}: not a model folder (no config.json)")
    return folder


def run_isolated(code: str, env: dict | None = None, timeout: int = 1800) -> dict:
    """Run `code` in a new interpreter; it must print one JSON object as its last line."""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def ppl_row(label: str, size_bytes: float, bpw: float, ppls: list, deltas: list | None, extra=()) -> str:
    """One markdown row of the perplexity tables: size, bits/weight, each text's perplexity
    (with its change against bf16 unless `deltas` is None), the mean change, extra cells."""
    if deltas is None:
        cells, mean = [f"{p:.3f}" for p in ppls], "—"
    else:
        cells = [f"{p:.3f} ({d:+.1%})" for p, d in zip(ppls, deltas)]
        mean = f"{sum(deltas) / len(deltas):+.2%}"
    return f"| {label} | {size_bytes / 1e6:.0f} MB | {bpw:.2f} | " + " | ".join([*cells, mean, *extra]) + " |"


def replace_section(path: str, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers `begin` and `end` of a docs file with `text`."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start, stop = doc.index(begin) + len(begin), doc.index(end)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc[:start] + "\n" + text + "\n" + doc[stop:])


def load_rows(path: str) -> dict:
    """{label: row} cached by an earlier run of a table script (empty if none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {r["label"]: r for r in json.load(f)}
    except (ValueError, TypeError, KeyError) as e:
        sys.exit(f"--results {path}: not a results file of this script ({e}); move it away or pass another")


def save_rows(path: str, rows: dict) -> None:
    """Write the cached rows whole or not at all (an interrupted write leaves the old file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(list(rows.values()), f, indent=1)
    os.replace(tmp, path)


POOL = 1 << 25  # values drawn once for a random checkpoint (64 MB of bf16)


def write_random_checkpoint(folder: str, raw: dict, outputs_bytes_per_source_byte: float = 0.8) -> None:
    """Random bf16 weights with the shapes `raw` (a config.json dict) implies, in Hugging Face layout
    (a Qwen2-MoE's experts one tensor per expert), streamed to 5 GB shards, with the fixture's
    tokenizer. Refuses up front when the disk cannot hold the source plus the outputs to come."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, ".."))
    import qmlx  # noqa: F401, I001  (BLAS before mlx.core)

    import mlx.core as mx
    from convert.card import write_index
    from convert.layout import expected_tensors
    from convert.writer import OutTensor, ShardWriter
    from qmlx.config import ModelConfig

    shapes = {}
    for name, shape in expected_tensors(ModelConfig.from_dict(raw)).items():
        if ".switch_mlp." in name:  # stacked (E, out, in) -> E tensors of (out, in)
            prefix, rest = name.split(".switch_mlp.")
            shapes.update({f"{prefix}.experts.{e}.{rest}": shape[1:] for e in range(shape[0])})
        else:
            shapes[name] = shape
    need = sum(2 * math.prod(s) for s in shapes.values())
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(folder))).free
    if free < need * (1 + outputs_bytes_per_source_byte) + 2e9:
        sys.exit(
            f"not enough disk for {folder}: need ~{need * (1 + outputs_bytes_per_source_byte) / 1e9:.0f} GB "
            f"with its outputs, {free / 1e9:.0f} GB free"
        )
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    groups = [[OutTensor(n, "BF16", s)] for n, s in shapes.items()]
    writer = ShardWriter(tmp, groups, 5 * 10**9, {"format": "pt"})
    # Blocks are windows at varying offsets into one pool of normal draws: drawing every value afresh
    # ran at ~30 MB/s on 2 cores (10 minutes for an 18 GB checkpoint).
    mx.random.seed(0)
    pool = (0.02 * mx.random.normal((POOL,))).astype(mx.bfloat16)
    mx.eval(pool)
    offset = 0
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            block = mx.ones(shape) if name.endswith("norm.weight") else 0.02 * mx.random.normal(shape)
            writer.write(name, 0, block.astype(mx.bfloat16))
            continue
        step = max(1, min((64 << 20) // (4 * shape[1]), (POOL // 2) // shape[1]))
        for start in range(0, shape[0], step):
            rows = min(step, shape[0] - start)
            offset = (offset * 7919 + 104729) % (POOL // 2)
            block = pool[offset : offset + rows * shape[1]].reshape(rows, shape[1])
            mx.eval(block)
            writer.write(name, start, block)
        if i % 50 == 0 or i + 1 == len(shapes):
            print(f"\rwriting random weights to {folder}: {i + 1}/{len(shapes)}", end="", file=sys.stderr)
    print(file=sys.stderr)
    weight_map = writer.close()
    write_index(tmp, weight_map, writer.total_size, sum(math.prod(s) for s in shapes.values()))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({**raw, "torch_dtype": "bfloat16"}, f, indent=2)
    fixture = fixture_dir()
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(os.path.join(fixture, file), os.path.join(tmp, file))
    os.replace(tmp, folder)
