"""Generation speed and memory: qmlx vs mlx-lm on the same model, in one run.

    .venv/bin/python benchmarks/bench_generate.py [--model DIR] [--prompt-tokens 512] [--gen-tokens 64]

Each configuration runs in its own process (clean peak-memory counters, its own BLAS choice).
Absolute times on a shared machine are noise; read the ratios.
"""

from __future__ import annotations

import argparse
import json

from common import fixture_dir, ratio, run_isolated

QMLX = r"""
import json, time, resource
t0 = time.perf_counter()
import qmlx
model, tok = qmlx.load({model!r})
load_s = time.perf_counter() - t0
text = open({text!r}, encoding="utf-8").read()
ids = tok.encode(text)[:{n_prompt}]
last = None
for ev in qmlx.stream_generate(model, tok, ids, max_tokens={n_gen}, temperature=0.0):
    last = ev
print(json.dumps(dict(load_s=load_s, prompt_tps=last.prompt_tps, gen_tps=last.generation_tps,
                      ttft=last.time_to_first_token, peak_gb=last.peak_memory_gb,
                      rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      blas=qmlx._blas.status)))
"""

MLX_LM = r"""
import json, time, resource
t0 = time.perf_counter()
import mlx.core as mx
from mlx_lm import load, stream_generate
model, tok = load({model!r})
load_s = time.perf_counter() - t0
text = open({text!r}, encoding="utf-8").read()
ids = tok.encode(text)[:{n_prompt}]
last = None
for r in stream_generate(model, tok, ids, max_tokens={n_gen}):
    last = r
print(json.dumps(dict(load_s=load_s, prompt_tps=last.prompt_tps, gen_tps=last.generation_tps,
                      ttft=None, peak_gb=last.peak_memory,
                      rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, blas="as shipped")))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--text", default=None, help="prompt text file (default: the shared Python text)")
    args = ap.parse_args()
    import os

    model = args.model or fixture_dir()
    here = os.path.dirname(os.path.abspath(__file__))
    text = args.text or os.path.join(here, "..", "..", "shared", "fixtures", "texts", "python_textwrap.py.txt")
    fmt = dict(model=model, text=text, n_prompt=args.prompt_tokens, n_gen=args.gen_tokens)
    runs = {
        "qmlx": run_isolated(QMLX.format(**fmt)),
        "qmlx (reference BLAS)": run_isolated(QMLX.format(**fmt), env={"QMLX_OPENBLAS": "0"}),
        "mlx-lm": run_isolated(MLX_LM.format(**fmt)),
    }
    peer = runs["mlx-lm"]
    print(f"model: {model}\nprompt {args.prompt_tokens} tokens, {args.gen_tokens} generated\n")
    print(f"{'':24} {'load s':>8} {'prompt tok/s':>13} {'gen tok/s':>10} {'peak GB':>8} {'RSS GB':>7}")
    for name, r in runs.items():
        print(f"{name:24} {r['load_s']:8.2f} {r['prompt_tps']:13.1f} {r['gen_tps']:10.1f} "
              f"{r['peak_gb']:8.2f} {r['rss_gb']:7.2f}")
    q = runs["qmlx"]
    print(f"\nqmlx vs mlx-lm: prompt speed {ratio(q['prompt_tps'], peer['prompt_tps'])}, "
          f"generation speed {ratio(q['gen_tps'], peer['gen_tps'])}, "
          f"load time {ratio(q['load_s'], peer['load_s'])}, peak RSS {ratio(q['rss_gb'], peer['rss_gb'])}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
