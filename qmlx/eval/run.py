"""`qmlx eval`: score a model (and adapter) on tasks; a table on stdout, every item in a JSON file.

Tasks: `humaneval` (pass@k), `mmlu` (accuracy, per category and subject), `gsm8k` (accuracy of the final
number), the five KoBEST tasks `kobest_boolq` … `kobest_sentineg` (macro-F1 and accuracy; `kobest` runs all
five and adds their average as the task `kobest`), and custom tasks: a `--tasks` entry that is a path
ending in `.jsonl` (`qmlx.eval.custom`). Each task is a loader (its data, read before the model loads, so
a mistake in a file ends the run at once) and a runner, in `REGISTRY`.

Each finished item is appended to `<out>.items.jsonl` as soon as it is scored, under a key of the
settings that decide it (model, adapter, data, mode, sampling, shots), so Ctrl-C and the same command
again continue where it stopped; other settings start afresh. Items are keyed by their place in the
task's data (not in the `--stride`/`--limit` selection), so a larger run reuses a smaller one's items.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from . import custom, gsm8k, humaneval, kobest, mmlu
from . import data as files
from .sandbox import Limits

KOBEST = tuple(f"kobest_{s}" for s in kobest.SUBSETS)
GROUPS = {"kobest": KOBEST}  # a name for several tasks; the report adds their average under it


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


def proportion(rights: list[bool]) -> dict:
    """A score of right/wrong items: the fraction, its Wilson interval, the count."""
    lo, hi = wilson(sum(rights), len(rights))
    return {"score": sum(rights) / len(rights) if rights else 0.0, "ci95": [lo, hi], "items": len(rights)}


def is_custom(name: str) -> bool:
    return name.endswith(".jsonl")


def adapter_identity(folder: str) -> str:
    """A digest of an adapter's files (a few MB): one retrained at the same path is another adapter."""
    from ..lora.adapters import CONFIG, WEIGHTS

    parts = [
        files.file_digest(os.path.join(folder, n))
        for n in (CONFIG, WEIGHTS)
        if os.path.isfile(os.path.join(folder, n))
    ]
    return "-".join(p[:16] for p in parts)


def parse_tasks(spec: str) -> list[str]:
    """The task names of a `--tasks` list, groups expanded, each once (a custom task's file is read later)."""
    names: list[str] = []
    for t in (t.strip() for t in spec.split(",")):
        if not t:
            continue
        if t in GROUPS:
            expanded = list(GROUPS[t])
        elif t in REGISTRY or is_custom(t):
            expanded = [t]
        else:
            raise UserError(
                f"--tasks: unknown task {t!r}; available: {', '.join(AVAILABLE)}, or a FILE.jsonl of your own"
            )
        names += [n for n in expanded if n not in names]
    if not names:
        raise UserError("--tasks: none given")
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


@dataclass
class Run:
    """What every task's runner gets: the flags, the model (once loaded), where items are cached."""

    base: dict  # model, adapter, data: part of every task's settings
    data: str | None
    limit: int | None
    stride: int
    shots: int | None  # None: each task's default
    mode: str
    samples: int
    temperature: float
    max_tokens: int
    timeout: float
    batch_size: int
    seed: int
    out: str | None
    progress: bool
    data_tasks: int  # how many of the tasks read --data
    model: Any = None
    tok: Any = None
    available: dict = field(default_factory=dict)  # task -> items in its data (the report's `available`)

    def pick(self, n: int, name: str) -> list[int]:
        """The indexes of a task's items that run: every stride-th, then the first `limit`."""
        self.available[name] = n
        return list(range(n))[:: self.stride][: self.limit]

    def cache(self, settings: dict) -> ItemCache:
        return ItemCache(self.out + ".items.jsonl" if self.out else None, settings)

    def mode_for(self, chat_by_default: bool) -> str:
        """--mode, or for auto: the chat template when the task is prompted through it by default and the
        model has one, else raw text."""
        if self.mode != "auto":
            return self.mode
        return "chat" if chat_by_default and self.tok.chat_template else "complete"


