"""Constrained decoding: what a JSON-schema constraint costs in decode speed, and the grammar engines' mask time.

    .venv/bin/python benchmarks/bench_constrain.py [--model QUANTIZED_DIR] [--max-tokens 96] [--rows 4]
        [--xgrammar-python /path/to/venv/bin/python]

Without --model the shared Qwen2.5 fixture is quantized to 4 bits (group 64) by `qmlx convert` into a
temporary folder. In one run:

  1. mask time per token on the model's whole vocabulary (152K for Qwen2.5): llguidance (what qmlx uses:
     mask computed, unpacked and applied to the logits as qmlx does) while it follows the tokens of a
     reference JSON document, for each schema in SCHEMAS; with --xgrammar-python, the same documents and
     schemas through xgrammar in that interpreter (xgrammar needs torch, transformers and triton, so it
     lives in its own venv), for the comparison that chose the engine.
  2. decode speed, same prompt, same run: greedy `stream_generate` with and without the constraint, and
     a batch of --rows rows (the server's batch decoder) with and without it; the issue's target is a
     constrained request >= 0.9x the unconstrained speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import model_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
        "languages": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "languages", "address"],
    "additionalProperties": False,
}
SCHEMAS = {  # name -> (schema, a document of it, as a model would write it)
    "person": (
        PERSON,
        '{"name": "Alice Kim", "age": 31, "email": "alice@example.com", "languages": ["Python", "Rust", "Korean"],'
        ' "address": {"city": "Seoul", "zip": "04524"}}',
    ),
    "json_object": (
        {"type": "object"},
        '{"items": [1, 2, {"deep": [true, null, "text with spaces"]}], "ok": 1.5e3}',
    ),
    "enum_array": (
        {"type": "array", "items": {"enum": ["red", "green", "blue", "cyan"]}, "maxItems": 8},
        '["red", "blue", "cyan", "green", "red"]',
    ),
}
PROMPT = (
    "Alice Kim is 31, lives in Seoul (zip 04524), writes Python, Rust and Korean, and her email is "
    "alice@example.com. Reply with her details as one JSON object with the keys name, age, email, "
    "languages and address (city, zip)."
)

XGRAMMAR_CHILD = r"""
import json, sys, time
import numpy as np, torch, xgrammar as xgr
from tokenizers import Tokenizer
folder, n_vocab, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
t0 = time.perf_counter()
tok = Tokenizer.from_file(folder + "/tokenizer.json")
vocab = [None] * n_vocab
for piece, i in tok.get_vocab(with_added_tokens=True).items():
    if i < n_vocab:
        vocab[i] = piece
vocab = [v if v is not None else f"<|pad{i}|>" for i, v in enumerate(vocab)]
info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=n_vocab, stop_token_ids=[151645])
compiler = xgr.GrammarCompiler(info)
setup = time.perf_counter() - t0
out = {"setup_s": setup}
for name, (schema, ids) in cases.items():
    t0 = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(schema))
    compile_s = time.perf_counter() - t0
    m = xgr.GrammarMatcher(cg)
    mask = xgr.allocate_token_bitmask(1, n_vocab)
    logits = torch.zeros((1, n_vocab))
    times = []
    for t in ids:
        t0 = time.perf_counter()
        m.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits, mask)
        times.append(time.perf_counter() - t0)
        assert m.accept_token(t), (name, t)
    out[name] = {"compile_s": compile_s, "mask_us": 1e6 * float(np.mean(times)), "mask_p99_us": 1e6 * float(np.percentile(times, 99))}
print(json.dumps(out))
"""


def mask_times(tok, n_vocab: int) -> tuple[dict, dict]:
    """llguidance through qmlx's processor: per schema, compile time and mask+apply time per token."""
    import mlx.core as mx

    from qmlx.constrain import Constraint, bridge

    t0 = time.perf_counter()
    bridge(tok, n_vocab)
    out = {"setup_s": time.perf_counter() - t0}
    ids_of = {}
    for name, (schema, doc) in SCHEMAS.items():
        ids = tok.encode(doc)
        ids_of[name] = (schema, ids)
        t0 = time.perf_counter()
        proc = Constraint.json_schema(schema).processor(tok, n_vocab)
        compile_s = time.perf_counter() - t0
        history, logits = mx.array([0]), mx.zeros((1, n_vocab))
        proc(history, logits)
        times = []
        for t in ids:
            history = mx.concatenate([history, mx.array([t])])
            t0 = time.perf_counter()
            mx.eval(proc(history, logits))  # feeds the token, computes the mask, applies it
            times.append(time.perf_counter() - t0)
        assert proc.done, name
        out[name] = {
            "compile_s": compile_s,
            "mask_us": 1e6 * float(np.mean(times)),
            "mask_p99_us": 1e6 * float(np.percentile(times, 99)),
        }
    return out, ids_of


