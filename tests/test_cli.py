"""Every input a user can get wrong ends in one line on stderr and exit status 2, never an "internal error".

The walk: for each subcommand, a valid command line (on a tiny model), then that line with each of its
options in turn given a wrong value: text where a number goes, a negative number, zero, an empty
string, a path that does not exist; and the subcommand with no arguments at all. Each run must end in
status 0 (the value was fine) or 2 with a one-line error naming the problem, never 1.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib

import pytest

from qmlx.cli import build_parser, main
from tests.tiny import tiny_config, write_folder

WRONG_NUMBERS = ("abc", "-1", "0")
WRONG_TEXTS = ("", "{missing}")  # {missing}: a path under the test's folder that does not exist


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_folder(str(root / "m"), tiny_config())
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"sample {i} " + "x " * i}) + "\n")
    (root / "text.txt").write_text("some text to score, long enough for a few windows. " * 4)
    row = {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"]}
    (root / "mmlu.jsonl").write_text(json.dumps({**row, "answer": 1}) + "\n")
    (root / "study.toml").write_text(
        'model = "m"\ndata = "data"\norderings = ["random"]\nseeds = [0]\n'
        '[lora]\nbatch_size = 2\nrank = 2\niters = 2\n[eval]\ntasks = "mmlu"\ndata = "mmlu.jsonl"\n'
    )
    assert main(["lora", "-m", str(root / "m"), "--data", str(root / "data"), "--adapter-path",
                 str(root / "a"), "--iters", "1", "--batch-size", "2", "--rank", "2"]) == 0  # fmt: skip
    return root


def valid_lines(root, out) -> dict[str, list[str]]:
    """A command line that works, per subcommand (`out` is a fresh output path for each run)."""
    m = str(root / "m")
    return {
        "generate": ["-m", m, "-p", "hi", "-n", "2"],
        "cache-prompt": ["-m", m, "-p", "hi", "-o", f"{out}.safetensors"],
        "convert": [m, out, "--group-size", "32"],
        "quality": ["-m", m, "-r", m, "-f", str(root / "text.txt"), "--max-tokens", "24", "--ctx", "8"],
        "perplexity": ["-m", m, "-f", str(root / "text.txt"), "--ctx", "8"],
        "chat": ["-m", m, "-n", "2"],
        "shard-plan": ["-m", m, "--hosts", "a:24,b:24"],
        "eval": ["-m", m, "--limit", "1", "--max-tokens", "2", "--out", f"{out}.json"],
        "lora": [
            "-m",
            m,
            "--data",
            str(root / "data"),
            "--adapter-path",
            out,
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--rank",
            "2",
        ],  # fmt: skip
        "fuse": ["-m", m, "--adapter", str(root / "a"), out],
        "study": [str(root / "study.toml"), "--dry-run", "--out", out],
    }


# Options whose valid use would start something that does not end (a server, a download) or that
# change what the walk can check; each is exercised by its own tests.
NOT_WALKED = {
    "serve": None,  # binds a port and runs until stopped: only its parse-time and pre-bind checks below
    "chat": {"--model"},  # without -m: downloads the default model
}


def options(sub: argparse.ArgumentParser):
    """(flag or None for a positional, index of the positional, the action) of each value-taking option."""
    positional = 0
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.nargs == 0:
            continue
        if action.option_strings:
            yield action.option_strings[0], None, action
        else:
            yield None, positional, action
            positional += 1


def mutations(base: list[str], sub: argparse.ArgumentParser, skip: set[str], missing: str):
    """`base` with one option's value replaced (or the option added) by each wrong value."""
    positions = [
        i for i, a in enumerate(base) if not a.startswith("-") and (i == 0 or not base[i - 1].startswith("-"))
    ]
    for flag, index, action in options(sub):
        if flag in skip or flag == "--resume":
            continue
        numeric = action.type in (int, float)
        for value in WRONG_NUMBERS if numeric else [t.format(missing=missing) for t in WRONG_TEXTS]:
            if action.choices and value not in action.choices and not numeric:
                value = "not-a-choice"
            argv = list(base)
            given = [s for s in action.option_strings if s in argv]
            if flag is None:
                argv[positions[index]] = value
            elif given:
                argv[argv.index(given[0]) + 1] = value
            else:
                argv += [flag, value]
            yield argv