def _strip(item: dict) -> dict:
    return {k: v for k, v in item.items() if k != "key"}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# Items scored per call of continuation_logprobs (one cache append per item after each call).
CHOICE_CHUNK = 32


def _choice_items(
    run: Run,
    name: str,
    cache: ItemCache,
    indexes: list[int],
    make_items: Callable[[list[int]], list],
    record: Callable[[int, list[float]], dict],
) -> list[dict]:
    """Score the items by log-likelihood (those not in the cache), a chunk per call; every item's record."""
    from .choices import continuation_logprobs

    todo = [i for i in indexes if (f"{name}/{i}", 0) not in cache.items]
    start, resumed = time.perf_counter(), len(indexes) - len(todo)
    for c in range(0, len(todo), CHOICE_CHUNK):
        chunk = todo[c : c + CHOICE_CHUNK]
        for i, lp in zip(chunk, continuation_logprobs(run.model, make_items(chunk))):
            cache.add({"task_id": f"{name}/{i}", "sample": 0, **record(i, lp)})
        done = resumed + c + len(chunk)
        _progress(run.progress, name, done, len(indexes), start, done - resumed)
    return [_strip(cache.items[(f"{name}/{i}", 0)]) for i in indexes]


def _generated_items(
    run: Run,
    name: str,
    cache: ItemCache,
    indexes: list[int],
    prompt_of: Callable[[int], tuple[str, tuple[str, ...] | None]],
    record: Callable[[int, str, str], dict],
) -> list[dict]:
    """Generate for the items not in the cache, --batch-size prompts per batch_generate call (prompts with
    the same stop strings together); every item's record. Item i samples with seed `--seed + i`."""
    from ..batch import batch_generate
    from ..sample import make_sampler

    todo = [i for i in indexes if (f"{name}/{i}", 0) not in cache.items]
    start, resumed = time.perf_counter(), len(indexes) - len(todo)
    for c in range(0, len(todo), run.batch_size):
        chunk = todo[c : c + run.batch_size]
        prompts = {i: prompt_of(i) for i in chunk}
        by_stop: dict[tuple[str, ...] | None, list[int]] = {}
        for i in chunk:
            by_stop.setdefault(prompts[i][1], []).append(i)
        for stop, group in by_stop.items():
            samplers = [make_sampler(run.temperature, seed=run.seed + i) for i in group]
            results = batch_generate(
                run.model, run.tok, [prompts[i][0] for i in group], run.max_tokens, sampler=samplers,
                repetition_penalty=1.0, stop=list(stop) if stop else None,
            )  # fmt: skip
            for i, r in zip(group, results):
                cache.add({"task_id": f"{name}/{i}", "sample": 0, **record(i, prompts[i][0], r.text)})
        done = resumed + c + len(chunk)
        _progress(run.progress, name, done, len(indexes), start, done - resumed)
    return [_strip(cache.items[(f"{name}/{i}", 0)]) for i in indexes]


# ------------------------------------------------------------------ HumanEval


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
    problems: list[humaneval.Problem],
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
    problems = problems[::stride][:limit]
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


def _run_humaneval(run: Run, name: str, problems: list[humaneval.Problem]) -> dict:
    # auto: through the chat template when there is one (as instruct models are evaluated).
    run.available[name] = len(problems)
    settings = {**run.base, "task": name, "mode": run.mode_for(True), "samples": run.samples,
                "temperature": run.temperature, "max_tokens": run.max_tokens, "timeout": run.timeout,
                "seed": run.seed}  # fmt: skip
    result = _humaneval(run.model, run.tok, settings, problems, run.limit, run.stride, run.samples,
                        run.temperature, run.max_tokens, run.timeout, run.batch_size, run.seed,
                        run.cache(settings), run.progress)  # fmt: skip
    return {"settings": settings, **result}


# ------------------------------------------------------------------ MMLU


