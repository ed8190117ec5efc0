"""Quantization methods side by side: qmlx (rtn, clip, awq, gptq) and mlx-lm's own tools.

    .venv/bin/python benchmarks/quant_methods.py [--bits 4,3] [--only LABEL,...]
        [--results FILE] [--write-docs]

For each bit width (group size 64) the fixture is quantized by every method, then each result is
scored against the bf16 fixture on the first 1024 tokens of each shared text (model and
reference in float32): perplexity per text, mean per-token KL(bf16 ‖ quantized), top-1
agreement, size on disk. Nothing is timed (quality does not depend on load, so the rows can run
beside other work); conversion speed is bench_convert.py's business. mlx-lm's AWQ and GPTQ run through their own
command-line entry points, fed the same calibration tokens as qmlx (its default calibration
file is a download, and this machine is offline): 8 samples × 512 tokens of Python's standard
library, which excludes textwrap.py, the code text scored here. Their fallback/embedding bits
are set to the same bits, so every row of a bit width has the same bits per weight (except
where noted by the size column). Each step runs in its own process with a time limit; rows are
cached in the results file as they finish (a rerun skips them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

from common import fixture_dir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SHARED = os.environ.get("QMLX_SHARED", os.path.join(ROOT, "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")
DOCS = os.path.join(ROOT, "docs", "quantization.md")
BEGIN, END = "<!-- quant-methods:begin -->", "<!-- quant-methods:end -->"
# 8 samples, not qmlx's default 32: each calibrated conversion runs the samples through every
# block two or three times, which on the shared 2-core CPU took ~40 minutes with 32.
SAMPLES, SEQ_LEN, GROUP = 8, 512, 64
STEP_TIMEOUT = 1500

QMLX_CONVERT = r"""
import sys
sys.path.insert(0, sys.argv[1])
from convert import convert
convert(sys.argv[2], sys.argv[3], bits=int(sys.argv[4]), group_size=int(sys.argv[5]),
        method=sys.argv[6], calib_samples=int(sys.argv[7]), calib_seq_len=int(sys.argv[8]),
        recipe=sys.argv[9] if len(sys.argv) > 9 else None, progress=False)
"""

# mlx-lm's entry point, with its calibration loader swapped for the same tokens qmlx uses.
MLX_LM_TOOL = r"""
import sys
sys.path.insert(0, sys.argv[1])
import importlib
tool = importlib.import_module("mlx_lm.quant." + sys.argv[2])
from convert.calib import calibration_tokens
SAMPLES = int(sys.argv[3])

class _Tok:
    def __init__(self, t): self.t = t
    def encode(self, text): return self.t.encode(text)

def load_data(tokenizer, num_samples, sequence_length):
    return calibration_tokens(_Tok(tokenizer), None, SAMPLES, sequence_length)

tool.load_data = load_data
sys.argv = [sys.argv[2]] + sys.argv[4:]
tool.main()
"""

MLX_LM_CONVERT = r"""
import sys
from mlx_lm import convert
convert(sys.argv[1], sys.argv[2], quantize=True, q_bits=int(sys.argv[3]), q_group_size=int(sys.argv[4]))
"""

SCORE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import qmlx
from qmlx.quality import compare
model, tok = qmlx.load(sys.argv[2], dtype="float32")
reference, _ = qmlx.load(sys.argv[3], dtype="float32")
out = {}
for path in sys.argv[4:]:
    ids = tok.encode(open(path, encoding="utf-8").read())[:1024]
    q = compare(model, reference, ids)
    out[os.path.basename(path)] = dict(ppl=q.ppl_model, ref=q.ppl_reference, kl=q.kl, top1=q.top1, n=q.n)
print(json.dumps(out))
"""


def rows_for(bits: int) -> list[tuple[str, str, list[str]]]:
    """(label, tool, arguments) of every method at `bits`."""
    b, g = str(bits), str(GROUP)
    rows = [(f"{bits}-bit qmlx {m}", "qmlx", [m]) for m in ("rtn", "clip", "awq", "gptq")]
    # Mixed bits (larger files): the fixed rule against the measured choice at the same size.
    rows += [(f"{bits}-bit qmlx gptq {r}-{bits}-6", "qmlx", ["gptq", f"{r}-{bits}-6"])
             for r in ("mixed", "auto")]  # fmt: skip
    rows.append((f"{bits}-bit mlx-lm convert", "mlx_lm.convert", []))
    rows.append(
        (f"{bits}-bit mlx-lm awq", "awq",
         ["--bits", b, "--group-size", g, "--embed-bits", b, "--embed-group-size", g,
          "--sequence-length", str(SEQ_LEN)])
    )  # fmt: skip
    if bits not in (2, 4, 8):
        return rows  # mlx-lm's GPTQ asserts bits in {2, 4, 8}
    rows.append(
        (f"{bits}-bit mlx-lm gptq", "gptq",
         ["--bits", b, "--group-size", g, "--fallback-bits", b, "--fallback-group-size", g,
          "--sequence-length", str(SEQ_LEN)])
    )  # fmt: skip
    return rows


