"""Helpers for benchmarks: run a snippet in a fresh process and collect its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys


# Source for scripts run in a child process: `peak_rss()` is that process's peak resident
# memory in bytes. On Linux it reads VmHWM, which starts afresh at exec; ru_maxrss would also
# count the memory of the (possibly large) process the child was forked from.
PEAK_RSS_SOURCE = """
def peak_rss():
    import resource, sys
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
"""


def fixture_dir() -> str:
    if os.environ.get("QMLX_FIXTURE_DIR"):
        return os.environ["QMLX_FIXTURE_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(here, "..", "..", "shared", "fixtures", "qwen-fixture")
    return subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


def run_isolated(code: str, env: dict | None = None, timeout: int = 1800) -> dict:
    """Run `code` in a new interpreter; it must print one JSON object as its last line."""
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
