"""Where round-to-nearest loses: each part of the fixture alone rounded, the rest left in bf16.

    .venv/bin/python benchmarks/quant_decompose.py [--bits 4] [--group-size 64]

Rows: the tied embedding/head alone, all block linears, everything, then each projection kind
(q, k, v, o, gate, up, down) alone, and everything with k/v at 8 bits (the `kv-8` recipe). Weights
are rounded in memory exactly as `qmlx convert` rounds them (bf16 in, scales and biases in bf16)
and dequantized, the model runs in float32; perplexity on the first 1024 tokens of each shared
text. ~3 minutes on a 2-core CPU. The table "Where 4-bit loses" of docs/quantization.md.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402
from common import fixture_dir  # noqa: E402

from qmlx.evaluate import perplexity  # noqa: E402
from qmlx.loader import load_model, tokenizer_for  # noqa: E402
from qmlx.quant.calibrate import LINEARS  # noqa: E402

SHARED = os.environ.get("QMLX_SHARED", os.path.join(ROOT, "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()

    def rounded(w, bits=a.bits):
        packed = mx.quantize(w.astype(mx.bfloat16), group_size=a.group_size, bits=bits)
        return mx.dequantize(*packed, group_size=a.group_size, bits=bits).astype(w.dtype)

    folder = fixture_dir()
    model = load_model(folder, dtype=mx.float32)
    tok = tokenizer_for(folder, model.config)
    names = sorted(os.listdir(TEXTS))
    texts = [tok.encode(open(os.path.join(TEXTS, n), encoding="utf-8").read())[:1024] for n in names]
    emb = model.model.embed_tokens.weight
    linears = {(i, p): getattr(getattr(b, p.split(".")[0]), p.split(".")[1])
               for i, b in enumerate(model.layers) for p in LINEARS}  # fmt: skip
    dense = {k: m.weight for k, m in linears.items()}

    def setting(embedding: bool, bits_of) -> list[float]:
        model.model.embed_tokens.weight = rounded(emb) if embedding else emb
        for (i, p), m in linears.items():
            b = bits_of(p)
            m.weight = dense[(i, p)] if b is None else rounded(dense[(i, p)], b)
        mx.eval(model.parameters())
        return [perplexity(model, ids)[0] for ids in texts]

    rows = [("bf16", False, lambda p: None),
            ("embedding/head alone", True, lambda p: None),
            ("all block linears", False, lambda p: a.bits),
            ("everything", True, lambda p: a.bits)]  # fmt: skip
    rows += [(f"{p.split('.')[1]} alone", False, lambda q, p=p: a.bits if q == p else None) for p in LINEARS]
    rows.append(("everything, k/v at 8 bits (kv-8)", True,
                 lambda p: 8 if p.endswith(("k_proj", "v_proj")) else a.bits))  # fmt: skip
    short = [n.split("_")[0].split(".")[0] for n in names]
    print(
        f"| {a.bits}-bit g{a.group_size}, rounded | " + " | ".join(f"ppl {s}" for s in short) + " | mean Δ |"
    )
    print("|---" * (2 + len(names)) + "|")
    base = None
    for label, embedding, bits_of in rows:
        ppl = setting(embedding, bits_of)
        base = base or ppl
        deltas = [p / b - 1 for p, b in zip(ppl, base)]
        cells = " | ".join(f"{p:.3f} ({d:+.1%})" for p, d in zip(ppl, deltas))
        print(f"| {label} | {cells} | {sum(deltas) / len(deltas):+.2%} |", flush=True)


if __name__ == "__main__":
    main()
