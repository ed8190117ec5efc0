"""`qmlx study SPEC.toml`: every ordering × seed trained by `qmlx lora`, scored by `qmlx eval`, reported.

The study folder (the spec's `out`):

    study.json                 the spec as read (what the runs were started with)
    base/eval.json             the base model's scores (once), eval.log
    runs/<order>-s<seed>/      adapter/ (`qmlx lora`'s output: metrics.jsonl, checkpoints/, the adapter),
                               eval.json (+ .items.jsonl), lora.log, eval.log, run.json,
                               lora.done and eval.done once each step has finished
    report.md, *.png, summary.json

Each step runs in its own process (`python -m qmlx lora|eval …`): its memory is returned when it ends, and
a crash in one run cannot take the study's state with it. A rerun skips finished steps, continues an
interrupted training with `qmlx lora --resume` (bit-for-bit the uninterrupted run) and an interrupted
evaluation from its item cache. A lock on the folder keeps a second study process (or an orphaned child)
from writing into it at the same time. Difficulty scores are computed once: `qmlx lora` caches the base
model's per-sample losses, so every seed and every fixed curriculum reads the same file.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

from ..errors import UserError
from .report import write_report, write_text
from .spec import Run, Spec, SpecError

TAIL = 12  # log lines shown when a step fails
PROBE_ITEMS = 8  # items per task a dry run times
PROBE_SPREAD = 100  # without a --limit, the probe's items are spread over this many


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def checkpoint_step(adapter: str) -> int | None:
    """The step of a run's latest checkpoint (where `qmlx lora --resume` continues), None before any."""
    from ..lora.trainer import latest_checkpoint

    try:
        ckpt = latest_checkpoint(adapter)
    except UserError:
        return None
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        return json.load(f)["step"]


def status(spec: Spec, run: Run) -> tuple[str, int]:
    """(its state: done / trained / at step N / to do, the training steps it has done)."""
    d = spec.run_dir(run)
    if _read(os.path.join(d, "lora.done")) == spec.lora_key():
        return ("done" if _read(os.path.join(d, "eval.done")) == spec.eval_key() else "trained"), spec.iters
    step = checkpoint_step(os.path.join(d, "adapter"))
    return (f"at step {step}", step) if step is not None else ("to do", 0)


def check_runs(spec: Spec) -> None:
    """Refuse to mix runs trained with other settings into this study."""
    for run in spec.runs:
        saved = _read(os.path.join(spec.run_dir(run), "run.json"))
        if saved is None:
            continue
        old = json.loads(saved)
        if old.get("lora_key") != spec.lora_key():
            changed = sorted(
                k
                for k in set(old.get("lora", {})) | set(spec.lora)
                if old.get("lora", {}).get(k) != spec.lora.get(k)
            )
            if old.get("model") != spec.model:
                changed.append("model")
            if old.get("data") != spec.data:
                changed.append("data")
            raise SpecError(
                f"{spec.path}: {spec.run_dir(run)} was trained with other settings "
                f"({', '.join(changed) or 'lora'} differ); give the changed study another out "
                "folder, or delete that run to retrain it"
            )


# ------------------------------------------------------------------ child processes


