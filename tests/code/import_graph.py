"""The project's import graph, read with ``ast`` (nothing is imported): used by test_layers and test_dvc_deps.

Every ``import``/``from ... import`` of a first-party module is an :class:`Edge` with its file and line and its kind:
``top`` (runs when the module is imported), ``lazy`` (inside a function: runs when that function does) or ``typing``
(under ``if TYPE_CHECKING:``: never runs).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("emassist", "stages", "pipelines", "serving", "bench", "tests")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (a module or package that exists in the repository)
    path: Path  # file of the importing module, relative to the repository root
    line: int
    kind: str  # "top" | "lazy" | "typing"

    def where(self) -> str:
        return f"{self.path.as_posix()}:{self.line}"


def module_file(name: str) -> Path | None:
    """The repository file of a first-party module or package (relative), or None if there is none."""
    if name.split(".")[0] not in FIRST_PARTY:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO_ROOT)
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT) if path.is_absolute() else path
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: str) -> list[str]:
    """Every module under a first-party package folder, dotted, sorted."""
    root = REPO_ROOT / package
    return sorted(module_name(p) for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _raw_imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with its kind, found anywhere in the module."""

    def walk(nodes: Iterable[ast.AST], kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, kind
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body, "typing")
                yield from walk(node.orelse, kind)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(ast.iter_child_nodes(node), "lazy" if kind == "top" else kind)
            else:
                yield from walk(ast.iter_child_nodes(node), kind)

    yield from walk(tree.body, "top")


def _absolute(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = source.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@functools.cache
def edges_of(path: Path) -> tuple[Edge, ...]:
    """The first-party imports of one file (relative path); see :func:`parse_edges`."""
    return parse_edges((REPO_ROOT / path).read_text(), path)


def parse_edges(text: str, path: Path) -> tuple[Edge, ...]:
    """The first-party imports in ``text`` (the file ``path``), each an edge to a module that exists in the repository.

    ``from P import x`` is an edge to ``P.x`` when that is a module, else to ``P``. Importing ``a.b.c`` also runs the
    packages ``a`` and ``a.b``: those are edges too, except packages the importing module is itself inside (they
    are always running already).
    """
    source = module_name(path)
    tree = ast.parse(text, filename=str(path))
    own_packages = {".".join(source.split(".")[:i]) for i in range(1, source.count(".") + 1)}
    if path.name == "__init__.py":
        own_packages.add(source)
    found: dict[tuple[str, int, str], None] = {}
    for node, kind in _raw_imports(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = _absolute(node, source, path.name == "__init__.py")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if module_file(sub) else base)
        for target in targets:
            while target and not module_file(target):  # `import a.b.attr`-like oddities: the longest real module
                target = target.rpartition(".")[0]
            if not target:
                continue
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in own_packages and name != source:
                    found[(name, node.lineno, kind)] = None
    return tuple(Edge(source, t, path, line, kind) for t, line, kind in found)


def edges_from(module: str) -> tuple[Edge, ...]:
    path = module_file(module)
    return edges_of(path) if path else ()


def closure(start: str, kinds: frozenset[str] = frozenset({"top", "lazy"})) -> set[str]:
    """Every first-party module ``start`` imports, directly or through others (edges of the given kinds)."""
    seen, todo = {start}, [start]
    while todo:
        for edge in edges_from(todo.pop()):
            if edge.kind in kinds and edge.target not in seen:
                seen.add(edge.target)
                todo.append(edge.target)
    return seen


def is_inert(module: str) -> bool:
    """A package ``__init__`` that only holds a docstring and plain constants: importing it cannot change anything."""
    path = module_file(module)
    if path is None or path.name != "__init__.py":
        return False
    tree = ast.parse((REPO_ROOT / path).read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Constant):
            continue
        return False
    return True


def cycles(modules: Iterable[str], kinds: frozenset[str] = frozenset({"top"})) -> list[list[str]]:
    """Import cycles (strongly connected components of more than one module) among ``modules`` (Tarjan)."""
    nodes = set(modules)
    graph = {m: sorted({e.target for e in edges_from(m) if e.kind in kinds and e.target in nodes}) for m in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found
