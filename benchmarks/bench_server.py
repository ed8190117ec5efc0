"""`qmlx serve` against `mlx_lm.server` on the same model: throughput and latency under concurrent clients,
then a storm of malformed requests and clients that hang up.

    .venv/bin/python benchmarks/bench_server.py [--model QUANTIZED_DIR] [--levels 1,4,8,16] [--skip-mlx-lm]

Without --model the shared Qwen2.5 fixture is quantized to 4 bits (group 64) by `qmlx convert` into a
temporary folder, and both servers load that folder (mlx-lm reads qmlx's output; tests/test_convert.py).
The servers run one after the other, each in its own process on a free loopback port, and see the same
requests. On a CPU mlx-lm loads a copy of the folder whose scales, biases and norms are float32 (the same
numbers; MLX's CPU kernels are ~10x slower in bfloat16, and mlx_lm.server has no dtype option). Each server
first answers every prompt of the chosen mixes alone (warm-up, and the answers the storm checks against).

  1. levels: at each concurrency level C, C streaming clients each send --requests chat requests one
     after the other (greedy, --max-tokens). Every request starts with the same system prompt; the user
     message alternates between a short question and a long one (~400 tokens of code to explain), and
     starts with the request's number, so what requests share is the system prompt, not their message.
     Per level: aggregate generated tokens/s (completion tokens of all requests / wall time) and the
     p50 / p99 time to first token. A failed well-formed request is a failure of the run.
  2. storm (qmlx only): --storm-clients streaming clients at once, every --disconnect-every'th hanging up
     after a few chunks, while --malformed bad requests arrive (invalid JSON, wrong types, oversized
     bodies, raw garbage, half-sent requests). Every completed stream must equal the answer the same
     request got alone, every bad request must get a 4xx (never a 5xx), the server must stay up.
  3. memory (qmlx only): resident memory after warm-up, under load, and once idle again; idle must
     come back to the warm level plus what the shared prefix caches hold (/metrics), within 15%.

Prints one table with ratios measured in this run (absolute speed on a shared machine is noise) and
checks the issue's targets: at 8 clients, qmlx >= 3x its own single-client throughput and >= 1.2x
mlx-lm's server. Loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import httpx2 as httpx
import mlx.core as mx
from common import model_dir

HOST = "127.0.0.1"  # never anything but loopback
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM = (
    "You are a careful senior software engineer. Answer in plain English, briefly and precisely. "
    "When you explain code, say what it computes, its inputs and outputs, and one thing that could go "
    "wrong. When you write code, write idiomatic Python 3 with type hints and no external packages. "
    "Never invent APIs; if you are unsure, say so. Keep every answer under a hundred words."
)
SHORT = [
    "Name three primary colors.",
    "What is the capital of Japan?",
    "Explain recursion in one sentence.",
    "Write a Python function that adds two numbers.",
]


def long_prompts() -> list[str]:
    """Two ~400-token requests: explain a piece of qmlx's own source (present in every checkout)."""
    out = []
    for name in ("qmlx/decode.py", "qmlx/sample.py"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            code = f.read()[2000:3600]
        out.append(f"Explain what this code does:\n\n```python\n{code}\n```")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(kind: str, model: str, port: int, concurrency: int) -> subprocess.Popen:
    if kind == "qmlx":
        cmd = [
            sys.executable,
            "-m",
            "qmlx.cli",
            "serve",
            "--model",
            model,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        cmd += ["--max-concurrency", str(concurrency)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            model,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        cmd += ["--decode-concurrency", str(concurrency), "--log-level", "WARNING"]
    log = open(os.path.join(tempfile.gettempdir(), f"bench-server-{kind}-{port}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} server exited with {proc.returncode}; see {log.name}")
        try:
            r = httpx.get(f"http://{HOST}:{port}/health", timeout=1)
            if r.status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the {kind} server did not come up in 300 s; see {log.name}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def body(user: str, max_tokens: int, stream: bool = True) -> dict:
    return {
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }


async def stream_client(client, payload: dict, hang_up_after: int | None = None) -> dict:
    """One streaming chat: its text, completion tokens, time to first token, or why it failed."""
    start, first, text, usage, done, n = time.perf_counter(), None, [], None, False, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                return {"error": f"status {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": str(event["error"])[:200]}
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("choices"):
                    piece = event["choices"][0].get("delta", {}).get("content")
                    if piece:
                        first = first or time.perf_counter()
                        text.append(piece)
                        n += 1
                if hang_up_after is not None and n >= hang_up_after:
                    return {"hung_up": True}
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done:
        return {"error": "the stream ended without [DONE]"}
    return {
        "text": "".join(text),
        "tokens": (usage or {}).get("completion_tokens", n),
        "ttft": (first or time.perf_counter()) - start,
    }


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def run_level(url: str, clients: int, requests: int, max_tokens: int, level_id: str, mix: str) -> dict:
    users = [*SHORT, *long_prompts()]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:

        async def one_client(i: int) -> list[dict]:
            out = []
            for j in range(requests):
                k = i * requests + j
                long_turn = mix == "mixed" and k % 2
                user = (
                    users[len(SHORT) + k // 2 % 2]
                    if long_turn
                    else SHORT[k // (1 + (mix == "mixed")) % len(SHORT)]
                )
                # A request number up front: requests share the system prompt, not their message.
                out.append(await stream_client(client, body(f"(request {level_id}.{k}) {user}", max_tokens)))
            return out

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(i) for i in range(clients))) for r in rs]
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok]
    return {
        "clients": clients,
        "requests": len(results),
        "failed": [r["error"] for r in results if "error" in r],
        "tokens": sum(r["tokens"] for r in ok),
        "seconds": elapsed,
        "tps": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_p50": percentile(ttfts, 0.5),
        "ttft_p99": percentile(ttfts, 0.99),
    }


# ---------------------------------------------------------------------- the storm (qmlx only)

MALFORMED_BODIES = [
    ("invalid JSON", b'{"messages": [', "application/json"),
    ("not an object", b"[1, 2, 3]", "application/json"),
    ("wrong type", b'{"messages": "hello"}', "application/json"),
    ("bad role", b'{"messages": [{"role": "robot", "content": "x"}]}', "application/json"),
    (
        "negative max_tokens",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}',
        "application/json",
    ),
    (
        "absurd max_tokens",
        b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 99999999}',
        "application/json",
    ),
    (
        "string temperature",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
        "application/json",
    ),
    ("binary garbage", bytes(range(256)), "application/octet-stream"),
    (
        "bad schema",
        json.dumps(
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {
                    "type": "json_schema",
                    # an unclosed group in the pattern (a plain pattern like "x" is valid JSON Schema)
                    "json_schema": {"schema": {"type": "string", "pattern": "(unclosed"}},
                },
            }
        ).encode(),
        "application/json",
    ),
    (
        "oversized body",
        b'{"messages": [{"role": "user", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}]}',
        "application/json",
    ),
]


