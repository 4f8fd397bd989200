"""The package's layers: every import points down, no cycles, no package import in a function.

Layers, lowest first (README, "Package layout"): ``version``, ``errors`` and ``config``
import nothing of ours; ``core`` (numpy in, numpy out) ← ``io`` ← ``masters`` ← ``run`` ←
the products ``kbmod`` and ``report`` ← ``testing`` ← ``cli``; the package's
``__init__`` re-exports the public API. A module may import its own layer and those below,
never above, and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import astep_dask

PACKAGE = Path(astep_dask.__file__).parent
RANK = {"version": 0, "errors": 0, "config": 0, "core": 1, "io": 2, "masters": 3, "run": 4,
        "kbmod": 5, "report": 5, "testing": 6, "cli": 7, "__init__": 8}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(("astep_dask", *parts))] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    return module.split(".")[1] if module != "astep_dask" else "__init__"


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for each import of ours."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == "astep_dask":
                    for alias in child.names:
                        sub = f"{child.module}.{alias.name}"
                        target = sub if sub in MODULES else child.module
                        found.append((target, child.lineno, inner))
            elif isinstance(child, ast.ImportFrom) and child.level > 0:
                found.append(("relative", child.lineno, inner))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "astep_dask":
                        found.append((alias.name, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    assert len(MODULES) > 20
    for module in MODULES:
        assert _layer(module) in RANK, f"{module}: not in a known layer"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    """No import from a higher layer, no relative import, no package import in a function
    (outside ``cli``, which imports each subcommand's stack only when it runs)."""
    rank = RANK[_layer(module)]
    for target, line, in_function in _imports(module):
        where = f"{MODULES[module].name}:{line}"
        assert target != "relative", f"{where}: relative import (write astep_dask.…)"
        assert target in MODULES, f"{where}: {target} is not a module of the package"
        assert RANK[_layer(target)] <= rank, f"{where}: {module} imports {target}, a higher layer"
        if not module.startswith("astep_dask.cli"):
            assert not in_function, f"{where}: package import inside a function"


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ is imported with any of its submodules: count it as imported
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t):], t]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_graph_sees_a_known_edge():
    """The parser finds imports (guards the tests above from passing on nothing)."""
    edges = {t for t, _, _ in _imports("astep_dask.core.badpix")}
    assert "astep_dask.core.bits" in edges
    assert "astep_dask.config" in edges


def test_public_api_resolves_with_docstrings():
    """Every name of ``astep_dask.__all__`` resolves (lazily) to an object documented in
    numpydoc style: a summary line, and for a function with parameters a Parameters or
    Returns section or a sentence that names them."""
    assert {"calibrate_night", "export_night", "search_night", "night_report", "scan_night",
            "open_stack", "open_calibrated", "StageResult", "STAGES"} <= set(astep_dask.__all__)
    for name in astep_dask.__all__:
        obj = getattr(astep_dask, name)
        if name in ("__version__", "STAGES"):
            continue
        assert obj.__doc__ and obj.__doc__.strip().splitlines()[0], f"{name}: no docstring"
    with pytest.raises(AttributeError):
        astep_dask.not_a_name  # noqa: B018


def test_a_worker_imports_no_product_module():
    """A dask worker that unpickles a frame task imports astep_dask.run.frames: that must
    not pull in the KBMOD or report modules (nor matplotlib) through the package."""
    code = ("import sys, astep_dask.run.frames; "
            "print(sorted(m for m in sys.modules if m.startswith(('astep_dask.kbmod', "
            "'astep_dask.report', 'matplotlib'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
