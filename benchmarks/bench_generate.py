"""Generation speed and memory: qmlx vs mlx-lm on the same model, in one run.

    .venv/bin/python benchmarks/bench_generate.py [--model DIR] [--prompt-tokens 1024] [--gen-tokens 64]

Sections:
  1. a 1024-token prompt: time to first token, prompt and generation tok/s, peak memory
  2. a 4K-token context: KV-cache bytes, memory held and peak while filling, with 16-bit,
     8-bit and 4-bit KV (caches filled with bfloat16 keys/values of the model's shapes)
  3. speculative decoding on a code-editing prompt: acceptance and speedup over plain
     greedy decoding, drafting with the model quantized to 4 bits (made with `qmlx convert`;
     skipped if that fails) and, qmlx only, with prompt lookup
  4. quantized models against llama.cpp (and mlx-lm): 4-bit and 8-bit, a 512-token prompt and
     128 decoded tokens (--quant-prompt-tokens, --quant-gen-tokens), prompt and decode tok/s.
     qmlx's 4-bit g64 / 8-bit g64 conversions of the model beside llama.cpp's Q4_0 / Q8_0
     re-quantizations of its GGUF (--gguf; for the fixture, scripts/fetch_fixture_gguf.py's), the
     same threads (all cores) for both. llama-cpp-python is built from PyPI for this CPU into this
     environment when it is missing (~8 min on 2 cores; --no-llama-build skips the peer instead).
     qmlx and llama.cpp alternate for --rounds rounds (default 3); each one's fastest-decoding round
     is shown (mlx-lm, minutes a run on a CPU, runs once).

Each configuration runs in its own process (clean peak-memory counters, its own BLAS choice).
Absolute times on a shared machine are noise; read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from common import PEAK_RSS_SOURCE, fixture_dir, model_dir, ratio, run_isolated

# The prompt of sections 1 and 2: the shared texts, concatenated, cut to N tokens.
PROMPT_IDS = (
    PEAK_RSS_SOURCE
    + r"""
def prompt_ids(tok, files, n):
    text = ""
    while True:
        for f in files:
            text += open(f, encoding="utf-8").read() + "\n\n"
        ids = tok.encode(text)
        if len(ids) >= n:
            return ids[:n]
"""
)

QMLX = (
    PROMPT_IDS
    + r"""
import json, time, resource
t0 = time.perf_counter()
import qmlx
model, tok = qmlx.load({model!r})
load_s = time.perf_counter() - t0
ids = prompt_ids(tok, {texts!r}, {n_prompt})
last = None
start = time.perf_counter()
for ev in qmlx.stream_generate(model, tok, ids, max_tokens={n_gen}, temperature=0.0):
    last = ev
print(json.dumps(dict(load_s=load_s, prompt_tps=last.prompt_tps, gen_tps=last.generation_tps,
                      ttft=last.time_to_first_token, peak_gb=last.peak_memory_gb,
                      rss_gb=peak_rss() / 1e9,
                      blas=qmlx._blas.status)))
"""
)

MLX_LM = (
    PROMPT_IDS
    + r"""
import json, time, resource
t0 = time.perf_counter()
import mlx.core as mx
from mlx_lm import load, stream_generate
model, tok = load({model!r})
load_s = time.perf_counter() - t0
ids = prompt_ids(tok, {texts!r}, {n_prompt})
last, first = None, None
start = time.perf_counter()
for r in stream_generate(model, tok, ids, max_tokens={n_gen}):
    first = first or time.perf_counter()
    last = r
print(json.dumps(dict(load_s=load_s, prompt_tps=last.prompt_tps, gen_tps=last.generation_tps,
                      ttft=first - start, peak_gb=last.peak_memory,
                      rss_gb=peak_rss() / 1e9, blas="as shipped")))
"""
)

# Section 2: the KV cache of a 4K-token context, per KV width. Bytes depend only on shapes,
# so each layer's cache is filled through its own update_and_fetch with bfloat16 keys and values
# of the model's shapes, 512 tokens at a time: no model compute (bfloat16 matmuls are very slow
# on the CPU backend), the same work for both runtimes.
KV_FILL = r"""
import json
import mlx.core as mx

