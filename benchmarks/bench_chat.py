"""Chat latency: time to first token on turn 1 and turn 8 of a conversation with growing history.

    .venv/bin/python benchmarks/bench_chat.py [--model DIR] [--turns 8] [--answer-tokens 48]

Three approaches in one run, each in its own process, on the same model and questions:
  qmlx chat        - the whole history rendered each turn; the prompt cache computes only new tokens
  re-prefill       - the whole history rendered and computed again each turn (a stateless client)
  mlx-lm chat      - mlx_lm's chat loop: one growing cache, each turn templated alone
                     (Qwen's template then re-inserts the default system prompt every turn)
Target: qmlx's turn-8 TTFT within 1.5x of its turn-1 TTFT. Read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse

from common import model_dir, ratio, run_isolated

QUESTIONS = [
    "Write a Python function that reverses a string.",
    "Now make it handle None by returning an empty string.",
    "Add type hints.",
    "Write a docstring for it.",
    "Write two pytest tests for it.",
    "Explain the slicing syntax you used.",
    "How would you do it without slicing?",
    "Which version is faster, and why?",
]

QMLX = r"""
import json
import qmlx
from qmlx.chat import ChatSession
model, tok = qmlx.load({model!r})
s = ChatSession(model, tok, sampling={{"temperature": 0.0}}, max_tokens={n})
reprefill = {reprefill}
out = []
for q in {questions!r}[:{turns}]:
    if reprefill:
        s.prompt_cache.reset()
    for ev in s.respond(q):
        pass
    out.append(dict(ttft=s.last.ttft, new=s.last.prompt_tokens - s.last.reused_tokens, total=s.last.prompt_tokens))
print(json.dumps(out))
"""

MLX_LM = r"""
import json, time
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
model, tok = load({model!r})
cache = make_prompt_cache(model)
out = []
for q in {questions!r}[:{turns}]:
    prompt = tok.apply_chat_template([{{"role": "user", "content": q}}], add_generation_prompt=True)
    t0 = time.perf_counter(); ttft = None
    for r in stream_generate(model, tok, prompt, max_tokens={n}, sampler=make_sampler(0.0), prompt_cache=cache):
        if ttft is None:
            ttft = time.perf_counter() - t0
    out.append(dict(ttft=ttft, new=len(prompt), total=cache[0].offset))
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--answer-tokens", type=int, default=48)
    args = ap.parse_args()
    fmt = dict(model=model_dir(args.model), questions=QUESTIONS, turns=args.turns, n=args.answer_tokens)
    runs = {
        "qmlx chat": run_isolated(QMLX.format(reprefill=False, **fmt)),
        "re-prefill": run_isolated(QMLX.format(reprefill=True, **fmt)),
        "mlx-lm chat": run_isolated(MLX_LM.format(**fmt)),
    }
    print(f"{'turn':>4} " + " ".join(f"{name + ' TTFT s':>22} {'new tok':>8}" for name in runs))
    for t in range(args.turns):
        print(f"{t + 1:>4} " + " ".join(f"{r[t]['ttft']:22.3f} {r[t]['new']:8d}" for r in runs.values()))
    last = args.turns - 1
    for name, r in runs.items():
        print(f"{name}: turn {args.turns} / turn 1 TTFT = {ratio(r[last]['ttft'], r[0]['ttft'])}")
    q, p = runs["qmlx chat"], runs["mlx-lm chat"]
    print(
        f"qmlx vs mlx-lm chat, turn-{args.turns} TTFT: {ratio(q[last]['ttft'], p[last]['ttft'])}; "
        f"qmlx vs re-prefill: {ratio(q[last]['ttft'], runs['re-prefill'][last]['ttft'])}"
    )


if __name__ == "__main__":
    main()
