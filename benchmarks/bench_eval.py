"""MMLU scoring throughput: `qmlx eval`'s batched choice scoring vs a one-prompt-at-a-time loop, one run.

    flock /tmp/qmlx-heavy.lock .venv/bin/python benchmarks/bench_eval.py [--model DIR] [--items 64]

Both score the same questions (a spread over the 57 subjects, 0-shot, raw prompts) on the same loaded
model. The loop is what a script would write: for each question and each of its four choices, one
forward pass over prompt + " X" and the full logits, the choice's log-probability read at the end.
qmlx: one row per question (the four one-token choices read at its last position), questions batched
right-padded, only read positions through the head. Both must pick the same letters.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import model_dir, ratio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import qmlx  # noqa: E402,I001  (before mlx.core: OpenBLAS)

import mlx.core as mx  # noqa: E402
from qmlx.eval import mmlu  # noqa: E402
from qmlx.eval.choices import continuation_logprobs  # noqa: E402


def naive(model, items) -> list[list[float]]:
    out = []
    for context, choices in items:
        scores = []
        for c in choices:
            logits = model(mx.array([context + c]))[0].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            scores.append(sum(lp[len(context) - 1 + t, c[t]].item() for t in range(len(c))))
        out.append(scores)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the shared fixture)")
    ap.add_argument("--items", type=int, default=64, help="questions scored by each (default 64)")
    args = ap.parse_args()
    model, tok = qmlx.load(model_dir(args.model))
    test, dev = mmlu.load(None)
    questions = test[:: max(1, len(test) // args.items)][: args.items]
    items = mmlu.items(questions, dev, 0, tok, chat=False)
    tokens = sum(len(c) for c, _ in items)
    continuation_logprobs(model, items[:2])  # warm-up
    t0 = time.perf_counter()
    ours = continuation_logprobs(model, items)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = naive(model, items)
    t_naive = time.perf_counter() - t0
    same = sum(
        max(range(4), key=o.__getitem__) == max(range(4), key=t.__getitem__) for o, t in zip(ours, theirs)
    )
    n = len(items)
    print(
        f"MMLU, {n} questions ({tokens / n:.0f} prompt tokens on average), 0-shot, {os.path.basename(model_dir(args.model))}"
    )
    print(f"{'scorer':<34}{'s':>8}{'items/s':>9}")
    print(f"{'qmlx eval (batched choices)':<34}{t_ours:>8.1f}{n / t_ours:>9.2f}")
    print(f"{'one prompt per choice, full logits':<34}{t_naive:>8.1f}{n / t_naive:>9.2f}")
    print(f"qmlx / loop items/s: {ratio(n / t_ours, n / t_naive)}; same choice on {same}/{n}")


if __name__ == "__main__":
    main()