def _run_mmlu(run: Run, name: str, loaded) -> dict:
    test, dev = loaded
    shots = run.shots or 0
    # auto: raw text (the log-likelihood convention).
    settings = {**run.base, "task": name, "mode": run.mode_for(False), "shots": shots}
    start, indexes = time.perf_counter(), run.pick(len(test), name)
    chat = settings["mode"] == "chat"
    items = _choice_items(
        run, name, run.cache(settings), indexes,
        lambda chunk: mmlu.items([test[i] for i in chunk], dev, shots, run.tok, chat),
        lambda i, lp: {"subject": test[i].subject, "answer": test[i].answer, "chosen": _argmax(lp), "logprobs": lp},
    )  # fmt: skip
    groups: dict[str, list[bool]] = {"overall": []}
    for it in items:
        right = it["chosen"] == it["answer"]
        for g in ("overall", mmlu.CATEGORY[it["subject"]], it["subject"]):
            groups.setdefault(g, []).append(right)
    categories = [c for c in mmlu.CATEGORIES if c in groups]
    return {
        "settings": settings,
        "problems": len(items),
        "scores": {
            "accuracy": proportion(groups["overall"]),
            **{c: proportion(groups[c]) for c in categories},
        },
        "subjects": {s: proportion(groups[s]) for s in sorted(groups) if s in mmlu.CATEGORY},
        "seconds": time.perf_counter() - start,
        "items": items,
    }


# ------------------------------------------------------------------ GSM8K


def _load_gsm8k(run: Run, name: str):
    return gsm8k.load(run.data, gsm8k.DEFAULT_SHOTS if run.shots is None else run.shots)


def _run_gsm8k(run: Run, name: str, loaded) -> dict:
    test, examples = loaded
    # auto: through the chat template when there is one (the shots become earlier turns).
    mode = run.mode_for(True)
    settings = {**run.base, "task": name, "mode": mode, "shots": len(examples), "temperature": run.temperature,
                "max_tokens": run.max_tokens, "seed": run.seed}  # fmt: skip
    start, indexes = time.perf_counter(), run.pick(len(test), name)

    def prompt_of(i: int):
        q = test[i].question
        if mode == "chat":
            return run.tok.apply_chat_template(
                gsm8k.chat_messages(q, examples), add_generation_prompt=True
            ), gsm8k.STOPS
        return gsm8k.prompt(q, examples), gsm8k.STOPS

    def record(i: int, prompt: str, output: str) -> dict:
        got = gsm8k.extract(output)
        return {"question": test[i].question, "prompt": prompt, "output": output, "extracted": got,
                "reference": test[i].reference, "correct": gsm8k.same(got, test[i].reference)}  # fmt: skip

    items = _generated_items(run, name, run.cache(settings), indexes, prompt_of, record)
    return {
        "settings": settings,
        "problems": len(items),
        "scores": {"accuracy": proportion([it["correct"] for it in items])},
        "no_number": sum(it["extracted"] is None for it in items),
        "seconds": time.perf_counter() - start,
        "items": items,
    }


# ------------------------------------------------------------------ KoBEST


def _load_kobest(run: Run, name: str):
    return kobest.load(name.removeprefix("kobest_"), run.data, run.shots or 0, alone=run.data_tasks == 1)


def _run_kobest(run: Run, name: str, loaded) -> dict:
    test, examples = loaded
    # auto: raw text (the log-likelihood convention).
    settings = {
        **run.base,
        "task": name,
        "mode": run.mode_for(False),
        "shots": len(examples),
        "split": "test",
    }
    start, indexes = time.perf_counter(), run.pick(len(test), name)
    chat = settings["mode"] == "chat"
    items = _choice_items(
        run, name, run.cache(settings), indexes,
        lambda chunk: kobest.items([test[i] for i in chunk], examples, run.tok, chat),
        lambda i, lp: {"prompt": kobest.prompt(test[i]), "choices": kobest.choices(test[i]), "label": test[i].label,
                       "chosen": _argmax(lp), "logprobs": lp},
    )  # fmt: skip
    gold, chosen = [it["label"] for it in items], [it["chosen"] for it in items]
    lo, hi = kobest.macro_f1_interval(gold, chosen, seed=run.seed)
    return {
        "settings": settings,
        "problems": len(items),
        "scores": {
            "macro_f1": {"score": kobest.macro_f1(gold, chosen), "ci95": [lo, hi], "items": len(items)},
            "accuracy": proportion([g == c for g, c in zip(gold, chosen)]),
        },
        "seconds": time.perf_counter() - start,
        "items": items,
    }


