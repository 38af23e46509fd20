"""The package's import graph: no cycle, counting imports inside functions, and config a leaf."""

from __future__ import annotations

import ast
import os

import cafi

ROOT = os.path.dirname(cafi.__file__)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """cafi module -> the cafi modules it imports anywhere in its body (functions included)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(ROOT) for f in fs if f.endswith(".py")]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(open(path).read())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names] + [base]
            for name in names:
                while name and name not in modules:  # `from cafi.x import y`: y is a module or a name in x
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "cafi":
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_cycle_counting_imports_inside_functions():
    graph = import_graph()
    assert len(graph) > 40 and graph["cafi.pipeline"], "the graph was not read"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_is_a_leaf_that_imports_nothing_of_the_models_or_stages():
    graph = import_graph()
    assert graph["cafi.config"] <= {"cafi.errors", "cafi.columns", "cafi.fusion"}, graph["cafi.config"]
    assert graph["cafi.fusion"] <= {"cafi.errors", "cafi.columns"}, graph["cafi.fusion"]


TRAIN_SHARED = {"cafi.train.run_rows", "cafi.train.faces", "cafi.train.split", "cafi.train.outputs"}


def test_what_every_trainer_shares_imports_no_trainer():
    """cafi/train's shared modules (a run's rows, faces, the split, outputs) import no trainer's module:
    a second trainer builds on them without pulling in SDD-FIQA (or the reverse)."""
    graph = import_graph()
    assert TRAIN_SHARED <= set(graph), "the shared training modules moved: update TRAIN_SHARED"
    assert graph["cafi.train.sddfiqa"] >= TRAIN_SHARED - {"cafi.train.split"}, "the graph was not read"
    for mod in sorted(TRAIN_SHARED):
        trainers = {m for m in graph[mod] if m.startswith("cafi.train.") and m not in TRAIN_SHARED}
        assert not trainers, f"{mod} imports {sorted(trainers)}"
