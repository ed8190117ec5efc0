"""`qmlx study`: the statistics against SciPy, the spec's checks, the report recomputed from the runs'
own files, and whole studies on a tiny model (resumed after a kill: the same report)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps
from tiny import tiny_config, write_folder

from qmlx.cli import build_parser, main
from qmlx.study import stats
from qmlx.study.report import write_report
from qmlx.study.spec import SpecError
from qmlx.study.spec import read_spec as _read_spec


def read_spec(path, out=None):
    return _read_spec(path, build_parser(), out)


# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    "a,b,x", [(0.5, 0.5, 0.3), (5, 0.5, 0.9), (1.5, 0.5, 0.01), (50, 0.5, 0.99), (2, 3, 0.6)]
)
def test_incomplete_beta_matches_scipy(a, b, x):
    assert stats.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("t,df", [(2.0, 10), (0.1, 1), (5, 2.5), (30, 100), (1.3, 1.2), (0.0, 4)])
def test_t_tails_and_quantiles_match_scipy(t, df):
    assert stats.t_sf2(t, df) == pytest.approx(2 * sps.t.sf(abs(t), df), rel=1e-10, abs=1e-300)
    assert stats.t_quantile(0.975, df) == pytest.approx(sps.t.ppf(0.975, df), rel=1e-10)


def test_welch_ci_and_cohens_d_match_independent_computations():
    r = random.Random(0)
    for _ in range(20):
        x = [r.gauss(0, 1) for _ in range(r.randint(2, 7))]
        y = [r.gauss(0.5, 2) for _ in range(r.randint(2, 7))]
        c = stats.compare(x, y)
        w = sps.ttest_ind(x, y, equal_var=False)
        ci = w.confidence_interval(0.95)
        assert (c.t, c.p, c.df) == pytest.approx((w.statistic, w.pvalue, w.df), rel=1e-9)
        assert c.ci95 == pytest.approx((ci.low, ci.high), rel=1e-9)
        n1, n0 = len(x), len(y)
        pooled = np.sqrt(((n1 - 1) * np.var(x, ddof=1) + (n0 - 1) * np.var(y, ddof=1)) / (n1 + n0 - 2))
        assert c.d == pytest.approx((np.mean(x) - np.mean(y)) / pooled, rel=1e-12)


def test_undefined_statistics_are_none_not_numbers():
    one = stats.compare([0.5], [0.4, 0.6])
    assert one.delta == pytest.approx(0.0, abs=1e-15) and one.ci95 is one.p is one.d is None
    flat = stats.compare([0.5, 0.5], [0.5, 0.5])
    assert flat.ci95 is None and flat.p is None and flat.d is None
    assert stats.sd([1.0]) is None


# ------------------------------------------------------------------ the spec


def _spec(tmp_path, text: str, name: str = "s.toml") -> str:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "d").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD = 'model = "m"\ndata = "d"\norderings = ["random", "adaptive"]\nseeds = [0, 1]\n'
TASKS = '[eval]\ntasks = ["mmlu"]\n'


def test_a_spec_resolves_paths_and_reads_every_option_with_the_commands_parsers(tmp_path):
    path = _spec(tmp_path, GOOD + '[lora]\nlr = 3e-4\nbatch-size = 8\ngrad_checkpoint = true\ntargets = ["q", "v"]\n'
                 '[eval]\ntasks = ["mmlu", "humaneval"]\nlimit = 50\n')  # fmt: skip
    s = read_spec(path)
    assert s.model == str(tmp_path / "m") and s.data == str(tmp_path / "d") and s.out == str(tmp_path / "s")
    assert [r.name for r in s.runs] == ["random-s0", "random-s1", "adaptive-s0", "adaptive-s1"]
    assert s.lora["lr"] == 3e-4 and s.lora["batch_size"] == 8 and s.lora["grad_checkpoint"] is True
    assert s.lora["rank"] == 8  # the command's default
    assert s.lora_argv == ["--lr", "0.0003", "--batch-size", "8", "--grad-checkpoint", "--targets", "q,v"]
    assert s.tasks == ["mmlu", "humaneval"] and s.eval["limit"] == 50
    assert read_spec(path, out=str(tmp_path / "elsewhere")).out == str(tmp_path / "elsewhere")
    # what decides the training changes the key; the eval settings do not
    other = read_spec(_spec(tmp_path, GOOD + "[lora]\nlr = 1e-4\n" + TASKS, "o.toml"))
    assert other.lora_key() != s.lora_key() and other.eval_key() != s.eval_key()


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "missing field 'model'"),
        ("model = [", "not valid TOML"),
        (GOOD + "colour = 1\n" + TASKS, "unknown field 'colour'"),
        (GOOD.replace('"adaptive"', '"sideways"') + TASKS, "unknown ordering 'sideways'"),
        (GOOD.replace("[0, 1]", "[0, 0]") + TASKS, "seeds must be a non-empty list of distinct"),
        (GOOD.replace("[0, 1]", '["a"]') + TASKS, "seeds must be"),
        (GOOD + 'baseline = "easy-to-hard"\n' + TASKS, "baseline 'easy-to-hard' is not one of"),
        (GOOD + "[lora]\nlrr = 1\n" + TASKS, r"\[lora\] lrr: not a `qmlx lora` option"),
        (GOOD + "[lora]\nseed = 3\n" + TASKS, r"\[lora\] seed: set by the study"),
        (GOOD + '[lora]\nlr = "fast"\n' + TASKS, r"s.toml: \[lora\] argument --lr: invalid float value"),
        (GOOD + "[lora]\ngrad-checkpoint = 1\n" + TASKS, "must be true or false"),
        (GOOD + '[lora]\norder = "random"\n' + TASKS, "set by the study"),
        (GOOD + "[eval]\nlimit = 5\n", r"\[eval\] tasks is missing"),
        (GOOD + '[eval]\ntasks = "nope"\n', "unknown task 'nope'"),
        (GOOD + '[eval]\ntasks = "mmlu"\nout = "x"\n', "set by the study"),
        (GOOD + "out = 3\n" + TASKS, "out must be a folder path"),
    ],
)
def test_bad_specs_are_errors_naming_the_field(tmp_path, text, words):
    with pytest.raises(SpecError, match=words):
        read_spec(_spec(tmp_path, text))


def test_a_missing_spec_is_a_one_line_error(tmp_path, capsys):
    assert main(["study", str(tmp_path / "none.toml")]) == 2
    assert "none.toml: no such spec file" in capsys.readouterr().err


# ------------------------------------------------------------------ the report, recomputed


def _fake_study(tmp_path, scores: dict, curves: dict, base: float) -> str:
    """A finished study's files written by hand: eval.json and metrics.jsonl per run."""
    path = _spec(tmp_path, 'model = "m"\ndata = "d"\norderings = ["random", "easy-to-hard", "adaptive"]\n'
                 'seeds = [0, 1, 2]\n' + TASKS)  # fmt: skip
    out = tmp_path / "s"

    def eval_json(folder, value):
        folder.mkdir(parents=True, exist_ok=True)
        rep = {"tasks": {"mmlu": {"scores": {"accuracy": {"score": value, "ci95": [0, 1], "items": 100},
                                             "STEM": {"score": 0.0, "ci95": [0, 1], "items": 1}}}}}  # fmt: skip
        (folder / "eval.json").write_text(json.dumps(rep))

    eval_json(out / "base", base)
    for name, value in scores.items():
        eval_json(out / "runs" / name, value)
        (out / "runs" / name / "adapter").mkdir()
        lines = [{"step": s, "train_loss": v + 0.1} for s, v in curves[name]]
        lines += [{"step": s, "val_loss": v} for s, v in curves[name]]
        lines.append({"step": curves[name][1][0], "val_loss": curves[name][1][1]})  # a resumed run's repeat
        (out / "runs" / name / "adapter" / "metrics.jsonl").write_text(
            "".join(json.dumps(d) + "\n" for d in lines)
        )
    return path


