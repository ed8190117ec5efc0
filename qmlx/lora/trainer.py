"""The LoRA training loop: AdamW, warmup + cosine, clipping, accumulation, checkpoints, resume.

A run writes into its output folder:
  adapters.safetensors, adapter_config.json   the final adapter (also the latest checkpoint's)
  train_config.json                           every setting, so `--resume` needs nothing else
  metrics.jsonl                               one JSON object per report / validation, for plots
  checkpoints/step-NNNNNN/                    adapter + optimizer state + order state
Resuming restores the adapter, the optimizer's moments and step, and the ordering's state;
batches and dropout masks are pure functions of (seed, step), so the resumed losses equal an
uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import UserError
from .adapters import WEIGHTS, save_adapter, write_json
from .data import Dataset
from .order import Order
from .score import loss_fn, make_batch, sample_losses

CHECKPOINTS = "checkpoints"


@dataclass
class TrainConfig:
    model: str = ""
    data: str = ""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    num_layers: int | None = None  # adapt only the last N blocks (None: all)
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 4
    iters: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    grad_checkpoint: bool = False
    max_seq_len: int = 2048
    train_on_prompt: bool = False
    schedule: str = "cosine"  # or "constant"
    warmup: int = 0
    min_lr: float = 0.0
    seed: int = 0
    order: str = "random"
    band: tuple[float, float] = (0.3, 0.8)
    rescore_every: int = 100
    rescore_pool: int = 512  # samples re-scored each time (0: all)
    report_every: int = 10
    val_every: int = 100
    val_batches: int = 0  # 0: the whole valid set
    save_every: int = 100

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.band = tuple(cfg.band)
        return cfg

    def validate(self) -> None:
        positive = (
            "rank",
            "batch_size",
            "iters",
            "grad_accum",
            "report_every",
            "val_every",
            "save_every",
            "rescore_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.warmup < 0 or self.warmup >= self.iters and self.warmup:
            raise UserError(f"--warmup must be in [0, --iters), got {self.warmup}")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip must be >= 0, got {self.grad_clip}")

    def adapter_config(self) -> dict:
        return {
            "format": "qmlx-lora",
            "base_model": self.model,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "targets": list(self.targets),
            "num_layers": self.num_layers,
        }


def learning_rate(cfg: TrainConfig):
    """Linear warmup from 0, then cosine decay to `min_lr` at the last step (or constant)."""
    main = (
        optim.cosine_decay(cfg.lr, max(cfg.iters - cfg.warmup, 1), cfg.min_lr)
        if cfg.schedule == "cosine"
        else (lambda step: mx.array(cfg.lr, mx.float32))
    )
    if not cfg.warmup:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, cfg.lr, cfg.warmup), main], [cfg.warmup])


@dataclass
class Event:
    """What the loop reports: a training report, a validation, or a saved checkpoint."""

    kind: str  # "step" (every step) | "train" (a report) | "val" | "save" | "rescore"
    step: int
    values: dict


class Trainer:
    """Trains the LoRA parameters of `model` (already wrapped, see apply_lora) on `data`."""

    def __init__(
        self,
        model: nn.Module,
        data: dict[str, Dataset],
        cfg: TrainConfig,
        out: str,
        difficulty: np.ndarray | None = None,
    ):
        cfg.validate()
        self.model, self.data, self.cfg, self.out = model, data, cfg, out
        self.train_set = data["train"]
        self.order = Order(cfg.order, self.train_set.lengths, cfg.batch_size, cfg.seed, difficulty, cfg.band)
        self.optimizer = optim.AdamW(learning_rate=learning_rate(cfg), weight_decay=cfg.weight_decay)
        self.step = 0  # optimizer steps done
        self.trained_tokens = 0
        self._value_and_grad = nn.value_and_grad(model, loss_fn)

    # ------------------------------------------------------------------ one step
    def train_step(self) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; (mean loss, target tokens)."""
        cfg, grads, losses, ntoks = self.cfg, None, [], 0
        for micro in range(cfg.grad_accum):
            k = self.step * cfg.grad_accum + micro
            # Dropout's randomness is a function of (seed, micro-batch), so a resumed run
            # draws the same masks without saving the generator.
            mx.random.seed(cfg.seed * 1_000_003 + k)
            idx = self.order.batch(k)
            (loss, n), g = self._value_and_grad(self.model, *make_batch(self.train_set, idx))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, loss, n)
            losses.append(loss.item())
            ntoks += int(n.item())
        if cfg.grad_accum > 1:
            grads = tree_map(lambda g: g / cfg.grad_accum, grads)
        if cfg.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.grad_clip)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.step += 1
        return float(np.mean(losses)), ntoks

    def validate(self) -> float:
        return self.evaluate(self.data["valid"], self.cfg.val_batches)

    def evaluate(self, valid: Dataset, max_batches: int = 0) -> float:
        """Target-token-weighted mean loss on a split (in a fixed, length-sorted order)."""
        idx = np.argsort(valid.lengths, kind="stable")
        total, count = 0.0, 0.0
        self.model.train(False)
        for b, start in enumerate(range(0, len(idx), self.cfg.batch_size)):
            if max_batches and b >= max_batches:
                break
            loss, n = loss_fn(self.model, *make_batch(valid, idx[start : start + self.cfg.batch_size]))
            mx.eval(loss, n)
            total += loss.item() * n.item()
            count += n.item()
        self.model.train(True)
        return total / max(count, 1.0)

    # ------------------------------------------------------------------ the loop
    def run(self):
        """Train up to `iters` steps, yielding Events; saves the final adapter at the end."""
        cfg = self.cfg
        self.model.train(True)
        metrics = open(os.path.join(self.out, "metrics.jsonl"), "a", encoding="utf-8")
        has_valid = "valid" in self.data
        try:
            if has_valid and self.step == 0:
                yield self._log(metrics, Event("val", 0, {"val_loss": self.validate()}))
            window_loss, window_tokens, t0 = [], 0, time.perf_counter()
            mx.reset_peak_memory()
            while self.step < cfg.iters:
                loss, ntoks = self.train_step()
                window_loss.append(loss)
                window_tokens += ntoks
                self.trained_tokens += ntoks
                if not math.isfinite(loss):
                    raise UserError(f"training diverged at step {self.step} (loss {loss}); try a lower --lr")
                yield Event("step", self.step, {"loss": loss})
                if self.step % cfg.report_every == 0 or self.step == cfg.iters:
                    dt = time.perf_counter() - t0
                    yield self._log(
                        metrics,
                        Event(
                            "train",
                            self.step,
                            {
                                "train_loss": float(np.mean(window_loss)),
                                "lr": float(self.optimizer.learning_rate.item()),
                                "tokens_per_sec": window_tokens / dt,
                                "step_time": dt / len(window_loss),
                                "trained_tokens": self.trained_tokens,
                                "peak_memory_gb": mx.get_peak_memory() / 1e9,
                            },
                        ),
                    )
                    window_loss, window_tokens, t0 = [], 0, time.perf_counter()
                if cfg.order == "adaptive" and self.step % cfg.rescore_every == 0 and self.step < cfg.iters:
                    n = self.rescore()
                    yield self._log(
                        metrics,
                        Event("rescore", self.step, {"rescored": n, "in_band": len(self.order.in_band())}),
                    )
                if has_valid and (self.step % cfg.val_every == 0 or self.step == cfg.iters):
                    yield self._log(metrics, Event("val", self.step, {"val_loss": self.validate()}))
                if self.step % cfg.save_every == 0 or self.step == cfg.iters:
                    path = self.save_checkpoint()
                    yield Event("save", self.step, {"path": path})
        finally:
            metrics.close()
        save_adapter(self.model, self.out, cfg.adapter_config())

    def rescore(self) -> int:
        """Re-compute the current loss of a seeded random pool of training samples (adaptive)."""
        n = len(self.train_set)
        pool = min(self.cfg.rescore_pool or n, n)
        idx = np.random.default_rng([self.cfg.seed, self.step, 1]).choice(n, pool, replace=False)
        self.order.scores[idx] = sample_losses(self.model, self.train_set, self.cfg.batch_size, idx)
        return pool

    def _log(self, f, ev: Event) -> Event:
        f.write(json.dumps({"step": ev.step, **ev.values}) + "\n")
        f.flush()
        return ev

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """Adapter + optimizer + order state at this step, written to a temp dir then renamed."""
        root = os.path.join(self.out, CHECKPOINTS)
        final = os.path.join(root, f"step-{self.step:06d}")
        tmp = final + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.model, tmp, self.cfg.adapter_config())
        state = dict(tree_flatten(self.optimizer.state))
        if self.order.scores is not None:
            state["__order_scores__"] = mx.array(self.order.scores.astype(np.float32))
        mx.save_safetensors(os.path.join(tmp, "optimizer.safetensors"), state)
        write_json(
            os.path.join(tmp, "trainer_state.json"),
            {
                "step": self.step,
                "trained_tokens": self.trained_tokens,
                # float64 scores exactly (the safetensors copy is float32, for inspection)
                "order_scores": None if self.order.scores is None else self.order.scores.tolist(),
            },
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final

    def load_checkpoint(self, folder: str) -> None:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            st = json.load(f)
        weights = mx.load(os.path.join(folder, WEIGHTS))
        self.model.load_weights(list(weights.items()), strict=False)
        state = mx.load(os.path.join(folder, "optimizer.safetensors"))
        state.pop("__order_scores__", None)
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(state.items()))
        if st.get("order_scores") is not None:
            self.order.scores = np.array(st["order_scores"], np.float64)
        self.step, self.trained_tokens = st["step"], st["trained_tokens"]
        mx.eval(self.model.parameters(), self.optimizer.state)
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metrics a killed run logged after the checkpoint we resume from."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= self.step]
        # The checkpoint's own step was logged before it was saved.
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def latest_checkpoint(folder: str) -> str:
    """`folder` itself when it is a checkpoint, else its newest checkpoint."""
    if os.path.exists(os.path.join(folder, "trainer_state.json")):
        return folder
    root = os.path.join(folder, CHECKPOINTS)
    steps = (
        sorted(d for d in os.listdir(root) if d.startswith("step-") and ".tmp" not in d)
        if os.path.isdir(root)
        else []
    )
    if not steps:
        raise UserError(f"--resume {folder}: no checkpoint found (expected {CHECKPOINTS}/step-NNNNNN/)")
    return os.path.join(root, steps[-1])


def resume_run(path: str) -> tuple[str, TrainConfig]:
    """(run folder, its saved settings) for a --resume path: a run folder or one of its checkpoints."""
    path = os.path.normpath(path)
    run = path
    if os.path.basename(os.path.dirname(path)) == CHECKPOINTS:
        run = os.path.dirname(os.path.dirname(path))
    saved = os.path.join(run, "train_config.json")
    if not os.path.exists(saved):
        raise UserError(f"--resume {path}: no train_config.json in {run} (not a `qmlx lora` output folder)")
    with open(saved, encoding="utf-8") as f:
        try:
            return run, TrainConfig.from_dict(json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{saved}: cannot be read ({e})") from None


def save_config(cfg: TrainConfig, out: str) -> None:
    write_json(os.path.join(out, "train_config.json"), asdict(cfg))
