"""Load test of `qmlx serve`: many streaming clients, some hanging up, plus malformed requests.

    .venv/bin/python benchmarks/bench_server.py [--model DIR] [--clients 16] [--max-tokens 24]

Starts `qmlx serve` in a subprocess on a free loopback port, then:
  1. reference: each distinct prompt once, alone (greedy), for the expected answers
  2. load: --clients streaming clients at once (every --disconnect-every'th hangs up after a
     few chunks), while another task sends --malformed bad requests (invalid JSON, wrong
     types, oversized bodies, raw garbage, half-sent requests)
  3. recovery: the server must be idle again, answer, and return to its idle memory

Checks: every well-formed request completes with the reference answer, every bad request gets
a 4xx (never a 5xx), the server stays up, and its resident memory returns near the idle level.
Prints requests served, errors by kind, and throughput. Loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx2 as httpx
from common import model_dir

HOST = "127.0.0.1"  # never anything but loopback
PROMPTS = [
    "Name three primary colors.",
    "Write a Python function that adds two numbers.",
    "What is the capital of Japan?",
    "Explain recursion in one sentence.",
]


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


def start_server(model: str, port: int, concurrency: int) -> subprocess.Popen:
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, "-m", "qmlx.cli", "serve", "--model", model, "--host", HOST]
    cmd += ["--port", str(port), "--max-concurrency", str(concurrency)]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qmlx-serve-{port}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(here))
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 120 s")


def body(prompt: str, max_tokens: int, stream: bool) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def stream_client(client, prompt, max_tokens, hang_up_after: int | None) -> dict:
    """One streaming chat; returns its text, usage, timing, or that it hung up."""
    start, first, text, usage, done, n = time.perf_counter(), None, [], None, False, 0
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt, max_tokens, True)) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"]:
                piece = event["choices"][0]["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
                    n += 1
            if hang_up_after is not None and n >= hang_up_after:
                return {"hung_up": True}
    return {
        "status": 200,
        "text": "".join(text),
        "usage": usage,
        "done": done,
        "ttft": (first or time.perf_counter()) - start,
        "elapsed": time.perf_counter() - start,
    }


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
                    "json_schema": {"schema": {"type": "string", "pattern": "x"}},
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


async def load_phase(url, port, args, expected) -> tuple[list, collections.Counter, float]:
    outcomes: collections.Counter = collections.Counter()
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        jobs = []
        for i in range(args.clients):
            hang = (
                3
                if args.disconnect_every and i % args.disconnect_every == args.disconnect_every - 1
                else None
            )
            jobs.append(stream_client(client, PROMPTS[i % len(PROMPTS)], args.max_tokens, hang))
        bad = malformed_stream(url, port, args.malformed, outcomes)
        results = await asyncio.gather(*jobs, bad)
        elapsed = time.perf_counter() - start
    return list(zip(range(args.clients), results[:-1])), outcomes, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the shared Qwen2.5 fixture)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--disconnect-every", type=int, default=4, help="every Nth client hangs up")
    ap.add_argument("--malformed", type=int, default=120, help="bad requests sent during the load")
    ap.add_argument("--max-concurrency", type=int, default=4)
    args = ap.parse_args()
    model = model_dir(args.model)
    port = free_port()
    url = f"http://{HOST}:{port}"
    print(f"model: {model}\nserver: {url} (max concurrency {args.max_concurrency})")
    proc = start_server(model, port, args.max_concurrency)
    failures = []
    try:
        # 1. reference answers, one request at a time (this also warms the server up)
        expected, ref_tokens, ref_start = {}, 0, time.perf_counter()
        for p in PROMPTS:
            r = httpx.post(url + "/v1/chat/completions", json=body(p, args.max_tokens, False), timeout=600)
            expected[p] = r.json()["choices"][0]["message"]["content"]
            ref_tokens += r.json()["usage"]["completion_tokens"]
        ref_rate = ref_tokens / (time.perf_counter() - ref_start)
        print(f"one request at a time: {ref_rate:.1f} tokens/s (includes warm-up)")
        time.sleep(1.0)
        idle = rss_mb(proc.pid)
        print(f"idle memory after warm-up: {idle:.0f} MB")

        # 2. load
        results, outcomes, elapsed = asyncio.run(load_phase(url, port, args, expected))
        finished = [(i, r) for i, r in results if not r.get("hung_up")]
        hung = len(results) - len(finished)
        tokens = 0
        for i, r in finished:
            want = expected[PROMPTS[i % len(PROMPTS)]]
            if r.get("status") != 200 or not r.get("done") or r.get("text") != want:
                failures.append(
                    f"client {i}: {r if r.get('status') != 200 else repr(r.get('text'))} != {want!r}"
                )
            tokens += (r.get("usage") or {}).get("completion_tokens", 0)
        peak = rss_mb(proc.pid)

        # 3. recovery
        deadline = time.time() + 60
        while time.time() < deadline:
            h = httpx.get(url + "/health", timeout=5).json()
            if h["active"] == 0 and h["queued"] == 0:
                break
            time.sleep(0.2)
        after = httpx.post(
            url + "/v1/chat/completions", json=body(PROMPTS[0], args.max_tokens, False), timeout=600
        )
        if after.json()["choices"][0]["message"]["content"] != expected[PROMPTS[0]]:
            failures.append("the answer after the load differs from the reference")
        time.sleep(1.0)
        settled = rss_mb(proc.pid)
        if proc.poll() is not None:
            failures.append("the server died")

        ttfts = [r["ttft"] for _, r in finished if "ttft" in r]
        print(f"\nwell-formed streams: {len(finished)} completed, {hung} hung up on purpose")
        rate = tokens / elapsed
        print(
            f"  {tokens} tokens in {elapsed:.1f} s: {rate:.1f} tokens/s aggregate "
            f"({rate / ref_rate:.2f}x one at a time), {len(finished) / elapsed:.2f} requests/s"
        )
        if ttfts:
            print(f"  time to first token: median {statistics.median(ttfts):.2f} s, max {max(ttfts):.2f} s")
        print(f"server counters: {json.dumps({k: v for k, v in h.items() if k not in ('status', 'model')})}")
        print("malformed requests, by kind and answer:")
        for (kind, status), n in sorted(outcomes.items(), key=lambda kv: str(kv[0])):
            print(f"  {kind:22s} -> {status}: {n}")
            if str(status).startswith(("BAD", "5")):
                failures.append(f"{kind} got {status}")
        print(
            f"memory: idle {idle:.0f} MB, under load {peak:.0f} MB, after {settled:.0f} MB "
            f"({settled - idle:+.0f} MB)"
        )
        if settled > idle * 1.15 + 50:
            failures.append(f"memory did not return to idle ({idle:.0f} -> {settled:.0f} MB)")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    print("\n" + ("PASS" if not failures else "FAIL:\n  " + "\n  ".join(failures)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
