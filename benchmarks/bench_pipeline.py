"""Per-token cost of pipeline parallelism on loopback: qmlx vs mlx-lm, one process vs two ranks.

    flock /tmp/qmlx-heavy.lock .venv/bin/python benchmarks/bench_pipeline.py [--model DIR]
        [--prompt-tokens 64] [--gen-tokens 32]

Four runs on the same model and random prompt: qmlx in one process, qmlx under
`mlx.launch -n 2 --backend ring` (this machine talking to itself), and the same two for
mlx-lm (`sharded_load` with a pipeline group). Each reports the median decode time per token
on rank 0, and the best token (the one least disturbed by other load); the pipeline overhead
is (two ranks) - (one process). Both ranks share this machine's cores, so the overhead here
includes the ranks competing for CPU (a waiting MLX ring receiver polls); on separate Macs it
is the network round trip per token. Each runtime uses its own default dtype on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

from common import model_dir, ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(os.path.dirname(sys.executable), "mlx.launch")

QMLX = r"""
import json, statistics, sys, time
sys.path.insert(0, ROOT)
import qmlx  # first: it loads OpenBLAS before mlx.core starts
import mlx.core as mx
from qmlx.distributed import launched, start
from qmlx.generate import generate_step

out = start(MODEL) if launched() else qmlx.load(MODEL)
if out is None:
    sys.exit(0)
model, tok = out
prompt = mx.array(PROMPT)
for _ in generate_step(model, prompt, max_tokens=4):
    pass
times, last = [], time.perf_counter()
for _ in generate_step(model, prompt, max_tokens=GEN + 1):
    now = time.perf_counter()
    times.append(now - last)
    last = now
print(json.dumps({"ms_per_token": 1e3 * statistics.median(times[1:]), "best_ms": 1e3 * min(times[1:]),
                  "dtype": str(model.layers[0].input_layernorm.weight.dtype)}))
"""

MLX_LM = r"""
import json, statistics, sys, time
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.utils import sharded_load

group = mx.distributed.init()
model, tok = sharded_load(MODEL, pipeline_group=group) if group.size() > 1 else load(MODEL)
prompt = PROMPT
tok._eos_token_ids = set()  # never stop early
for _ in stream_generate(model, tok, prompt, max_tokens=4):
    pass
times, last = [], time.perf_counter()
for _ in stream_generate(model, tok, prompt, max_tokens=GEN + 1):
    now = time.perf_counter()
    times.append(now - last)
    last = now
if group.rank() == 0:
    print(json.dumps({"ms_per_token": 1e3 * statistics.median(times[1:]), "best_ms": 1e3 * min(times[1:]),
                      "dtype": str(model.model.norm.weight.dtype)}))
"""


def run(code: str, ranks: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    cmd = [sys.executable, f.name]
    if ranks > 1:
        cmd = [LAUNCH, "-n", str(ranks), "--backend", "ring", "--", *cmd]
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    finally:
        os.unlink(f.name)
    lines = [x for x in res.stdout.splitlines() if x.startswith("{")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark run failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    args = ap.parse_args()
    model = model_dir(args.model)

    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    rng = random.Random(0)
    prompt = [rng.randrange(0, min(vocab, 150000)) for _ in range(args.prompt_tokens)]

    def fill(code: str) -> str:
        values = {"ROOT": ROOT, "MODEL": model, "PROMPT": prompt, "GEN": args.gen_tokens}
        return "".join(f"{k} = {v!r}\n" for k, v in values.items()) + code

    results = {}
    for name, code in (("qmlx", QMLX), ("mlx-lm", MLX_LM)):
        for ranks in (1, 2):
            r = run(fill(code), ranks)
            results[name, ranks] = r
            print(
                f"{name:7} {ranks} rank(s): median {r['ms_per_token']:8.1f} ms/token, "
                f"best {r['best_ms']:8.1f} ({r['dtype']})",
                flush=True,
            )
    print()
    for name in ("qmlx", "mlx-lm"):
        for key, what in (("ms_per_token", "median"), ("best_ms", "best")):
            one, two = results[name, 1][key], results[name, 2][key]
            print(f"{name:7} pipeline overhead ({what}): {two - one:+8.1f} ms/token ({ratio(two, one)})")
    q = results["qmlx", 2]["ms_per_token"]
    m = results["mlx-lm", 2]["ms_per_token"]
    print(f"two ranks, qmlx vs mlx-lm time per token: {ratio(q, m)}")


if __name__ == "__main__":
    main()
