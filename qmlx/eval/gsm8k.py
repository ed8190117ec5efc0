"""GSM8K: grade-school math word problems, answered with worked reasoning that ends in `#### N`.

k-shot chain of thought (8 shots unless `--shots` says otherwise): the first k problems of the train
split, the same for every question, each with its full reference answer (the reasoning, with the
dataset's `<<48/2=24>>` calculator notes, then `#### N`). Two prompt modes:

- `complete`: "Question: …\\nAnswer: …" blocks separated by a blank line, then "Question: …\\nAnswer:";
  the generation stops where the next question would start ("Question:").
- `chat` (default for a model with a chat template): each shot is a user turn (the question) and an
  assistant turn (its reference answer), then the question as the last user turn.

Generation is greedy (or `--temperature`). The answer is the number after `####` in the generation,
else the last number in it; it is right when it equals, as a number, the one after `####` in the
reference (`$`, thousands commas and a trailing `.` do not count: "$1,234.00" is 1234).

Data, in the published formats (columns `question`, `answer`): Hugging Face's `openai/gsm8k` (config
`main`: `main/test-00000-of-00001.parquet`, `main/train-00000-of-00001.parquet`) or the original GitHub
release's `test.jsonl` and `train.jsonl`. `--data` is a folder holding either layout, or one file (the
questions; shots then read the train split beside it). Without `--data` the Hub's files are downloaded
into its cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from . import data as files
from .data import DataError

REPO = "openai/gsm8k"
HUB_FILES = {"test": "main/test-00000-of-00001.parquet", "train": "main/train-00000-of-00001.parquet"}
DEFAULT_SHOTS = 8
STOPS = ("Question:",)
HINT = "pass --data with the test (and train) split: a folder with main/*.parquet or test.jsonl, train.jsonl"

# An optional minus (not a hyphen: "3-4" is 3 and 4), an optional $, digits with optional thousands
# commas ("1,234"; "1,2,3" is three numbers), an optional decimal part.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\$?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass
class Problem:
    question: str
    answer: str  # the full reference answer: reasoning, then "#### N"
    reference: str  # N, normalised


def normalise(number: str) -> str | None:
    """A number as written ("$1,234.", "-0.50") as a canonical decimal string ("1234", "-0.5"), or None."""
    s = number.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    return format(d, "f") if d != 0 else "0"


def extract(text: str) -> str | None:
    """The answer in a generation: the first number after `####`, else the last number; None if no number."""
    head, sep, tail = text.partition("####")
    if sep:
        m = _NUMBER.search(tail)
        if m:
            return normalise(m.group())
    numbers = _NUMBER.findall(text)
    return normalise(numbers[-1]) if numbers else None


def same(extracted: str | None, reference: str) -> bool:
    return extracted is not None and Decimal(extracted) == Decimal(reference)


def _problems(paths: list[str]) -> list[Problem]:
    out = []
    for where, row in files.rows(paths):
        question, answer = files.text(row, "question", where), files.text(row, "answer", where)
        _, sep, tail = answer.rpartition("####")
        m = _NUMBER.search(tail) if sep else None
        if m is None:
            raise DataError(f"{where}: field 'answer' has no '#### N' final answer")
        out.append(Problem(question, answer, normalise(m.group()) or "0"))
    if not out:
        raise DataError(f"{', '.join(paths)}: no problems")
    return out


def _folder_split(folder: str, split: str) -> list[str]:
    return files.split_files(folder, split) or files.split_files(os.path.join(folder, "main"), split)


def load(data: str | None, shots: int) -> tuple[list[Problem], list[Problem]]:
    """(test problems, the first `shots` train problems)."""
    if data is None:
        test = [files.hub_file(REPO, HUB_FILES["test"], "gsm8k", HINT)]
        train = [files.hub_file(REPO, HUB_FILES["train"], "gsm8k", HINT)] if shots else []
    elif os.path.isdir(data):
        test = _folder_split(data, "test")
        if not test:
            raise DataError(f"{data}: no GSM8K test split (main/test-00000-of-00001.parquet or test.jsonl)")
        train = _folder_split(data, "train") if shots else []
        if shots and not train:
            raise DataError(
                f"--shots {shots} needs GSM8K's train split: {data} has no main/train-00000-of-00001.parquet "
                "or train.jsonl (or pass --shots 0)"
            )
    elif os.path.isfile(data):
        test = [data]
        train = files.sibling_split(data, "train") if shots else []
        if shots and not train:
            raise DataError(
                f"--shots {shots} needs GSM8K's train split beside {data} (train.jsonl or "
                "train-00000-of-00001.parquet in its folder), or pass --shots 0"
            )
    else:
        raise DataError(f"{data}: no such GSM8K file or folder")
    examples = _problems(train)[:shots] if shots else []
    if len(examples) < shots:
        raise DataError(f"--shots {shots}: the train split has only {len(examples)} problems")
    return _problems(test), examples


def prompt(question: str, shots: list[Problem]) -> str:
    blocks = [f"Question: {s.question.strip()}\nAnswer: {s.answer.strip()}\n\n" for s in shots]
    return "".join(blocks) + f"Question: {question.strip()}\nAnswer:"


def chat_messages(question: str, shots: list[Problem]) -> list[dict]:
    messages = []
    for s in shots:
        messages += [
            {"role": "user", "content": s.question.strip()},
            {"role": "assistant", "content": s.answer.strip()},
        ]
    return messages + [{"role": "user", "content": question.strip()}]
