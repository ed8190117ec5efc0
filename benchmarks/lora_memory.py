"""`qmlx lora --estimate` against the measured peak memory of LoRA training on the fixture.

    .venv/bin/python benchmarks/lora_memory.py [--batch-size 2] [--seq-len 128] [--bits 4]

Each configuration (with and without gradient checkpointing) runs in its own process: the
fixture (quantized in memory with --bits, or dense), rank-8 adapters on all projections, two
AdamW steps on a fixed (batch, seq-len) batch, peak from `mx.get_peak_memory()`. The estimate is
computed for the same shapes on the CPU backend (float32, dequantized matmuls). The last lines
scale Qwen2.5-7B's Metal estimate by the measured/estimated ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import fixture_dir, run_isolated

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json
import qmlx, mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
from qmlx.lora.apply import apply_lora, checkpoint_blocks
from qmlx.lora.score import loss_fn
from qmlx.quant import quantize_model
model, _ = qmlx.load({model!r})
if {bits}:
    quantize_model(model, {{"bits": {bits}, "group_size": 64}})
mx.random.seed(0)
apply_lora(model, 8, 16.0)
if {ckpt}:
    checkpoint_blocks(model)
model.train()
tokens = mx.random.randint(100, 50000, ({b}, {L}))
mask = mx.ones(tokens.shape, mx.bool_)
opt = optim.AdamW(learning_rate=1e-4)
vg = nn.value_and_grad(model, loss_fn)
mx.eval(model.parameters())
base = mx.get_active_memory()
mx.reset_peak_memory()
for _ in range(2):
    (loss, n), g = vg(model, tokens, mask)
    opt.update(model, g)
    mx.eval(loss, model.trainable_parameters(), opt.state)
print(json.dumps({{"peak": mx.get_peak_memory(), "resident_before": base}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4, help="0: dense float32 base")
    a = ap.parse_args()
    from qmlx.lora.estimate import estimate, read_config

    fx = fixture_dir()
    config = read_config(fx)
    bits = a.bits or None
    e = estimate(config, bits, 64, 8, batch_size=a.batch_size, seq_len=a.seq_len, dtype_bytes=4, cpu=True)
    print(
        f"fixture, {a.bits or 'dense'}-bit, rank 8, batch {a.batch_size}, sequence {a.seq_len}, CPU float32"
    )
    ratios = {}
    for ckpt in (False, True):
        got = run_isolated(CHILD.format(model=fx, bits=a.bits, ckpt=ckpt, b=a.batch_size, L=a.seq_len))
        est = e.total_checkpointed if ckpt else e.total
        ratios[ckpt] = got["peak"] / est
        print(
            f"  {'--grad-checkpoint' if ckpt else 'no checkpointing':18} measured {got['peak'] / 1e9:6.2f} GB, "
            f"estimate {est / 1e9:6.2f} GB (measured/estimate {ratios[ckpt]:.2f})"
        )
    path = os.path.join(ROOT, "..", "shared", "fixtures", "configs", "qwen2.5-7b-instruct.json")
    if os.path.exists(path):
        with open(path) as f:
            big = estimate(json.load(f), 4, 64, 8, batch_size=8, seq_len=512, dtype_bytes=2)
        print("Qwen2.5-7B, 4-bit, rank 8, batch 8, sequence 512, Metal bf16:")
        for ckpt, total in ((False, big.total), (True, big.total_checkpointed)):
            print(
                f"  {'--grad-checkpoint' if ckpt else 'no checkpointing':18} estimate {total / 1e9:6.2f} GB, "
                f"scaled by the fixture's measured/estimate ratio {total * ratios[ckpt] / 1e9:6.2f} GB"
            )


if __name__ == "__main__":
    main()
