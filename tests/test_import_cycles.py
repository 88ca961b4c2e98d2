"""No import loops in our packages: the module import graph of neuro_models/, data/, analysis/ and study/ is acyclic.

Edges come from every ``import`` in a file, function-level ones included (a local import that dodges a loop at
import time is still a loop in the design: ``mamba/model.py`` importing ``mamba/family.py`` inside
``__init__`` was one). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at ``pkg``;
importing a submodule does not add an edge to its parent package (Python initialises parents first, which
is not a dependency of our code). Imports under ``if TYPE_CHECKING:`` are left out.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("neuro_models", "data", "analysis", "study")

#: loops that another work item removes; each entry names it. An entry that no longer exists fails
#: ``test_known_cycles_still_exist``: delete it then, so the loop cannot come back unnoticed.
KNOWN_CYCLES: dict[frozenset[str], str] = {}


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _known_prefix(name: str, modules: set[str]) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in modules:
            return cand
    return None


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """``module -> modules it imports`` over the ``.py`` files of ``packages`` under ``root``."""
    files = {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))
             if ".venv" not in p.parts}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [_known_prefix(a.name, modules) for a in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = []
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in modules else _known_prefix(base, modules))
            graph[mod] |= {t for t in targets if t and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[frozenset[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_no_import_cycles():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not found, "import loops: " + "; ".join(" <-> ".join(sorted(c)) for c in found)


def test_known_cycles_still_exist():
    found = set(cycles(import_graph()))
    stale = [f"{sorted(c)} ({why})" for c, why in KNOWN_CYCLES.items() if c not in found]
    assert not stale, f"these loops are gone: remove them from KNOWN_CYCLES in {Path(__file__).name}: {stale}"


@pytest.mark.parametrize("local", [True, False])
def test_checker_finds_a_loop_also_through_a_function_level_import(tmp_path, local):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    body = "def g():\n    from .a import f\n    return 1\n" if local else "from pkg import a\n\ndef g():\n    return 1\n"
    (pkg / "b.py").write_text(body)
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")
    (pkg / "d.py").write_text("from . import c\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert cycles(graph) == [frozenset({"pkg.a", "pkg.b"})]
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.c"] == set()  # a package's own imports are edges