async def raw_abuse(port: int, kind: str) -> str:
    """Connection-level abuse: a half-sent request, or bytes that are not HTTP at all."""
    reader, writer = await asyncio.open_connection(HOST, port)
    if kind == "half request":
        writer.write(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"mess')
    else:
        writer.write(os.urandom(512))
    await writer.drain()
    try:
        line = await asyncio.wait_for(reader.readline(), timeout=0.5)
    except asyncio.TimeoutError:
        line = b""
    writer.close()
    return line.decode(errors="replace").split(" ")[1] if line.startswith(b"HTTP/") else "dropped"


async def malformed_stream(url: str, port: int, count: int, outcomes: collections.Counter) -> None:
    rng = random.Random(0)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i in range(count):
            if i % 10 == 9:
                kind = rng.choice(["half request", "not HTTP"])
                outcomes[(kind, await raw_abuse(port, kind))] += 1
                continue
            kind, data, ctype = MALFORMED_BODIES[(i - i // 10) % len(MALFORMED_BODIES)]
            try:
                r = await client.post("/v1/chat/completions", content=data, headers={"content-type": ctype})
                ok = r.status_code < 500 and "error" in r.json()
                outcomes[(kind, r.status_code if ok else f"BAD {r.status_code}")] += 1
            except httpx.HTTPError as e:  # a refused oversized upload may be cut off while sending
                outcomes[(kind, type(e).__name__)] += 1
            await asyncio.sleep(0.01)


async def storm(url: str, port: int, args, expected: dict) -> tuple[list[str], collections.Counter, int]:
    outcomes: collections.Counter = collections.Counter()
    failures, hung = [], 0
    limits = httpx.Limits(max_connections=args.storm_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:
        jobs = []
        for i in range(args.storm_clients):
            every = args.disconnect_every
            hang = 3 if every and i % every == every - 1 else None
            jobs.append(stream_client(client, body(SHORT[i % len(SHORT)], args.max_tokens), hang))
        results = await asyncio.gather(*jobs, malformed_stream(url, port, args.malformed, outcomes))
    for i, r in enumerate(results[:-1]):
        if r.get("hung_up"):
            hung += 1
        elif "error" in r or r["text"] != expected[SHORT[i % len(SHORT)]]:
            failures.append(f"storm client {i}: {r.get('error') or repr(r['text'])}")
    for (kind, status), _ in outcomes.items():
        if str(status).startswith(("BAD", "5")):
            failures.append(f"malformed request {kind!r} got {status}")
    return failures, outcomes, hung


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(url + "/health", timeout=5).json()
        if h["active"] == 0 and h["queued"] == 0:
            return
        time.sleep(0.2)


# ---------------------------------------------------------------------- main


def quantized_fixture(tmp: str, bits: int) -> str:
    src = model_dir(None)
    dst = os.path.join(tmp, f"q{bits}")
    print(f"quantizing {src} to {bits} bits (qmlx convert) ...", flush=True)
    cmd = [sys.executable, "-m", "qmlx.cli", "convert", src, dst, "--bits", str(bits), "--group-size", "64"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return dst


def float32_copy(model: str, tmp: str) -> str:
    """The model with its floating-point tensors (scales, biases, norms) in float32 and the packed weights
    untouched: the same numbers (bfloat16 -> float32 is exact). On a CPU MLX's kernels run ~10x slower in
    bfloat16 than in float32 (mlx_lm.generate, 4-bit fixture, 16 tokens: 0.27 vs 2.76 tok/s here) and
    mlx_lm.server has no dtype option, so mlx-lm is given its fastest CPU form, as bench_generate does."""
    dst = os.path.join(tmp, "mlx-lm-float32")
    shutil.copytree(model, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            tensors = mx.load(os.path.join(model, name))
            cast = {
                k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                for k, v in tensors.items()
            }
            mx.save_safetensors(os.path.join(dst, name), cast, metadata={"format": "mlx"})
    return dst


def bench(kind: str, model: str, args, levels: list[int]) -> dict:
    port = free_port()
    url = f"http://{HOST}:{port}"
    proc = start_server(kind, model, port, max(levels))
    out: dict = {"levels": {}, "failures": []}
    try:
        users = [*SHORT, *(long_prompts() if "mixed" in args.mixes else [])]
        expected = {}
        for u in users:  # warm-up, and each request's answer alone
            r = httpx.post(
                url + "/v1/chat/completions", json=body(u, args.max_tokens, stream=False), timeout=1800
            )
            expected[u] = r.json()["choices"][0]["message"]["content"]
        time.sleep(1.0)
        out["idle_mb"] = rss_mb(proc.pid)
        for mix in args.mixes:
            for c in levels:
                res = asyncio.run(run_level(url, c, args.requests, args.max_tokens, f"{mix}{c}", mix))
                out["levels"][mix, c] = res
                out["failures"] += [f"{kind}, {mix}, {c} clients: {e}" for e in res["failed"]]
                print(
                    f"  {kind:7s} {mix:5s} {c:3d} clients: {res['tokens']:5d} tokens in {res['seconds']:6.1f} s = "
                    f"{res['tps']:6.1f} tok/s, TTFT p50 {res['ttft_p50']:.2f} s p99 {res['ttft_p99']:.2f} s",
                    flush=True,
                )
        if kind == "qmlx" and not args.skip_storm:
            failures, outcomes, hung = asyncio.run(storm(url, port, args, expected))
            out["failures"] += failures
            out["storm"] = (outcomes, hung)
            out["load_mb"] = rss_mb(proc.pid)
            wait_idle(url)
            again = httpx.post(
                url + "/v1/chat/completions", json=body(SHORT[0], args.max_tokens, False), timeout=600
            )
            if again.json()["choices"][0]["message"]["content"] != expected[SHORT[0]]:
                out["failures"].append("after the storm, an answer differs from the one before")
            time.sleep(1.0)
            out["settled_mb"] = rss_mb(proc.pid)
            out["metrics"] = metrics(url)
            held = out["metrics"].get("qmlx_prefix_cache_bytes", 0) / 2**20
            out["prefix_mb"] = held
            if out["settled_mb"] > (out["idle_mb"] + held) * 1.15 + 50:
                out["failures"].append(
                    f"memory did not return to idle: {out['idle_mb']:.0f} MB warm, {out['settled_mb']:.0f} MB after "
                    f"(prefix caches hold {held:.0f} MB)"
                )
        if proc.poll() is not None:
            out["failures"].append(f"the {kind} server died")
    finally:
        stop_server(proc)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a quantized model folder (default: the fixture, quantized here)")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8), help="bits when quantizing the fixture")
    ap.add_argument("--levels", default="1,4,8,16", help="concurrent clients per level")
    ap.add_argument("--requests", type=int, default=2, help="requests per client per level")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument(
        "--mixes",
        default="mixed,short",
        help="request mixes: mixed (every other request long) and/or short (short questions only)",
    )
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--skip-storm", action="store_true")
    ap.add_argument("--storm-clients", type=int, default=16)
    ap.add_argument("--disconnect-every", type=int, default=4, help="every Nth storm client hangs up")
    ap.add_argument("--malformed", type=int, default=120, help="bad requests sent during the storm")
    args = ap.parse_args()
    try:
        levels = sorted({int(x) for x in args.levels.split(",")})
    except ValueError:
        sys.exit(f"--levels {args.levels!r}: give client counts separated by commas, e.g. 1,4,8,16")
    if not levels or levels[0] < 1:
        sys.exit("--levels: every level needs at least one client")
    args.mixes = [m for m in args.mixes.split(",") if m]
    if not args.mixes or set(args.mixes) - {"mixed", "short"}:
        sys.exit(f"--mixes {','.join(args.mixes)!r}: give mixed, short or both")
    tmp = tempfile.mkdtemp(prefix="bench-server-")
    try:
        model = model_dir(args.model) if args.model else quantized_fixture(tmp, args.bits)
        print(
            f"model: {model}\nlevels: {levels}, {args.requests} requests per client, {args.max_tokens} tokens each"
        )
        runs = {"qmlx": bench("qmlx", model, args, levels)}
        if not args.skip_mlx_lm:
            theirs = model if mx.metal.is_available() else float32_copy(model, tmp)
            runs["mlx-lm"] = bench("mlx-lm", theirs, args, levels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(runs, levels, args)
    failures = [f for r in runs.values() for f in r["failures"]]
    print("\n" + ("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)))
    return 0 if not failures else 1


def report(runs: dict, levels: list[int], args) -> None:
    q = runs["qmlx"]["levels"]
    m = runs.get("mlx-lm", {}).get("levels", {})
    for mix in args.mixes:
        what = "every other request long (~400 tokens)" if mix == "mixed" else "short questions only"
        print(f"\n{mix}: {what}; one shared system prompt")
        print(
            "| clients | qmlx tok/s | x qmlx at 1 | TTFT p50 / p99 | mlx-lm tok/s | TTFT p50 / p99 | qmlx / mlx-lm |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        single = q[mix, 1]["tps"] if (mix, 1) in q else float("nan")
        for c in levels:
            a, b = q[mix, c], m.get((mix, c))
            cells = [
                f"{c}",
                f"{a['tps']:.1f}",
                f"{a['tps'] / single:.2f}x",
                f"{a['ttft_p50']:.2f} / {a['ttft_p99']:.2f} s",
            ]
            if b:
                cells += [
                    f"{b['tps']:.1f}",
                    f"{b['ttft_p50']:.2f} / {b['ttft_p99']:.2f} s",
                    f"{a['tps'] / b['tps']:.2f}x",
                ]
            else:
                cells += ["—", "—", "—"]
            print("| " + " | ".join(cells) + " |")
        if (mix, 8) in q and (mix, 1) in q:
            x1 = q[mix, 8]["tps"] / single
            line = f"target at 8 clients: >= 3x qmlx's single client: {x1:.2f}x ({'met' if x1 >= 3 else 'NOT met'})"
            if (mix, 8) in m:
                xm = q[mix, 8]["tps"] / m[mix, 8]["tps"]
                line += f"; >= 1.2x mlx-lm's server: {xm:.2f}x ({'met' if xm >= 1.2 else 'NOT met'})"
            print(line)
    r = runs["qmlx"]
    if "storm" in r:
        outcomes, hung = r["storm"]
        print(
            f"\nstorm: {args.storm_clients} streaming clients ({hung} hung up on purpose), {args.malformed} bad requests:"
        )
        for (kind, status), n in sorted(outcomes.items(), key=lambda kv: str(kv[0])):
            print(f"  {kind:22s} -> {status}: {n}")
        print(
            f"memory: warm {r['idle_mb']:.0f} MB, after the storm {r['load_mb']:.0f} MB, idle again "
            f"{r['settled_mb']:.0f} MB (prefix caches hold {r['prefix_mb']:.0f} MB)"
        )
        mt = r["metrics"]
        print(
            f"server metrics: {mt.get('qmlx_requests_completed_total', 0):.0f} completed, "
            f"{mt.get('qmlx_requests_cancelled_total', 0):.0f} cancelled, {mt.get('qmlx_requests_failed_total', 0):.0f} failed, "
            f"{mt.get('qmlx_cached_prompt_tokens_total', 0):.0f} prompt tokens from shared prefix caches"
        )


if __name__ == "__main__":
    sys.exit(main())
