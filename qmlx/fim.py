"""Fill-in-the-middle prompts: the code between a prefix and a suffix, as Qwen2.5-Coder was trained to write it.

    <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>

and the repo-level form, other files of the project first (each after `<|file_sep|>` with its path):

    <|repo_name|>{repo}\\n<|file_sep|>{path}\\n{text}\\n … <|file_sep|>{path}\\n<|fim_prefix|>…<|fim_middle|>

The markers are added tokens of the vocabulary, so they are single ids; a model whose vocabulary lacks
them (a non-Coder Qwen2.5) is refused by `FIMError`. Generation ends at `<|endoftext|>`, `<|fim_pad|>`
or any marker (`stop_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UserError

PREFIX, SUFFIX, MIDDLE, PAD = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"
REPO, FILE_SEP = "<|repo_name|>", "<|file_sep|>"
ENDS = ("<|endoftext|>", PAD, PREFIX, SUFFIX, MIDDLE, REPO, FILE_SEP)


class FIMError(UserError):
    """The model cannot fill in the middle (its vocabulary lacks the tokens), or the input is unusable."""


@dataclass
class ExtraFile:
    """Another file of the project, shown to the model before the one being edited."""

    path: str
    text: str


def _ids(tokenizer, names: Sequence[str]) -> dict[str, int]:
    found = {n: tokenizer.token_to_id(n) for n in names}
    missing = [n for n, i in found.items() if i is None]
    if missing:
        raise FIMError(
            f"this model cannot fill in the middle: its vocabulary has no {', '.join(missing)} "
            "(a Qwen2.5-Coder model has them)"
        )
    return found


def fim_prompt(
    tokenizer,
    prefix: str,
    suffix: str,
    extra: Sequence[ExtraFile] = (),
    repo: str = "project",
    path: str | None = None,
) -> list[int]:
    """The token ids of a fill-in-the-middle prompt (repo-level when `extra` files or a `path` are given)."""
    m = _ids(tokenizer, (PREFIX, SUFFIX, MIDDLE))
    text = tokenizer.encode_plain  # code that quotes a marker is code, not a marker
    ids: list[int] = []
    if extra or path:
        r = _ids(tokenizer, (REPO, FILE_SEP))
        ids += [r[REPO], *text(f"{repo}\n")]
        for f in extra:
            ids += [r[FILE_SEP], *text(f"{f.path}\n{f.text}\n")]
        ids += [r[FILE_SEP], *text(f"{path or 'file'}\n")]
    return ids + [m[PREFIX], *text(prefix), m[SUFFIX], *text(suffix), m[MIDDLE]]


def stop_ids(tokenizer) -> list[int]:
    """The ids that end a fill-in-the-middle completion (those this vocabulary has)."""
    return [i for i in (tokenizer.token_to_id(n) for n in ENDS) if i is not None]
