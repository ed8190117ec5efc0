"""A study's spec (TOML): model, data, orderings × seeds, `qmlx lora` and `qmlx eval` settings.

    model = "q7b-4bit"                 # paths are relative to the spec's folder
    data = "data"                      # train.jsonl, valid.jsonl (validation loss curves need it)
    orderings = ["random", "easy-to-hard", "hard-to-easy", "adaptive"]
    seeds = [0, 1, 2, 3, 4]
    baseline = "random"                # what the others are compared with (default: random)
    out = "study"                      # default: the spec's name without .toml, beside it

    [lora]                             # any `qmlx lora` option by its long name (- or _)
    rank = 8
    lr = 3e-4
    batch_size = 8
    iters = 10000
    val_every = 250

    [eval]                             # any `qmlx eval` option by its long name
    tasks = ["mmlu", "gsm8k"]          # or "mmlu,gsm8k"
    limit = 500

Each option is checked by the command's own parser when the spec is read, so a typo or a bad value is
an error naming the spec's field before anything runs. The study sets --model, --data, --order,
--seed, --adapter-path/--adapter and --out itself; they cannot be given in the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Set by the study per run, never by the spec's tables.
RESERVED = {
    "lora": {"model", "data", "order", "seed", "adapter_path", "resume", "force", "estimate", "test",
             "bits", "group_size", "backend"},
    "eval": {"model", "adapter", "out"},
}  # fmt: skip
TOP = {"model", "data", "orderings", "seeds", "baseline", "out", "name", "lora", "eval"}


class SpecError(UserError):
    """A spec that cannot be used; the message names the file and the field."""


@dataclass
class Run:
    order: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.order}-s{self.seed}"


@dataclass
class Spec:
    path: str
    name: str
    model: str
    data: str
    orderings: list[str]
    seeds: list[int]
    baseline: str
    out: str
    lora: dict = field(default_factory=dict)  # option dest -> value, as parsed by `qmlx lora`
    eval: dict = field(default_factory=dict)
    lora_argv: list[str] = field(default_factory=list)
    eval_argv: list[str] = field(default_factory=list)

    @property
    def runs(self) -> list[Run]:
        return [Run(o, s) for o in self.orderings for s in self.seeds]

    @property
    def iters(self) -> int:
        """Training steps per run (`qmlx lora`'s default when the spec gives none)."""
        return self.lora["iters"] or 1000

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.out, "runs", run.name)

    @property
    def tasks(self) -> list[str]:
        return [t.strip() for t in self.eval["tasks"].split(",") if t.strip()]

    def lora_key(self) -> str:
        """What decides a run's training besides its ordering and seed (a changed spec is refused)."""
        return _digest({"model": self.model, "data": self.data, "lora": self.lora})

    def eval_key(self) -> str:
        return _digest({"eval": self.eval})


