"""`qmlx lora`: load a base model, wrap it, load data, train with a live progress display.

This is the front end of the lora room: it wires the loader, the adapters, the data, the
ordering and the trainer together, and prints. The pieces it calls never print.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import mlx.core as mx

from ..errors import UserError
from ..folder import resolve
from ..loader import load
from .adapters import CONFIG, WEIGHTS
from .apply import adapter_weights, apply_lora, checkpoint_blocks
from .data import load_data
from .score import difficulty
from .trainer import CHECKPOINTS, TrainConfig, Trainer, latest_checkpoint, save_config


def prepare(cfg: TrainConfig, out: str, dtype=None, resume: str | None = None, log=print):
    """A Trainer ready to run (model loaded and wrapped, data tokenized, difficulty scored)."""
    cfg.validate()
    folder = resolve(cfg.model)
    model, tokenizer = load(folder, dtype=dtype)
    data = load_data(cfg.data, tokenizer, cfg.max_seq_len, cfg.train_on_prompt)
    for name, d in data.items():
        cut = f", {d.truncated} truncated to {cfg.max_seq_len} tokens" if d.truncated else ""
        log(f"{name}: {len(d)} {d.format} samples, {d.target_tokens} target tokens{cut}")
    if "valid" not in data:
        log("no valid.jsonl: validation loss is not computed")
    scores = None
    if cfg.order != "random":
        # The base model's losses: before any adapter exists, so every seed shares them.
        key = {
            "model": os.path.abspath(folder),
            "max_seq_len": cfg.max_seq_len,
            "train_on_prompt": cfg.train_on_prompt,
            "dtype": str(model.model.norm.weight.dtype),
        }
        scores, path, cached = difficulty(model, data["train"], key, cfg.batch_size)
        log(f"difficulty: {'read from' if cached else 'computed, cached in'} {path}")
    mx.random.seed(cfg.seed)
    apply_lora(model, cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.num_layers)
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    trainer = Trainer(model, data, cfg, out, scores)  # checks the settings before anything is written
    os.makedirs(out, exist_ok=True)
    save_config(cfg, out)
    if resume:
        ckpt = latest_checkpoint(resume)
        trainer.load_checkpoint(ckpt)
        log(f"resumed from {ckpt} at step {trainer.step}")
    n_train = sum(v.size for v in adapter_weights(model).values())
    log(f"trainable parameters: {n_train:,} (rank {cfg.rank}, targets {','.join(cfg.targets)})")
    return trainer


def train_with_progress(trainer: Trainer, out=sys.stderr) -> None:
    """Run the trainer, showing a rich progress bar on a terminal and plain lines otherwise."""
    cfg = trainer.cfg
    if not out.isatty():
        for ev in trainer.run():
            if ev.kind != "step":
                print(_describe(ev), file=out, flush=True)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=out)
    stats = {"loss": "-", "tps": "-", "lr": "-", "mem": "-", "val": "-"}
    with Progress(
        TextColumn("[bold]lora"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn(
            "loss {task.fields[loss]} · val {task.fields[val]} · {task.fields[tps]} tok/s · "
            "lr {task.fields[lr]} · peak {task.fields[mem]}"
        ),
        console=console,
    ) as bar:
        task = bar.add_task("train", total=cfg.iters, completed=trainer.step, **stats)
        for ev in trainer.run():
            v = ev.values
            if ev.kind == "step":
                stats["loss"] = f"{v['loss']:.3f}"
            elif ev.kind == "train":
                stats.update(
                    loss=f"{v['train_loss']:.3f}",
                    tps=f"{v['tokens_per_sec']:.0f}",
                    lr=f"{v['lr']:.2e}",
                    mem=f"{v['peak_memory_gb']:.2f} GB",
                )
            elif ev.kind == "val":
                stats["val"] = f"{v['val_loss']:.3f}"
                bar.console.print(_describe(ev))
            elif ev.kind in ("save", "rescore"):
                bar.console.print(_describe(ev))
            bar.update(task, completed=ev.step, **stats)


def _describe(ev) -> str:
    v = ev.values
    if ev.kind == "train":
        return (
            f"step {ev.step}: loss {v['train_loss']:.4f}, lr {v['lr']:.3e}, "
            f"{v['tokens_per_sec']:.0f} tok/s, peak {v['peak_memory_gb']:.2f} GB"
        )
    if ev.kind == "val":
        return f"step {ev.step}: validation loss {v['val_loss']:.4f}"
    if ev.kind == "rescore":
        return f"step {ev.step}: re-scored, {v['in_band']} samples in the band"
    return f"step {ev.step}: checkpoint {v['path']}"


def check_out(out: str, resume: str | None, force: bool) -> None:
    """Refuse to mix a new run into a folder holding another run's files (unless --force)."""
    if resume or not os.path.exists(os.path.join(out, "train_config.json")):
        return
    if not force:
        raise UserError(
            f"--adapter-path {out}: already holds a run; use --resume {out} to continue it "
            "or --force to start over"
        )
    # Remove only what a run writes, never anything else the user keeps there.
    shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)
    for name in ("train_config.json", "metrics.jsonl", WEIGHTS, CONFIG):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def report_test(trainer: Trainer, log=print) -> None:
    """The final adapter's loss on test.jsonl (if present)."""
    if "test" not in trainer.data:
        log("no test.jsonl: nothing to test")
        return
    loss = trainer.evaluate(trainer.data["test"])
    log(f"test loss {loss:.4f}, perplexity {math.exp(loss):.3f}")
