"""A real small `qmlx study` on the shared fixture: the measured example of docs/study.md.

1. the fixture converted to 4-bit g64 by qmlx; 2. the stdlib instruction set (scripts/stdlib_instructions.py);
3. a spec of 2 orderings × 2 seeds, 40 LoRA steps each, MMLU on 100 questions spread over the subjects;
4. `qmlx study --dry-run`, then the study; the report lands in WORK/fixture-study/.

    python scripts/fixture_study.py WORK [--iters 40] [--limit 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = """# written by scripts/fixture_study.py
model = "q4"
data = "data"
orderings = ["random", "easy-to-hard"]
seeds = [0, 1]

[lora]
rank = 8
alpha = 16
lr = 3e-4
batch_size = 4
iters = {iters}
max_seq_len = 128
val_every = 10
save_every = 10
report_every = 10

[eval]
tasks = ["mmlu"]
limit = {limit}
stride = 140
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--limit", type=int, default=100)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    qmlx = [sys.executable, "-m", "qmlx"]
    fixture = subprocess.run([os.path.join(HERE, "..", "..", "shared", "fixtures", "qwen-fixture")],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]  # fmt: skip
    q4 = os.path.join(args.work, "q4")
    if not os.path.exists(os.path.join(q4, "config.json")):
        subprocess.run([*qmlx, "convert", fixture, q4, "--bits", "4", "--group-size", "64"], check=True)
    if not os.path.exists(os.path.join(args.work, "data", "train.jsonl")):
        subprocess.run([sys.executable, os.path.join(HERE, "stdlib_instructions.py"),
                        os.path.join(args.work, "data")], check=True)  # fmt: skip
    spec = os.path.join(args.work, "fixture-study.toml")
    with open(spec, "w", encoding="utf-8") as f:
        f.write(SPEC.format(iters=args.iters, limit=args.limit))
    subprocess.run([*qmlx, "study", spec, "--dry-run"], check=True)
    subprocess.run([*qmlx, "study", spec], check=True)


if __name__ == "__main__":
    main()
