"""`qmlx eval`: score a model (and adapter) on tasks; a table on stdout, every item in a JSON file.

Tasks so far: `humaneval` (pass@k) and `mmlu` (accuracy, per category and subject). Each finished item is appended to `<out>.items.jsonl` as soon as it is
scored, under a key of the settings that decide it (model, adapter, mode, sampling, limits), so Ctrl-C
and the same command again continue where it stopped; other settings start afresh.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from ..errors import UserError
from . import humaneval, mmlu
from .sandbox import Limits

TASKS = ("humaneval", "mmlu")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (sound near 0 and 1, unlike mean ± 1.96·se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """mean ± z·sd/√n (pass@k over problems, each a fraction)."""
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return max(0.0, m - z * sd / math.sqrt(n)), min(1.0, m + z * sd / math.sqrt(n))


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise UserError(
            f"--tasks: unknown task {bad[0]!r}; available: {', '.join(TASKS)}"
            if bad
            else "--tasks: none given"
        )
    return names


class ItemCache:
    """Scored items by settings key, appended one JSON line at a time (a torn last line is ignored)."""

    def __init__(self, path: str | None, key: dict):
        self.path, self.key = path, json.dumps(key, sort_keys=True)
        self.items: dict[tuple[str, int], dict] = {}
        if path and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        d = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(d, dict) and d.get("key") == self.key:
                        self.items[(d["task_id"], d["sample"])] = d

    def add(self, item: dict) -> None:
        self.items[(item["task_id"], item["sample"])] = item
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": self.key, **item}, ensure_ascii=False) + "\n")


def _generator(model, tokenizer, mode: str, samples: int, temperature: float, max_tokens: int, seed: int):
    from ..batch import batch_generate
    from ..sample import make_sampler

    counter = iter(range(1 << 62))

    def generate(problems: list[humaneval.Problem]) -> list[str]:
        if mode == "chat":
            prompts = [
                tokenizer.apply_chat_template(humaneval.chat_prompt(p), add_generation_prompt=True)
                for p in problems
            ]
        else:
            prompts = [p.prompt for p in problems]
        # Each sample its own seeded sampler: reproducible, and two samples of a problem differ.
        samplers = [make_sampler(temperature, seed=seed + next(counter)) for _ in problems]
        stop = list(humaneval.STOPS) if mode == "complete" else None
        results = batch_generate(
            model, tokenizer, prompts, max_tokens, sampler=samplers, repetition_penalty=1.0, stop=stop
        )
        return [r.text for r in results]

    return generate


def _humaneval(
    m,
    tok,
    settings,
    data,
    limit,
    stride,
    samples,
    temperature,
    max_tokens,
    timeout,
    batch_size,
    seed,
    cache: ItemCache,
    progress: bool,
) -> dict:
    problems = humaneval.load_problems(data)[::stride][:limit]
    mode = settings["mode"]
    done = {k: humaneval.Sample(**{f: v[f] for f in ("task_id", "completion", "program", "status", "seconds",
                                                     "detail")})
            for k, v in cache.items.items()}  # fmt: skip
    start, total = time.perf_counter(), len(problems) * samples
    ids = {p.task_id for p in problems}
    counted = [sum(k[0] in ids for k in done)]
    resumed = counted[0]

    def on_sample(s: humaneval.Sample, number: int) -> None:
        cache.add({"task_id": s.task_id, "sample": number, "completion": s.completion, "program": s.program,
                   "status": s.status, "seconds": s.seconds, "detail": s.detail})  # fmt: skip
        counted[0] += 1
        _progress(progress, "humaneval", counted[0], total, start, counted[0] - resumed)

    gen = _generator(m, tok, mode, samples, temperature, max_tokens, seed)
    results = humaneval.run_samples(
        problems, gen, mode, samples, Limits(timeout=timeout), done, batch_size, on_sample
    )
    per_problem = {tid: sum(s.status == "passed" for s in ss) for tid, ss in results.items()}
    scores = {}
    for k in sorted({1, *([10] if samples >= 10 else []), *([samples] if samples > 1 else [])}):
        values = [humaneval.pass_at_k(samples, c, k) for c in per_problem.values()]
        lo, hi = wilson(sum(values), len(values)) if samples == 1 else mean_interval(values)
        scores[f"pass@{k}"] = {"score": sum(values) / len(values), "ci95": [lo, hi], "items": len(values)}
    return {
        "problems": len(problems), "scores": scores, "seconds": time.perf_counter() - start,
        "statuses": {st: sum(s.status == st for ss in results.values() for s in ss)
                     for st in ("passed", "failed", "timeout", "killed")},
        "items": [{"task_id": tid, "sample": i, **{f: getattr(s, f) for f in
                   ("completion", "program", "status", "seconds", "detail")}}
                  for tid, ss in results.items() for i, s in enumerate(ss)],
    }  # fmt: skip


# Items scored per call of continuation_logprobs (one cache append per item after each call).
MMLU_CHUNK = 32


def _mmlu(m, tok, settings, data, limit, stride, shots, cache: ItemCache, progress: bool) -> dict:
    from .choices import continuation_logprobs

    test, dev = mmlu.load(data)
    test = test[::stride][:limit]
    start = time.perf_counter()
    todo = [i for i in range(len(test)) if (f"mmlu/{i}", 0) not in cache.items]
    resumed = len(test) - len(todo)
    for c in range(0, len(todo), MMLU_CHUNK):
        chunk = todo[c : c + MMLU_CHUNK]
        questions = [test[i] for i in chunk]
        scores = continuation_logprobs(m, mmlu.items(questions, dev, shots, tok, settings["mode"] == "chat"))
        for i, q, lp in zip(chunk, questions, scores):
            chosen = max(range(4), key=lambda j: lp[j])
            cache.add({"task_id": f"mmlu/{i}", "sample": 0, "subject": q.subject, "answer": q.answer,
                       "chosen": chosen, "logprobs": lp})  # fmt: skip
        done = resumed + c + len(chunk)
        _progress(progress, "mmlu", done, len(test), start, done - resumed)
    items = [cache.items[(f"mmlu/{i}", 0)] for i in range(len(test))]
    groups: dict[str, list[bool]] = {"overall": []}
    for it in items:
        right = it["chosen"] == it["answer"]
        for g in ("overall", mmlu.CATEGORY[it["subject"]], it["subject"]):
            groups.setdefault(g, []).append(right)

    def score(rights: list[bool]) -> dict:
        lo, hi = wilson(sum(rights), len(rights))
        return {"score": sum(rights) / len(rights), "ci95": [lo, hi], "items": len(rights)}

    categories = [c for c in mmlu.CATEGORIES if c in groups]
    return {
        "problems": len(test),
        "scores": {"accuracy": score(groups["overall"]), **{c: score(groups[c]) for c in categories}},
        "subjects": {s: score(groups[s]) for s in sorted(groups) if s in mmlu.CATEGORY},
        "seconds": time.perf_counter() - start,
        "items": [{k: v for k, v in it.items() if k != "key"} for it in items],
    }


def _progress(show: bool, task: str, done: int, total: int, start: float, new: int) -> None:
    if show:
        eta = (time.perf_counter() - start) / max(new, 1) * (total - done)
        end = "\n" if done >= total else ""
        print(f"\r{task}: {done}/{total}, ETA {eta / 60:.1f} min", end=end, file=sys.stderr)


def evaluate(
    model: str,
    tasks: str = "humaneval",
    adapter: str | None = None,
    limit: int | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 512,
    mode: str = "auto",
    data: str | None = None,
    out: str | None = None,
    timeout: float = 10.0,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    shots: int = 0,
    stride: int = 1,
) -> dict:
    """Run the tasks; returns (and writes to `out`) settings, scores and every item."""
    import qmlx

    names = parse_tasks(tasks)
    if samples < 1 or batch_size < 1 or max_tokens < 1 or timeout <= 0 or shots < 0:
        raise UserError(
            "--samples, --batch-size and --max-tokens must be at least 1, --timeout positive, --shots at least 0"
        )
    if samples > 1 and temperature <= 0:
        raise UserError("--samples above 1 needs --temperature above 0 (greedy samples are all the same)")
    if stride < 1:
        raise UserError(f"--stride must be at least 1, got {stride}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if mode not in ("auto", "chat", "complete"):
        raise UserError(f"--mode must be auto, chat or complete, got {mode!r}")
    if data and len(names) > 1:
        raise UserError("--data names one task's file: give one task with it")
    m, tok = qmlx.load(model, adapter=adapter)
    # What decides an item (the cache's key); --limit and --stride only choose which items run.
    base = {
        "model": os.path.abspath(model) if os.path.exists(model) else model,
        "adapter": adapter,
        "data": data,
    }
    report: dict = {"settings": {**base, "tasks": names, "limit": limit, "stride": stride}, "tasks": {}}
    for name in names:
        # auto: HumanEval through the chat template when there is one (as instruct models are evaluated);
        # MMLU on raw text (the log-likelihood convention).
        task_mode = (
            mode if mode != "auto" else ("chat" if name == "humaneval" and tok.chat_template else "complete")
        )
        if name == "humaneval":
            settings = {**base, "task": name, "mode": task_mode, "samples": samples, "temperature": temperature,
                        "max_tokens": max_tokens, "timeout": timeout, "seed": seed}  # fmt: skip
            cache = ItemCache(out + ".items.jsonl" if out else None, settings)
            result = _humaneval(m, tok, settings, data, limit, stride, samples, temperature, max_tokens, timeout,
                                batch_size, seed, cache, progress)  # fmt: skip
        else:
            settings = {**base, "task": name, "mode": task_mode, "shots": shots}
            cache = ItemCache(out + ".items.jsonl" if out else None, settings)
            result = _mmlu(m, tok, settings, data, limit, stride, shots, cache, progress)
        report["tasks"][name] = {"settings": settings, **result}
    if out:
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        os.replace(tmp, out)
    return report


def table(report: dict) -> str:
    lines = [f"{'task':<12}{'metric':<17}{'score':>8}  {'95% CI':<15}{'items':>6}{'time':>9}"]
    for name, t in report["tasks"].items():
        for i, (metric, s) in enumerate(t["scores"].items()):
            lo, hi = s["ci95"]
            lines.append(
                f"{name:<12}{metric:<17}{s['score']:>8.1%}  {f'{lo:.1%}–{hi:.1%}':<15}{s['items']:>6}"
                + (f"{t['seconds']:>8.0f}s" if i == 0 else "")
            )
    return "\n".join(lines)