def test_the_report_table_is_recomputed_from_the_runs_own_files(tmp_path):
    r = random.Random(1)
    names = [f"{o}-s{s}" for o in ("random", "easy-to-hard", "adaptive") for s in (0, 1, 2)]
    scores = {n: round(r.uniform(0.3, 0.5), 3) for n in names}
    drop = {"random": 1.0, "easy-to-hard": 1.3, "adaptive": 0.8}
    curves = {n: [(s, 3.0 - drop[n.rsplit("-s", 1)[0]] * s / 100 + r.uniform(-0.05, 0.05)) for s in range(0, 101, 20)]
              for n in names}  # fmt: skip
    spec = read_spec(_fake_study(tmp_path, scores, curves, base=0.35))
    report = open(write_report(spec), encoding="utf-8").read()
    summary = json.load(open(os.path.join(spec.out, "summary.json")))["summary"]
    assert os.path.getsize(os.path.join(spec.out, "val_loss.png")) > 10_000
    assert os.path.getsize(os.path.join(spec.out, "scores.png")) > 10_000

    by = {o: [scores[f"{o}-s{s}"] for s in (0, 1, 2)] for o in ("random", "easy-to-hard", "adaptive")}
    finals = {o: [curves[f"{o}-s{s}"][-1][1] for s in (0, 1, 2)] for o in by}
    target = np.mean(finals["random"])
    for o, xs in by.items():
        e = summary["orderings"][o]
        m, sd = np.mean(xs), np.std(xs, ddof=1)
        assert e["scores"]["mmlu"]["mean"] == pytest.approx(m) and e["scores"]["mmlu"]["sd"] == pytest.approx(
            sd
        )
        fm, fsd = np.mean(finals[o]), np.std(finals[o], ddof=1)
        assert f"| {o} | 3 | {100 * m:.2f} ± {100 * sd:.2f} | {fm:.4f} ± {fsd:.4f} |" in report
        mean_curve = np.mean([[v for _, v in curves[f"{o}-s{s}"]] for s in (0, 1, 2)], axis=0)
        hit = [s for (s, _), v in zip(curves[f"{o}-s0"], mean_curve) if v <= target]
        assert e["reach"]["mean_curve_step"] == (hit[0] if hit else None)
        if o == "random":
            continue
        w = sps.ttest_ind(xs, by["random"], equal_var=False)
        ci = w.confidence_interval(0.95)
        pooled = np.sqrt((np.var(xs, ddof=1) + np.var(by["random"], ddof=1)) / 2)  # equal n
        d = (m - np.mean(by["random"])) / pooled
        c = e["vs_baseline"]["mmlu"]
        assert c["p"] == pytest.approx(w.pvalue) and c["ci95"] == pytest.approx([ci.low, ci.high])
        assert c["d"] == pytest.approx(d)
        delta = 100 * (m - np.mean(by["random"]))
        row = f"| {o} | mmlu | {delta:+.2f} | {100 * ci.low:+.2f} … {100 * ci.high:+.2f} | {d:+.2f} | {w.pvalue:.3f} |"
        assert row in report
    assert summary["orderings"]["random"]["reach"]["mean_curve_step"] == 100  # its own mean final, at the end
    assert "| base model | — | 35.00 | — |" in report
    assert "runs in this report: 9 of 9" in report and "Partial" not in report


