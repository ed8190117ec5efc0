"""Editor-like fill-in-the-middle latency: a ~2,000-token file with the cursor in the middle, as llama.vscode
sends it to `/infill`, cold and with the file's prefix cached.

    .venv/bin/python benchmarks/bench_editor.py [--model QUANTIZED_DIR] [--tokens 2000] [--n-predict 24]

Without --model the shared Qwen2.5-Coder fixture is quantized to 4 bits (group 64) by `qmlx convert`. The
file is the standard library's `textwrap.py` cut to --tokens tokens; the cursor is at the start of the
line in its middle. The server runs in this process (the engine and the app, over an in-process client);
each request streams, and the time to the first `content` line and to the end are measured:

  cold      the first request (empty prefix cache)
  typed     the user typed a few characters at the cursor: same file, longer prefix
  moved     the cursor moved down five lines: the part before the old cursor is shared
  again     the `typed` request repeated

Prints the times and each one's ratio to the cold request (same run), and the prompt tokens the prefix
cache served (`tokens_cached`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

from common import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a quantized Coder model folder (default: the fixture at 4 bits)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--n-predict", type=int, default=24)
    args = ap.parse_args()
    from fastapi.testclient import TestClient

    import qmlx
    from qmlx.server import Engine, create_app

    folder = args.model
    if folder is None:
        folder = os.path.join(tempfile.mkdtemp(prefix="qmlx-bench-editor-"), "q4")
        subprocess.run([os.path.join(ROOT, ".venv", "bin", "qmlx"), "convert", model_dir(None), folder, "--bits", "4",
                        "--group-size", "64"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    model, tok = qmlx.load(folder)
    source = open(textwrap.__file__, encoding="utf-8").read()
    ids = tok.encode(source)[: args.tokens]
    text = tok.decode(ids)
    lines = text.splitlines(keepends=True)
    mid = len(lines) // 2
    engine = Engine(model, tok, "bench", max_concurrency=1)
    engine.start()
    client = TestClient(create_app(engine))

    def request(prefix: str, suffix: str) -> dict:
        body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": args.n_predict, "stream": True,
                "temperature": 0, "cache_prompt": True, "samplers": ["top_k", "top_p", "infill"]}  # fmt: skip
        t0 = time.perf_counter()
        first, last = None, None
        with client.stream("POST", "/infill", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                obj = json.loads(line[6:])
                if first is None and obj.get("content"):
                    first = time.perf_counter() - t0
                last = obj
        total = time.perf_counter() - t0
        return {"ttft": first if first is not None else total, "total": total, "cached": last["tokens_cached"],
                "prompt": last["tokens_evaluated"], "out": last["tokens_predicted"]}  # fmt: skip

    before, after = "".join(lines[:mid]), "".join(lines[mid:])
    cases = {
        "cold": (before, after),
        "typed": (before + "    def ", after),
        "moved": ("".join(lines[: mid + 5]), "".join(lines[mid + 5 :])),
    }
    res = {name: request(*pa) for name, pa in cases.items()}
    res["again"] = request(*cases["typed"])
    engine.stop()
    cold = res["cold"]
    print(f"model {folder}; file: textwrap.py, {len(ids)} tokens, cursor at line {mid} of {len(lines)}; "
          f"{args.n_predict} tokens per completion")  # fmt: skip
    print(
        "| request | prompt tokens | from the prefix cache | time to first token | vs cold | total | vs cold |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in res.items():
        print(f"| {name} | {r['prompt']} | {r['cached']} | {r['ttft']:.2f} s | {r['ttft'] / cold['ttft']:.2f}x | "
              f"{r['total']:.2f} s | {r['total'] / cold['total']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