def check(argv: list[str], capsys) -> str | None:
    """None if `qmlx argv` ended well (0, or 2 with a one-line error); else what went wrong."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if rc == 0:
        return None
    if rc != 2:
        return f"status {rc}: {err.strip()[-300:]}"
    if "internal error" in err or "Traceback" in err:
        return f"internal error: {err.strip()[-300:]}"
    if not lines or not lines[-1].startswith("qmlx") or "error:" not in lines[-1]:
        return f"status 2 without a one-line error: {err.strip()[-300:]}"
    return None


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_walk_covers_every_subcommand():
    assert set(subparsers()) == set(valid_lines(pathlib.Path("r"), "o")) | {"serve"}


@pytest.mark.parametrize("command", sorted(valid_lines(pathlib.Path("r"), "o")))
def test_wrong_arguments_are_user_errors(files, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # chat reads its turns from standard input
    monkeypatch.chdir(tmp_path)  # relative outputs (lora's ./adapters) land here
    sub = subparsers()[command]
    counter = iter(range(10**6))
    fresh = lambda: str(tmp_path / f"out{next(counter)}")  # noqa: E731
    base = valid_lines(files, fresh())[command]
    assert check([command, *base], capsys) is None, "the valid line must work"
    problems = []
    if command != "chat":
        problems += [(command, p) for p in [check([command], capsys)] if p]
    skip = NOT_WALKED.get(command) or set()
    for argv in mutations(base, sub, skip, str(tmp_path / "missing" / "x")):
        out = fresh()
        argv = [out if a.startswith(str(tmp_path / "out")) else a for a in argv]
        problem = check([command, *argv], capsys)
        if problem:
            problems.append((" ".join(argv), problem))
    assert problems == [], "\n".join(f"{a}\n    -> {p}" for a, p in problems)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["serve", "-m", "x", "--port", "abc"],
        ["serve", "-m", "x", "--max-concurrency", "0"],
        ["serve", "-m", "x", "--max-concurrency", "-1"],
        ["serve", "-m", "x", "--dtype", "int8"],
        ["serve", "-m", "x", "--port", "-1"],
        ["serve", "-m", "x", "--port", "70000"],
        ["serve", "-m", "x", "--prompt-cache-dir", __file__],
        ["serve", "-m", "x", "--prompt-cache-disk-bytes", "-5"],
        ["serve", "-m", "x", "--prompt-cache-disk-bytes", "lots"],
        ["serve", "-m", "x", "--prompt-cache-dir", "/tmp/qmlx-test-never-made", "--layers", "0:3"],
        ["lora", "--resume", "/nonexistent/qmlx-test"],
        ["lora", "--resume", ""],
        ["generate", "-m", "x", "-p", "", "--raw"],
        ["nonsense"],
    ],
)
def test_more_wrong_lines(argv, capsys):
    assert check(argv, capsys) is None


def test_generate_constrained_output(files, tmp_path, capsys):
    """--json-schema / --regex / --grammar / --choice: stdout matches them (checked by jsonschema and re),
    also when --max-tokens cuts the output short; a drafting flag is turned off with a note."""
    import re

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 10}, "tag": {"enum": ["x", "y"]}},
        "required": ["id", "tag"],
        "additionalProperties": False,
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.gbnf").write_text('root ::= "<" [a-c]+ ">"')
    m = str(files / "m")
    for n in ("3", "40"):
        base = ["generate", "-m", m, "-p", "hi", "-n", n, "--temp", "1", "--seed", "5"]
        assert main([*base, "--json-schema", str(tmp_path / "s.json"), "--prompt-lookup", "2"]) == 0
        out, err = capsys.readouterr()
        jsonschema.validate(json.loads(out), schema)
        assert "without --draft-model/--prompt-lookup" in err
        assert main([*base, "--regex", "[0-9]{2}:[0-9]{2}"]) == 0
        assert re.fullmatch(r"[0-9]{2}:[0-9]{2}\n", capsys.readouterr().out)
        assert main([*base, "--grammar", str(tmp_path / "g.gbnf")]) == 0
        assert re.fullmatch(r"<[a-c]+>\n", capsys.readouterr().out)
        assert main([*base, "--choice", "left", "--choice", "right"]) == 0
        assert capsys.readouterr().out in ("left\n", "right\n")
    (tmp_path / "bad.json").write_text('{"type": "string", "not": {}}')
    assert main(["generate", "-m", m, "-p", "hi", "--json-schema", str(tmp_path / "bad.json")]) == 2
    assert f'{tmp_path / "bad.json"}: unsupported JSON Schema keyword(s): ["not"]' in capsys.readouterr().err
