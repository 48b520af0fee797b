"""No module imports, even lazily or for type checking, a module that imports it back (issue #11).

Read from the source text (every ``import`` statement, wherever it stands), so a cycle hidden in a
function body or behind ``TYPE_CHECKING`` counts as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (the package's own __init__ aside)."""
    deps: dict[str, set[str]] = {}
    for f in (ROOT / package).rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        deps[name] = found
    return {m: {d for d in found if d in deps and d not in (m, package)} for m, found in deps.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (cycle := visit(d, [*path, d])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_find_cycle_sees_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("package", ["pruning", "perception", "benchmarks"])
def test_package_has_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 5
    assert find_cycle(graph) is None
