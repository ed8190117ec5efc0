"""`qmlx eval`: the sandbox that runs completions (hostile programs end as failed, quickly, harmlessly),
HumanEval's prompts, program assembly and pass@k, the result cache, and the command on a tiny model."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import socket
import time

import pytest
from tiny import tiny_config, write_folder

import qmlx.batch
from qmlx.cli import main
from qmlx.eval import humaneval
from qmlx.eval.run import evaluate, mean_interval, wilson
from qmlx.eval.sandbox import SANDBOX_UIDS, Limits, run_program

# ------------------------------------------------------------------ the sandbox

QUICK = Limits(timeout=2.0)


@pytest.fixture(scope="module")
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    yield srv.getsockname()[1]
    srv.close()


def test_a_correct_program_passes_and_a_wrong_one_fails():
    assert run_program("assert sum([1, 2]) == 3", QUICK).passed
    o = run_program("assert sum([1, 2]) == 4", QUICK)
    assert o.status == "failed" and "AssertionError" in o.detail


@pytest.mark.parametrize(
    "name,source",
    [
        ("loops forever", "while True:\n    pass"),
        ("sleeps", "import time\ntime.sleep(60)"),
        ("allocates 10 GB", "x = bytearray(10 * 2**30)\nx[-1] = 1"),
        ("fork-bombs", "import os\nwhile True:\n    os.fork()"),
        ("floods its output", "import sys\nwhile True:\n    sys.stdout.write('x' * 100000)"),
        ("exits with an error", "import sys\nsys.exit(3)"),
        ("kills itself", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"),
    ],
)
def test_hostile_programs_end_as_not_passed_quickly(name, source):
    start = time.perf_counter()
    o = run_program(source, QUICK)
    assert not o.passed, name
    assert time.perf_counter() - start < QUICK.timeout + 3, name


def test_writes_outside_its_folder_fail_and_leave_nothing(tmp_path):
    target = tmp_path / "outside.txt"
    o = run_program(f"open({str(target)!r}, 'w').write('x')", QUICK)
    if os.geteuid() != 0 and not os.path.exists("/usr/bin/sandbox-exec"):
        pytest.skip("an ordinary user's own folders are writable without an OS sandbox (documented)")
    assert not o.passed and not target.exists()


@pytest.mark.parametrize("module", ["socket", "_socket"])
def test_network_connections_fail(listener, module):
    o = run_program(f"import {module}\ns = {module}.socket()\ns.connect(('127.0.0.1', {listener}))", QUICK)
    assert not o.passed and "OSError" in o.detail


def test_nothing_outlives_a_run_as_root():
    if os.geteuid() != 0:
        pytest.skip("as an ordinary user a process that leaves the session outlives the run (documented)")
    src = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
    assert run_program(src, QUICK).passed
    assert not _sandbox_processes()


def _sandbox_processes() -> list[str]:
    """Running processes of sandbox user ids (zombies, dead children waiting for init to reap them, aside)."""
    lo, hi = SANDBOX_UIDS
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if lo <= os.stat(f"/proc/{pid}").st_uid < hi and state != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


# ------------------------------------------------------------------ HumanEval


def packaged() -> list[dict]:
    with gzip.open(humaneval.packaged_data(), "rt") as f:
        return [json.loads(line) for line in f]


def test_the_164_problems_load_and_every_canonical_solution_passes_in_the_sandbox():
    problems = humaneval.load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    raw = {d["task_id"]: d for d in packaged()}
    sample = problems[:: 164 // 12]  # a spread of 12 (all 164 pass too: ~10 s)
    for p in sample:
        program = humaneval.program_from_completion(p, raw[p.task_id]["canonical_solution"])
        o = run_program(humaneval.test_program(p, program))
        assert o.passed, (p.task_id, o.detail)


def test_programs_from_chat_replies_and_completions():
    p = humaneval.Problem(
        "T/0", 'import math\n\n\ndef f(x):\n    """doc"""\n', "def check(c):\n    assert c(4) == 2\n", "f"
    )
    whole = "Sure!\n```python\ndef f(x):\n    return int(math.sqrt(x))\n```\nThis works."
    assert humaneval.program_from_chat(p, whole) == "import math\ndef f(x):\n    return int(math.sqrt(x))\n"
    body = "```python\n    return int(math.sqrt(x))\n```"
    assert humaneval.program_from_chat(p, body) == p.prompt + "    return int(math.sqrt(x))\n"
    unfinished = "```python\ndef f(x):\n    return 2"  # cut by max_tokens: no closing fence
    assert humaneval.program_from_chat(p, unfinished).endswith("def f(x):\n    return 2")
    completion = "    return int(math.sqrt(x))\n\n\ndef g():\n    pass\nprint(1)"
    assert humaneval.program_from_completion(p, completion) == p.prompt + "    return int(math.sqrt(x))\n\n"
    for reply in (whole, body, unfinished):
        assert run_program(humaneval.test_program(p, humaneval.program_from_chat(p, reply)), QUICK).passed


def test_pass_at_k_is_the_chance_over_every_draw_of_k():
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 2), (6, 3, 4), (4, 4, 2), (10, 1, 10)]:
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert humaneval.pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_confidence_intervals():
    lo, hi = wilson(5, 10)  # the textbook value: 0.2366 – 0.7634
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert wilson(0, 40)[0] == 0.0 and 0 < wilson(0, 40)[1] < 0.1
    lo, hi = mean_interval([0.0, 0.5, 1.0, 0.5])
    assert lo < 0.5 < hi


@pytest.mark.parametrize(
    "line,words",
    [
        ('{"task_id": "a", "prompt": "x"}', "t.jsonl:2: missing field 'test'"),
        ("nonsense", "t.jsonl:2: not a JSON"),
    ],
)
def test_bad_task_files_are_named_by_line(tmp_path, line, words):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(packaged()[0]) + "\n" + line + "\n")
    with pytest.raises(humaneval.TaskDataError, match=words):
        humaneval.load_problems(str(path))


def test_run_samples_scores_each_completion_and_skips_those_already_run():
    raw = packaged()[:3]
    problems = [humaneval.Problem(d["task_id"], d["prompt"], d["test"], d["entry_point"]) for d in raw]
    answers = {raw[0]["task_id"]: raw[0]["canonical_solution"], raw[1]["task_id"]: "    return None\n",
               raw[2]["task_id"]: raw[2]["canonical_solution"]}  # fmt: skip
    asked = []

    def generate(batch):
        asked.extend(p.task_id for p in batch)
        return [answers[p.task_id] for p in batch]

    out = humaneval.run_samples(problems, generate, "complete", batch_size=2)
    assert [out[p.task_id][0].status for p in problems] == ["passed", "failed", "passed"]
    done = {(problems[0].task_id, 0): out[problems[0].task_id][0]}
    asked.clear()
    humaneval.run_samples(problems, generate, "complete", done=done)
    assert asked == [p.task_id for p in problems[1:]]


# ------------------------------------------------------------------ qmlx eval on a tiny model


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_folder(str(root / "m"), tiny_config())
    data = root / "two.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in packaged()[:2]))
    return str(root / "m"), str(data)


def test_eval_writes_every_item_and_resumes_from_its_cache(tiny_task, tmp_path, monkeypatch):
    model, data = tiny_task
    out = str(tmp_path / "r.json")
    calls = []
    real = qmlx.batch.batch_generate

    def counting(*a, **k):
        calls.append(len(a[2]))
        return real(*a, **k)

    monkeypatch.setattr(qmlx.batch, "batch_generate", counting)
    report = evaluate(model, data=data, out=out, max_tokens=6, batch_size=1, progress=False)
    t = report["tasks"]["humaneval"]
    assert t["problems"] == 2 and len(t["items"]) == 2 and calls == [1, 1]
    assert t["scores"]["pass@1"]["score"] == 0.0  # a random tiny model writes no working function
    assert all(i["status"] in ("failed", "timeout", "killed") and i["program"] for i in t["items"])
    with open(out) as f:
        assert json.load(f)["settings"]["mode"] == "chat"
    calls.clear()
    again = evaluate(model, data=data, out=out, max_tokens=6, batch_size=1, progress=False)
    assert calls == [] and again["tasks"]["humaneval"]["items"] == t["items"]
    evaluate(model, data=data, out=out, max_tokens=7, batch_size=2, progress=False)
    assert calls == [2]  # other settings: generated afresh
    sampled = evaluate(model, data=data, samples=3, temperature=0.8, max_tokens=4, progress=False)
    assert set(sampled["tasks"]["humaneval"]["scores"]) == {"pass@1", "pass@3"}


def test_eval_command_prints_the_table_and_refuses_bad_flags(tiny_task, capsys):
    model, data = tiny_task
    assert (
        main(["eval", "-m", model, "--data", data, "--limit", "1", "--max-tokens", "4", "--mode", "complete"])
        == 0
    )
    out = capsys.readouterr().out
    assert "humaneval" in out and "pass@1" in out and "95% CI" in out
    base = ["eval", "-m", model, "--data", data]
    for argv, words in [
        (base + ["--tasks", "mmlu"], "unknown task 'mmlu'; available: humaneval"),
        (base + ["--samples", "4"], "needs --temperature above 0"),
        (["eval", "-m", model, "--data", data + ".missing"], "cannot be read"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