def _die_with_parent() -> None:  # pragma: no cover  (runs in the child)
    """Linux: the child is killed when the study process dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(argv: list[str], log_path: str, label: str, lock_fd: int, say) -> None:
    """Run `python -m qmlx <argv>`, its output appended to log_path and its lines echoed as `label: …`."""
    cmd = [sys.executable, "-m", "qmlx", *argv]
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(lock_fd,),
            preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            pending = b""
            while chunk := proc.stdout.read1(65536):
                log.write(chunk)
                log.flush()
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    text = line.decode("utf-8", "replace").split("\r")[-1].rstrip()
                    if text:
                        say(f"{label}: {text}")
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted: stop the child before the study exits
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if rc != 0:
        raise UserError(
            f"{label}: `qmlx {argv[0]}` failed (exit {rc}); finished runs are kept and a rerun continues. "
            f"Its output ({log_path}) ends:\n{_log_tail(log_path)}"
        )


def _log_tail(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return "".join(f.readlines()[-TAIL:]).rstrip()


def lora_argv(spec: Spec, run: Run, adapter: str) -> list[str]:
    return ["lora", "--model", spec.model, "--data", spec.data, "--order", run.order, "--seed", str(run.seed),
            "--adapter-path", adapter, *spec.lora_argv]  # fmt: skip


def eval_argv(spec: Spec, out: str, adapter: str | None) -> list[str]:
    return ["eval", "--model", spec.model, *(["--adapter", adapter] if adapter else []), "--out", out,
            *spec.eval_argv]  # fmt: skip


class FolderLock:
    """An exclusive lock on the study folder, held by the study and inherited by its children."""

    def __init__(self, folder: str):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        import fcntl

        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(
                f"{folder}: another `qmlx study` (or a step it started) is still running in this folder"
            ) from None
        os.set_inheritable(self.fd, True)

    def close(self) -> None:
        os.close(self.fd)


def run(spec: Spec, say=print) -> str:
    """Run (or finish) the study; returns the report's path."""
    check_runs(spec)
    lock = FolderLock(spec.out)
    try:
        write_text(os.path.join(spec.out, "study.json"), json.dumps(_spec_record(spec), indent=1) + "\n")
        _evaluate(spec, os.path.join(spec.out, "base"), None, "base", lock, say)
        for number, r in enumerate(spec.runs, 1):
            d = spec.run_dir(r)
            adapter = os.path.join(d, "adapter")
            label = f"[{number}/{len(spec.runs)}] {r.name}"
            os.makedirs(d, exist_ok=True)
            if _read(os.path.join(d, "lora.done")) != spec.lora_key():
                write_text(os.path.join(d, "run.json"), json.dumps({
                    "order": r.order, "seed": r.seed, "model": spec.model, "data": spec.data, "lora": spec.lora,
                    "lora_key": spec.lora_key(), "argv": lora_argv(spec, r, adapter)}, indent=1, default=str))  # fmt: skip
                step = checkpoint_step(adapter)
                if step is not None:
                    say(f"{label}: resuming the training at step {step}")
                    argv = ["lora", "--resume", adapter]
                else:
                    say(f"{label}: training")
                    argv = lora_argv(spec, r, adapter) + ["--force"]
                _child(argv, os.path.join(d, "lora.log"), label, lock.fd, say)
                write_text(os.path.join(d, "lora.done"), spec.lora_key())
            _evaluate(spec, d, adapter, label, lock, say)
        path = write_report(spec)
        say(f"report: {path}")
        return path
    finally:
        lock.close()


def _evaluate(spec: Spec, folder: str, adapter: str | None, label: str, lock: FolderLock, say) -> None:
    """`qmlx eval` of the base model or a run's adapter into `folder`, unless done with these settings."""
    os.makedirs(folder, exist_ok=True)
    if _read(os.path.join(folder, "eval.done")) == spec.eval_key():
        return
    say(f"{label}: qmlx eval --tasks {spec.eval['tasks']}")
    _child(eval_argv(spec, os.path.join(folder, "eval.json"), adapter), os.path.join(folder, "eval.log"), label,
           lock.fd, say)  # fmt: skip
    write_text(os.path.join(folder, "eval.done"), spec.eval_key())


def _spec_record(spec: Spec) -> dict:
    return {"spec": spec.path, "name": spec.name, "model": spec.model, "data": spec.data,
            "orderings": spec.orderings, "seeds": spec.seeds, "baseline": spec.baseline, "lora": spec.lora,
            "eval": spec.eval, "lora_key": spec.lora_key(), "eval_key": spec.eval_key()}  # fmt: skip


# ------------------------------------------------------------------ --dry-run


