"""Custom tasks: a JSONL file of your own questions, named in `--tasks` by its path (ending in `.jsonl`).

Each line is one item, of one of two kinds (a file may mix them):

- choices, scored by log-likelihood: `{"prompt": "…", "choices": ["…", "…"], "answer": 1}` (the answer
  is the right choice's index, or its text). In raw-text mode each choice follows the prompt after one
  space (none when the prompt ends in whitespace or the choice starts with it); through the chat template
  the prompt is the user's message and the choice starts the reply. Right when the most likely choice is
  the answer.
- generation, greedy: `{"prompt": "…", "answer": "…"}`, with optional `"match"`: `"exact"` (the default:
  the output equals the answer after trimming, collapsing whitespace and ignoring case), `"contains"` (the
  answer, so normalised, occurs in the output) or `"number"` (the output's number, found as GSM8K finds
  it, equals the answer's), and optional `"stop"` (a string or a list: where the output ends; by default
  at a blank line in raw-text mode, at the end of the reply through the chat template).

Optional `"id"` (text or a number, unique in the file) names the item in the report. Other fields are
ignored. `--mode auto` prompts choices as raw text and generation through the chat template when the
model has one.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import data as files
from .data import DataError
from .gsm8k import extract, same

MATCHES = ("exact", "contains", "number")
DEFAULT_STOP = ("\n\n",)  # raw-text generation ends at a blank line unless the line says otherwise


@dataclass
class Item:
    id: str
    prompt: str
    answer: int | str  # the choice index, or the text to generate
    choices: list[str] | None = None
    match: str = "exact"
    stop: tuple[str, ...] | None = None  # None: the default of the mode

    @property
    def kind(self) -> str:
        return "choices" if self.choices is not None else "generate"


def _item(row: dict, where: str, n: int) -> Item:
    prompt = files.text(row, "prompt", where)
    if not prompt.strip():
        raise DataError(f"{where}: field 'prompt' is empty")
    if "answer" not in row:
        raise DataError(f"{where}: missing field 'answer'")
    answer = row["answer"]
    ident = row.get("id", n)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise DataError(f"{where}: field 'id' must be text or an integer, got {ident!r}")
    if "choices" in row:
        choices = row["choices"]
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)
        ):
            raise DataError(f"{where}: field 'choices' must be a list of at least two non-empty texts")
        if isinstance(answer, str):
            matches = [i for i, c in enumerate(choices) if c == answer] or [
                i for i, c in enumerate(choices) if c.strip() == answer.strip()
            ]
            if not matches:
                raise DataError(f"{where}: field 'answer' {answer!r} is not one of the choices")
            answer = matches[0]
        elif isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(
                f"{where}: field 'answer' must be a choice's index 0–{len(choices) - 1} or its text, got {answer!r}"
            )
        for f in ("match", "stop"):
            if f in row:
                raise DataError(f"{where}: field {f!r} is for generated answers, not a line with 'choices'")
        return Item(str(ident), prompt, answer, choices)
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field 'answer' must be the expected text (or add 'choices')")
    match = row.get("match", "exact")
    if match not in MATCHES:
        raise DataError(f"{where}: field 'match' must be one of {', '.join(MATCHES)}, got {match!r}")
    if match == "number" and extract(answer) is None:
        raise DataError(f'{where}: field \'answer\' has no number ("match": "number")')
    stop = row.get("stop")
    if stop is not None:
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not stop or not all(isinstance(s, str) and s for s in stop):
            raise DataError(f"{where}: field 'stop' must be a non-empty text or a list of them")
        stop = tuple(stop)
    return Item(str(ident), prompt, answer, None, match, stop)


def load(path: str) -> list[Item]:
    if not path.endswith(".jsonl"):
        raise DataError(f"{path}: a custom task is a .jsonl file")
    out, seen = [], {}
    for n, (where, row) in enumerate(files.rows(path)):
        item = _item(row, where, n)
        if item.id in seen:
            raise DataError(f"{where}: field 'id' {item.id!r} repeats line {seen[item.id]}")
        seen[item.id] = where.rpartition(":")[2]
        out.append(item)
    if not out:
        raise DataError(f"{path}: no items")
    return out


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def correct(item: Item, output: str) -> bool:
    """Whether a generated output matches the item's answer."""
    if item.match == "number":
        return same(extract(output), extract(str(item.answer)) or "0")  # the answer has one (checked)
    if item.match == "contains":
        return _normal(str(item.answer)) in _normal(output)
    return _normal(output) == _normal(str(item.answer))
