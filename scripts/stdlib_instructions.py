"""A small real instruction set from the docstrings of Python's standard library.

Each public function of a few stdlib modules becomes one chat sample: the user asks what
`module.function` does, the assistant answers with the first paragraph of its docstring.
Samples are split into train/valid/test by a hash of the function's name, so the split is
the same on every machine with the same Python.

    python scripts/stdlib_instructions.py OUT_DIR
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import sys

MODULES = (
    "textwrap",
    "json",
    "os.path",
    "shutil",
    "itertools",
    "functools",
    "string",
    "re",
    "base64",
    "calendar",
    "statistics",
    "fnmatch",
    "glob",
    "tempfile",
    "html",
    "difflib",
    "heapq",
    "bisect",
    "random",
    "gzip",
    "zipfile",
    "tarfile",
    "csv",
    "urllib.parse",
    "inspect",
    "pathlib",
    "copy",
    "pprint",
    "operator",
    "collections",
    "math",
    "decimal",
    "fractions",
    "uuid",
    "hashlib",
    "time",
    "datetime",
    "locale",
    "logging",
    "argparse",
    "subprocess",
    "socket",
    "email.utils",
    "codecs",
)
SYSTEM = "Answer briefly."
MAX_ANSWER = 400  # characters of docstring kept per answer


def samples() -> list[tuple[str, dict]]:
    """(qualified name, chat record) for every documented public function, sorted by name."""
    out = {}
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            answer = doc.split("\n\n")[0].replace("\n", " ").strip()[:MAX_ANSWER]
            if len(answer) < 20:
                continue
            q = f"{mod_name}.{name}"
            out[q] = {
                "messages": [
                    # A short system turn: Qwen's template would otherwise add its 20-token default.
                    {"role": "system", "content": SYSTEM},
                    {
                        "role": "user",
                        "content": f"In Python, what does `{q}` do? Answer in its docstring's words.",
                    },
                    {"role": "assistant", "content": answer},
                ]
            }
    return sorted(out.items())


def split_of(name: str) -> str:
    h = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10
    return "valid" if h == 0 else "test" if h == 1 else "train"


def write(out_dir: str, limit: int | None = None) -> dict[str, int]:
    """Write train/valid/test.jsonl into `out_dir` (at most `limit` train samples); counts per split."""
    os.makedirs(out_dir, exist_ok=True)
    rows = {"train": [], "valid": [], "test": []}
    for name, rec in samples():
        rows[split_of(name)].append(rec)
    if limit is not None:
        rows = {k: v[: limit if k == "train" else max(limit // 8, 4)] for k, v in rows.items()}
    for split, recs in rows.items():
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    return {k: len(v) for k, v in rows.items()}


if __name__ == "__main__":
    print(write(sys.argv[1]))
