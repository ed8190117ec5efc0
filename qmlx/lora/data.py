"""Fine-tuning data: `train.jsonl` / `valid.jsonl` / `test.jsonl`, tokenized with a loss mask.

Each file's format is detected from its first record and every line must follow it:
- chat:       {"messages": [{"role": ..., "content": ...}, ...]}  (optional "tools")
- completion: {"prompt": ..., "completion": ...}  rendered as a user turn and an assistant turn
              through the chat template (plain concatenation + end-of-text when there is none)
- text:       {"text": ...}
The loss is masked to assistant turns / completions by default (text trains on every token);
`train_on_prompt` trains on everything. Samples longer than `max_seq_len` are cut, and counted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError

SPLITS = ("train", "valid", "test")
FORMATS = {"messages": "chat", "prompt": "completion", "text": "text"}


class DataError(UserError):
    """A data file or line that cannot be used; the message names the file and line."""


@dataclass
class Sample:
    tokens: np.ndarray  # (L,) int32
    mask: np.ndarray  # (L,) bool: True where the token is a training target


@dataclass
class Dataset:
    path: str
    format: str
    samples: list[Sample]
    truncated: int = 0  # samples cut at max_seq_len
    lengths: np.ndarray = field(init=False)

    def __post_init__(self):
        self.lengths = np.array([len(s.tokens) for s in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def target_tokens(self) -> int:
        return int(sum(s.mask[1:].sum() for s in self.samples))


def load_data(folder: str, tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> dict[str, Dataset]:
    """The splits present in `folder` (train.jsonl is required)."""
    if not os.path.isdir(folder):
        raise DataError(f"--data {folder}: no such folder")
    if not os.path.exists(os.path.join(folder, "train.jsonl")):
        raise DataError(f"--data {folder}: no train.jsonl (also read: valid.jsonl, test.jsonl)")
    return {
        split: load_split(path, tokenizer, max_seq_len, train_on_prompt)
        for split in SPLITS
        if os.path.exists(path := os.path.join(folder, f"{split}.jsonl"))
    }


def load_split(path: str, tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> Dataset:
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2, got {max_seq_len}")
    fmt, samples, truncated = None, [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            kind = next((FORMATS[k] for k in FORMATS if k in record), None)
            if kind is None:
                raise DataError(f"{where}: needs one of 'messages' (chat), 'prompt'+'completion', 'text'")
            if fmt is None:
                fmt = kind
            elif kind != fmt:
                raise DataError(f"{where}: a {kind} record in a file of {fmt} records (see its first line)")
            tokens, mask = _encode(record, kind, tokenizer, where)
            if train_on_prompt:
                mask = [True] * len(tokens)
            if len(tokens) > max_seq_len:
                tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
                truncated += 1
            if len(tokens) < 2:
                raise DataError(f"{where}: fewer than 2 tokens, nothing to predict")
            samples.append(Sample(np.array(tokens, np.int32), np.array(mask, bool)))
    if not samples:
        raise DataError(f"{path}: no records")
    return Dataset(path, fmt, samples, truncated)


def _encode(record: dict, kind: str, tokenizer, where: str) -> tuple[list[int], list[bool]]:
    if kind == "text":
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string")
        ids = tokenizer.encode(text) + tokenizer.eos_token_ids[:1]
        return ids, [True] * len(ids)
    if kind == "completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        if not tokenizer.chat_template:
            p, c = tokenizer.encode(prompt), tokenizer.encode(completion) + tokenizer.eos_token_ids[:1]
            return p + c, [False] * len(p) + [True] * len(c)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _encode_chat(messages, None, tokenizer, where)
    messages, tools = record["messages"], record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: messages[{i}] needs a 'role' string")
        if not isinstance(m.get("content", ""), (str, type(None))):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to train on")
    return _encode_chat(messages, tools, tokenizer, where)


def _encode_chat(messages, tools, tokenizer, where) -> tuple[list[int], list[bool]]:
    """Tokens of the rendered conversation, with the assistant turns marked.

    Each assistant turn is the text the template adds between "prompt up to this turn, with
    the generation prompt" and "conversation including this turn"; every other piece is
    context. Pieces are tokenized separately, so turn boundaries are token boundaries.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
        after = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn")
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
    if full.startswith(done) and len(full) > len(done):
        pieces.append((full[len(done) :], False))
    tokens, mask = [], []
    for text, trained in pieces:
        ids = tokenizer.encode(text) if text else []
        tokens += ids
        mask += [trained] * len(ids)
    return tokens, mask
