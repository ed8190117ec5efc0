"""SIGTERM and SIGHUP (what `timeout`, a service manager or a closed terminal send) stop every long-running
command the way Ctrl-C does: one line on stderr, status 128 + the signal, nothing half-written left behind.

Each command runs as a real process; the signal is sent once it is provably in the middle of its work
(its hidden output folder exists, its first checkpoint is written, or it is blocked reading its input).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny import tiny_config, write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A model big enough that converting or fusing it takes a while, an adapter for it, and data."""
    root = tmp_path_factory.mktemp("signals")
    cfg = tiny_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8)
    write_folder(str(root / "m"), cfg, shards=4)
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(16):
            f.write(json.dumps({"text": f"sample {i} " + "x y " * (i % 5)}) + "\n")
    run(["lora", "-m", str(root / "m"), "--data", str(root / "data"), "--adapter-path", str(root / "a"),
         "--iters", "1", "--batch-size", "2", "--rank", "2", "--max-seq-len", "32"], check=True)  # fmt: skip
    return root


def env() -> dict:
    path = [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    # PYTHONFAULTHANDLER: a process that hangs after the signal is aborted with its stacks on stderr.
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONFAULTHANDLER": "1"}


def run(argv, check=False):
    argv = [sys.executable, "-m", "qmlx", *argv]
    return subprocess.run(argv, env=env(), capture_output=True, check=check, timeout=300)


def start(argv, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "qmlx", *argv], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"timed out waiting for {what}:\n{proc.communicate()[1].decode()[-6000:]}")
        time.sleep(0.002)


def stop(proc: subprocess.Popen, sig: int) -> str:
    """Send `sig`, wait, and check the ending every signal must have; returns stderr."""
    masks = ""
    if os.path.exists(f"/proc/{proc.pid}/status"):  # for the message, if the process hangs
        with open(f"/proc/{proc.pid}/status") as f:
            masks = " ".join(line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt")))
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate()
        pytest.fail(f"still running 60 s after {signal.Signals(sig).name} ({masks}):\n{err.decode()[-6000:]}")
    err = err.decode()
    want = 130 if sig == signal.SIGINT else 128 + sig
    assert proc.returncode == want, err[-2000:]
    assert ("interrupted" if sig == signal.SIGINT else f"stopped by {signal.Signals(sig).name}") in err
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    return err


def hidden_beside(dst) -> list[str]:
    """Hidden work folders/files a command makes beside DST (".DST.partial-…", ".DST.tmp…")."""
    parent, name = os.path.dirname(str(dst)), os.path.basename(str(dst))
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.")]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_convert_leaves_nothing(models, tmp_path, sig):
    dst = tmp_path / "q"
    proc = start(["convert", str(models / "m"), str(dst), "--bits", "4", "--group-size", "32"])
    wait_for(proc, lambda: hidden_beside(dst), "its partial output folder appeared")
    stop(proc, sig)
    assert not dst.exists()
    assert hidden_beside(dst) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_fuse_leaves_nothing(models, tmp_path, sig):
    dst = tmp_path / "fused"
    proc = start(["fuse", "-m", str(models / "m"), "--adapter", str(models / "a"), str(dst), "--bits", "4"])
    wait_for(proc, lambda: hidden_beside(dst), "its partial output folder appeared")
    stop(proc, sig)
    assert not dst.exists()
    assert hidden_beside(dst) == []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_lora_stops_after_a_checkpoint_with_no_temporary_files(models, tmp_path, sig):
    out = tmp_path / "run"
    proc = start(["lora", "-m", str(models / "m"), "--data", str(models / "data"), "--adapter-path", str(out),
                  "--iters", "10000", "--batch-size", "2", "--rank", "2", "--max-seq-len", "32",
                  "--save-every", "1", "--report-every", "1"])  # fmt: skip
    wait_for(proc, lambda: (out / "checkpoints" / "step-000002").exists(), "its second checkpoint")
    stop(proc, sig)
    left = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names if ".tmp" in n]
    assert left == []
    # What was saved is a run that resumes.
    assert run(["lora", "--resume", str(out), "--iters", "3"]).returncode == 0


def reader_is_waiting(fifo: str) -> bool:
    """True once a process holds the FIFO open for reading (a non-blocking writer can then open it)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    reader_is_waiting.fds.append(fd)  # kept open without writing: the reader stays blocked in read()
    return True


reader_is_waiting.fds = []


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_quality_stops_cleanly(models, tmp_path, sig):
    fifo = str(tmp_path / "text.fifo")
    os.mkfifo(fifo)
    proc = start(["quality", "-m", str(models / "m"), "-r", str(models / "m"), "-f", fifo])
    wait_for(proc, lambda: reader_is_waiting(fifo), "it opened its text")
    stop(proc, sig)


READ = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())  # the read(2) syscall's number


def reading_stdin(pid: int) -> bool:
    """True while the process's main thread is blocked in read(0, …) (Linux: /proc/PID/syscall)."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[:2] == [READ, "0x0"]


@pytest.mark.skipif(
    READ is None or not os.path.exists("/proc/self/syscall"), reason="needs Linux's /proc/PID/syscall"
)
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_cache_prompt_stops_cleanly_and_writes_nothing(models, tmp_path, sig):
    out = tmp_path / "p.safetensors"
    proc = start(["cache-prompt", "-m", str(models / "m"), "-p", "-", "-o", str(out)], stdin=subprocess.PIPE)
    proc.stdin.write(b"a prompt that never ends ")
    proc.stdin.flush()  # stdin stays open: the command is blocked reading it
    wait_for(proc, lambda: reading_stdin(proc.pid), "it was reading its prompt")
    stop(proc, sig)
    assert os.listdir(tmp_path) == []


def test_serve_drains_the_requests_in_flight_on_sigterm(models):
    """SIGTERM to `qmlx serve` mid-stream: the stream still runs to its end ([DONE], every token), then the
    server exits 143 with the usual one line."""
    import socket
    import threading

    import httpx2 as httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start(["serve", "--model", str(models / "m"), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(proc, up, "the server to answer", timeout=120)
    no_end = {"258": -100}  # the tiny tokenizer's end token: every answer runs to max_tokens
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 80, "stream": True,
            "logit_bias": no_end, "stream_options": {"include_usage": True}}  # fmt: skip
    lines, started = [], threading.Event()

    def client():
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and '"content"' in line:
                    started.set()

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(60), lines
    err = stop(proc, signal.SIGTERM)
    t.join(timeout=60)
    events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert [ln for ln in lines if ln][-1] == "data: [DONE]", lines[-5:]
    assert events[-1]["usage"]["completion_tokens"] == 80
    assert any(e["choices"] and e["choices"][0]["finish_reason"] == "length" for e in events)
    assert "stopped by SIGTERM" in err
