"""pcd_ray's modules import each other without cycles, and the serve scorer stays numpy-only at import.

The graph is read from the source with ``ast``, not by importing: every ``import``/``from ... import`` of a pcd_ray
module anywhere in a file, function-level (lazy) imports included, since a lazy import that closes a cycle still
fails when both ends run (a half-initialised module raises ImportError or AttributeError at call time). Imports
under ``if TYPE_CHECKING:`` are left out: they never execute. ``from pcd_ray.a import b`` is an edge to
``pcd_ray.a.b`` when that is a module, else to ``pcd_ray.a``; importing a submodule also runs its packages'
``__init__``, but those implicit edges are not added (a package that re-exports its submodules would otherwise
always be a cycle with them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pcd_ray"


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under pcd_ray/ (a package is its ``__init__``)."""
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, skipping the bodies of ``if TYPE_CHECKING:`` (their ``else`` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imported(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]
) -> list[tuple[str, int]]:
    """(target module name, line) of every pcd_ray module this statement imports; targets may not exist."""
    if isinstance(node, ast.Import):
        return [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append((sub if sub in known else base, node.lineno))
    return targets


def import_graph() -> tuple[dict[str, dict[str, int]], list[str]]:
    """(module -> {imported pcd_ray module: first line}, imports that name no module as "file:line: name")."""
    files = _module_files()
    known = set(files)
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    unknown = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree):
            for target, line in _imported(module, path.name == "__init__.py", node, known):
                if target not in known:
                    unknown.append(f"{path.relative_to(ROOT)}:{line}: {target}")
                elif target != module:
                    graph[module].setdefault(target, line)
    return graph, unknown


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module, each sorted; iterative (no recursion
    limit on a deep graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    for root in sorted(graph):
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
                    out.append(sorted(component))
    return sorted(out)


def shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, as [m0, m1, ..., m0] (breadth-first)."""
    start, members = component[0], set(component)
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if child in members and child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {component}")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    files = _module_files()
    steps = [f"{a} ({files[a].relative_to(ROOT)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_import_cycle_among_pcd_ray_modules():
    graph, _ = import_graph()
    cycles = [
        f"{_describe(graph, shortest_cycle(graph, c))}\n    (all modules of this cycle set: {', '.join(c)})"
        for c in strongly_connected(graph)
    ]
    assert not cycles, (
        "import cycles among pcd_ray modules (each: one shortest cycle of a strongly connected "
        "set; file:line is where the next module is imported):\n" + "\n".join(cycles)
    )


def test_every_pcd_ray_import_names_an_existing_module():
    _, unknown = import_graph()
    assert not unknown, "imports of pcd_ray modules that do not exist:\n" + "\n".join(unknown)


def test_graph_reader_sees_lazy_submodule_and_relative_imports(tmp_path):
    """The reader itself, on a hand-made tree: a cycle closed only by a function-level import is found, a
    TYPE_CHECKING import is not an edge, ``from pkg import sub`` resolves to the submodule."""
    known = {"pcd_ray", "pcd_ray.a", "pcd_ray.a.b", "pcd_ray.a.c", "pcd_ray.c"}
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nfrom pcd_ray.a import b, helper\nfrom . import c\n"
        "if TYPE_CHECKING:\n    import pcd_ray.c\ndef f():\n    from ..c import thing\n"
    )
    edges = [t for node in _import_nodes(tree) for t, _ in _imported("pcd_ray.a.x", False, node, known)]
    assert sorted(edges) == ["pcd_ray.a", "pcd_ray.a.b", "pcd_ray.a.c", "pcd_ray.c"]
    graph = {
        "pcd_ray.a": {"pcd_ray.c": 1},
        "pcd_ray.c": {"pcd_ray.a.b": 2},
        "pcd_ray.a.b": {"pcd_ray.a": 3},
        "pcd_ray": {"pcd_ray.a": 1},
    }
    assert strongly_connected(graph) == [["pcd_ray.a", "pcd_ray.a.b", "pcd_ray.c"]]
    assert shortest_cycle(graph, ["pcd_ray.a", "pcd_ray.a.b", "pcd_ray.c"]) == [
        "pcd_ray.a",
        "pcd_ray.c",
        "pcd_ray.a.b",
        "pcd_ray.a",
    ]


def test_serve_scoring_imports_no_torch():
    """The API's scores are numpy; importing them (and the shared vector helpers they use) must not pull torch."""
    code = (
        "import sys, pcd_ray.serve.scoring, pcd_ray.vectors; "
        "print(sorted(m for m in ('torch', 'open_clip') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