def fill(cache, n_ctx, n_kv, head_dim):
    mx.clear_cache(); mx.reset_peak_memory()
    base = mx.get_active_memory()
    for i in range(0, n_ctx, 512):
        shape = (1, n_kv, min(512, n_ctx - i), head_dim)
        k = mx.random.normal(shape).astype(mx.bfloat16)
        v = mx.random.normal(shape).astype(mx.bfloat16)
        for c in cache:
            c.update_and_fetch(k, v)
        mx.eval([c.state for c in cache])
    return dict(active_mb=(mx.get_active_memory() - base) / 1e6, peak_mb=(mx.get_peak_memory() - base) / 1e6)
"""

QMLX_KV = (
    KV_FILL
    + r"""
from qmlx.cache import cache_nbytes, make_cache
from qmlx.loader import load_config
cfg = load_config({model!r})
out = {{}}
for bits in (None, 8, 4):
    cache = make_cache(cfg.num_hidden_layers, kv_bits=bits)
    out[str(bits or 16)] = dict(fill(cache, {n_ctx}, cfg.num_key_value_heads, cfg.head_dim),
                                cache_mb=cache_nbytes(cache) / 1e6)
    del cache
print(json.dumps(out))
"""
)

MLX_LM_KV = (
    KV_FILL
    + r"""
import json as _json
from mlx_lm.models.cache import KVCache, QuantizedKVCache
cfg = _json.load(open({model!r} + "/config.json"))
n_kv, head_dim = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
out = {{}}
for bits in (None, 8, 4):
    cache = [KVCache() if bits is None else QuantizedKVCache(group_size=64, bits=bits)
             for _ in range(cfg["num_hidden_layers"])]
    out[str(bits or 16)] = dict(fill(cache, {n_ctx}, n_kv, head_dim),
                                cache_mb=sum(c.nbytes for c in cache) / 1e6)
    del cache
print(json.dumps(out))
"""
)

# Section 3: a code edit, whose answer copies most of the prompt.
EDIT_PROMPT = r"""
def edit_prompt(tok, file, **template_kw):
    code = open(file, encoding="utf-8").read()
    start = code.index("    def _split(self, text):")
    code = code[start:code.index("\n    def ", start + 10)]
    msg = ("Rename the method _split to _split_chunks and the variable `chunks` to `pieces` in this "
           "code, and print the whole changed code:\n```python\n" + code + "\n```")
    # The answer starts with the code block, as chat front ends that prefill it do.
    messages = [{{"role": "user", "content": msg}}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, **template_kw) + "```python\n"
"""

QMLX_SPEC = (
    EDIT_PROMPT
    + r"""
import json, time
import qmlx  # first: it loads OpenBLAS before mlx.core starts
import mlx.core as mx
from qmlx.sample import make_distribution
from qmlx.generate import generate_step
from qmlx.speculative import SpeculativeStats, speculative_generate_step
model, tok = qmlx.load({model!r})
draft = qmlx.load({draft!r})[0] if {draft!r} else None
ids = tok.encode(edit_prompt(tok, {code_file!r}))

def timed(steps):
    # decode speed: from the first token to the last, prefill excluded
    n, first = 0, None
    for _ in steps:
        n += 1
        first = first or time.perf_counter()
    return (n - 1) / (time.perf_counter() - first)

out = dict(prompt_tokens=len(ids))
out["plain"] = dict(tps=timed(generate_step(model, mx.array(ids), max_tokens={n_gen})))
kinds = [("lookup", dict(prompt_lookup=3, num_draft_tokens=4))]
if draft is not None:
    kinds.append(("draft", dict(draft_model=draft, num_draft_tokens=3)))
for name, kw in kinds:
    st = SpeculativeStats()
    tps = timed(speculative_generate_step(model, ids, distribution=make_distribution(0.0),
                                          max_tokens={n_gen}, stats=st, **kw))
    out[name] = dict(tps=tps, acceptance=st.acceptance_rate, tokens_per_pass={n_gen} / st.passes)
print(json.dumps(out))
"""
)

MLX_LM_SPEC = (
    EDIT_PROMPT
    + r"""
