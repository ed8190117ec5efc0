"""The quantization table of docs/quantization.md: bits × group size → size, bpw, perplexity.

    .venv/bin/python benchmarks/quant_table.py [--model DIR] [--results FILE] [--write-docs]

For each setting the fixture is converted with `qmlx convert`, loaded in float32 and scored on
the first 1024 tokens of each shared text (the reference's protocol), next to the bf16 model.
Results are cached in a JSON file as they come (a rerun skips finished rows), and the markdown
table is printed, or written between the markers in docs/quantization.md with --write-docs.
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

from common import load_rows, model_dir, ppl_row, replace_section, save_rows

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("QMLX_SHARED", os.path.join(HERE, "..", "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")
DOCS = os.path.join(HERE, "..", "docs", "quantization.md")
BEGIN, END = "<!-- quant-table:begin -->", "<!-- quant-table:end -->"

# (label, bits, group size, recipe); bits None = the unquantized bf16 source. Every group size
# for 8 and 4 bits (the common choices), g64 elsewhere: each row costs ~2 CPU-minutes.
SETTINGS = [("bf16", None, None, None)]
SETTINGS += [(f"8-bit g{g}", 8, g, None) for g in (32, 64, 128)]
SETTINGS += [("6-bit g64", 6, 64, None), ("5-bit g64", 5, 64, None)]
SETTINGS += [(f"4-bit g{g}", 4, g, None) for g in (32, 64, 128)]
SETTINGS += [("3-bit g32", 3, 32, None), ("3-bit g64", 3, 64, None), ("2-bit g64", 2, 64, None)]
SETTINGS += [("4-bit g64 head-8", 4, 64, "head-8"), ("mixed-4-6 g64", 4, 64, "mixed-4-6")]
SETTINGS += [("4-bit g64 kv-8", 4, 64, "kv-8")]

SCORE = r"""
import json, sys
import qmlx
from qmlx.evaluate import perplexity
model, tok = qmlx.load(sys.argv[1], dtype="float32")
out = {}
for path in sys.argv[2:]:
    ids = tok.encode(open(path, encoding="utf-8").read())[:1024]
    ppl, nll, n = perplexity(model, ids, ctx=1024)
    out[path.rsplit("/", 1)[-1]] = ppl
print(json.dumps(out))
"""


def safetensors_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
    )


def score(folder: str, texts: list[str]) -> dict[str, float]:
    r = subprocess.run(
        [sys.executable, "-c", SCORE, folder, *texts], capture_output=True, text=True, timeout=3600
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure(label, bits, group_size, recipe, src, work, texts, params) -> dict:
    if bits is None:
        folder = src
    else:
        sys.path.insert(0, os.path.join(HERE, ".."))
        from convert import convert

        folder = os.path.join(work, label.replace(" ", "_"))
        convert(src, folder, bits=bits, group_size=group_size, recipe=recipe, progress=False, force=True)
    size = safetensors_bytes(folder)
    row = {"label": label, "bytes": size, "bpw": 8 * size / params, "ppl": score(folder, texts)}
    if folder != src:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def table(rows: list[dict], texts: list[str]) -> str:
    base = next(r for r in rows if r["label"] == "bf16")["ppl"]
    names = [os.path.basename(t) for t in texts]
    short = {n: n.split("_")[0].split(".")[0] for n in names}
    head = "| setting | size | bits/weight | " + " | ".join(f"ppl {short[n]}" for n in names)
    head += " | mean Δ vs bf16 |"
    lines = [head, "|---" * (4 + len(names)) + "|"]
    for r in rows:
        ppls = [r["ppl"][n] for n in names]
        deltas = None if r["label"] == "bf16" else [r["ppl"][n] / base[n] - 1 for n in names]
        lines.append(ppl_row(r["label"], r["bytes"], r["bpw"], ppls, deltas))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="bf16 HF folder (default: the shared fixture)")
    ap.add_argument("--results", default=os.path.expanduser("~/.cache/qmlx-bench/quant_table.json"))
    ap.add_argument("--only", help="comma-separated labels to run (default: all)")
    ap.add_argument("--write-docs", action="store_true", help="update docs/quantization.md")
    args = ap.parse_args()

    src = model_dir(args.model)
    texts = sorted(os.path.join(TEXTS, f) for f in os.listdir(TEXTS))
    done = load_rows(args.results)
    sys.path.insert(0, os.path.join(HERE, ".."))
    from qmlx.safetensors import folder_index

    params = sum(math.prod(i.shape) for i in folder_index(src).values())
    wanted = set(args.only.split(",")) if args.only else None
    work = tempfile.mkdtemp(prefix="quant-table-", dir=os.path.dirname(args.results))
    try:
        for label, bits, group_size, recipe in SETTINGS:
            if label in done or (wanted and label not in wanted and label != "bf16"):
                continue
            done[label] = measure(label, bits, group_size, recipe, src, work, texts, params)
            print(f"{label}: {done[label]['ppl']}", file=sys.stderr, flush=True)
            save_rows(args.results, done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [done[label] for label, *_ in SETTINGS if label in done]
    md = table(rows, texts)
    print(md)
    if args.write_docs:
        replace_section(DOCS, BEGIN, END, md)


if __name__ == "__main__":
    main()
