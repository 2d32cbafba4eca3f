"""fedtune's modules import on their own and form no import cycle.

A cycle among fedtune's own modules is what once made ``secure_server`` import the
round loop's types lazily from ``server``: it works until someone moves an import, then
fails at import time in only one order.  The graph here counts module-level imports and
also function-level ``from fedtune... import`` lines (a lazy import hides a cycle, it
does not remove it); ``if TYPE_CHECKING:`` imports are left out, as they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fedtune"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_blocks(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for child in node.body for n in ast.walk(child)}
    return skipped


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The fedtune module ``name`` refers to (a module, or the package that defines a name)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fedtune modules ``module`` imports (module level, or ``from fedtune...`` inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_blocks(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from fedtune.x import y`` may import the submodule y, or a name defined in x.
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "fedtune":
                target = _resolve(name, modules)
                if target is not None and target != module:
                    found.add(target)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components of more than one module are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    # A package's __init__ that imports its own submodules (to re-export them, or to fill a
    # registry such as fedtune.tasks) is how a package is built, not a cycle between modules:
    # those parent -> child edges are left out; every other edge, child -> parent included, counts.
    return {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}


def test_the_graph_finds_a_lazy_cycle(tmp_path: Path) -> None:
    """The check itself: two modules importing each other, one of them inside a function."""
    graph = {"fedtune.a": {"fedtune.b"}, "fedtune.b": {"fedtune.a"}, "fedtune.c": {"fedtune.a"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [["fedtune.a", "fedtune.b"]]
    path = tmp_path / "probe.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedtune import config\n"
                    "def f():\n    from fedtune.federation.server import run_server\n")
    assert imports_of("fedtune.probe", path, all_modules()) == {"fedtune.federation.server"}


def test_fedtunes_modules_form_no_import_cycle() -> None:
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, "import cycles among fedtune's modules: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    """Each module on its own, first, in one fresh process (a cycle shows up as an ImportError here)."""
    names = sorted(all_modules())
    script = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'fedtune' or m.startswith('fedtune.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