def recompute_mmlu_table(out, orderings, seeds, baseline="random") -> list[str]:
    """The report's rows, recomputed from the runs' own files: accuracy from eval.json's items (chosen
    letter vs answer), the final validation loss from metrics.jsonl, the statistics with NumPy/SciPy."""
    acc, final = {}, {}
    for o in orderings:
        acc[o], final[o] = [], []
        for s in seeds:
            run = out / "runs" / f"{o}-s{s}"
            items = json.loads((run / "eval.json").read_text())["tasks"]["mmlu"]["items"]
            acc[o].append(np.mean([it["chosen"] == it["answer"] for it in items]))
            vals = [json.loads(x) for x in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
            final[o].append([d["val_loss"] for d in vals if "val_loss" in d][-1])
    rows = []
    for o in orderings:
        m, sd = np.mean(acc[o]), np.std(acc[o], ddof=1)
        rows.append(f"| {o} | {len(seeds)} | {100 * m:.2f} ± {100 * sd:.2f} | "
                    f"{np.mean(final[o]):.4f} ± {np.std(final[o], ddof=1):.4f} |")  # fmt: skip
        if o == baseline:
            continue
        b = acc[baseline]
        delta = 100 * (m - np.mean(b))
        if sd > 0 and np.std(b, ddof=1) > 0:
            w = sps.ttest_ind(acc[o], b, equal_var=False)
            ci = w.confidence_interval(0.95)
            pooled = np.sqrt((np.var(acc[o], ddof=1) + np.var(b, ddof=1)) / 2)  # equal seed counts
            rows.append(f"| {o} | mmlu | {delta:+.2f} | {100 * ci.low:+.2f} … {100 * ci.high:+.2f} | "
                        f"{(m - np.mean(b)) / pooled:+.2f} | {w.pvalue:.3f} |")  # fmt: skip
        else:
            rows.append(f"| {o} | mmlu | {delta:+.2f} | ")
    return rows


# ------------------------------------------------------------------ whole studies on a tiny model

WORDS = "the cat sat on a mat and then it ran to see the dog who was very happy today".split()


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    write_folder(str(root / "m"), tiny_config())
    (root / "data").mkdir()
    r = random.Random(0)
    for split, n in (("train", 24), ("valid", 8)):
        with open(root / "data" / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                sample = {"prompt": " ".join(r.choice(WORDS) for _ in range(3)),
                          "completion": " ".join(r.choice(WORDS) for _ in range(r.randint(3, 20)))}  # fmt: skip
                f.write(json.dumps(sample) + "\n")
    row = {"subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"]}
    with open(root / "mmlu.jsonl", "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({**row, "question": f"What is {i} + 2?", "answer": i % 4}) + "\n")
    (root / "s.toml").write_text(
        'model = "m"\ndata = "data"\norderings = ["random", "easy-to-hard"]\nseeds = [0, 1]\n'
        "[lora]\nrank = 4\nlr = 1e-3\nbatch_size = 4\niters = 30\nval_every = 5\nsave_every = 5\nreport_every = 5\n"
        '[eval]\ntasks = ["mmlu"]\ndata = "mmlu.jsonl"\n'
    )
    return root


def _study(root, out, *extra, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "qmlx", "study", str(root / "s.toml"), "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def test_a_study_runs_every_step_and_a_killed_one_resumes_to_the_same_report(tiny_study, tmp_path):
    whole = tmp_path / "whole"
    p = _study(tiny_study, whole)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.strip() == str(whole / "report.md")
    for name in ("random-s0", "random-s1", "easy-to-hard-s0", "easy-to-hard-s1"):
        run = whole / "runs" / name
        assert (run / "adapter" / "adapters.safetensors").exists() and (run / "eval.json").exists()
        lines = [json.loads(x) for x in (run / "adapter" / "metrics.jsonl").read_text().splitlines()]
        assert [d["step"] for d in lines if "val_loss" in d] == [0, 5, 10, 15, 20, 25, 30]
    assert err.count("difficulty: computed") == 1 and err.count("difficulty: read from") == 1
    report = (whole / "report.md").read_text()
    for row in recompute_mmlu_table(whole, ["random", "easy-to-hard"], [0, 1]):
        assert row in report, (row, report)

    # Killed (SIGKILL: no clean-up at all) while the third run trains, then started again.
    cut = tmp_path / "cut"
    p = _study(tiny_study, cut)
    ckpt = cut / "runs" / "easy-to-hard-s0" / "adapter" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpt.is_dir() and any(".tmp" not in d for d in os.listdir(ckpt))) and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (cut / "runs" / "easy-to-hard-s0" / "lora.done").exists(), "killed before it finished"
    time.sleep(0.5)  # the child dies with the study (Linux: PR_SET_PDEATHSIG)
    p = _study(tiny_study, cut)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "easy-to-hard-s0: resuming the training at step" in err and "random-s0: training" not in err
    assert (cut / "report.md").read_text() == (whole / "report.md").read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert a == b

    # A finished study: nothing left to do, and the dry run says so.
    p = _study(tiny_study, cut, "--dry-run")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith(("random-s", "easy-to-hard-s", "base model"))]
    assert len(rows) == 5 and all(" done " in ln for ln in rows), out
    assert "this study's runs" in out


def test_the_dry_run_measures_a_step_and_plans_every_run(tiny_study, tmp_path):
    p = _study(tiny_study, tmp_path / "plan", "--dry-run")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "2 orderings × 2 seeds = 4 runs" in out and "(24 train, 8 valid samples)" in out
    step = float(out.split("measured (a probe): ")[1].split(" s per step")[0])
    assert 0 < step < 60
    gb = float(out.split("memory per run (qmlx lora --estimate): ")[1].split(" GB")[0])
    assert gb > 0
    rows = [ln for ln in out.splitlines() if ln.startswith(("random-s", "easy-to-hard-s"))]
    assert len(rows) == 4 and all("to do" in ln and "30/30" in ln for ln in rows)
    # no --limit: the eval time is per item × the items the task has (the probe's report says how many)
    assert all(not ln.rstrip().endswith("?") for ln in rows), out
    assert not (tmp_path / "plan").exists(), "a dry run writes nothing into the study folder"


def test_a_second_study_in_the_same_folder_is_refused_and_changed_settings_are_refused(tiny_study, tmp_path):
    from qmlx.study.runner import FolderLock

    lock = FolderLock(str(tmp_path / "busy"))
    try:
        p = _study(tiny_study, tmp_path / "busy")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2 and "another `qmlx study`" in err
    finally:
        lock.close()
    # A run started with other settings is never mixed into the study.
    spec = read_spec(str(tiny_study / "s.toml"), out=str(tmp_path / "mixed"))
    run = tmp_path / "mixed" / "runs" / "random-s0"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"lora_key": "old", "lora": {**spec.lora, "lr": 0.5}, "model": spec.model,
                                              "data": spec.data}))  # fmt: skip
    p = _study(tiny_study, tmp_path / "mixed")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "was trained with other settings (lr differ)" in err