import json, time
import mlx.core as mx
from mlx_lm import load, stream_generate
model, tok = load({model!r})
draft = load({draft!r})[0]
# float32 like qmlx on the CPU: mlx-lm's bfloat16 is ~8x slower here and would time the dtype,
# not the speculation (session 1's run with bf16 did not finish in 16 minutes).
if not mx.metal.is_available():
    model.set_dtype(mx.float32)
    draft.set_dtype(mx.float32)
ids = tok.encode(edit_prompt(tok, {code_file!r}, tokenize=False), add_special_tokens=False)
out = {{}}
for name, kw in (("plain", {{}}), ("draft", dict(draft_model=draft, num_draft_tokens=3))):
    drafted, last = 0, None
    for r in stream_generate(model, tok, ids, max_tokens={n_gen}, **kw):
        drafted += bool(r.from_draft)
        last = r
    out[name] = dict(tps=last.generation_tps, drafted=drafted / last.generation_tokens)
print(json.dumps(out))
"""
)


# Section 4: decode and prompt speed of quantized models. Greedy and never stopping early: every runtime
# decodes exactly n_gen tokens. Prompt tok/s: the prompt's tokens over the time to the first new
# token; decode tok/s: tokens after the first over the time from the first to the last.
QMLX_QUANT = (
    PROMPT_IDS
    + r"""
import json, time
import qmlx
import mlx.core as mx
from qmlx.generate import generate_step
model, tok = qmlx.load({model!r})
ids = prompt_ids(tok, {texts!r}, {n_prompt})
t0 = time.perf_counter()
n, first = 0, None
for _ in generate_step(model, mx.array(ids), max_tokens={n_gen}):
    n += 1
    first = first or time.perf_counter()
t1 = time.perf_counter()
print(json.dumps(dict(prompt_tps=len(ids) / (first - t0), gen_tps=(n - 1) / (t1 - first),
                      kernels=qmlx.kernels.status)))
"""
)

MLX_LM_QUANT = (
    PROMPT_IDS
    + r"""
import json, time
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, tok = load({model!r})
if not mx.metal.is_available():
    model.set_dtype(mx.float32)  # as qmlx on the CPU; MLX's CPU kernels are far slower in bfloat16
ids = prompt_ids(tok, {texts!r}, {n_prompt})
t0 = time.perf_counter()
n, first = 0, None
for _ in generate_step(mx.array(ids), model, max_tokens={n_gen}):
    n += 1
    first = first or time.perf_counter()
t1 = time.perf_counter()
print(json.dumps(dict(prompt_tps=len(ids) / (first - t0), gen_tps=(n - 1) / (t1 - first))))
"""
)

LLAMA_CPP_QUANT = (
    PROMPT_IDS
    + r"""
import json, os, time
import numpy as np
import llama_cpp
from llama_cpp import Llama
from tokenizers import Tokenizer
tok = Tokenizer.from_file(os.path.join({model!r}, "tokenizer.json"))
class _T:  # prompt_ids() wants .encode(text) -> ids: the same ids every runtime gets
    def encode(self, text):
        return tok.encode(text, add_special_tokens=False).ids
ids = prompt_ids(_T(), {texts!r}, {n_prompt})
threads = os.cpu_count()
llm = Llama(model_path={gguf!r}, n_ctx={n_ctx}, n_batch=512, n_ubatch=512, n_threads=threads,
            n_threads_batch=threads, verbose=False)
n_vocab = llm.n_vocab()
def last_logits():  # the last evaluated token's logits, read in place
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
t0 = time.perf_counter()
llm.eval(ids)
y = int(np.argmax(last_logits()))
first = time.perf_counter()
for _ in range({n_gen} - 1):
    llm.eval([y])
    y = int(np.argmax(last_logits()))
t1 = time.perf_counter()
print(json.dumps(dict(prompt_tps=len(ids) / (first - t0), gen_tps=({n_gen} - 1) / (t1 - first),
                      threads=threads)))
