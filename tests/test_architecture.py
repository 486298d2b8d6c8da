"""The house's shape: no import cycles in the project's packages, and the walls between them.

Imports are read with `ast` (nothing is imported), at every level of a module: top-level ones
and those inside functions, which would otherwise hide a cycle until the function runs. Imports
under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("search", "compressors", "experiments")
#: (importer, imported): packages that must never import the other.
WALLS = [
    ("compressors", "search"),
    ("experiments", "search"),
    ("compressors", "experiments"),
    ("experiments", "compressors"),
]


def _modules() -> dict[str, Path]:
    """Every module of `PACKAGES`, by dotted name (a package by its own name)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imported(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules ``name`` imports, each with the line of its first import.

    ``from a.b import c`` names the module ``a.b.c`` when there is one, else ``a.b``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name, not a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


@functools.cache
def _graph() -> dict[str, dict[str, int]]:
    """The project's import graph: module -> {imported module: line} (read once per run)."""
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan, then a path back)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(sorted(c), graph) for c in components]


def _cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*paths[node], start]
            if nxt in members and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {start}")  # (a component always has one)


def _show(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)]
    return " -> ".join([*steps, cycle[-1]])


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The reader finds an import made inside a function, resolves ``from a import module``
    and relative imports, and leaves out ``if TYPE_CHECKING:`` imports."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from search.results import reuse\n"
        "from . import report\n"
        "if TYPE_CHECKING:\n    import search.run.study\n"
        "def f():\n    from search.run.trial import measure\n"
    )
    path = tmp_path / "m.py"
    path.write_text(source)
    modules = _modules()
    found = _imported("search.results.m", path, modules)
    assert set(found) == {"search.results.reuse", "search.results.report", "search.run.trial"}
    assert found["search.run.trial"] == 7


def test_cycles_are_found_and_printed():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    (cycle,) = _cycles(graph)
    assert cycle == ["a", "b", "c", "a"]
    assert _show(cycle, graph) == "a (line 1) -> b (line 2) -> c (line 3) -> a"


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 50, sorted(graph)  # (the walk found the packages)
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module (line of the import) -> imported module):\n" + (
        "\n".join(_show(c, graph) for c in cycles)
    )


@pytest.mark.parametrize(("importer", "imported"), WALLS)
def test_walls(importer, imported):
    graph = _graph()
    crossing = [
        f"{name} (line {line}) imports {target}"
        for name, targets in sorted(graph.items())
        if name.split(".")[0] == importer
        for target, line in targets.items()
        if target.split(".")[0] == imported
    ]
    assert not crossing, f"{importer} must never import {imported}:\n" + "\n".join(crossing)
