"""Calibration text: the samples that calibrated methods (AWQ, GPTQ) run through the model.

By default, source code and docstrings of Python's own standard library: real text that ships
with every Python, needs no download, and suits code models. It never contains the evaluation
texts of the quality table. `--calib FILE|DIR` takes plain text files (.txt, .md, .py, …) or
JSONL with a "text" field per line.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig

import mlx.core as mx

from .errors import ConvertError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".jsonl")
# Standard-library folders that are mostly test data or generated tables, not representative.
SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "encodings", "idlelib"}
# textwrap.py is the code text of the shared quality evaluation (the fixture's texts); keeping it
# out means the default calibration never sees what the quality table scores.
SKIP_FILES = {"textwrap.py"}


def stdlib_files() -> list[str]:
    """Sorted paths of the standard library's .py files (the default calibration text)."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        found += [
            os.path.join(folder, f)
            for f in sorted(files)
            if f.endswith(".py") and not (folder == root and f in SKIP_FILES)
        ]
    return found


def _files(path: str) -> list[str]:
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return [p]
    if os.path.isdir(p):
        found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(TEXT_SUFFIXES))
        if not found:
            raise ConvertError(f"--calib {path}: no text files ({', '.join(TEXT_SUFFIXES)}) in it")
        return found
    raise ConvertError(f"--calib {path}: no such file or folder")


def read_texts(path: str) -> list[str]:
    """The documents in a file: the whole file, or one per JSONL line ("text" field)."""
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return [f.read()]
            texts = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    raise ConvertError(f"--calib {path}:{n}: not valid JSON") from None
                if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                    raise ConvertError(f'--calib {path}:{n}: expected an object with a "text" string')
                texts.append(item["text"])
            return texts
    except UnicodeDecodeError:
        raise ConvertError(f"--calib {path}: not a UTF-8 text file") from None


def calibration_tokens(tokenizer, calib: str | None, n_samples: int, seq_len: int, seed: int = 0):
    """(n, seq_len) token ids cut from the calibration text, documents in a seeded random order.

    The default text takes at most one sample's worth of tokens from each module.
    Documents are read only until enough tokens are gathered. Fewer samples are returned when
    the text is short; none at all is an error naming --calib.
    """
    if n_samples < 1 or seq_len < 2:
        raise ConvertError("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 2")
    files = stdlib_files() if calib is None else _files(calib)
    random.Random(seed).shuffle(files)
    # The standard library's modules are many and long: one sample's worth from each spreads
    # the calibration over many of them. A user's text is taken as it comes.
    per_doc = seq_len if calib is None else None
    need = n_samples * seq_len
    ids: list[int] = []
    for path in files:
        for text in read_texts(path):
            ids += tokenizer.encode(text)[:per_doc]
            if len(ids) >= need:
                break
        if len(ids) >= need:
            break
    n = min(n_samples, len(ids) // seq_len)
    if n == 0:
        where = calib or "the standard library"
        raise ConvertError(
            f"--calib {where}: has {len(ids)} tokens, fewer than one sample of --calib-seq-len {seq_len}"
        )
    return mx.array(ids[: n * seq_len]).reshape(n, seq_len)
