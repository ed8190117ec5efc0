"""`qmlx study` on the real fixture (4-bit): a small study, killed mid-training and started again, whose
report's table is recomputed from the runs' own files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_study import recompute_mmlu_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_small_real_study_resumes_after_a_kill_and_its_table_recomputes(fixture_dir, tmp_path):
    qmlx = [sys.executable, "-m", "qmlx"]
    subprocess.run([*qmlx, "convert", fixture_dir, str(tmp_path / "q4"), "--bits", "4"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "stdlib_instructions.py"), str(tmp_path / "all")],
                   check=True, capture_output=True)  # fmt: skip
    (tmp_path / "data").mkdir()
    for split, n in (("train", 24), ("valid", 4)):
        lines = (tmp_path / "all" / f"{split}.jsonl").read_text().splitlines()[:n]
        (tmp_path / "data" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    spec = tmp_path / "real.toml"
    spec.write_text(
        'model = "q4"\ndata = "data"\norderings = ["random", "easy-to-hard"]\nseeds = [0, 1]\n'
        "[lora]\nrank = 4\nlr = 1e-3\nbatch_size = 2\niters = 4\nmax_seq_len = 96\nval_every = 2\n"
        "save_every = 2\nreport_every = 2\n"
        '[eval]\ntasks = "mmlu"\nlimit = 8\n'
    )
    out = tmp_path / "real"
    start = lambda: subprocess.Popen([*qmlx, "study", str(spec)], stdout=subprocess.PIPE,  # noqa: E731
                                     stderr=subprocess.PIPE, text=True)  # fmt: skip
    p = start()
    ckpt = out / "runs" / "random-s1" / "adapter" / "checkpoints"
    deadline = time.time() + 900
    while not (ckpt.is_dir() and any(".tmp" not in d for d in os.listdir(ckpt))) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "runs" / "random-s1" / "lora.done").exists()
    time.sleep(1)
    p = start()
    stdout, err = p.communicate(timeout=1800)
    assert p.returncode == 0, err
    assert "random-s1: resuming the training at step" in err and "random-s0: training" not in err
    report = (out / "report.md").read_text()
    for row in recompute_mmlu_table(out, ["random", "easy-to-hard"], [0, 1]):
        assert row in report, (row, report)
    assert (out / "val_loss.png").stat().st_size > 10_000 and (out / "scores.png").stat().st_size > 10_000
