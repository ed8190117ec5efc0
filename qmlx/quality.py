"""How far a quantized model is from its reference: perplexity of both, KL divergence, top-1.

Perplexity alone can hide damage (errors that cancel on average); the per-token
KL(reference ‖ model) measures how much each predicted distribution moved, and top-1 agreement
how often greedy decoding would pick the same token. Both models score the same windows of
the same tokens (the protocol of `qmlx.evaluate.perplexity`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import mlx.core as mx

from . import kernels
from .errors import UserError
from .evaluate import HEAD_CHUNK, read_text


@dataclass
class Quality:
    """Scores of a model against a reference over `n` predicted tokens."""

    n: int
    nll_model: float  # mean negative log-likelihood, nats
    nll_reference: float
    kl: float  # mean KL(reference ‖ model) per token, nats
    top1: float  # fraction of tokens where both models' most likely next token agree

    @property
    def ppl_model(self) -> float:
        return math.exp(self.nll_model)

    @property
    def ppl_reference(self) -> float:
        return math.exp(self.nll_reference)


def _window(model, reference, ids: list[int]) -> mx.array:
    """[Σ nll model, Σ nll reference, Σ KL, Σ agreements] over one window."""
    inputs, targets = mx.array([ids[:-1]]), mx.array(ids[1:])
    hq, hr = model.model(inputs)[0], reference.model(inputs)[0]
    totals = mx.zeros((4,), dtype=mx.float32)
    for start in range(0, hq.shape[0], HEAD_CHUNK):
        t = targets[start : start + HEAD_CHUNK, None]
        lq = kernels.log_softmax(model.head(hq[start : start + HEAD_CHUNK]))
        lr = kernels.log_softmax(reference.head(hr[start : start + HEAD_CHUNK]))
        kl = (mx.exp(lr) * (lr - lq)).sum(-1)
        agree = mx.argmax(lq, axis=-1) == mx.argmax(lr, axis=-1)
        part = mx.stack(
            [
                -mx.take_along_axis(lq, t, axis=-1).sum(),
                -mx.take_along_axis(lr, t, axis=-1).sum(),
                kl.sum(),
                agree.sum().astype(mx.float32),
            ]
        )
        totals = totals + part
        mx.eval(totals)
    return totals


def compare(model, reference, ids: list[int], ctx: int = 1024) -> Quality:
    """Score `model` against `reference` on `ids`, in windows of `ctx` tokens."""
    if ctx < 2:
        raise UserError(f"ctx must be at least 2, got {ctx}")
    if len(ids) < 2:
        raise UserError("quality needs at least 2 tokens")
    totals, n = mx.zeros((4,), dtype=mx.float32), 0
    for start in range(0, len(ids), ctx):
        window = ids[start : start + ctx]
        if len(window) < 2:
            continue
        totals = totals + _window(model, reference, window)
        n += len(window) - 1
    nll_q, nll_r, kl, agree = (v / n for v in totals.tolist())
    return Quality(n, nll_q, nll_r, kl, agree)


def default_files() -> list[str]:
    """Python's own textwrap.py: real code every user has (and the shared fixture's code text)."""
    import textwrap

    return [textwrap.__file__]


def _read_ids(tokenizer, ref_tokenizer, path: str, max_tokens: int, reference_path: str) -> list[int]:
    """The first `max_tokens` ids of the file, checked to be the reference's too."""
    text = read_text(path, "--files")
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"--files {path}: needs at least 2 tokens to score, has {len(ids)}")
    # The whole text, not the decoded first tokens: the cut may fall inside a character.
    if ref_tokenizer.encode(text)[:max_tokens] != ids:
        raise UserError(
            f"--reference {reference_path}: its tokenizer splits {path} differently; "
            "the models must share a tokenizer to be compared"
        )
    return ids


def report(model_path, reference_path, files=None, max_tokens=1024, ctx=1024, dtype="auto"):
    """Load both models, score every file, print a table; returns {file: Quality}."""
    from rich.console import Console
    from rich.table import Table

    from .loader import load

    if max_tokens < 2 or ctx < 2:
        raise UserError("--max-tokens and --ctx must be at least 2")
    files = files or default_files()
    model, tokenizer = load(model_path, dtype=dtype)
    reference, ref_tokenizer = load(reference_path, dtype=dtype)
    results = {}
    for path in files:
        ids = _read_ids(tokenizer, ref_tokenizer, path, max_tokens, reference_path)
        results[path] = compare(model, reference, ids, ctx)
    table = Table(title=f"{model_path} against {reference_path}")
    for col in ("text", "tokens", "ppl reference", "ppl model", "Δ ppl", "KL mean (nats)", "top-1"):
        table.add_column(col, justify="left" if col == "text" else "right")
    for path, q in results.items():
        table.add_row(
            os.path.basename(path),
            str(q.n),
            f"{q.ppl_reference:.3f}",
            f"{q.ppl_model:.3f}",
            f"{q.ppl_model / q.ppl_reference - 1:+.2%}",
            f"{q.kl:.4f}",
            f"{q.top1:.2%}",
        )
    if len(results) > 1:
        qs = list(results.values())
        n = sum(q.n for q in qs)
        table.add_row(
            "all (token-weighted)",
            str(n),
            f"{math.exp(sum(q.nll_reference * q.n for q in qs) / n):.3f}",
            f"{math.exp(sum(q.nll_model * q.n for q in qs) / n):.3f}",
            f"{math.exp(sum((q.nll_model - q.nll_reference) * q.n for q in qs) / n) - 1:+.2%}",
            f"{sum(q.kl * q.n for q in qs) / n:.4f}",
            f"{sum(q.top1 * q.n for q in qs) / n:.2%}",
        )
    Console().print(table)
    return results