def test_a_failing_step_names_its_run_and_log(tiny_study, tmp_path):
    bad = tiny_study / "bad.toml"
    bad.write_text(
        (tiny_study / "s.toml").read_text().replace('data = "mmlu.jsonl"', 'data = "data/train.jsonl"')
    )
    p = subprocess.run([sys.executable, "-m", "qmlx", "study", str(bad), "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()
    assert any("base: `qmlx eval` failed (exit 2)" in ln and "eval.log" in ln for ln in last), p.stderr
    assert "Traceback" not in p.stderr


def test_a_torn_metrics_line_is_skipped_and_a_broken_eval_json_is_named(tmp_path, capsys):
    names = [f"{o}-s{s}" for o in ("random", "easy-to-hard", "adaptive") for s in (0, 1, 2)]
    curves = {n: [(0, 3.0), (20, 2.5), (40, 2.0)] for n in names}
    path = _fake_study(tmp_path, dict.fromkeys(names, 0.4), curves, base=0.3)
    spec = read_spec(path)
    metrics = tmp_path / "s" / "runs" / "random-s0" / "adapter" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 60, "val_lo')  # killed mid-line
    write_report(spec)
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["runs"]["random-s0"]["val"] == [[0, 3.0], [20, 2.5], [40, 2.0]]
    (tmp_path / "s" / "runs" / "adaptive-s1" / "eval.json").write_text('{"tasks": {"mm')
    assert main(["study", path, "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adaptive-s1/eval.json: not a JSON file" in err[0] and "eval.done" in err[0]
