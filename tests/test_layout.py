"""The package's layout: no import cycle between its modules, and only the Lightning-facing modules import Lightning
when they are imported (README: `import lightning_gradguard` does not import Lightning; `check_step` users never
load it through this package)."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_gradguard

PACKAGE = Path(lightning_gradguard.__file__).parent
#: The Lightning adapter, its CLI, its dashboards (Trainer loggers) and the Fabric adapter.
LIGHTNING_MODULES = {"callback", "cli", "dashboard", "fabric"}


def _top_level_imports(path: Path) -> list[str]:
    """Modules imported when ``path`` is imported (not under ``TYPE_CHECKING``, not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                if "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                out.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # from . import x / from .x import y
                    base = node.module or ""
                    out.extend(f".{base}" if base else f".{a.name}" for a in node.names)
                else:
                    out.append(node.module or "")

    visit(tree.body)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {
        p.stem: {name[1:].split(".")[0] for name in _top_level_imports(p) if name.startswith(".")} & modules
        for p in PACKAGE.glob("*.py")
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``graph`` (``[a, b, ..., a]``), or ``None``."""
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for dep in sorted(graph.get(name, ())):
            found = walk(dep, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        found = walk(name, [])
        if found:
            return found
    return None


def test_the_modules_import_each_other_without_a_cycle():
    assert _cycle({"core": {"history"}, "history": {"schedule"}, "schedule": {"history"}}) == [
        "history",
        "schedule",
        "history",
    ]
    graph = _graph()
    assert {"core", "schedule", "history"} <= set(graph)
    assert "schedule" in graph["core"]
    cycle = _cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_only_the_lightning_facing_modules_import_lightning():
    importing = {
        p.stem for p in PACKAGE.glob("*.py") if any(n.split(".")[0] == "lightning" for n in _top_level_imports(p))
    }
    assert importing <= LIGHTNING_MODULES
    assert "callback" in importing  # the check sees imports at all
