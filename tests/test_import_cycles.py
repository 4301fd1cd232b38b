"""Every module of the project imports, and no two of them depend on each other in a circle.

The dependency graph is read from the source (``ast``): module-level imports, imports inside
functions and ``TYPE_CHECKING`` blocks, relative imports, and module names written as strings
(``importlib.import_module("vioasid.x")``, command tables). An edge goes to the most specific
project module a name resolves to; a package's ``__init__`` counts as a module of its own.
Cycles are found as the strongly connected components of that graph (Tarjan, iterative).
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vioasid", "qemu_glue", "images", "guest_tests")
_DOTTED = re.compile(rf"(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the project's packages (tests excluded)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if path.name.startswith("test_") or "tests" in parts[:-1] or "conftest" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of ``name`` that is a project module."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def dependencies(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules ``module`` names anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        target = _resolve(name, known)
        if target is not None and target != module:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # "from pkg import mod" names the submodule when there is one
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _DOTTED.fullmatch(node.value)
        ):
            add(node.value)
    return found


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    known = set(mods)
    return {m: dependencies(m, p, known) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(g):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(g[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(g.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp: list[str] = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1 or node in g.get(node, ()):
                        out.append(sorted(comp))
    return out


def test_no_import_cycles_among_the_project_packages() -> None:
    found = cycles(graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(
    "module", sorted(m for m in project_modules() if not m.endswith("__main__"))
)  # a __main__ runs its program when imported (it is in the graph all the same)
def test_every_module_imports(module: str) -> None:
    importlib.import_module(module)


def test_the_cycle_finder_sees_function_level_and_string_imports(tmp_path: Path) -> None:
    """The detector itself: a cycle closed by an import inside a function, one closed by a
    module name in a string, a relative import, and an acyclic chain."""
    pkg = tmp_path / "vioasid"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from vioasid import b\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "c.py").write_text("MODULES = ['vioasid.sub.d']\n")
    (pkg / "sub" / "d.py").write_text("from ..c import MODULES\n")
    (pkg / "e.py").write_text("import vioasid.a\n")
    mods = {
        "vioasid": pkg / "__init__.py",
        "vioasid.sub": pkg / "sub" / "__init__.py",
        **{f"vioasid.{n}": pkg / f"{n}.py" for n in "abce"},
        "vioasid.sub.d": pkg / "sub" / "d.py",
    }
    known = set(mods)
    g = {m: dependencies(m, p, known) for m, p in mods.items()}
    assert g["vioasid.b"] == {"vioasid.a"}
    assert g["vioasid.sub.d"] == {"vioasid.c"}
    assert cycles(g) == [["vioasid.a", "vioasid.b"], ["vioasid.c", "vioasid.sub.d"]]
