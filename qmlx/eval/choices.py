"""Multiple-choice scoring by log-likelihood: how likely the model finds each choice's continuation.

For an item (context tokens, one continuation per choice) the score of a choice is the sum of the
log-probabilities of its tokens after the context. When every continuation is one token (MMLU's " A"…
" D") the item is one row: one forward pass over the context, all choices read at its last position.
Otherwise each choice is a row of context + continuation. Rows of many items are right-padded into one
batch (a causal model's positions never see the padding after them), longest first, and only the
positions that are read go through the output head (a 152K-word vocabulary over every position of a
batch would be gigabytes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from .. import kernels


def _rows(items: Sequence[tuple[list[int], list[list[int]]]]):
    """(item, choice or None, tokens, [(position, [targets…])…]) per row."""
    for i, (context, continuations) in enumerate(items):
        if not context or not continuations or any(not c for c in continuations):
            raise ValueError(f"item {i}: empty context or continuation")
        if all(len(c) == 1 for c in continuations):
            yield i, None, context, [(len(context) - 1, [c[0] for c in continuations])]
        else:
            for j, c in enumerate(continuations):
                seq = context + c
                yield i, j, seq[:-1], [(len(context) - 1 + t, [c[t]]) for t in range(len(c))]


def continuation_logprobs(
    model,
    items: Sequence[tuple[list[int], list[list[int]]]],
    max_batch_tokens: int = 4096,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[float]]:
    """Per item, the log-likelihood of each choice's continuation after its context."""
    rows = sorted(_rows(items), key=lambda r: -len(r[2]))
    out = [[0.0] * len(conts) for _, conts in items]
    start = 0
    while start < len(rows):
        width = len(rows[start][2])
        end = start + max(1, max_batch_tokens // width)
        batch = rows[start:end]
        x = mx.array([r[2] + [0] * (width - len(r[2])) for r in batch])
        hidden = model.model(x)
        b_idx, p_idx = [], []
        for b, r in enumerate(batch):
            for pos, _ in r[3]:
                b_idx.append(b)
                p_idx.append(pos)
        lp = kernels.log_softmax(model.head(hidden[mx.array(b_idx), mx.array(p_idx)]))
        ks, ts, where = [], [], []  # (row of lp, target token) -> (item, choice)
        k = 0
        for i, j, _, reads in batch:
            for _, targets in reads:
                for c, t in enumerate(targets):
                    ks.append(k)
                    ts.append(t)
                    where.append((i, c if j is None else j))
                k += 1
        for (i, c), v in zip(where, lp[mx.array(ks), mx.array(ts)].astype(mx.float32).tolist()):
            out[i][c] += v
        if on_batch is not None:
            on_batch(len({r[0] for r in batch}))
        start = end
    return out
