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
    return (
        subprocess.run([script], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    )


def model_dir(given: str | None) -> str:
    """--model's folder, or the shared fixture; exits with one line if it is not a model folder."""
    folder = given or fixture_dir()
    if not os.path.isfile(os.path.join(folder, "config.json")):
        sys.exit(f"--model {folder}: not a model folder (no config.json)")
    return folder


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


def ppl_row(label: str, size_bytes: float, bpw: float, ppls: list, deltas: list | None, extra=()) -> str:
    """One markdown row of the perplexity tables: size, bits/weight, each text's perplexity
    (with its change against bf16 unless `deltas` is None), the mean change, extra cells."""
    if deltas is None:
        cells, mean = [f"{p:.3f}" for p in ppls], "—"
    else:
        cells = [f"{p:.3f} ({d:+.1%})" for p, d in zip(ppls, deltas)]
        mean = f"{sum(deltas) / len(deltas):+.2%}"
    return f"| {label} | {size_bytes / 1e6:.0f} MB | {bpw:.2f} | " + " | ".join([*cells, mean, *extra]) + " |"


def replace_section(path: str, begin: str, end: str, text: str) -> None:
    """Replace what lies between the markers `begin` and `end` of a docs file with `text`."""
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    start, stop = doc.index(begin) + len(begin), doc.index(end)
    with open(path, "w", encoding="utf-8") as f:
        f.write(doc[:start] + "\n" + text + "\n" + doc[stop:])


def load_rows(path: str) -> dict:
    """{label: row} cached by an earlier run of a table script (empty if none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return {r["label"]: r for r in json.load(f)}
    except (ValueError, TypeError, KeyError) as e:
        sys.exit(f"--results {path}: not a results file of this script ({e}); move it away or pass another")


def save_rows(path: str, rows: dict) -> None:
    """Write the cached rows whole or not at all (an interrupted write leaves the old file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(list(rows.values()), f, indent=1)
    os.replace(tmp, path)
