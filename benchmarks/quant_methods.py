"""Quantization methods side by side: qmlx (rtn, clip, awq, gptq) and mlx-lm's own tools.

    .venv/bin/python benchmarks/quant_methods.py [--bits 4,3] [--only LABEL,...]
        [--results FILE] [--write-docs] [--jobs 2] [--calib FILE]

For each bit width (group size 64) the fixture is quantized by every method, then each result is
scored against the bf16 fixture on the first 1024 tokens of each shared text (model and
reference in float32): perplexity per text, mean per-token KL(bf16 ‖ quantized), top-1
agreement, size on disk. Nothing is timed (quality does not depend on load, so the rows can run
beside other work); conversion speed is bench_convert.py's business. mlx-lm's AWQ and GPTQ run
through their own command-line entry points, fed the same calibration tokens as qmlx (its
default calibration file is a download, and this machine is offline): 8 samples × 512 tokens of
Python's standard library, which excludes textwrap.py, the code text scored here; their
fallback/embedding bits are set to the same bits, so every row of a bit width has the same bits
per weight (except where noted by the size column). With `--calib FILE` (e.g. the model's own
Chinese/Korean/English answers mixed with standard-library code, from
scripts/self_calibration.py; checked to hold no piece of a scored text) each bit width gets two
more rows: GPTQ with --calib-head, uniform and with the kv-8 recipe, calibrated on 32 samples
of that file. Each step runs in its own process with a time limit; rows are cached in the results file as
they finish (a rerun skips them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

from common import load_rows, model_dir, ppl_row, replace_section, save_rows

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SHARED = os.environ.get("QMLX_SHARED", os.path.join(ROOT, "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")
DOCS = os.path.join(ROOT, "docs", "quantization.md")
BEGIN, END = "<!-- quant-methods:begin -->", "<!-- quant-methods:end -->"
# 8 samples, not qmlx's default 32: each calibrated conversion runs the samples through every
# block two or three times, which on the shared 2-core CPU took ~40 minutes with 32.
SAMPLES, SEQ_LEN, GROUP = 8, 512, 64
# Samples of the --calib rows: 32, qmlx's default (the text is meant to cover the scored languages).
OWN_SAMPLES = 32
STEP_TIMEOUT = 3600

QMLX_CONVERT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from convert import convert
convert(sys.argv[2], sys.argv[3], progress=False, **json.loads(sys.argv[4]))
"""

