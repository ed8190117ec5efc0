"""Perplexity: how well a model predicts a text, the yardstick for quantization settings.

The text's tokens are cut into consecutive windows of `ctx` tokens, each evaluated from an
empty context; inside a window every token after the first is predicted from those before it,
so a window of L tokens scores L - 1 predictions (the convention of transformers'
`labels=input_ids` loss, which the shared reference uses).
"""

from __future__ import annotations

import math

import mlx.core as mx

from . import kernels
from .errors import UserError

# Logits are computed for this many positions at a time: a full 1024-token window of a
# 152K-token vocabulary would be 0.6 GB of float32 logits at once.
HEAD_CHUNK = 256


def window_nll(model, ids: list[int]) -> tuple[float, int]:
    """(sum of negative log-likelihoods, number of predictions) for one window of tokens."""
    if len(ids) < 2:
        return 0.0, 0
    inputs = mx.array([ids[:-1]])
    targets = mx.array(ids[1:])
    hidden = model.model(inputs)[0]
    total = mx.array(0.0, dtype=mx.float32)
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        lp = kernels.log_softmax(model.head(hidden[start : start + HEAD_CHUNK]))
        t = targets[start : start + HEAD_CHUNK]
        total = total - mx.take_along_axis(lp, t[:, None], axis=-1).sum()
        mx.eval(total)
    return total.item(), len(ids) - 1


def perplexity(model, ids: list[int], ctx: int = 1024) -> tuple[float, float, int]:
    """(perplexity, mean negative log-likelihood in nats, number of scored predictions).

    The first `ctx` tokens give the perplexity the shared reference reports; longer inputs are
    scored window by window.
    """
    if ctx < 2:
        raise UserError(f"ctx must be at least 2, got {ctx}")
    if len(ids) < 2:
        raise UserError("perplexity needs at least 2 tokens")
    nll, n = 0.0, 0
    for start in range(0, len(ids), ctx):
        window_sum, window_n = window_nll(model, ids[start : start + ctx])
        nll += window_sum
        n += window_n
    mean = nll / n
    return math.exp(mean), mean, n


def read_text(path: str, flag: str) -> str:
    """A UTF-8 text file the user named with `flag`; errors name the flag and the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise UserError(f"{flag} {path}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(f"{flag} {path}: not a UTF-8 text file") from None


def text_perplexity(
    model, tokenizer, text: str, ctx: int = 1024, max_tokens: int | None = None, name: str = "the text"
) -> tuple[float, float, int]:
    """`perplexity` of a text's first `max_tokens` tokens (all when None); `name` is for errors."""
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UserError(f"{name}: needs at least 2 tokens to score, has {len(ids)}")
    return perplexity(model, ids, ctx=ctx)
