"""GPTQ variants on the fixture, in memory: the table "GPTQ ablations" of docs/quantization.md.

    .venv/bin/python benchmarks/gptq_ablation.py [--samples 8] [--seq-len 512] [--calib FILE|DIR]
        [--damp 0.1] [--act-order] [--no-sink] [--token-rms] [--kv8] [--head rtn|gptq] [--sequential]
        [--bits 4] [--group-size 64]

Quantizes every decoder block with GPTQ as `qmlx convert --method gptq` does
(`quantize_block`, block by block, each block calibrated on the outputs of the quantized blocks
before it), the tied embedding/head by round-to-nearest (`--head gptq`: by GPTQ on the final
hidden states, as `convert --calib-head` does), and prints the perplexity of the
first 1024 tokens of each shared text against bf16 (model in float32). One run is one row; it
takes ~8 minutes with 8 samples and ~20 with 32 on a 2-core CPU. Nothing is timed. (The
table's rows with the searched group range ran the code of commit 0e3c70f, before GPTQ took
RTN's [min, max] range.)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402
from common import fixture_dir  # noqa: E402

from convert.calib import calibration_tokens  # noqa: E402
from convert.errors import ConvertError  # noqa: E402
from qmlx.evaluate import perplexity  # noqa: E402
from qmlx.loader import load_model, tokenizer_for  # noqa: E402
from qmlx.quant import calibrate, gptq  # noqa: E402
from qmlx.quant.recipes import KV_PROJECTIONS  # noqa: E402

SHARED = os.environ.get("QMLX_SHARED", os.path.join(ROOT, "..", "shared"))
TEXTS = os.path.join(SHARED, "fixtures", "texts")


def scores(model, texts) -> list[float]:
    return [perplexity(model, ids)[0] for ids in texts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib", help="text/JSONL file or folder (default: the standard library)")
    ap.add_argument("--damp", type=float, default=gptq.DAMP)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--no-sink", action="store_true", help="leave each sample's first token out of H")
    ap.add_argument(
        "--token-rms",
        action="store_true",
        help="weigh each token's row of H by 1/its mean square (tames the sink token)",
    )
    ap.add_argument("--kv8", action="store_true", help="k_proj/v_proj at 8 bits (the kv-8 recipe)")
    ap.add_argument(
        "--head",
        choices=("rtn", "gptq"),
        default="rtn",
        help="how the tied embedding/head is rounded (gptq: on the final hidden "
        "states, as convert --calib-head)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="site by site: each site's H with the sites before it quantized",
    )
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args()

    calibrate.Hessian = functools.partial(gptq.Hessian, damp=a.damp, act_order=a.act_order)
    if a.no_sink:
        tap_call = calibrate.Tap.__call__

        def call(self, x):
            if x.ndim == 3 and x.shape[1] > 1:
                tap_call(self, x[:, 1:])
                return self.linear(x)
            return tap_call(self, x)

        calibrate.Tap.__call__ = call

    if a.token_rms:
        rms_call = calibrate.Tap.__call__

        def call(self, x):
            flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            scale = mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + 1e-12)
            rms_call(self, (flat * scale / mx.mean(scale)).reshape(x.shape))
            return self.linear(x)

        calibrate.Tap.__call__ = call

    folder = fixture_dir()
    model = load_model(folder, dtype=mx.float32)
    tok = tokenizer_for(folder, model.config)
    names = sorted(os.listdir(TEXTS))
    texts = [tok.encode(open(os.path.join(TEXTS, n), encoding="utf-8").read())[:1024] for n in names]
    ref = scores(model, texts)

    try:
        tokens = calibration_tokens(tok, a.calib, a.samples, a.seq_len)
    except ConvertError as e:
        sys.exit(f"gptq_ablation: {e}")
    emb = model.model.embed_tokens.weight
    h = emb[tokens]
    kv = KV_PROJECTIONS if a.kv8 else ()
    params = {p: {"bits": 8 if p in kv else a.bits, "group_size": a.group_size} for p in calibrate.LINEARS}
    cfg = model.config
    for block in model.layers:
        out, h = calibrate.quantize_block(block, h, params, "gptq", cfg.num_attention_heads,
                                          cfg.num_key_value_heads, mx.bfloat16, sequential=a.sequential)  # fmt: skip
        for path, (packed, s, b) in out.items():
            parent, name = path.split(".")
            getattr(getattr(block, parent), name).weight = mx.dequantize(
                packed, s, b, group_size=a.group_size, bits=params[path]["bits"]).astype(mx.float32)  # fmt: skip
        mx.eval(block.parameters(), h)
    if a.head == "gptq":
        xtx = calibrate.head_hessian(h, model.model.norm.weight, cfg.rms_norm_eps)
        packed = gptq.gptq(emb, gptq.Hessian(xtx, damp=a.damp), a.bits, a.group_size)
    else:
        packed = mx.quantize(emb.astype(mx.bfloat16), group_size=a.group_size, bits=a.bits)
    model.model.embed_tokens.weight = mx.dequantize(*packed, group_size=a.group_size, bits=a.bits).astype(
        mx.float32
    )
    mx.eval(model.parameters())
    got = scores(model, texts)
    deltas = [g / r - 1 for g, r in zip(got, ref)]
    print(f"calibration {tuple(tokens.shape)} {a.calib or 'stdlib'}; damp {a.damp}, act-order {a.act_order}, "
          f"no sink {a.no_sink}, token rms {a.token_rms}, kv-8 {a.kv8}, head {a.head}, "
          f"sequential {a.sequential}")  # fmt: skip
    for n, r, g, d in zip(names, ref, got, deltas):
        print(f"{n:32} bf16 {r:8.3f}  gptq {g:8.3f}  {d:+.1%}")
    print(f"mean Δppl {sum(deltas) / len(deltas):+.2%}")


if __name__ == "__main__":
    main()
