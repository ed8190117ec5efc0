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
