"""The package's imports point one way: no module imports, even inside a function, a module
that imports it back (directly or through others), and none imports a layer above its own
(``LAYERS``). No module is over ``MAX_LINES`` lines. ast only, nothing is imported."""

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


# --------------------------------------------------------------------------- layers
# Each top-level module or package of grpo_ray -> its layer. A module may import modules of its
# own layer or a lower one, never a higher one: the CLI drives the sweep, the sweep runs trials
# (and exports and shows them), a trial learns a task, the task is configured by the spec.
LAYERS: dict[str, int] = {
    "grpo_ray": 0, "errors": 0, "storage": 0, "run_dir": 0, "run_lock": 0, "select": 0, "gguf": 0,
    "config": 1,
    "task": 2, "models": 2, "tiny": 2,
    "trial": 3,
    "export": 4, "views": 4, "tracking": 4,
    "sweep": 5,
    "cli": 6,
}
# Units that may import only these other units (the spec answers `grpo-ray validate` on its own).
ONLY: dict[str, set[str]] = {"config": {"errors"}}
MAX_LINES = 500


def unit(module: str) -> str:
    """``grpo_ray.trial.run`` -> ``trial``; ``grpo_ray`` -> ``grpo_ray``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int] = LAYERS,
                     only: dict[str, set[str]] = ONLY) -> list[str]:
    found = []
    for m in sorted(graph):
        for d in sorted(graph[m]):
            a, b = unit(m), unit(d)
            if a == b:
                continue
            if layers[b] > layers[a]:
                found.append(f"{m} -> {d}: {a} (layer {layers[a]}) imports {b} (layer {layers[b]})")
            elif a in only and b not in only[a]:
                found.append(f"{m} -> {d}: {a} may import only {', '.join(sorted(only[a]))}")
    return found


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    for deps in list(out.values()):
        for d in deps:
            out.setdefault(d, set())
    return out


def long_modules(root: Path = SRC, limit: int = MAX_LINES) -> list[str]:
    return sorted(f"{p.relative_to(root)}: {n} lines" for p in root.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > limit)


def test_the_checker_finds_an_upward_import():
    graph = {"grpo_ray.config.spec": {"grpo_ray.trial.run"}, "grpo_ray.trial.run": {"grpo_ray.config.spec"},
             "grpo_ray.config.load": {"grpo_ray.storage"}}
    assert layer_violations(graph) == [
        "grpo_ray.config.load -> grpo_ray.storage: config may import only errors",
        "grpo_ray.config.spec -> grpo_ray.trial.run: config (layer 1) imports trial (layer 3)",
    ]
    assert cycles(unit_graph({"grpo_ray.views.a": {"grpo_ray.tracking.b"}, "grpo_ray.tracking.c": {"grpo_ray.views.d"}})) \
        == ["tracking -> views -> tracking"]


def test_the_checker_finds_a_long_module(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "long.py").write_text("x = 1\n" * 501)
    (tmp_path / "short.py").write_text("x = 1\n" * 500)
    assert long_modules(tmp_path) == ["pkg/long.py: 501 lines"]


def test_every_module_has_a_layer():
    assert sorted({unit(m) for m in import_graph()} - set(LAYERS)) == []


def test_no_import_goes_up_a_layer():
    assert layer_violations(import_graph()) == []


def test_no_cycle_between_packages():
    assert cycles(unit_graph(import_graph())) == []


def test_no_module_is_too_long():
    assert long_modules() == []