def _average(report: dict, group: str, members: list[str]) -> dict:
    """A group's entry: the unweighted mean of its tasks' scores (no interval), their items and time."""
    tasks = [report["tasks"][n] for n in members]
    scores = {}
    for metric in tasks[0]["scores"]:
        values = [t["scores"][metric]["score"] for t in tasks]
        items = sum(t["scores"][metric]["items"] for t in tasks)
        scores[metric] = {"score": sum(values) / len(values), "ci95": None, "items": items}
    return {"settings": {"task": group, "tasks": members}, "group": members,
            "problems": sum(t["problems"] for t in tasks), "scores": scores,
            "seconds": sum(t["seconds"] for t in tasks), "items": []}  # fmt: skip


# ------------------------------------------------------------------ custom JSONL tasks


def _run_custom(run: Run, name: str, items: list[custom.Item]) -> dict:
    from .choices import choice_item

    # auto: choices as raw text (the log-likelihood convention), generation through the chat template.
    choice_mode, generate_mode = run.mode_for(False), run.mode_for(True)
    settings = {**run.base, "data": os.path.abspath(name), "task": name, "sha256": files.file_digest(name),
                "mode": choice_mode, "generate_mode": generate_mode, "temperature": run.temperature,
                "max_tokens": run.max_tokens, "seed": run.seed}  # fmt: skip
    start, indexes = time.perf_counter(), run.pick(len(items), name)
    cache = run.cache(settings)
    chat = choice_mode == "chat"
    picked = [i for i in indexes if items[i].kind == "choices"]
    scored = _choice_items(
        run, name, cache, picked,
        lambda chunk: [choice_item(run.tok, items[i].prompt, items[i].choices, chat) for i in chunk],
        lambda i, lp: {"id": items[i].id, "kind": "choices", "prompt": items[i].prompt, "choices": items[i].choices,
                       "answer": items[i].answer, "chosen": _argmax(lp), "logprobs": lp,
                       "correct": _argmax(lp) == items[i].answer},
    ) if picked else []  # fmt: skip

    def prompt_of(i: int):
        it = items[i]
        if generate_mode == "chat":
            text = run.tok.apply_chat_template(
                [{"role": "user", "content": it.prompt}], add_generation_prompt=True
            )
            return text, it.stop
        return it.prompt, it.stop or custom.DEFAULT_STOP

    def record(i: int, prompt: str, output: str) -> dict:
        it = items[i]
        return {"id": it.id, "kind": "generate", "prompt": it.prompt, "output": output, "answer": it.answer,
                "match": it.match, "correct": custom.correct(it, output)}  # fmt: skip

    wanted = [i for i in indexes if items[i].kind == "generate"]
    generated = _generated_items(run, name, cache, wanted, prompt_of, record) if wanted else []
    by_index = dict(zip(picked, scored)) | dict(zip(wanted, generated))
    ordered = [by_index[i] for i in indexes]
    scores = {"accuracy": proportion([it["correct"] for it in ordered])}
    if scored and generated:
        scores["choices"] = proportion([it["correct"] for it in scored])
        scores["generated"] = proportion([it["correct"] for it in generated])
    return {"settings": settings, "problems": len(ordered), "scores": scores,
            "seconds": time.perf_counter() - start, "items": ordered}  # fmt: skip


@dataclass(frozen=True)
class Task:
    load: Callable[[Run, str], Any]  # the task's data (before the model loads)
    run: Callable[[Run, str, Any], dict]  # settings, scores, items


REGISTRY: dict[str, Task] = {
    "humaneval": Task(lambda run, name: humaneval.load_problems(run.data), _run_humaneval),
    "mmlu": Task(lambda run, name: mmlu.load(run.data), _run_mmlu),
    "gsm8k": Task(_load_gsm8k, _run_gsm8k),
    **{name: Task(_load_kobest, _run_kobest) for name in KOBEST},
}
CUSTOM = Task(lambda run, name: custom.load(name), _run_custom)
AVAILABLE = ("humaneval", "mmlu", "gsm8k", "kobest", *KOBEST)


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
    shots: int | None = None,
    stride: int = 1,
) -> dict:
    """Run the tasks; returns (and writes to `out`) settings, scores and every item.

    `shots` None is each task's default: 8 for gsm8k, 0 for the others."""
    import qmlx

    names = parse_tasks(tasks)
    if samples < 1 or batch_size < 1 or max_tokens < 1 or timeout <= 0 or (shots is not None and shots < 0):
        raise UserError(
            "--samples, --batch-size and --max-tokens must be at least 1, --timeout positive, --shots at least 0"
        )
    if samples > 1 and temperature <= 0:
        raise UserError("--samples above 1 needs --temperature above 0 (greedy samples are all the same)")
    if temperature < 0:
        raise UserError(f"--temperature must be at least 0, got {temperature}")
    if stride < 1:
        raise UserError(f"--stride must be at least 1, got {stride}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if mode not in ("auto", "chat", "complete"):
        raise UserError(f"--mode must be auto, chat or complete, got {mode!r}")
    reading = [n for n in names if not is_custom(n)]  # the tasks --data is for
    if data and not reading:
        raise UserError("--data is for a built-in task; a custom task's file is its own --tasks entry")
    if data and len(reading) > 1:
        if not all(n in KOBEST for n in reading):
            raise UserError("--data names one task's data (or a KoBEST folder): give one task with it")
        if not os.path.isdir(data):
            raise UserError(
                f"--data {data}: several KoBEST tasks read a folder (boolq/, copa/, …), not one file"
            )
    # What decides an item (the cache's key); --limit and --stride only choose which items run.
    base = {
        "model": os.path.abspath(model) if os.path.exists(model) else model,
        "adapter": os.path.abspath(adapter) if adapter else None,
        "data": data,
    }
    run = Run(base, data, limit, stride, shots, mode, samples, temperature, max_tokens, timeout, batch_size,
              seed, out, progress, len(reading))  # fmt: skip
    loaded = {n: (CUSTOM if is_custom(n) else REGISTRY[n]).load(run, n) for n in names}
    run.model, run.tok = qmlx.load(model, adapter=adapter)
    # What the weights are, not only where: a retrained adapter (or model) at the same path is scored afresh.
    from ..prompt_cache import model_identity

    base["identity"] = {
        "model": model_identity(run.model),
        **({"adapter": adapter_identity(adapter)} if adapter else {}),
    }
    report: dict = {"settings": {**base, "tasks": names, "limit": limit, "stride": stride}, "tasks": {}}
    for name in names:
        report["tasks"][name] = (CUSTOM if is_custom(name) else REGISTRY[name]).run(run, name, loaded[name])
        if name in run.available:  # how many items the task has (a --limit run scores fewer)
            report["tasks"][name]["available"] = run.available[name]
    asked = {t.strip() for t in tasks.split(",")}
    for group, members in GROUPS.items():
        if group in asked:
            report["tasks"][group] = _average(report, group, list(members))
    if out:
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        os.replace(tmp, out)
    return report


def table(report: dict) -> str:
    width = max([12, *(len(n) + 2 for n in report["tasks"])])
    lines = [f"{'task':<{width}}{'metric':<17}{'score':>8}  {'95% CI':<15}{'items':>6}{'time':>9}"]
    for name, t in report["tasks"].items():
        for i, (metric, s) in enumerate(t["scores"].items()):
            ci = f"{s['ci95'][0]:.1%}–{s['ci95'][1]:.1%}" if s.get("ci95") else "(mean)"
            lines.append(
                f"{name:<{width}}{metric:<17}{s['score']:>8.1%}  {ci:<15}{s['items']:>6}"
                + (f"{t['seconds']:>8.0f}s" if i == 0 else "")
            )
    return "\n".join(lines)