def run(args: list[str], timeout: int = STEP_TIMEOUT) -> None:
    """Run a child python; raises with the child's stderr on failure."""
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])


def produce(label, tool, extra, bits, src, dst) -> None:
    if tool == "qmlx":
        return run(["-c", QMLX_CONVERT, ROOT, src, dst, str(bits), str(GROUP), extra[0],
                    str(SAMPLES), str(SEQ_LEN), *extra[1:]])  # fmt: skip
    if tool == "mlx_lm.convert":
        return run(["-c", MLX_LM_CONVERT, src, dst, str(bits), str(GROUP)])
    return run(["-c", MLX_LM_TOOL, ROOT, tool, str(SAMPLES), "--model", src, "--mlx-path", dst,
                *extra])  # fmt: skip


def score(folder: str, src: str, texts: list[str]) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", SCORE, ROOT, folder, src, *texts],
        capture_output=True, text=True, timeout=STEP_TIMEOUT,
    )  # fmt: skip
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def safetensors_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.endswith(".safetensors")
    )


def table(rows: list[dict], params: int) -> str:
    names = sorted(next(iter(rows))["scores"]) if rows else []
    short = [n.split("_")[0].split(".")[0] for n in names]
    head = "| setting | size | bits/weight | " + " | ".join(f"ppl {s}" for s in short)
    head += " | mean Δppl | KL mean | top-1 |"
    lines = [head, "|---" * (6 + len(names)) + "|"]
    if rows:
        ref = rows[0]["scores"]
        lines.append(
            "| bf16 | " + f"{rows[0]['ref_bytes'] / 1e6:.0f} MB | 16.00 | "
            + " | ".join(f"{ref[n]['ref']:.3f}" for n in names) + " | — | 0 | 100% |"
        )
    for r in rows:
        s = r["scores"]
        deltas = [s[n]["ppl"] / s[n]["ref"] - 1 for n in names]
        n_tok = sum(s[n]["n"] for n in names)
        kl = sum(s[n]["kl"] * s[n]["n"] for n in names) / n_tok
        top1 = sum(s[n]["top1"] * s[n]["n"] for n in names) / n_tok
        cells = [f"{s[n]['ppl']:.3f} ({d:+.1%})" for n, d in zip(names, deltas)]
        lines.append(
            f"| {r['label']} | {r['bytes'] / 1e6:.0f} MB | {8 * r['bytes'] / params:.2f} | "
            + " | ".join(cells)
            + f" | {sum(deltas) / len(deltas):+.2%} | {kl:.4f} | {top1:.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="bf16 HF folder (default: the shared fixture)")
    ap.add_argument("--bits", default="4,3", help="comma-separated bit widths (default 4,3)")
    ap.add_argument("--only", help="comma-separated labels to run (default: all)")
    ap.add_argument(
        "--results", default=os.path.expanduser("~/.cache/qmlx-bench/quant_methods.json")
    )
    ap.add_argument("--write-docs", action="store_true", help="update docs/quantization.md")
    args = ap.parse_args()

    src = args.model or fixture_dir()
    texts = sorted(os.path.join(TEXTS, f) for f in os.listdir(TEXTS))
    sys.path.insert(0, ROOT)
    from convert.calib import stdlib_files
    from qmlx.safetensors import folder_index

    evaluated = {open(t, encoding="utf-8").read() for t in texts}
    for path in stdlib_files():  # the calibration pool must not contain a scored text
        with open(path, encoding="utf-8", errors="replace") as f:
            if f.read() in evaluated:
                sys.exit(f"{path} is an evaluation text but is in the calibration pool")
    params = sum(math.prod(i.shape) for i in folder_index(src).values())
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    done = {}
    if os.path.exists(args.results):
        with open(args.results) as f:
            done = {r["label"]: r for r in json.load(f)}
    wanted = set(args.only.split(",")) if args.only else None
    order = [row for b in args.bits.split(",") for row in rows_for(int(b))]
    work = tempfile.mkdtemp(prefix="quant-methods-", dir=os.path.dirname(args.results))
    try:
        for label, tool, extra in order:
            if label in done or (wanted and label not in wanted):
                continue
            bits = int(label.split("-")[0])
            dst = os.path.join(work, label.replace(" ", "_"))
            try:
                produce(label, tool, extra, bits, src, dst)
                row = {"label": label, "bytes": safetensors_bytes(dst),
                       "ref_bytes": safetensors_bytes(src), "scores": score(dst, src, texts)}  # fmt: skip
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"{label}: failed: {str(e)[-1500:]}", file=sys.stderr, flush=True)
                continue
            finally:
                shutil.rmtree(dst, ignore_errors=True)
            done[label] = row
            print(f"{label}: {row['scores']}", file=sys.stderr, flush=True)
            with open(args.results, "w") as f:
                json.dump(list(done.values()), f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [done[label] for label, _, _ in order if label in done]
    md = table(rows, params)
    print(md)
    if args.write_docs:
        with open(DOCS, encoding="utf-8") as f:
            doc = f.read()
        start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
        with open(DOCS, "w", encoding="utf-8") as f:
            f.write(doc[:start] + "\n" + md + "\n" + doc[end:])


if __name__ == "__main__":
    main()
