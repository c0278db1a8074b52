"""Imports run one way: the import graph of lightning_prune has no cycle, and no function imports a project module.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` counts, at module level,
under ``TYPE_CHECKING`` and inside functions. ``from package import name`` points at ``package.name`` when that is a
module, else at the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_prune"


def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append((target, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


def _graph(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules(package)
    edges: dict[str, set[str]] = {name: set() for name in modules}
    in_functions = []
    for name, path in modules.items():
        for target, line, in_function in _imports(name, path, modules):
            edges[name].add(target)
            if in_function:
                in_functions.append(f"{path.relative_to(package.parent)}:{line} imports {target}")
    return edges, in_functions


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_import_graph_of_lightning_prune_has_no_cycle():
    edges, _ = _graph(PACKAGE)
    assert len(edges) > 50  # every module was read
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_imports_a_project_module():
    _, in_functions = _graph(PACKAGE)
    assert not in_functions, "imports of project modules inside functions:\n" + "\n".join(in_functions)


def test_no_test_module_imports_another():
    """Shared test helpers live in helper modules (tests/runs.py, checks.py, pruners.py, ...), not in test modules."""
    tests = PACKAGE.parent / "tests"
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[-1].startswith("test_") and (n.startswith("tests.") or "." not in n)]
    assert len(list(tests.glob("test_*.py"))) > 20  # the folder was read
    assert not found, "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize("b_imports", [
    "from pkg.a import X\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
    "def f():\n    from ..a import X\n    return X\n",
])
def test_the_check_finds_a_cycle_however_it_is_imported(tmp_path, b_imports):
    package = _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from pkg.sub.b import Y\nX = 1\n",
                                "pkg/sub/__init__.py": "", "pkg/sub/b.py": b_imports + "Y = 2\n"})
    edges, in_functions = _graph(package)
    assert _cycle(edges) == ["pkg.a", "pkg.sub.b", "pkg.a"]
    assert bool(in_functions) == b_imports.startswith("def")


def test_the_check_passes_imports_that_run_one_way(tmp_path):
    package = _write(tmp_path, {"pkg/__init__.py": "from pkg.a import X\n", "pkg/a.py": "from pkg import b\nX = 1\n",
                                "pkg/b.py": "import torch\n\ndef f():\n    import transformers\n"})
    edges, in_functions = _graph(package)
    assert _cycle(edges) is None and not in_functions
    assert edges["pkg.a"] == {"pkg.b"}
