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


def continuation_tokens(
    tokenizer, context: str, continuation: str, context_ids: list[int] | None = None
) -> list[int]:
    """The tokens of `continuation` as they follow `context`: those of context + continuation past the
    context's own, unless the two merged across the boundary (then the continuation's tokens alone)."""
    ctx = tokenizer.encode(context) if context_ids is None else context_ids
    full = tokenizer.encode(context + continuation)
    if full[: len(ctx)] == ctx and len(full) > len(ctx):
        return full[len(ctx) :]
    return tokenizer.encode(continuation)


def choice_item(
    tokenizer, text: str, choices: Sequence[str], chat: bool
) -> tuple[list[int], list[list[int]]]:
    """(context tokens, [continuation tokens per choice]) of a question and its choices.

    Raw text: each choice follows the text after one space (none when the text ends in whitespace or the
    choice starts with it). Chat: the text is the user's message and each choice (stripped) starts the reply.
    """
    if chat:
        context = tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        )
        return context, [tokenizer.encode(c.strip()) for c in choices]
    context = tokenizer.encode(text)
    joined = [c if not text or text[-1].isspace() or c[:1].isspace() else " " + c for c in choices]
    return context, [continuation_tokens(tokenizer, text, c, context) for c in joined]
