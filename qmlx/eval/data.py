"""Reading task data in the published formats: JSONL and Parquet rows, split files in a folder, the Hub.

Every row comes with where it was read (`file:line` for JSONL, `file: row N` for Parquet), so a
task's checks name the file, the line and the field. Parquet needs `pyarrow` (the `eval` extra);
files missing from `--data` are downloaded with `huggingface_hub` into its cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator

from ..errors import UserError

EXTENSIONS = (".jsonl", ".parquet")


class DataError(UserError):
    """Task data that cannot be read or is not in the expected format; the message names file, line, field."""


def file_digest(path: str) -> str:
    """A file's SHA-256 (in cache keys: an edited task file or a retrained adapter is scored afresh)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{n}: not valid JSON") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: not a JSON object")
                yield f"{path}:{n}", row
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow (pip install pyarrow, or qmlx[eval]); or pass JSONL"
        ) from None
    try:
        rows = pq.read_table(path).to_pylist()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:  # pyarrow's ArrowInvalid and kin: not a Parquet file (a Git LFS pointer, say)
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    for n, row in enumerate(rows, 1):
        yield f"{path}: row {n}", row


def rows(paths: str | list[str]) -> list[tuple[str, dict]]:
    """(where, row) of every row of the files (shards of one split, in order), JSONL or Parquet by name."""
    out = []
    for path in [paths] if isinstance(paths, str) else paths:
        if path.endswith(".parquet"):
            out.extend(_parquet_rows(path))
        else:
            out.extend(_jsonl_rows(path))
    return out


def text(row: dict, name: str, where: str) -> str:
    """The text field `name` of a row, or an error naming it."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def label(row: dict, name: str, where: str, n: int) -> int:
    """The class index field `name` (0 … n-1)."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DataError(f"{where}: field {name!r} must be an integer 0–{n - 1}, got {value!r}")
    return value


def split_files(folder: str, split: str) -> list[str]:
    """The files of `split` in a folder, in the layouts the Hub publishes: `<split>.jsonl`,
    `<split>.parquet`, `<split>-00000-of-0000N.parquet` shards, or `<split>/*.parquet` (its parquet conversion)."""
    for pattern in (
        f"{split}.jsonl",
        f"{split}.parquet",
        f"{split}-*.parquet",
        os.path.join(split, "*.parquet"),
    ):
        found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if found:
            return found
    return []


def sibling_split(path: str, split: str) -> list[str]:
    """The files of `split` next to one split's file (`d/test.jsonl` → `d/train.jsonl`; `d/test/0000.parquet`
    → `d/train/*.parquet`)."""
    folder = os.path.dirname(os.path.abspath(path))
    return split_files(folder, split) or split_files(os.path.dirname(folder), split)


def hub_file(repo: str, filename: str, task: str, hint: str) -> str:
    """A file of a Hugging Face dataset repo, downloaded once into the Hub's cache."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a declared dependency
        raise DataError(f"{task}: huggingface_hub is not installed; {hint}") from None
    try:
        return hf_hub_download(repo_id=repo, repo_type="dataset", filename=filename)
    except Exception as e:  # network, auth, a missing file: all end the same way for the user
        raise DataError(
            f"{task}: could not download {filename} of the Hugging Face dataset {repo} ({type(e).__name__}; "
            f"offline?); {hint}"
        ) from None