"""
)

REQUANTIZE = r"""
import ctypes, json, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = {ftype}
p.allow_requantize = True  # the fixture's GGUF is itself quantized (Q5_0-based)
p.nthread = 0
rc = llama_cpp.llama_model_quantize({src!r}.encode(), {dst!r}.encode(), ctypes.byref(p))
print(json.dumps(dict(rc=rc)))
"""

# llama.cpp's file types closest to qmlx's 4-bit and 8-bit (llama.h: LLAMA_FTYPE_MOSTLY_Q4_0 = 2, Q8_0 = 7).
LLAMA_FTYPES = {4: ("Q4_0", 2), 8: ("Q8_0", 7)}

# A build of llama-cpp-python for this machine's CPU: a native-flags build uses AMX where the CPU has it,
# which crashed here; AVX2/AVX-512 (and VNNI) are what the CPU's SIMD peers get.
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON "
    "-DGGML_AVX512_VNNI=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
    "-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
)


def ensure_llama_cpp(build: bool) -> str | None:
    """None when llama-cpp-python imports (installing it first if allowed), else why the peer is skipped."""
    check = [sys.executable, "-c", "import llama_cpp"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return None
    if not build:
        return "llama-cpp-python is not installed (--no-llama-build)"
    cmake_args = LLAMA_CMAKE_ARGS if platform.machine() in ("x86_64", "AMD64") else "-DGGML_NATIVE=ON"
    print(
        "building llama-cpp-python from PyPI for this CPU (~8 min on 2 cores; --no-llama-build skips it)…",
        flush=True,
    )
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "llama-cpp-python==0.3.36"],
        env={**os.environ, "CMAKE_ARGS": cmake_args}, capture_output=True, text=True,
    )  # fmt: skip
    if res.returncode != 0:
        return "llama-cpp-python did not build: " + res.stderr.strip()[-300:]
    return None


def default_gguf(model: str) -> str | None:
    """The fixture's GGUF when --model is the fixture, else None."""
    if os.path.realpath(model) != os.path.realpath(fixture_dir()):
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "fetch_fixture_gguf.py")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()[-1]


def quant_section(model: str, fmt: dict, args, tmp: str) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    q_fmt = dict(fmt, n_prompt=args.quant_prompt_tokens, n_gen=args.quant_gen_tokens,
                 n_ctx=args.quant_prompt_tokens + args.quant_gen_tokens + 16)  # fmt: skip
    gguf = args.gguf or default_gguf(model)
    why_no_llama = ensure_llama_cpp(not args.no_llama_build) if gguf else "no --gguf for this model"
    out: dict = {}
    for bits in (4, 8):
        folder = os.path.join(tmp, f"qmlx-{bits}bit")
        subprocess.run([sys.executable, "-m", "qmlx.cli", "convert", model, folder, "--bits", str(bits),
                        "--group-size", "64"], check=True, capture_output=True, cwd=os.path.join(here, ".."))  # fmt: skip
        codes = {"qmlx": QMLX_QUANT.format(**dict(q_fmt, model=folder))}
        if why_no_llama is None:
            name, ftype = LLAMA_FTYPES[bits]
            dst = os.path.join(tmp, f"model-{name}.gguf")
            rc = run_isolated(REQUANTIZE.format(ftype=ftype, src=gguf, dst=dst))["rc"]
            if rc != 0:
                raise RuntimeError(f"llama.cpp's quantize to {name} failed ({rc})")
            codes[f"llama.cpp {name}"] = LLAMA_CPP_QUANT.format(**dict(q_fmt, gguf=dst))
        out[f"{bits}-bit"] = rows = best_of_rounds(codes, args.rounds)
        if not args.no_mlx_lm_quant:  # once: on a CPU MLX's own kernels take minutes a run, far behind either
            rows["mlx-lm (float32)"] = run_isolated(MLX_LM_QUANT.format(**dict(q_fmt, model=folder)))
    print(f"4. quantized models: prompt {args.quant_prompt_tokens} tokens, {args.quant_gen_tokens} decoded "
          f"(greedy), qmlx kernels: {out['4-bit']['qmlx']['kernels']}; best of {args.rounds} alternating rounds")  # fmt: skip
    if why_no_llama:
        print(f"(llama.cpp skipped: {why_no_llama})")
    print(f"{'':26} {'prompt tok/s':>13} {'decode tok/s':>13} {'prompt vs peer':>15} {'decode vs peer':>15}")
    for width, rows in out.items():
        peer = next((r for name, r in rows.items() if name.startswith("llama.cpp")), None)
        for name, r in rows.items():
            label = f"{width} {name}" if name != "qmlx" else f"{width} qmlx g64"
            vs = ("", "") if peer is None or r is peer else (ratio(r["prompt_tps"], peer["prompt_tps"]),
                                                           ratio(r["gen_tps"], peer["gen_tps"]))  # fmt: skip
            print(f"{label:26} {r['prompt_tps']:13.1f} {r['gen_tps']:13.1f} {vs[0]:>15} {vs[1]:>15}")
    print("(vs peer: against llama.cpp of the same width, measured in this run; targets: decode >= 0.7x, "
          "prompt >= 0.5x)\n")  # fmt: skip
    return out


