"""No import cycle inside mantis_llm, counting imports inside functions too, and the low
modules (errors, types, validation, mime sniffing) import nothing above them. Read from the
source with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import mantis_llm

ROOT = Path(mantis_llm.__file__).resolve().parent
LOW = {"mantis_llm.errors": set(), "mantis_llm._mime": set(), "mantis_llm._validate": {"mantis_llm.errors"}}
LOW["mantis_llm.types"] = {"mantis_llm.errors", "mantis_llm._mime", "mantis_llm._validate"}


def modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the mantis_llm modules it imports anywhere in its source (``from . import x``
    counts as importing ``x`` when it is a module, else the package)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in mods.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = here[: len(here) - node.level + 1]
                    base = ".".join(package + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in mods else base)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "mantis_llm.backends.fal" in graph["mantis_llm.backends"]  # a lazy import in __getattr__
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_low_modules_import_nothing_above_them():
    graph = import_graph()
    above = {name: graph[name] - allowed for name, allowed in LOW.items()}
    assert above == {name: set() for name in LOW}
