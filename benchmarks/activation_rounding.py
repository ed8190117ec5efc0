"""What rounding the activations of a decode step to int8 (as llama.cpp does) would cost in output.

    flock /tmp/qmlx-heavy.lock .venv/bin/python benchmarks/activation_rounding.py MODEL [--block 32 64]

qmlx's GEMV rounds x to 16-bit integers per weight group (exact to ~2^-16 of the group's largest |x|).
Rounding to int8 instead would halve the GEMV's integer work; this measures what it changes: x of every
product with at most 4 rows is rounded to int8 per `block` values (round to nearest, scale = max |x| /
127) in front of the same kernels, and greedy decoding of two chat prompts is compared token by token
with the unrounded run (identical tokens, largest change of a token's probability while they agree).
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

import qmlx
from qmlx.errors import UserError
from qmlx.generate import generate_step
from qmlx.quant import layers as qlayers

PROMPTS = [
    [{"role": "user", "content": "파이썬으로 리스트를 뒤집는 함수를 써 주세요. 然后用中文解释一下。"}],
    [{"role": "user", "content": "Write a C function that computes the CRC32 of a buffer."}],
]


def rounded(product, block: int):
    def run(layer, x, bias=None):
        if x.size // x.shape[-1] <= 4:
            shape = x.shape
            xs = x.astype(mx.float32).reshape(-1, shape[-1] // block, block)
            d = mx.max(mx.abs(xs), axis=-1, keepdims=True) / 127
            d = mx.where(d == 0, 1, d)
            x = (mx.clip(mx.round(xs / d), -127, 127) * d).reshape(shape).astype(x.dtype)
        return product(layer, x, bias)

    return run


def greedy(model, tok, n: int):
    runs = []
    for p in PROMPTS:
        ids = tok.encode(tok.apply_chat_template(p, add_generation_prompt=True))
        steps = list(generate_step(model, mx.array(ids), max_tokens=n))
        runs.append(([t for t, _ in steps], [np.exp(np.array(lp)) for _, lp in steps]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--block", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--tokens", type=int, default=120)
    args = ap.parse_args()
    try:
        model, tok = qmlx.load(args.model)
    except UserError as e:
        ap.error(str(e))
    widths = {model.config.hidden_size, model.config.intermediate_size}
    for block in args.block:
        if block < 1 or any(w % block for w in widths):
            ap.error(f"--block {block}: must divide the model's widths {sorted(widths)}")
    exact = qlayers._quantized_product
    ref = greedy(model, tok, args.tokens)
    for block in args.block:
        qlayers._quantized_product = rounded(exact, block)
        try:
            runs = greedy(model, tok, args.tokens)
        finally:
            qlayers._quantized_product = exact
        for i, ((rt, rp), (ot, op)) in enumerate(zip(ref, runs, strict=True)):
            same = next((j for j, (a, b) in enumerate(zip(rt, ot)) if a != b), len(rt))
            dp = max(float(np.abs(a - b).max()) for a, b in zip(rp[: max(same, 1)], op[: max(same, 1)]))
            print(
                f"int8 per {block}: prompt {i}: {same}/{len(rt)} greedy tokens identical, max |dp| {dp:.3f}"
            )


if __name__ == "__main__":
    main()
