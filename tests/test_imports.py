"""Which module may import which: read from the source (imports inside functions included)."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
    """{dotted module name: path} of the qmlx and convert packages."""
    out = {}
    for package in ("qmlx", "convert"):
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its file."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import submodule` imports the submodule; `from mod import name`, the module.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {m for m in found if m in MODULES and m != module}


def test_the_loader_needs_nothing_of_the_lora_room():
    assert not {m for m in imports("qmlx.loader") if m.startswith("qmlx.lora")}


def test_the_folder_helpers_need_only_the_errors():
    assert imports("qmlx.folder") <= {"qmlx", "qmlx.errors"}


def test_the_server_engine_knows_no_http():
    """qmlx/server: schemas -> engine -> prepare -> stream -> app, and the engine imports no web framework."""
    order = ["schemas", "engine", "prepare", "stream", "anthropic", "ollama", "app"]
    for i, name in enumerate(order):
        inside = {
            m.rpartition(".")[2] for m in imports(f"qmlx.server.{name}") if m.startswith("qmlx.server.")
        }
        assert inside <= set(order[:i]), (name, inside)
    tree = ast.parse(open(MODULES["qmlx.server.engine"], encoding="utf-8").read())
    third_party = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    third_party |= {
        n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
    }
    assert not third_party & {"fastapi", "starlette", "uvicorn", "pydantic", "httpx"}


@pytest.mark.parametrize("package", ["convert", "qmlx.lora"])
def test_no_import_cycles(package):
    inside = [m for m in MODULES if m == package or m.startswith(package + ".")]
    graph = {m: {d for d in imports(m) if d in inside} for m in inside}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if m not in done:
            for d in sorted(graph[m]):
                visit(d, path + [m])
            done.add(m)

    for m in sorted(graph):
        visit(m, [])


# ------------------------------------------------------------------ the rules of docs/architecture.md

DOC = os.path.join(ROOT, "docs", "architecture.md")


def rooms() -> tuple[dict[str, str], dict[str, set[str]]]:
    """({module: room}, {room: rooms it may import}) from the doc's Rooms table."""
    import re

    text = open(DOC, encoding="utf-8").read()
    table = text.split("## Rooms", 1)[1].split("\n## ", 1)[0]
    room_of, may = {}, {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] in ("room", "") or set(cells[0]) <= {"-"}:
            continue
        room = cells[0]
        for m in re.findall(r"`([\w.]+)`", cells[1]):
            assert m not in room_of, f"{m} is in two rooms of docs/architecture.md"
            room_of[m] = room
        may[room] = {w.strip("`") for w in cells[2].split() if w != "—"} | {room}
    return room_of, may


ROOM_OF, MAY = rooms()


def test_every_module_has_a_room():
    assert sorted(set(MODULES) - set(ROOM_OF)) == [], "add the module to docs/architecture.md's Rooms"
    assert sorted(set(ROOM_OF) - set(MODULES)) == [], "the doc names a module that does not exist"


def test_arrows_go_only_where_the_doc_allows():
    bad = []
    for m in sorted(MODULES):
        for d in sorted(imports(m)):
            allowed = MAY[ROOM_OF[m]]
            if ROOM_OF[d] not in allowed and d not in allowed:  # a room, or one named module
                bad.append(f"{m} ({ROOM_OF[m]}) -> {d} ({ROOM_OF[d]})")
    assert bad == []


def test_the_model_imports_only_its_config_errors_and_kernels():
    allowed = {"qmlx.config", "qmlx.errors", "qmlx.kernels", "qmlx.attention", "qmlx"}
    for m in ("qmlx.model", "qmlx.attention"):
        assert imports(m) <= allowed, m


def test_no_import_cycle_anywhere():
    graph = {m: imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m) :] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_no_module_imports_another_modules_private_names():
    bad = []
    for m, path in sorted(MODULES.items()):
        package = m if path.endswith("__init__.py") else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] not in ("qmlx", "convert"):
                continue
            for a in node.names:
                name = a.name
                if not name.startswith("_") or name.startswith("__"):
                    continue
                sub = f"{base}.{name}"
                if sub in MODULES or sub == "qmlx.kernels._qmm":  # a private module: only its own package
                    if not (m == base or m.startswith(base + ".")):
                        bad.append(f"{m}: from {base} import {name}")
                else:
                    bad.append(f"{m}: from {base} import {name}")
    assert bad == []
