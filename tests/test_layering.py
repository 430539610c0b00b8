"""The package's modules form layers: no import circle, counting imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import brittle

ROOT = Path(brittle.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
                candidates = [a.value for a in node.args[:1] if isinstance(a, ast.Constant)]
            else:
                continue
            # importing a.b.c also runs a.b: only the deepest package module counts as the dependency
            deps |= {c for c in candidates if c in files and c != mod}
        graph[mod] = {d for d in deps if not mod.startswith(d + ".")}  # a module's own parent package is not a dependency
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_package_modules():
    graph = import_graph()
    assert len(graph) > 30 and "brittle.pipeline" in graph["brittle.cli"]  # the graph was really read
    assert cycles(graph) == []


def test_lower_layers_do_not_reach_up():
    """The loader, data and selection math never import stage code, evaluation or the CLI."""
    graph = import_graph()
    upper = {"brittle.cli", "brittle.pipeline", "brittle.config", "brittle.presets"}
    for low in ("brittle.models", "brittle.io", "brittle.data.core", "brittle.data.build", "brittle.data.sources",
                "brittle.groups.select", "brittle.scoring.compute", "brittle.scoring.methods", "brittle.align",
                "brittle.finetune", "brittle.ablation"):
        assert not graph[low] & upper, (low, graph[low] & upper)
    for data_module in ("brittle.data.core", "brittle.data.build", "brittle.data.sources"):
        assert not {d for d in graph[data_module] if d.startswith("brittle.evaluation")}, data_module
    assert "brittle.evaluation.suite" not in graph["brittle.align"]
