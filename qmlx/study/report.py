"""A study's report from its runs' own files: report.md, val_loss.png, scores.png and summary.json.

Inputs, per run: `adapter/metrics.jsonl` (validation losses by step) and `eval.json` (each task's
headline score: the first of its scores, e.g. pass@1, accuracy, macro-F1). Per ordering: mean ± sd
over seeds; against the baseline: the difference of means with Welch's 95% CI and two-sided p-value,
and Cohen's d (pooled sd); and the first validation step at which the ordering's mean curve reaches
the baseline's mean final validation loss. The report holds no timings, so the same runs always give
the same report (an interrupted and resumed study included).
"""

from __future__ import annotations

import json
import os

from ..errors import UserError
from . import stats
from .spec import Spec


def _json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise UserError(
            f"{path}: not a JSON file `qmlx eval` wrote ({e}); delete it and the eval.done beside it to score that run again"
        ) from None


def val_curve(adapter: str) -> list[tuple[int, float]]:
    """(step, validation loss) of a run, in step order (a resumed run's repeated steps once)."""
    points: dict[int, float] = {}
    try:
        with open(os.path.join(adapter, "metrics.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line torn by a kill (a resumed run rewrites its metrics past the checkpoint)
                if "val_loss" in d:
                    points[d["step"]] = d["val_loss"]
    except FileNotFoundError:
        pass
    return sorted(points.items())


def headline(eval_report: dict) -> dict[str, tuple[str, float]]:
    """task -> (metric, score): the first score each task reports."""
    out = {}
    for name, t in eval_report.get("tasks", {}).items():
        metric, s = next(iter(t["scores"].items()))
        out[name] = (metric, s["score"])
    return out


def collect(spec: Spec) -> dict:
    """Every finished run's curve and scores, the base model's scores."""
    runs = {}
    for r in spec.runs:
        d = spec.run_dir(r)
        ev = _json(os.path.join(d, "eval.json"))
        curve = val_curve(os.path.join(d, "adapter"))
        if ev is None:
            continue  # not finished: left out (the report says how many runs it holds)
        runs[r.name] = {"order": r.order, "seed": r.seed, "val": curve, "scores": headline(ev)}
    base = _json(os.path.join(spec.out, "base", "eval.json"))
    return {"runs": runs, "base": headline(base) if base else {}}


def reach_step(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose validation loss is at or below target."""
    return next((s for s, v in curve if v <= target), None)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over runs at the steps every run logged."""
    steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
    lookup = [dict(c) for c in curves]
    return [(s, stats.mean([d[s] for d in lookup])) for s in steps]


def summarize(spec: Spec, data: dict) -> dict:
    runs = data["runs"]
    # every task the evaluations reported (a group such as kobest: its members, then their average)
    tasks = list(dict.fromkeys(t for r in runs.values() for t in r["scores"]))
    metric = {t: next(r["scores"][t][0] for r in runs.values() if t in r["scores"]) for t in tasks}
    by_order = {o: [r for r in runs.values() if r["order"] == o] for o in spec.orderings}
    out: dict = {"tasks": {t: metric[t] for t in tasks}, "orderings": {}, "runs": len(runs),
                 "planned": len(spec.runs), "baseline": spec.baseline, "base_model": {}}  # fmt: skip
    for t in tasks:
        if t in data["base"]:
            out["base_model"][t] = data["base"][t][1]
    finals = {o: [r["val"][-1][1] for r in rs if r["val"]] for o, rs in by_order.items()}
    base_final = finals.get(spec.baseline) or []
    target = stats.mean(base_final) if base_final else None
    base_runs = by_order.get(spec.baseline, [])
    for o, rs in by_order.items():
        if not rs:
            continue
        entry: dict = {"seeds": sorted(r["seed"] for r in rs), "scores": {}, "vs_baseline": {}}
        for t in tasks:
            xs = [r["scores"][t][1] for r in rs if t in r["scores"]]
            entry["scores"][t] = {"mean": stats.mean(xs), "sd": stats.sd(xs), "n": len(xs), "values": xs}
            if o != spec.baseline and base_runs:
                bs = [r["scores"][t][1] for r in base_runs if t in r["scores"]]
                c = stats.compare(xs, bs)
                entry["vs_baseline"][t] = {"delta": c.delta, "ci95": c.ci95, "t": c.t, "df": c.df, "p": c.p,
                                           "d": c.d}  # fmt: skip
        if finals[o]:
            entry["final_val_loss"] = {
                "mean": stats.mean(finals[o]),
                "sd": stats.sd(finals[o]),
                "n": len(finals[o]),
            }
        curves = [r["val"] for r in rs if r["val"]]
        if target is not None and curves:
            per_seed = [reach_step(c, target) for c in curves]
            entry["reach"] = {"target": target, "mean_curve_step": reach_step(mean_curve(curves), target),
                              "seeds_reaching": sum(s is not None for s in per_seed), "seed_steps": per_seed}  # fmt: skip
        out["orderings"][o] = entry
    return out


def _pm(m: float, s: float | None, pct: bool) -> str:
    f = (lambda v: f"{100 * v:.2f}") if pct else (lambda v: f"{v:.4f}")
    return f"{f(m)} ± {f(s)}" if s is not None else f"{f(m)} (one seed)"


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def render(spec: Spec, summary: dict) -> str:
    tasks = summary["tasks"]
    orders = summary["orderings"]
    b = spec.baseline
    L = [f"# Study `{spec.name}`", ""]
    L += [f"- model: `{spec.model}`", f"- data: `{spec.data}`",
          f"- orderings: {', '.join(spec.orderings)}; seeds: {', '.join(map(str, spec.seeds))}; baseline: {b}",
          f"- `qmlx lora {' '.join(spec.lora_argv)}`", f"- `qmlx eval {' '.join(spec.eval_argv)}`",
          f"- runs in this report: {summary['runs']} of {summary['planned']}", ""]  # fmt: skip
    if summary["runs"] < summary["planned"]:
        L += [
            "**Partial**: not every run has finished; the numbers below are those of the finished ones.",
            "",
        ]
    L += ["## Scores per ordering (mean ± sd over seeds, in %)", ""]
    head = ["ordering", "seeds"] + [f"{t} ({m})" for t, m in tasks.items()] + ["final val loss"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o, e in orders.items():
        cells = [o, str(len(e["seeds"]))] + [
            _pm(e["scores"][t]["mean"], e["scores"][t]["sd"], True) for t in tasks
        ]
        fv = e.get("final_val_loss")
        cells.append(_pm(fv["mean"], fv["sd"], False) if fv else "—")
        L.append("| " + " | ".join(cells) + " |")
    if summary["base_model"]:
        cells = ["base model", "—"] + [_num(100 * summary["base_model"][t], ".2f") if t in summary["base_model"]
                                       else "—" for t in tasks] + ["—"]  # fmt: skip
        L.append("| " + " | ".join(cells) + " |")
    L += ["", f"## Against {b}", "",
          f"Δ = ordering − {b}, in points; 95% CI and p from Welch's t-test; d = Cohen's d (pooled sd).", "",
          "| ordering | task | Δ | 95% CI | d | p |", "|---|---|---|---|---|---|"]  # fmt: skip
    for o, e in orders.items():
        for t, c in e["vs_baseline"].items():
            ci = "—" if c["ci95"] is None else f"{100 * c['ci95'][0]:+.2f} … {100 * c['ci95'][1]:+.2f}"
            L.append(
                f"| {o} | {t} | {100 * c['delta']:+.2f} | {ci} | {_num(c['d'], '+.2f')} | {_num(c['p'], '.3f')} |"
            )
    reach = {o: e["reach"] for o, e in orders.items() if "reach" in e}
    if reach:
        target = next(iter(reach.values()))["target"]
        L += ["", f"## Steps to reach {b}'s final validation loss ({target:.4f})", "",
              "The first validation step at which the ordering's mean curve over seeds is at or below it.", "",
              "| ordering | step (mean curve) | seeds reaching it | their steps |", "|---|---|---|---|"]  # fmt: skip
        for o, r in reach.items():
            steps = ", ".join("—" if s is None else str(s) for s in r["seed_steps"])
            L.append(f"| {o} | {_num(r['mean_curve_step'], 'd')} | {r['seeds_reaching']}/{len(r['seed_steps'])} "
                     f"| {steps} |")  # fmt: skip
    L += ["", "## Plots", "", "![validation loss](val_loss.png)", "", "![scores](scores.png)", ""]
    return "\n".join(L)


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    os.replace(tmp, path)


def plot(spec: Spec, data: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, o in enumerate(spec.orderings):
        curves = [r["val"] for r in data["runs"].values() if r["order"] == o and r["val"]]
        if not curves:
            continue
        mc = mean_curve(curves)
        steps = [s for s, _ in mc]
        lookup = [dict(c) for c in curves]
        sds = [stats.sd([d[s] for d in lookup]) or 0.0 for s in steps]
        means = [v for _, v in mc]
        c = colors[i % len(colors)]
        ax.plot(steps, means, color=c, label=f"{o} (n={len(curves)})")
        ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                        color=c, alpha=0.2, linewidth=0)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{spec.name}: validation loss (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    _save(fig, os.path.join(spec.out, "val_loss.png"))
    plt.close(fig)

    tasks = list(summary["tasks"])
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(tasks) * len(spec.orderings) / 2), 4.2))
    width = 0.8 / max(len(spec.orderings), 1)
    for i, o in enumerate(spec.orderings):
        e = summary["orderings"].get(o)
        if not e:
            continue
        xs = [k + (i - (len(spec.orderings) - 1) / 2) * width for k in range(len(tasks))]
        means = [100 * e["scores"][t]["mean"] for t in tasks]
        errs = [100 * (e["scores"][t]["sd"] or 0.0) for t in tasks]
        ax.bar(xs, means, width, yerr=errs, capsize=3, color=colors[i % len(colors)], label=o)
        for x, t in zip(xs, tasks):
            vals = e["scores"][t]["values"]
            ax.scatter([x] * len(vals), [100 * v for v in vals], color="black", s=8, zorder=3)
    for k, t in enumerate(tasks):
        if t in summary["base_model"]:
            y = 100 * summary["base_model"][t]
            ax.hlines(y, k - 0.45, k + 0.45, colors="gray", linestyles="dashed",
                      label="base model" if k == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(tasks)), [f"{t}\n({summary['tasks'][t]})" for t in tasks])
    ax.set_ylabel("score (%)")
    ax.set_title(f"{spec.name}: scores per ordering (mean ± sd, dots: seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, os.path.join(spec.out, "scores.png"))
    plt.close(fig)


def write_text(path: str, text: str) -> None:
    """Write `path` whole or not at all (a killed study never leaves half a file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(spec: Spec) -> str:
    data = collect(spec)
    summary = summarize(spec, data)
    write_text(os.path.join(spec.out, "summary.json"),
               json.dumps({"summary": summary, "runs": data["runs"], "base": data["base"]}, indent=1))  # fmt: skip
    if data["runs"]:
        plot(spec, data, summary)
    path = os.path.join(spec.out, "report.md")
    write_text(path, render(spec, summary))
    return path
