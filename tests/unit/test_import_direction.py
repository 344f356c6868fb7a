"""Every import arrow points down (DESIGN.md, "Import direction").

``train.py -> train/ -> parallel/, checkpoint/, data/, metrics/ -> models/ -> kernels/``;
``config/`` is a leaf that everyone may import. The source of ``moetrain/`` and
``kernels/`` (shipped as ``moetrain.kernels``) is parsed with ``ast``, imports inside
functions included, so a lazy import cannot hide an upward arrow or close a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"moetrain": ROOT / "moetrain", "moetrain.kernels": ROOT / "kernels"}

# Package -> the moetrain packages it may import (besides itself). ``moetrain`` is the
# package root, the public API (``moetrain.load``): it may import anything.
MIDDLE = {"config", "faults", "kernels", "models"}  # what the middle tier stands on
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "faults": set(),
    "testing": set(),
    "kernels": {"config"},
    "models": {"config", "kernels"},
    "data": MIDDLE,
    "metrics": MIDDLE,
    "checkpoint": MIDDLE,
    "parallel": MIDDLE | {"data"},  # the memory estimate reads the tokenizer's vocabulary
    "train": MIDDLE | {"data", "metrics", "checkpoint", "parallel"},
    # experiments.py: training runs as subprocesses and their numbers (the comparison tools)
    "experiments": MIDDLE | {"data", "metrics", "checkpoint"},
    "moetrain": MIDDLE | {"data", "metrics", "checkpoint", "parallel", "train", "testing"},
}


def _module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of moetrain and moetrain.kernels."""
    out = {}
    for prefix, base in SOURCES.items():
        for f in sorted(base.rglob("*.py")):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


MODULES = _module_files()


def _package(module: str) -> str:
    """The row of :data:`ALLOWED` that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moetrain"


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int, str]]:
    """(imported module, line, where) for each import in ``module``'s file; ``where`` is
    "module" (runs at import), "function" (runs when called) or "typing" (under ``if
    TYPE_CHECKING:``, never at run time). ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module."""
    path = MODULES[module]
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, int, str]] = []

    def add(name: str, line: int, where: str) -> None:
        out.append((name, line, where))

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            w = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                w = "function" if where == "module" else where
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.body:
                    visit(ast.Module(body=[n], type_ignores=[]), "typing")
                for n in child.orelse:
                    visit(ast.Module(body=[n], type_ignores=[]), where)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    add(a.name, child.lineno, w)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                    pkg = pkg[:len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    add(sub if sub in MODULES else base, child.lineno, w)
            visit(child, w)

    visit(ast.parse(path.read_text(), str(path)), "module")
    return out


def _edges(module: str, include: set[str]) -> set[str]:
    """Modules whose code runs when ``module``'s imports of kinds ``include`` run: the
    imported module and its enclosing packages' ``__init__`` (not those of ``module``
    itself, which ran before it)."""
    own = module.split(".")
    out = set()
    for name, _, where in _imports(module):
        if where not in include or not name.startswith("moetrain"):
            continue
        parts = name.split(".")
        for n in range(2, len(parts) + 1):
            target = ".".join(parts[:n])
            if target in MODULES and parts[:n] != own[:n] and target != module:
                out.add(target)
    return out


def _cycles(include: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: _edges(m, include) for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sccs


def test_sources_are_found():
    """The scan sees the packages it checks (a wrong root would pass vacuously)."""
    assert {_package(m) for m in MODULES} == set(ALLOWED)
    assert "moetrain.checkpoint.load" in MODULES and "moetrain.kernels.reference" in MODULES


def test_parser_sees_lazy_and_type_only_imports(tmp_path, monkeypatch):
    """A made-up module: each kind of import is found and labelled."""
    f = tmp_path / "probe.py"
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "from moetrain.config import schema\n"
        "if TYPE_CHECKING:\n"
        "    from moetrain.train.trainer import Trainer\n"
        "else:\n"
        "    import moetrain.data\n"
        "def f():\n"
        "    from moetrain.train.callbacks import base\n"
        "class C:\n"
        "    def g(self):\n"
        "        import moetrain.parallel.mesh\n")
    monkeypatch.setitem(MODULES, "moetrain.models.probe", f)
    got = {(n, w) for n, _, w in _imports("moetrain.models.probe")}
    assert got == {("typing", "module"), ("moetrain.config.schema", "module"),
                   ("moetrain.train.trainer", "typing"), ("moetrain.data", "module"),
                   ("moetrain.train.callbacks.base", "function"),
                   ("moetrain.parallel.mesh", "function")}
    assert _edges("moetrain.models.probe", {"function"}) == {
        "moetrain.train", "moetrain.train.callbacks", "moetrain.train.callbacks.base",
        "moetrain.parallel", "moetrain.parallel.mesh"}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    """Each import of another moetrain package, at any depth (module level, inside a
    function, or for type checking only), is in the package's row of ALLOWED."""
    bad = []
    for module in (m for m in MODULES if _package(m) == package):
        for name, line, where in _imports(module):
            if name.split(".")[0] == "kernels":
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {name} "
                           f"(the PyPI package named kernels): import moetrain.kernels")
                continue
            if not name.startswith("moetrain"):
                continue
            target = _package(name)
            if target != package and target not in ALLOWED[package]:
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({where}) imports "
                           f"{name}: {package}/ may import only {sorted(ALLOWED[package])}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle_at_module_level():
    """No two moetrain modules need each other while they are being imported."""
    cycles = _cycles({"module"})
    assert not cycles, f"modules that import each other at import time: {cycles}"


def test_no_import_cycle_through_lazy_imports():
    """Moving an import into a function hides a cycle from the interpreter, not from the
    design: the graph of every run-time import is acyclic too."""
    cycles = _cycles({"module", "function"})
    assert not cycles, f"modules that import each other (some inside functions): {cycles}"
