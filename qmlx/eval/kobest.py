"""KoBEST: five Korean understanding tasks, each answer chosen by log-likelihood, scored by macro-F1.

Tasks (Hugging Face `skt/kobest_v1`, the test split; labels as the dataset defines them):

| task | columns | prompt (raw text) | choices, label 0 … |
|---|---|---|---|
| `kobest_boolq` | paragraph, question, label | "{paragraph}\\n질문: {question}\\n답변:" | 아니오, 예 |
| `kobest_copa` | premise, question (원인/결과), alternative_1, alternative_2, label | "{premise} 왜냐하면" (원인) or "{premise} 그래서" (결과) | alternative_1, alternative_2 |
| `kobest_wic` | word, context_1, context_2, label | "문장 1: {context_1}\\n문장 2: {context_2}\\n질문: 두 문장에서 '{word}'의 의미가 같은가?\\n답변:" | 아니오, 예 |
| `kobest_hellaswag` | context, ending_1 … ending_4, label | "{context}" | ending_1 … ending_4 |
| `kobest_sentineg` | sentence, label | "문장: {sentence}\\n감정(긍정 또는 부정):" | 부정, 긍정 |

Each choice is scored as a continuation after one space (the convention of KoBEST's log-likelihood
evaluation: COPA's alternative completes the premise after the connective, the others answer after
"답변:"/"감정…:"). With k shots the first k train examples of the task come first, each with its right
choice, separated by blank lines. With `--mode chat` the same text is the user's message and the choice
starts the reply. Metrics: macro-F1 over the classes (the KoBEST paper's metric; a class is the gold
label or the chosen one), with a bootstrap 95% interval, and accuracy with Wilson's.

Data: `--data DIR` holds one subfolder per task in the Hub's layout (`boolq/test.jsonl`, …, as
`huggingface-cli download skt/kobest_v1 --repo-type dataset --local-dir DIR` leaves it; or the Hub's
parquet conversion `boolq/test/0000.parquet`; or `boolq/test-00000-of-00001.parquet`), or one file per
task (`DIR/boolq.jsonl` or `.parquet`: the questions, no shots). With one task, `--data` may also be
that task's folder or a single file (shots then read the train split beside it). Without `--data` the
Hub's `<task>/test.jsonl` (and `train.jsonl` for shots) are downloaded into its cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import data as files
from .data import DataError

REPO = "skt/kobest_v1"
SUBSETS = ("boolq", "copa", "wic", "hellaswag", "sentineg")
COLUMNS = {
    "boolq": ("paragraph", "question"),
    "copa": ("premise", "question", "alternative_1", "alternative_2"),
    "wic": ("word", "context_1", "context_2"),
    "hellaswag": ("context", "ending_1", "ending_2", "ending_3", "ending_4"),
    "sentineg": ("sentence",),
}
CLASSES = {"boolq": 2, "copa": 2, "wic": 2, "hellaswag": 4, "sentineg": 2}
CONNECTIVES = {"원인": "왜냐하면", "결과": "그래서"}  # cause: "because", effect: "so"
YES_NO = ("아니오", "예")
SENTIMENTS = ("부정", "긍정")
HINT = "pass --data DIR with the task's folder (e.g. boolq/test.jsonl) in the Hub's layout"


@dataclass
class Example:
    subset: str
    fields: dict[str, str]
    label: int


def prompt(ex: Example) -> str:
    f = {k: v.strip() for k, v in ex.fields.items()}
    if ex.subset == "boolq":
        return f"{f['paragraph']}\n질문: {f['question']}\n답변:"
    if ex.subset == "copa":
        return f"{f['premise']} {CONNECTIVES[f['question']]}"
    if ex.subset == "wic":
        return f"문장 1: {f['context_1']}\n문장 2: {f['context_2']}\n질문: 두 문장에서 '{f['word']}'의 의미가 같은가?\n답변:"
    if ex.subset == "hellaswag":
        return f["context"]
    return f"문장: {f['sentence']}\n감정(긍정 또는 부정):"


def choices(ex: Example) -> list[str]:
    if ex.subset in ("boolq", "wic"):
        return list(YES_NO)
    if ex.subset == "sentineg":
        return list(SENTIMENTS)
    names = ("alternative_1", "alternative_2") if ex.subset == "copa" else COLUMNS["hellaswag"][1:]
    return [ex.fields[n].strip() for n in names]


def full_prompt(ex: Example, shots: list[Example]) -> str:
    blocks = [f"{prompt(s)} {choices(s)[s.label]}\n\n" for s in shots]
    return "".join(blocks) + prompt(ex)


def items(examples: list[Example], shots: list[Example], tokenizer, chat: bool):
    """(context tokens, [continuation tokens per choice]) per example, for `continuation_logprobs`."""
    from .choices import choice_item

    return [choice_item(tokenizer, full_prompt(ex, shots), choices(ex), chat) for ex in examples]


def _examples(subset: str, paths: list[str]) -> list[Example]:
    out = []
    for where, row in files.rows(paths):
        fields = {c: files.text(row, c, where) for c in COLUMNS[subset]}
        for c in COLUMNS[subset]:
            if not fields[c].strip():
                raise DataError(f"{where}: field {c!r} is empty")
        if subset == "copa" and fields["question"].strip() not in CONNECTIVES:
            raise DataError(f"{where}: field 'question' must be 원인 or 결과, got {fields['question']!r}")
        out.append(Example(subset, fields, files.label(row, "label", where, CLASSES[subset])))
    if not out:
        raise DataError(f"{', '.join(paths)}: no examples")
    return out


def _in_folder(subset: str, folder: str, split: str, alone: bool) -> tuple[list[str], list[str]]:
    """(the split's files, the train split's files) of a task in a folder; ([], []) when it is not there."""
    names = {subset, f"kobest_{subset}"}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        stem, ext = os.path.splitext(entry)
        if os.path.isdir(path) and entry.lower() in names:
            return files.split_files(path, split), files.split_files(path, "train")
        if os.path.isfile(path) and stem.lower() in names and ext in files.EXTENSIONS:
            return [path], []
    if alone:  # the task's own folder
        return files.split_files(folder, split), files.split_files(folder, "train")
    return [], []


def load(subset: str, data: str | None, shots: int = 0, split: str = "test", alone: bool = True):
    """(the split's examples, the first `shots` train examples) of one task."""
    name = f"kobest_{subset}"
    if data is None:
        test = [files.hub_file(REPO, f"{subset}/{split}.jsonl", name, HINT)]
        train = [files.hub_file(REPO, f"{subset}/train.jsonl", name, HINT)] if shots else []
    elif os.path.isdir(data):
        test, train = _in_folder(subset, data, split, alone)
        if not test:
            raise DataError(
                f"{data}: no KoBEST {subset} {split} split ({subset}/{split}.jsonl, {subset}/{split}/*.parquet "
                f"or {subset}.jsonl)"
            )
    elif os.path.isfile(data):
        test, train = [data], files.sibling_split(data, "train") if shots else []
    else:
        raise DataError(f"{data}: no such KoBEST file or folder")
    if shots and not train:
        raise DataError(
            f"--shots {shots} needs {name}'s train split ({subset}/train.jsonl beside the {split} split); "
            "or pass --shots 0"
        )
    examples = _examples(subset, train)[:shots] if shots else []
    if len(examples) < shots:
        raise DataError(f"--shots {shots}: {name}'s train split has only {len(examples)} examples")
    return _examples(subset, test), examples


def macro_f1(gold: list[int], chosen: list[int]) -> float:
    """The mean over classes (those that are a gold label or a choice) of F1 = 2·TP / (2·TP + FP + FN)."""
    classes = sorted(set(gold) | set(chosen))
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, chosen))
        fp = sum(g != c and p == c for g, p in zip(gold, chosen))
        fn = sum(g == c and p != c for g, p in zip(gold, chosen))
        total += 2 * tp / (2 * tp + fp + fn)
    return total / len(classes)


def macro_f1_interval(gold: list[int], chosen: list[int], resamples: int = 1000, seed: int = 0):
    """A percentile bootstrap 95% interval of macro-F1 (items resampled with replacement)."""
    import numpy as np

    n = len(gold)
    if n < 2:
        return 0.0, 1.0
    g, p = np.asarray(gold), np.asarray(chosen)
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    gs, ps = g[rows], p[rows]
    scores = np.zeros(resamples)
    present = np.zeros(resamples)
    for c in sorted(set(gold) | set(chosen)):
        tp = ((gs == c) & (ps == c)).sum(1)
        fp = ((gs != c) & (ps == c)).sum(1)
        fn = ((gs == c) & (ps != c)).sum(1)
        denominator = 2 * tp + fp + fn
        scores += np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
        present += denominator > 0
    values = scores / np.maximum(present, 1)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)
