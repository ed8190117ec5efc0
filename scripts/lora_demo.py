"""The real-run demonstration of `qmlx lora` (QLoRA on the fixture quantized to 4-bit).

1. convert the fixture to 4-bit with qmlx's converter; 2. build the stdlib instruction set
(scripts/stdlib_instructions.py); 3. train an adapter; 4. report validation loss before and
after, greedy answers with and without the adapter, the fused model's logits against the
adapter's, and the measured peak memory next to `qmlx lora --estimate` for the same shapes.

    python scripts/lora_demo.py WORK_DIR [--iters 200] [--batch-size 2] [--max-seq-len 96]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import qmlx  # noqa: I001  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import stdlib_instructions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=50)
    args = ap.parse_args()
    from convert import convert
    from qmlx.lora.estimate import estimate, read_config
    from qmlx.lora.fuse import fuse
    from qmlx.lora.run import prepare, train_with_progress
    from qmlx.lora.trainer import TrainConfig
    from qmlx.progress import byte_bar

    fixture = os.environ["QMLX_FIXTURE_DIR"]
    q4 = os.path.join(args.work, "fixture-4bit")
    if not os.path.exists(q4):
        with byte_bar() as progress:
            convert(fixture, q4, bits=4, group_size=64, progress=progress)
    data = os.path.join(args.work, "data")
    counts = stdlib_instructions.write(data)
    out = os.path.join(args.work, "adapter")
    cfg = TrainConfig(
        model=q4,
        data=data,
        rank=args.rank,
        alpha=2.0 * args.rank,
        lr=args.lr,
        batch_size=args.batch_size,
        iters=args.iters,
        max_seq_len=args.max_seq_len,
        warmup=10,
        val_every=args.val_every,
        save_every=args.val_every,
        report_every=10,
    )
    trainer = prepare(cfg, out, log=lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    train_with_progress(trainer)
    train_seconds = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    vals = [m for m in metrics if "val_loss" in m]
    trains = [m for m in metrics if "train_loss" in m]
    peak = max(m["peak_memory_gb"] for m in trains)

    base, tok = qmlx.load(q4)
    tuned, _ = qmlx.load(q4, adapter=out)
    fused_dir = os.path.join(args.work, "fused-4bit")
    fuse(q4, out, fused_dir, force=True)
    fused, _ = qmlx.load(fused_dir)
    answers = []
    with open(os.path.join(data, "valid.jsonl"), encoding="utf-8") as f:
        valid = [json.loads(line) for line in f]
    for rec in valid[:3]:
        prompt = tok.apply_chat_template(rec["messages"][:-1], add_generation_prompt=True)
        answers.append(
            {
                "question": rec["messages"][1]["content"],
                "docstring": rec["messages"][2]["content"],
                "base": qmlx.generate(base, tok, prompt, max_tokens=40, temperature=0.0),
                "adapter": qmlx.generate(tuned, tok, prompt, max_tokens=40, temperature=0.0),
                "fused": qmlx.generate(fused, tok, prompt, max_tokens=40, temperature=0.0),
            }
        )
    ids = mx.array([tok.encode(tok.apply_chat_template(rec["messages"], add_generation_prompt=False))])
    la, lf = tuned(ids), fused(ids)
    scale = mx.abs(la - base(ids)).max().item()
    e = estimate(
        read_config(q4),
        4,
        64,
        args.rank,
        batch_size=args.batch_size,
        seq_len=args.max_seq_len,
        dtype_bytes=4,
        cpu=True,
    )
    print(
        json.dumps(
            {
                "data": counts,
                "iters": args.iters,
                "batch_size": args.batch_size,
                "max_seq_len": args.max_seq_len,
                "val_loss_first": vals[0]["val_loss"],
                "val_loss_last": vals[-1]["val_loss"],
                "val_curve": [(m["step"], round(m["val_loss"], 4)) for m in vals],
                "train_seconds": round(train_seconds, 1),
                "mean_step_time": sum(m["step_time"] for m in trains) / len(trains),
                "peak_memory_gb": peak,
                "estimate_cpu_gb": e.total / 1e9,
                "estimate_cpu_checkpointed_gb": e.total_checkpointed / 1e9,
                "fused_vs_adapter_max_abs_logit_diff": mx.abs(la - lf).max().item(),
                "adapter_vs_base_max_abs_logit_diff": scale,
                "answers": answers,
            },
            indent=1,
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