def best_of_rounds(codes: dict[str, str], rounds: int) -> dict[str, dict]:
    """Each peer's run, the peers alternating for `rounds` rounds; per peer the round with the fastest decode
    (its prompt rate from that same round). On a shared machine the host's load drifts over minutes: one run
    each would hand the drift to whichever peer ran in a slow minute, alternating rounds share it out."""
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    for _ in range(rounds):
        for name, code in codes.items():
            runs[name].append(run_isolated(code))
    return {name: dict(max(rs, key=lambda r: r["gen_tps"]), rounds=len(rs)) for name, rs in runs.items()}


def make_4bit_draft(model: str, folder: str) -> str | None:
    """The model quantized to 4 bits by `qmlx convert`, or None if that is not possible."""
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-m", "qmlx.cli", "convert", model, folder, "--bits", "4"],
        capture_output=True, text=True, cwd=os.path.join(here, ".."), check=False,
    )  # fmt: skip
    if res.returncode != 0:
        print(f"(4-bit draft unavailable: {res.stderr.strip()[-300:]})")
        return None
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--context-tokens", type=int, default=4096, help="context of the KV-memory section")
    ap.add_argument("--spec-tokens", type=int, default=96, help="tokens generated per speculative run")
    ap.add_argument("--reference-blas", action="store_true", help="also time qmlx without OpenBLAS (slow)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: speed,kv,spec,quant")
    ap.add_argument("--quant-prompt-tokens", type=int, default=512)
    ap.add_argument("--quant-gen-tokens", type=int, default=128)
    ap.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of section 4 (best of each peer)"
    )
    ap.add_argument("--gguf", default=None, help="the model's GGUF for llama.cpp (default: the fixture's)")
    ap.add_argument(
        "--no-llama-build",
        action="store_true",
        help="skip llama.cpp when llama-cpp-python is missing instead of building it",
    )
    ap.add_argument("--no-mlx-lm-quant", action="store_true", help="section 4 without mlx-lm's rows")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: give at least 1 round")
    skip = set(args.skip.split(","))

    model = model_dir(args.model)
    here = os.path.dirname(os.path.abspath(__file__))
    texts_dir = os.path.join(here, "..", "..", "shared", "fixtures", "texts")
    code_file = os.path.join(texts_dir, "python_textwrap.py.txt")
    texts = [code_file] + [
        os.path.join(texts_dir, f) for f in ("korean_qwen2_review.txt", "chinese_qwen25_release.txt")
    ]
    fmt = dict(model=model, texts=texts, n_prompt=args.prompt_tokens, n_gen=args.gen_tokens)
    print(f"model: {model}\n")
    results: dict = {}

    if "speed" not in skip:
        runs = {"qmlx": run_isolated(QMLX.format(**fmt))}
        if args.reference_blas:  # ~20x slower prompts: 10 minutes for this row alone on 2 cores
            runs["qmlx (reference BLAS)"] = run_isolated(QMLX.format(**fmt), env={"QMLX_OPENBLAS": "0"})
        runs["mlx-lm"] = run_isolated(MLX_LM.format(**fmt))
        results["speed"] = runs
        peer, q = runs["mlx-lm"], runs["qmlx"]
        print(f"1. prompt {args.prompt_tokens} tokens, {args.gen_tokens} generated (greedy)")
        print(f"{'':24} {'load s':>7} {'TTFT s':>7} {'prompt tok/s':>13} {'gen tok/s':>10} "
              f"{'peak GB':>8} {'RSS GB':>7}")  # fmt: skip
        for name, r in runs.items():
            print(f"{name:24} {r['load_s']:7.2f} {r['ttft']:7.2f} {r['prompt_tps']:13.1f} "
                  f"{r['gen_tps']:10.1f} {r['peak_gb']:8.2f} {r['rss_gb']:7.2f}")  # fmt: skip
        print(f"qmlx vs mlx-lm: TTFT {ratio(q['ttft'], peer['ttft'])} (lower is better), "
              f"prompt speed {ratio(q['prompt_tps'], peer['prompt_tps'])}, "
              f"generation speed {ratio(q['gen_tps'], peer['gen_tps'])}, "
              f"peak memory {ratio(q['peak_gb'], peer['peak_gb'])}, "
              f"load time {ratio(q['load_s'], peer['load_s'])}\n")  # fmt: skip

    if "kv" not in skip:
        kv_fmt = dict(fmt, n_ctx=args.context_tokens)
        kv = {
            "qmlx": run_isolated(QMLX_KV.format(**kv_fmt)),
            "mlx-lm": run_isolated(MLX_LM_KV.format(**kv_fmt)),
        }
        results["kv"] = kv
        print(f"2. a {args.context_tokens}-token context: bfloat16 KV cache of the model's shapes, by width")
        print(f"{'':8} {'':8} {'KV MB':>8} {'held MB':>8} {'peak MB':>8}")
        for name, r in kv.items():
            for bits, m in r.items():
                print(
                    f"{name:8} {bits + '-bit':8} {m['cache_mb']:8.1f} {m['active_mb']:8.1f} {m['peak_mb']:8.1f}"
                )
        q, p = kv["qmlx"], kv["mlx-lm"]
        print("qmlx vs mlx-lm KV bytes: " + ", ".join(
            f"{b}-bit {ratio(q[b]['cache_mb'], p[b]['cache_mb'])}" for b in q
        ) + f"; qmlx 8-bit / 16-bit {ratio(q['8']['cache_mb'], q['16']['cache_mb'])}, "
            f"4-bit / 16-bit {ratio(q['4']['cache_mb'], q['16']['cache_mb'])}\n")  # fmt: skip

    if "spec" not in skip:
        tmp = tempfile.mkdtemp(prefix="qmlx-bench-")
        draft = make_4bit_draft(model, os.path.join(tmp, "draft-4bit")) or ""
        s_fmt = dict(model=model, draft=draft, code_file=code_file, n_gen=args.spec_tokens)
        spec = {"qmlx": run_isolated(QMLX_SPEC.format(**s_fmt))}
        results["spec"] = spec
        q = spec["qmlx"]
        print(
            f"3. speculative decoding, code edit ({q['prompt_tokens']}-token prompt, "
            f"{args.spec_tokens} tokens, greedy)"
        )
        print(f"{'':28} {'gen tok/s':>10} {'speedup':>8} {'accepted':>9} {'tok/pass':>9}")
        print(f"{'qmlx plain':28} {q['plain']['tps']:10.1f}")
        for name, label in (
            ("lookup", "qmlx prompt lookup (n=3,k=4)"),
            ("draft", "qmlx 4-bit draft (k=3)"),
        ):
            if name in q:
                r = q[name]
                print(f"{label:28} {r['tps']:10.1f} {ratio(r['tps'], q['plain']['tps']):>8} "
                      f"{r['acceptance']:9.0%} {r['tokens_per_pass']:9.2f}", flush=True)  # fmt: skip
        if draft:  # printed above first: the peer's run is the long one
            spec["mlx-lm"] = m = run_isolated(MLX_LM_SPEC.format(**s_fmt))
            print(f"{'mlx-lm plain (float32)':28} {m['plain']['tps']:10.1f}")
            print(f"{'mlx-lm 4-bit draft (k=3)':28} {m['draft']['tps']:10.1f} "
                  f"{ratio(m['draft']['tps'], m['plain']['tps']):>8} {'':>9} {'':>9}"
                  f"  ({m['draft']['drafted']:.0%} of tokens drafted)")  # fmt: skip
            if "draft" in q:
                print(f"qmlx vs mlx-lm, 4-bit draft: {ratio(q['draft']['tps'], m['draft']['tps'])}")
        print("(accepted = drafted tokens the model kept; tok/pass = tokens per model pass)\n")
    if "quant" not in skip:
        with tempfile.TemporaryDirectory(prefix="qmlx-bench-quant-") as tmp:
            results["quant"] = quant_section(model, fmt, args, tmp)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
