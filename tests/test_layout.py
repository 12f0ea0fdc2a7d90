"""The package's layout stays readable (issue 22): no import circle among trace_ds's modules, and no module
imports another module's private name. Read from the source (every import, at the top or inside a function),
so a circle that only closes at run time is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file: trace_ds/ and kernels/ (installed as trace_ds.kernels)."""
    found = {}
    for top, package in ((REPO / "trace_ds", "trace_ds"), (REPO / "kernels", "trace_ds.kernels")):
        for path in top.rglob("*.py"):
            parts = path.relative_to(top).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a trace_ds module in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append(
                    (submodule, "", node.lineno) if submodule in modules else (base, alias.name, node.lineno)
                )
    return [(m, n, line) for m, n, line in found if m.startswith("trace_ds")]


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imported, _, _ in _imports(name, path, modules):
            owner = _owner(imported, modules)
            if owner and owner != name:
                graph[name].add(owner)
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_circles(graph) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_among_trace_ds_modules() -> None:
    circles = import_circles(_graph())
    assert not circles, (
        "import circles (move the shared names down to a module both sides import): "
        + "; ".join(" <-> ".join(c) for c in circles)
    )


def test_no_module_imports_another_modules_private_name() -> None:
    modules = _modules()
    found = [
        f"{path.relative_to(REPO)}:{line}: {imported}.{name}"
        for module, path in modules.items()
        for imported, name, line in _imports(module, path, modules)
        if name.startswith("_") and not name.startswith("__") and _owner(imported, modules) != module
    ]
    found += [
        f"{path.relative_to(REPO)}:{line}: {imported}.{name}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for imported, name, line in _imports("tests." + path.stem, path, modules)
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not found, (
        "private names imported from another module (make them public or move them):\n" + "\n".join(found)
    )
