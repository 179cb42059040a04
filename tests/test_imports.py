"""The package's imports point one way: no module imports, even inside a function, a module
that imports it back (directly or through others). ast only, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "grpo_ray"


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    """Module -> the grpo_ray modules it imports anywhere in its body (a package counts as its __init__)."""
    mods = {".".join(("grpo_ray",) + p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grpo_ray"):
                out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        # A package and its own modules may import each other (trial/__init__ is empty; tracking's re-exports).
        graph[name] = {d for d in out if d in mods and d != name
                       and not d.startswith(name + ".") and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append(" -> ".join(path[path.index(v):] + [v]))
            elif not state.get(v):
                visit(v, path + [v])
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [m])
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []
