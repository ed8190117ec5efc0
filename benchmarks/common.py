"""Helpers for benchmarks: run a snippet in a fresh process and collect its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