def _count_lines(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def _train_reports(adapter: str) -> tuple[list[float], list[float]]:
    """(per-step seconds, peak GB) of a run's train reports; the first step's time is left out
    (compilation, warm-up)."""
    times, peaks = [], []
    try:
        with open(os.path.join(adapter, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                if "step_time" in d and d["step"] > 1:
                    times.append(d["step_time"])
                if "peak_memory_gb" in d:
                    peaks.append(d["peak_memory_gb"])
    except (FileNotFoundError, ValueError):
        pass
    return times, peaks


def _eval_seconds(path: str) -> dict[str, tuple[float, int, int | None]]:
    """task -> (seconds, items scored, items the task has) of an eval.json."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return {
        name: (t["seconds"], t["problems"], t.get("available")) for name, t in report.get("tasks", {}).items()
    }


def measure(spec: Spec, say=print, probe_steps: int = 4) -> dict:
    """Step time (s), peak memory (GB) and eval seconds per item: from this study's own runs when any
    have logged them, else from a short probe (`qmlx lora` for a few steps and `qmlx eval --limit` of a
    few items, in a temporary folder)."""
    times, peaks = [], []
    evals: dict[str, tuple[float, int, int | None]] = {}
    for r in spec.runs:
        adapter = os.path.join(spec.run_dir(r), "adapter")
        t, p = _train_reports(adapter)
        times, peaks = times + t, peaks + p
        for name, e in _eval_seconds(os.path.join(spec.run_dir(r), "eval.json")).items():
            evals.setdefault(name, e)
    for name, e in _eval_seconds(os.path.join(spec.out, "base", "eval.json")).items():
        evals.setdefault(name, e)
    source = "this study's runs"
    if not times or any(t not in evals for t in spec.tasks):
        source = "a probe"
        with tempfile.TemporaryDirectory(prefix="qmlx-study-probe-") as tmp:
            if not times:
                say(f"dry run: timing {probe_steps} training steps …")
                adapter = os.path.join(tmp, "adapter")
                argv = lora_argv(spec, Run("random", spec.seeds[0]), adapter)
                argv += ["--iters", str(probe_steps), "--report-every", "1", "--val-every", str(10**9),
                         "--save-every", str(10**9), "--warmup", "0"]  # fmt: skip
                _probe(argv, os.path.join(tmp, "lora.log"))
                times, peaks = _train_reports(adapter)
            missing = [t for t in spec.tasks if t not in evals]
            if missing:
                say(f"dry run: timing a few items of {', '.join(missing)} …")
                out = os.path.join(tmp, "eval.json")
                # PROBE_ITEMS spread over the ones the study scores (lengths vary along a task's file)
                spread = spec.eval["stride"] * max(1, (spec.eval["limit"] or PROBE_SPREAD) // PROBE_ITEMS)
                argv = eval_argv(spec, out, None) + ["--limit", str(PROBE_ITEMS), "--stride", str(spread)]
                argv[argv.index("--tasks") + 1] = ",".join(missing)  # the spec always names its tasks
                _probe(argv, os.path.join(tmp, "eval.log"))
                evals.update(_eval_seconds(out))
    return {
        "step_time": statistics.median(times) if times else None,
        "peak_memory_gb": max(peaks) if peaks else None,
        "eval": {name: s / max(n, 1) for name, (s, n, _) in evals.items()},
        "available": {name: a for name, (_, _, a) in evals.items()},
        "source": source,
    }


def _probe(argv: list[str], log_path: str) -> None:
    cmd = [sys.executable, "-m", "qmlx", *argv]
    with open(log_path, "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent).returncode
    if rc != 0:
        raise UserError(f"dry run: the probe `qmlx {argv[0]}` failed (exit {rc}):\n{_log_tail(log_path)}")


def _memory(spec: Spec) -> tuple[float, bool]:
    """(`qmlx lora --estimate`'s GB for the spec's settings, whether it counts --grad-checkpoint)."""
    import mlx.core as mx

    from ..lora.apply import parse_targets
    from ..lora.estimate import GB, estimate_for

    lo = spec.lora
    e, _ = estimate_for(
        spec.model, rank=lo["rank"], targets=parse_targets(lo["targets"]), batch_size=lo["batch_size"],
        seq_len=lo["max_seq_len"], dtype=lo["dtype"], dropout=lo["dropout"],
        backend="metal" if mx.metal.is_available() else "cpu", num_layers=lo["num_layers"],
    )  # fmt: skip
    ckpt = bool(lo["grad_checkpoint"])
    return (e.total_checkpointed if ckpt else e.total) / GB, ckpt


def dry_run(spec: Spec, say=print) -> str:
    """The plan: each run's state, its time (from a measured step time) and memory, and the total."""
    check_runs(spec)
    m = measure(spec, say)
    lo = spec.lora
    iters = spec.iters
    n_train = _count_lines(os.path.join(spec.data, "train.jsonl"))
    n_valid = _count_lines(os.path.join(spec.data, "valid.jsonl"))
    step = m["step_time"]
    batches = lambda n: -(-n // lo["batch_size"])  # noqa: E731
    # A forward pass without the backward costs about a third of a training step.
    per_val = (min(batches(n_valid), lo["val_batches"] or 10**9)) * step / 3 if n_valid else 0.0
    vals = iters // lo["val_every"] + 2 if n_valid else 0
    limit = spec.eval.get("limit")
    from ..eval.run import GROUPS

    # Each task's items (its members', for a group such as kobest): the limit, or all it has.
    scored = [t for t in m["eval"] if t not in GROUPS]
    items = {t: min(limit, m["available"][t] or limit) if limit else m["available"][t] for t in scored}
    eval_s = (
        None if any(n is None for n in items.values()) else sum(m["eval"][t] * n for t, n in items.items())
    )
    gb, ckpt = _memory(spec)
    lines = [
        f"study {spec.name}: {len(spec.orderings)} orderings × {len(spec.seeds)} seeds = {len(spec.runs)} runs "
        f"in {spec.out}",
        f"model {spec.model}; data {spec.data} ({n_train} train, {n_valid} valid samples)",
        f"qmlx lora {' '.join(spec.lora_argv) or '(defaults)'}; qmlx eval {' '.join(spec.eval_argv)}",
        f"measured ({m['source']}): {step:.2f} s per step"
        + (f", peak {m['peak_memory_gb']:.2f} GB" if m["peak_memory_gb"] else "")
        + "".join(f"; {t} {s:.2f} s per item" for t, s in m["eval"].items()),
        f"memory per run (qmlx lora --estimate{', --grad-checkpoint' if ckpt else ''}): {gb:.2f} GB",
        "",
        f"{'run':<22}{'state':<16}{'steps':>8}{'train':>10}{'eval':>10}",
    ]
    total = 0.0
    difficulty_s = batches(n_train) * step / 3
    states = {r.name: status(spec, r) for r in spec.runs}
    if any(r.order != "random" and states[r.name][0] == "to do" for r in spec.runs):
        lines.insert(5, f"difficulty scores: computed once, ~{_hours(difficulty_s)}")
        total += difficulty_s
    base_done = _read(os.path.join(spec.out, "base", "eval.done")) == spec.eval_key()
    rows = [("base model", ("done" if base_done else "to do", 0), None)] + [
        (r.name, states[r.name], r) for r in spec.runs
    ]
    for name, (state, trained), r in rows:
        left = 0 if r is None else iters - trained
        train_s = left * step + (vals * per_val * left / iters if iters else 0.0)
        ev = 0.0 if state == "done" else (eval_s or 0.0)
        total += train_s + ev
        steps = "" if r is None else f"{left}/{iters}"
        lines.append(f"{name:<22}{state:<16}{steps:>8}{_hours(train_s) if r else '':>10}"
                     f"{_hours(ev) if eval_s is not None else '?':>10}")  # fmt: skip
    lines.append(f"{'total':<46}{_hours(total):>10}" + ("" if eval_s is not None else "  + eval (the eval time "
                 "per item is shown above)"))  # fmt: skip
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
