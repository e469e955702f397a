"""The code's shape: module, class and function sizes, no import circles, thin HTTP routes (pure, reads source)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scheduler_daemon"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if "migrations" in relative.parts:
            continue
        name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        yield name, path


def test_no_module_class_or_function_is_too_long() -> None:
    too_long = []
    for name, path in modules():
        source = path.read_text()
        if (lines := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
                if length > limit:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert too_long == []


def _imports(name: str, path: Path) -> set[str]:
    """Modules of the package ``name`` imports, including imports for the type checker only."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("scheduler_daemon"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base])
                if base.startswith("scheduler_daemon"):
                    found.add(base.rstrip("."))
                    found.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(path.read_text()).body)
    return found


def test_no_import_circle() -> None:
    graph = {name: _imports(name, path) for name, path in modules()}
    graph = {name: {m for m in deps if m in graph and m != name} for name, deps in graph.items()}
    # A package's __init__ may import its own modules (its public names); the circle we forbid is between modules.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert circles == []


@pytest.mark.parametrize("module", ["routes.py", "ingest_routes.py"])
@pytest.mark.parametrize("forbidden", ["store", "runner", "scheduler"])
def test_no_route_touches_the_store_the_runner_or_the_scheduler(module: str, forbidden: str) -> None:
    tree = ast.parse((PACKAGE / "http" / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr != forbidden, f"{module} line {node.lineno} reaches .{forbidden}"
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith(f"scheduler_daemon.{forbidden}"), node.module