def decode_speed(model, tok, max_tokens: int, rows: int) -> dict:
    from qmlx.batch import BatchDecoder
    from qmlx.constrain import Constraint
    from qmlx.generate import stream_generate

    prompt = tok.user_prompt(PROMPT)
    constraint = Constraint.json_schema(PERSON)
    n_vocab = model.config.vocab_size
    res = {}

    def single(procs) -> tuple[float, int]:
        last = None
        for ev in stream_generate(model, tok, prompt, max_tokens, temperature=0.0, repetition_penalty=1.0,
                                  logits_processors=procs):  # fmt: skip
            last = ev
        return last.generation_tps, last.generation_tokens

    single([])  # warm-up
    for label, procs in (
        ("plain", lambda: []),
        ("constrained", lambda: [constraint.processor(tok, n_vocab)]),
    ):
        runs = [single(procs()) for _ in range(3)]
        res[f"single_{label}"] = max(r[0] for r in runs)
        res[f"single_{label}_tokens"] = runs[0][1]
    prompts = [tok.user_prompt(f"Person {i}. " + PROMPT) for i in range(rows)]

    def batch(constrained: bool) -> float:
        decoder = BatchDecoder(model, tok, max_rows=rows)
        for i, p in enumerate(prompts):
            procs = [constraint.processor(tok, n_vocab)] if constrained else []
            decoder.add(
                i, tok.encode(p), max_tokens, temperature=0.0, repetition_penalty=1.0, logits_processors=procs
            )
        n, t0 = 0, time.perf_counter()
        while decoder.busy:
            for _, ev in decoder.step():
                if isinstance(ev, Exception):
                    raise ev
                n += ev.token is not None
        return n / (time.perf_counter() - t0)

    batch(False)
    res["batch_plain"] = max(batch(False) for _ in range(2))
    res["batch_constrained"] = max(batch(True) for _ in range(2))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a quantized model folder (default: the fixture at 4 bits)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--xgrammar-python", help="an interpreter with xgrammar installed, for the comparison")
    args = ap.parse_args()
    import qmlx

    tmp = None
    folder = args.model
    if folder is None:
        tmp = tempfile.mkdtemp(prefix="qmlx-bench-constrain-")
        folder = os.path.join(tmp, "q4")
        subprocess.run([os.path.join(ROOT, ".venv", "bin", "qmlx"), "convert", model_dir(None), folder, "--bits", "4",
                        "--group-size", "64"], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    model, tok = qmlx.load(folder)
    n_vocab = model.config.vocab_size
    print(f"model {folder}: vocabulary {tok.vocab_size} tokens, logits {n_vocab} wide")

    lg, ids_of = mask_times(tok, n_vocab)
    xg = None
    if args.xgrammar_python:
        r = subprocess.run([args.xgrammar_python, "-c", XGRAMMAR_CHILD, folder, str(n_vocab)], input=json.dumps(ids_of),
                           capture_output=True, text=True, timeout=1800)  # fmt: skip
        if r.returncode != 0:
            print(f"xgrammar child failed:\n{r.stderr[-2000:]}")
        else:
            xg = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n1. mask per token, {n_vocab}-token vocabulary (mean / p99 µs; compile s)")
    print(
        f"   tokenizer setup: llguidance {lg['setup_s']:.2f} s"
        + (f", xgrammar {xg['setup_s']:.2f} s" if xg else "")
    )
    print("| schema | tokens | llguidance mean | p99 | compile | xgrammar mean | p99 | compile | llg/xgr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SCHEMAS:
        a = lg[name]
        b = xg.get(name) if xg else None
        tail = (f"{b['mask_us']:.0f} | {b['mask_p99_us']:.0f} | {b['compile_s']:.3f} | {a['mask_us'] / b['mask_us']:.2f}x"
                if b else "- | - | - | -")  # fmt: skip
        print(
            f"| {name} | {len(ids_of[name][1])} | {a['mask_us']:.0f} | {a['mask_p99_us']:.0f} | {a['compile_s']:.3f} | {tail} |"
        )

    d = decode_speed(model, tok, args.max_tokens, args.rows)
    single = d["single_constrained"] / d["single_plain"]
    batch = d["batch_constrained"] / d["batch_plain"]
    print(f"\n2. decode speed, greedy, --max-tokens {args.max_tokens} (best of the runs; tokens/s)")
    print("| decode | plain | JSON schema | constrained / plain |")
    print("|---|---|---|---|")
    print(f"| one request | {d['single_plain']:.1f} | {d['single_constrained']:.1f} | {single:.2f}x |")
    print(f"| batch of {args.rows} | {d['batch_plain']:.1f} | {d['batch_constrained']:.1f} | {batch:.2f}x |")
    print(
        f"   tokens generated: plain {d['single_plain_tokens']}, constrained {d['single_constrained_tokens']}"
    )
    ok = single >= 0.9 and batch >= 0.9
    print(f"\ntarget: a constrained request >= 0.9x unconstrained speed: {'met' if ok else 'NOT met'}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