def _digest(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise ValueError("the parser has no subcommands")


def _options(parser, path: str, command: str, table: dict) -> tuple[dict, list[str]]:
    """(every option's parsed value, the argv giving the spec's ones) for `qmlx <command>`."""
    p = _subparser(parser, command)
    by_dest = {a.dest: a for a in p._actions if a.option_strings}
    argv: list[str] = []
    for key, value in table.items():
        dest = key.replace("-", "_")
        where = f"{path}: [{command if command == 'eval' else 'lora'}] {key}"
        if dest in RESERVED[command]:
            raise SpecError(f"{where}: set by the study for each run; remove it from the spec")
        action = by_dest.get(dest)
        if action is None or dest == "help":
            known = sorted(d for d in by_dest if d not in RESERVED[command] and d != "help")
            raise SpecError(f"{where}: not a `qmlx {command}` option (options: {', '.join(known)})")
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise SpecError(f"{where}: must be true or false, got {value!r}")
            argv += [flag] if value else []
            continue
        if isinstance(value, list) and dest in ("tasks", "targets", "band"):
            value = ",".join(str(v) for v in value)
        if isinstance(value, (dict, list)) or isinstance(value, bool):
            raise SpecError(f"{where}: must be a number or a string, got {value!r}")
        argv += [flag, str(value)]

    def fail(message: str):
        raise SpecError(f"{path}: [{command}] {message}")

    p.error = fail  # the command's own checks, as one error naming the spec
    placeholders = ["--model", "M"] + (["--data", "D"] if command == "lora" else [])
    parsed = vars(p.parse_args(placeholders + argv))
    values = {k: v for k, v in parsed.items() if k in by_dest and k not in RESERVED[command] and k != "help"}
    return values, argv


def _resolve(base: str, value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: must be a path (a string), got {value!r}")
    value = os.path.expanduser(value)
    joined = os.path.join(base, value)
    # A hub id ("Qwen/Qwen2.5-7B-Instruct") stays as given when no such folder exists here.
    return os.path.abspath(joined) if os.path.exists(joined) or os.path.isabs(value) else value


def read_spec(path: str, commands: argparse.ArgumentParser, out: str | None = None) -> Spec:
    """The spec at `path`; `commands` is the `qmlx` parser, whose `lora` and `eval` subcommands check
    the tables' options (handed in by the CLI, which this room does not import)."""
    from ..lora.order import ORDERS

    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such spec file")
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(d) - TOP)
    if unknown:
        raise SpecError(f"{path}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(TOP))})")
    for key in ("model", "data", "orderings", "seeds"):
        if key not in d:
            raise SpecError(f"{path}: missing field {key!r}")
    base = os.path.dirname(os.path.abspath(path))
    orderings = d["orderings"]
    if not isinstance(orderings, list) or not orderings or not all(isinstance(o, str) for o in orderings):
        raise SpecError(f"{path}: orderings must be a non-empty list of names, got {orderings!r}")
    for o in orderings:
        if o not in ORDERS:
            raise SpecError(f"{path}: orderings: unknown ordering {o!r} (known: {', '.join(ORDERS)})")
    if len(set(orderings)) != len(orderings):
        raise SpecError(f"{path}: orderings: each ordering once, got {orderings}")
    seeds = d["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**32 for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise SpecError(
            f"{path}: seeds must be a non-empty list of distinct integers 0 … 2^32-1, got {seeds!r}"
        )
    baseline = d.get("baseline", "random")
    if baseline not in orderings:
        raise SpecError(f"{path}: baseline {baseline!r} is not one of the orderings {orderings}")
    for table in ("lora", "eval"):
        if not isinstance(d.get(table, {}), dict):
            raise SpecError(f"{path}: [{table}] must be a table")
    if "tasks" not in d.get("eval", {}):
        raise SpecError(f'{path}: [eval] tasks is missing (e.g. tasks = ["mmlu"])')
    lora, lora_argv = _options(commands, path, "lora", d.get("lora", {}))
    eval_table = dict(d.get("eval", {}))
    if isinstance(eval_table.get("data"), str):  # a task file, relative to the spec like every path
        eval_table["data"] = _resolve(base, eval_table["data"], f"{path}: [eval] data")
    tasks = eval_table.get("tasks")
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if isinstance(tasks, list):  # custom tasks (FILE.jsonl) too
        eval_table["tasks"] = [
            _resolve(base, t.strip(), f"{path}: [eval] tasks") if isinstance(t, str) and t.strip().endswith(".jsonl")
            else t
            for t in tasks
        ]  # fmt: skip
    ev, eval_argv = _options(commands, path, "eval", eval_table)
    from ..eval.run import parse_tasks

    try:
        parse_tasks(ev["tasks"])
    except UserError as e:
        raise SpecError(f"{path}: [eval] {e}") from None
    name = d.get("name") or os.path.splitext(os.path.basename(path))[0]
    if out == "":
        raise SpecError("--out: an empty folder name")
    if out is None:
        if "out" in d and (not isinstance(d["out"], str) or not d["out"]):
            raise SpecError(f"{path}: out must be a folder path (a string), got {d['out']!r}")
        out = os.path.join(base, os.path.expanduser(d["out"])) if "out" in d else os.path.join(base, name)
    return Spec(
        path=os.path.abspath(path), name=str(name), model=_resolve(base, d["model"], f"{path}: model"),
        data=_resolve(base, d["data"], f"{path}: data"), orderings=orderings, seeds=seeds, baseline=baseline,
        out=os.path.abspath(out), lora=lora, eval=ev, lora_argv=lora_argv, eval_argv=eval_argv,
    )  # fmt: skip
