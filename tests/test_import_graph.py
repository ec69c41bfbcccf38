"""No import circle between moeray's modules, imports inside functions included.

A static check over the AST of every module of the package: each ``import`` and ``from ...
import`` (at any depth, so a circle hidden by an import inside a function counts) is an edge to
the module it names (``from a.b import c`` names ``a.b.c`` when that is a module, else
``a.b``). Any strongly connected set of more than one module is a circle. A second test plants
one in a throwaway package to show the check can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import moeray

pytestmark = pytest.mark.pure

PACKAGE = Path(moeray.__file__).resolve().parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py under root."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(modules: dict[str, Path], package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its source."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target.split(".")[0] == package and target in modules and target != name:
                    edges[name].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_moeray_has_no_import_circle():
    modules = module_names(PACKAGE, "moeray")
    assert {"moeray.actors.coordinator", "moeray.replay.inprocess", "moeray.traces.mtrace"} <= set(
        modules
    )
    edges = import_edges(modules, "moeray")
    assert "moeray.shards.capacity" in edges["moeray.actors.config"]  # edges are really read
    assert circles(edges) == []


def test_a_circle_hidden_in_a_function_is_found(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from pkg.sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")
    (root / "c.py").write_text("import pkg.a\n")
    (root / "d.py").write_text("from . import a\n")  # relative, no circle
    edges = import_edges(module_names(root, "pkg"), "pkg")
    assert edges["pkg.d"] == {"pkg.a"}
    assert circles(edges) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
