"""The project's shape: no import cycle anywhere (imports inside functions count too), and core/
imports nothing of flows/, tasks/, Prefect, DVC or MLflow."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "flows", "tasks")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            mods[".".join(parts)] = f
    return mods


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(path):
            while imp and imp not in mods:  # `from core.a import f` → core.a
                imp = imp.rpartition(".")[0]
            if imp and imp != name and not name.startswith(imp + "."):  # a package's own __init__ is no edge
                deps.add(imp)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 40  # the walk found the project
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_knows_nothing_of_the_orchestration():
    banned = ("flows", "tasks", "prefect", "prefect_dask", "dvc", "mlflow")
    for f in (ROOT / "core").rglob("*.py"):
        bad = sorted(i for i in _imports(f) if i.split(".")[0] in banned)
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_tests_import_only_core_apart_from_the_orchestration_tests():
    """Library tests import core/ only; the flows', tasks' and CLI's own tests are listed here."""
    orchestration = {"test_flows.py", "test_caching.py", "test_bench_speed.py", "test_tracking.py", "test_dvc.py"}
    for f in (ROOT / "tests").glob("test_*.py"):
        if f.name in orchestration:
            continue
        other = sorted(i for i in _imports(f) if i.split(".")[0] in ("tasks",))
        assert not other, f"{f.name} imports {other}"