# mlx-lm's entry point, with its calibration loader swapped for the same tokens qmlx uses, on
# the same OpenBLAS as qmlx (imported first), computing in float32 like qmlx's calibration (bf16
# on MLX's CPU backend is several times slower), and saving its scales and biases in bf16 as
# qmlx does (so the sizes compare).
MLX_LM_TOOL = r"""
import sys
sys.path.insert(0, sys.argv[1])
import qmlx  # OpenBLAS before mlx.core
import importlib
import mlx.core as mx
tool = importlib.import_module("mlx_lm.quant." + sys.argv[2])
from convert.calib import calibration_tokens
SAMPLES = int(sys.argv[3])
_load, _save = tool.load, tool.save

def load(*args, **kwargs):
    out = _load(*args, **kwargs)
    out[0].set_dtype(mx.float32)
    return out

def save(path, src, model, *args, **kwargs):
    model.set_dtype(mx.bfloat16)
    return _save(path, src, model, *args, **kwargs)

tool.load, tool.save = load, save

class _Tok:
    def __init__(self, t): self.t = t
    def encode(self, text): return self.t.encode(text)

def load_data(tokenizer, num_samples, sequence_length):
    return calibration_tokens(_Tok(tokenizer), None, SAMPLES, sequence_length)

tool.load_data = load_data
sys.argv = [sys.argv[2]] + sys.argv[4:]
tool.main()
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


def rows_for(bits: int, calib: str | None = None) -> list[tuple[str, str, list | dict]]:
    """(label, tool, arguments: qmlx's convert keywords or mlx-lm's flags) of every method at
    `bits`; with `calib`, also GPTQ with --calib-head (uniform and kv-8) on 32 samples of it."""
    b, g = str(bits), str(GROUP)
    base = {"bits": bits, "group_size": GROUP, "calib_samples": SAMPLES, "calib_seq_len": SEQ_LEN}
    rows = [(f"{bits}-bit qmlx {m}", "qmlx", {**base, "method": m})
            for m in ("rtn", "clip", "awq", "gptq")]  # fmt: skip
    # k/v projections at 8 bits (+0.05 bits/weight), plain and with GPTQ for the rest.
    rows += [(f"{bits}-bit qmlx {m} kv-8", "qmlx", {**base, "method": m, "recipe": "kv-8"})
             for m in ("rtn", "gptq")]  # fmt: skip
    if calib:
        own = {**base, "method": "gptq", "calib_head": True, "calib": calib,
               "calib_samples": OWN_SAMPLES}  # fmt: skip
        tag = f"calib-head ({OWN_SAMPLES} × --calib)"
        rows.append((f"{bits}-bit qmlx gptq {tag}", "qmlx", own))
        rows.append((f"{bits}-bit qmlx gptq kv-8 {tag}", "qmlx", {**own, "recipe": "kv-8"}))
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


def run(args: list[str], timeout: int = STEP_TIMEOUT) -> str:
    """A child python's stdout; raises with its stderr on failure (KeyboardInterrupt if it
    died of the Ctrl-C that is stopping this script, so that no row is reported failed)."""
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode == -signal.SIGINT or "\nKeyboardInterrupt" in r.stderr:
        raise KeyboardInterrupt
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return r.stdout


def produce(label, tool, extra, bits, src, dst) -> None:
    if tool == "qmlx":
        run(["-c", QMLX_CONVERT, ROOT, src, dst, json.dumps(extra)])
    else:
        run(["-c", MLX_LM_TOOL, ROOT, tool, str(SAMPLES), "--model", src, "--mlx-path", dst,
             *extra])  # fmt: skip


def score(folder: str, src: str, texts: list[str]) -> dict:
    out = run(["-c", SCORE, ROOT, folder, src, *texts])
    return json.loads(out.strip().splitlines()[-1])


def safetensors_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )


def table(rows: list[dict], params: int) -> str:
    names = sorted(next(iter(rows))["scores"]) if rows else []
    short = [n.split("_")[0].split(".")[0] for n in names]
    head = "| setting | size | bits/weight | " + " | ".join(f"ppl {s}" for s in short)
    head += " | mean Δppl | KL mean | top-1 |"
    lines = [head, "|---" * (6 + len(names)) + "|"]
    if rows:
        ref = rows[0]["scores"]
        names_ref = [ref[n]["ref"] for n in names]
        lines.append(ppl_row("bf16", rows[0]["ref_bytes"], 16, names_ref, None, ("0", "100%")))
    for r in rows:
        s = r["scores"]
        deltas = [s[n]["ppl"] / s[n]["ref"] - 1 for n in names]
        n_tok = sum(s[n]["n"] for n in names)
        kl = sum(s[n]["kl"] * s[n]["n"] for n in names) / n_tok
        top1 = sum(s[n]["top1"] * s[n]["n"] for n in names) / n_tok
        ppls = [s[n]["ppl"] for n in names]
        bpw = 8 * r["bytes"] / params
        lines.append(ppl_row(r["label"], r["bytes"], bpw, ppls, deltas, (f"{kl:.4f}", f"{top1:.1%}")))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bf16 HF folder (default: the shared fixture)")
    ap.add_argument("--bits", default="4,3", help="comma-separated bit widths (default 4,3)")
    ap.add_argument("--only", help="comma-separated labels to run (default: all)")
    ap.add_argument("--results", default=os.path.expanduser("~/.cache/qmlx-bench/quant_methods.json"))
    ap.add_argument("--write-docs", action="store_true", help="update docs/quantization.md")
    ap.add_argument("--jobs", type=int, default=1, help="rows run at once (default 1)")
    ap.add_argument(
        "--calib", metavar="FILE",
        help="calibration text for extra rows (GPTQ, kv-8, --calib-head), e.g. the output of "
        "scripts/self_calibration.py; it must not contain any scored text",
    )  # fmt: skip
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")

    src = model_dir(args.model)
    texts = sorted(os.path.join(TEXTS, f) for f in os.listdir(TEXTS))
    sys.path.insert(0, ROOT)
    from convert.calib import stdlib_files
    from qmlx.safetensors import folder_index

    evaluated = {open(t, encoding="utf-8").read() for t in texts}
    for path in stdlib_files():  # the calibration pool must not contain a scored text
        with open(path, encoding="utf-8", errors="replace") as f:
            if f.read() in evaluated:
                sys.exit(f"{path} is an evaluation text but is in the calibration pool")
    if args.calib:
        from convert.calib import read_texts
        from convert.errors import ConvertError

        if not os.path.isfile(args.calib):
            sys.exit(f"--calib {args.calib}: no such file")
        try:
            own = "\n".join(read_texts(args.calib))
        except ConvertError as e:
            sys.exit(str(e))
        for t in evaluated:  # no scored text, nor a sizeable piece of one
            pieces = [p for p in (t[i : i + 200] for i in range(0, len(t), 200)) if len(p) == 200]
            if any(p in own for p in pieces):
                sys.exit(f"--calib {args.calib}: contains a piece of a scored text")
    params = sum(math.prod(i.shape) for i in folder_index(src).values())
    done = load_rows(args.results)
    wanted = set(args.only.split(",")) if args.only else None
    calib = os.path.abspath(args.calib) if args.calib else None
    order = [row for b in args.bits.split(",") for row in rows_for(int(b), calib)]
    work = tempfile.mkdtemp(prefix="quant-methods-", dir=os.path.dirname(args.results))
    lock = threading.Lock()

    def one(label, tool, extra):
        bits = int(label.split("-")[0])
        dst = os.path.join(work, label.replace(" ", "_"))
        try:
            produce(label, tool, extra, bits, src, dst)
            row = {"label": label, "bytes": safetensors_bytes(dst),
                   "ref_bytes": safetensors_bytes(src), "scores": score(dst, src, texts)}  # fmt: skip
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{label}: failed: {str(e)[-1500:]}", file=sys.stderr, flush=True)
            return
        finally:
            shutil.rmtree(dst, ignore_errors=True)
        with lock:
            done[label] = row
            print(f"{label}: {row['scores']}", file=sys.stderr, flush=True)
            save_rows(args.results, done)

    todo = [r for r in order if r[0] not in done and (not wanted or r[0] in wanted)]
    todo.sort(key=lambda r: r[1] == "qmlx")  # mlx-lm's (slowest, least known) first
    # Rows are independent processes and nothing is timed, so they may share the cores.
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        list(pool.map(lambda r: one(*r), todo))
    except KeyboardInterrupt:
        # The running children got the Ctrl-C too; rows not started yet are dropped.
        sys.exit(f"interrupted: the rows finished so far are kept in {args.results}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(work, ignore_errors=True)
    rows = [done[label] for label, _, _ in order if label in done]
    md = table(rows, params)
    print(md)
    if args.write_docs:
        replace_section(DOCS, BEGIN, END, md)


if __name__ == "__main__":
    main()
