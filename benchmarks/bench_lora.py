"""LoRA training step time and peak memory: `qmlx lora` against `mlx_lm.lora`, same data and settings.

    flock /tmp/qmlx-heavy.lock .venv/bin/python benchmarks/bench_lora.py [--steps 4] [--batch-size 2]

Both train rank-8 adapters (scale 2 = alpha 16 / rank 8) on q,k,v,o,gate,up,down of every block
of the fixture converted to 4-bit by qmlx (QLoRA), on the stdlib instruction set
(scripts/stdlib_instructions.py), loss on answers only, Adam(W) at a constant learning rate, no
dropout, each in its own process. Each runs 2 x --steps steps; the figures are those of the
second window, after warm-up: mlx-lm's from its training-report callback (iterations/s,
tokens/s, peak memory), qmlx's from metrics.jsonl. Read the ratios, not the seconds.

On MLX's CPU backend the base is converted with float32 scales and norms (`--dtype float32`)
and the mlx-lm child gets the same OpenBLAS qmlx loads: mlx-lm computes in the dtype of the
weights it loads, and with bf16 weights on the netlib BLAS its quantized matmuls took over five
minutes per step here. `--as-shipped` runs mlx-lm without OpenBLAS on a bf16 base instead.
On a Mac (Metal) the base is bf16 and neither side uses a BLAS for the model's matmuls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import fixture_dir, ratio

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def run(cmd: list[str], cwd: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT}
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[1:3]} failed:\n{res.stderr[-3000:]}\n{res.stdout[-2000:]}")
    return res.stdout + res.stderr


def bench_qmlx(model: str, data: str, work: str, a) -> dict:
    out = os.path.join(work, "qmlx-adapter")
    run(
        [
            sys.executable,
            "-m",
            "qmlx",
            "lora",
            "--model",
            model,
            "--data",
            data,
            "--adapter-path",
            out,
            "--rank",
            "8",
            "--alpha",
            "16",
            "--lr",
            "1e-4",
            "--schedule",
            "constant",
            "--batch-size",
            str(a.batch_size),
            "--iters",
            str(2 * a.steps),
            "--max-seq-len",
            str(a.max_seq_len),
            "--report-every",
            str(a.steps),
            "--val-batches",
            "1",
            "--val-every",
            "100000",
            "--save-every",
            "100000",
            "--grad-clip",
            "0",
            "--force",
        ]
        + (["--grad-checkpoint"] if a.grad_checkpoint else []),
        work,
    )
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "train_loss" in r][-1]
    return {
        "step_time": last["step_time"],
        "tokens_per_sec": last["tokens_per_sec"],
        "peak_gb": last["peak_memory_gb"],
        "loss": last["train_loss"],
    }


# mlx_lm.lora in a child process; its own report callback hook carries the numbers out
# (`run()` builds its callbacks with get_reporting_callbacks, which we replace).
MLX_LM_CHILD = r"""
import json, os, sys
if os.environ.get("BENCH_OPENBLAS") == "1":
    from qmlx._blas import preload  # the same OpenBLAS qmlx uses; must precede mlx.core
    preload()
import mlx_lm.lora as lora
from mlx_lm.tuner.callbacks import TrainingCallback

class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT " + json.dumps(info), flush=True)

lora.get_reporting_callbacks = lambda *a, **k: Report()
sys.argv = ["mlx_lm.lora"] + sys.argv[1:]
lora.main()
"""


def bench_mlx_lm(model: str, data: str, work: str, a) -> dict:
    os.environ["BENCH_OPENBLAS"] = "0" if a.as_shipped else "1"
    cfg = os.path.join(work, "mlx_lm.yaml")
    with open(cfg, "w") as f:
        json.dump({"lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}}, f)  # JSON is YAML
    text = run(
        [
            sys.executable,
            "-c",
            MLX_LM_CHILD,
            "--model",
            model,
            "--train",
            "--data",
            data,
            "--adapter-path",
            os.path.join(work, "mlx-lm-adapter"),
            "--num-layers",
            "-1",
            "--batch-size",
            str(a.batch_size),
            "--iters",
            str(2 * a.steps),
            "--learning-rate",
            "1e-4",
            "--optimizer",
            "adamw",
            "--max-seq-length",
            str(a.max_seq_len),
            "--mask-prompt",
            "--steps-per-report",
            str(a.steps),
            "--steps-per-eval",
            "100000",
            "--val-batches",
            "1",
            "--save-every",
            "100000",
            "-c",
            cfg,
        ]
        + (["--grad-checkpoint"] if a.grad_checkpoint else []),
        work,
    )
    reports = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("REPORT ")]
    if not reports:
        raise RuntimeError(f"no reports from mlx_lm.lora:\n{text[-2000:]}")
    last = reports[-1]
    return {
        "step_time": 1 / last["iterations_per_second"],
        "tokens_per_sec": last["tokens_per_second"],
        "peak_gb": last["peak_memory"],
        "loss": last["train_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a 4-bit model folder (default: the fixture converted by qmlx)")
    # mlx-lm multiplies packed weights directly, which on MLX's CPU backend takes ~100 s per step
    # here; keep the windows short there.
    ap.add_argument("--steps", type=int, default=2, help="steps per measured window")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument(
        "--as-shipped",
        action="store_true",
        help="mlx-lm on the wheel's reference BLAS and a bf16 base (very slow on a CPU)",
    )
    a = ap.parse_args()
    import stdlib_instructions

    with tempfile.TemporaryDirectory() as work:
        model = a.model
        if model is None:
            model = os.path.join(work, "fixture-4bit")
            import mlx.core as mx

            f32 = [] if (a.as_shipped or mx.metal.is_available()) else ["--dtype", "float32"]
            run([sys.executable, "-m", "qmlx", "convert", fixture_dir(), model, "--bits", "4"] + f32, work)
        data = os.path.join(work, "data")
        counts = stdlib_instructions.write(data)
        mlx_lm_side = "as shipped (reference BLAS)" if a.as_shipped else "with OpenBLAS"
        print(f"base: {model}; mlx-lm {mlx_lm_side}")
        print(
            f"data: {counts}; {a.steps} steps per window; batch {a.batch_size}, max length {a.max_seq_len}, rank 8, all 7 projections, "
            f"all blocks, 4-bit base{', gradient checkpointing' if a.grad_checkpoint else ''}",
            flush=True,
        )
        results = {"qmlx": bench_qmlx(model, data, work, a)}
        print("qmlx:", json.dumps(results["qmlx"]), flush=True)  # kept if mlx-lm's run is cut short
        results["mlx-lm"] = bench_mlx_lm(model, data, work, a)
    q, m = results["qmlx"], results["mlx-lm"]
    print(f"{'':8} {'step time':>10} {'tokens/s':>9} {'peak mem':>9} {'loss':>7}")
    for name, r in results.items():
        print(
            f"{name:8} {r['step_time']:9.2f}s {r['tokens_per_sec']:9.1f} {r['peak_gb']:7.2f}GB {r['loss']:7.3f}"
        )
    print(
        f"qmlx / mlx-lm: step time {ratio(q['step_time'], m['step_time'])}, "
        f"tokens/s {ratio(q['tokens_per_sec'], m['tokens_per_sec'])}, peak memory {ratio(q['peak_gb'], m['peak_gb'])}"
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
