"""The notebooks run top to bottom on small simulated nights (papermill, a real Jupyter
kernel), use only the public API, never replace products made with other settings, and are
committed without outputs."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import astep_dask
from astep_dask.config import Settings
from astep_dask.run.night import settings_conflicts
from astep_dask.testing.simulate import SimConfig, simulate_night

# Running a notebook runs a whole night (papermill): those tests are marked slow; the
# static checks are not.
slow = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["night.ipynb", "season.ipynb"]


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and not _outputs(nb)
    assert all(c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "one cell tagged `parameters` (papermill)"


def _code(name: str) -> list[ast.Module]:
    """The notebook's code cells as Python (IPython magics such as ``%matplotlib`` left
    out: they are not Python)."""
    nb = json.loads((NOTEBOOKS / name).read_text())
    cells = []
    for c in nb["cells"]:
        if c["cell_type"] == "code":
            text = "".join(c["source"])
            cells.append(ast.parse(re.sub(r"(?m)^\s*[%!].*$", "", text)))
    return cells


def _api_misuse(trees: list[ast.Module]) -> list[str]:
    """Every use of astep_dask that is not a name of ``astep_dask.__all__``: submodule
    imports, private names, attributes of the package outside its public API."""
    public = set(astep_dask.__all__)
    aliases: set[str] = set()
    bad = []
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("astep_dask."):
                        bad.append(f"import {a.name}")
                    elif a.name == "astep_dask":
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("astep_dask."):
                    bad.append(f"from {node.module} import ...")
                elif node.module == "astep_dask":
                    bad += [f"from astep_dask import {a.name}" for a in node.names
                            if a.name not in public or a.name.startswith("_")]
    for tree in trees:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                    and (node.attr not in public or node.attr.startswith("_"))):
                bad.append(f"{node.value.id}.{node.attr}")
    return bad


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_use_only_the_public_api(name):
    trees = _code(name)
    assert not _api_misuse(trees), _api_misuse(trees)
    # The check sees what it must refuse (guards the test from passing on nothing).
    assert _api_misuse([ast.parse(
        "import astep_dask as ad\nimport astep_dask.report\n"
        "from astep_dask.io.products import read_manifest\nfrom astep_dask import report\n"
        "ad.scan_night\nad._WHERE\nad.local_cluster\n")]) == [
        "import astep_dask.report", "from astep_dask.io.products import ...",
        "from astep_dask import report", "ad._WHERE", "ad.local_cluster"]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-")
            for r in requirements}


@pytest.mark.parametrize("name", NAMES)
def test_the_notebooks_extra_has_what_they_import(name):
    """``pip install 'astep-dask[notebooks]'`` installs every package a notebook imports,
    and what runs them (a kernel, papermill, JupyterLab)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = _requirement_names(project["optional-dependencies"]["notebooks"])
    assert {"ipykernel", "ipywidgets", "papermill", "jupyterlab", "matplotlib"} <= extra
    modules = set()
    for tree in _code(name):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"astep_dask"}
    assert third_party, "the notebooks import pandas, IPython..."
    where = packages_distributions()
    for module in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in where.get(module, [module])}
        assert dists & extra, f"{name} imports {module}: not in the notebooks extra"


def _run(name: str, tmp_path: Path, **parameters) -> dict:
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    out = tmp_path / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters,
                               cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                               execution_timeout=300)
    nb = json.loads(out.read_text())
    errors = [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert not errors, errors
    return nb


def _pngs(nb: dict) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def _text(nb: dict) -> str:
    parts = []
    for o in _outputs(nb):
        parts.append(o.get("text", "") if isinstance(o.get("text"), str)
                     else "".join(o.get("text", [])))
        plain = o.get("data", {}).get("text/plain", "")
        parts.append(plain if isinstance(plain, str) else "".join(plain))
    return "\n".join(parts)


@slow
@pytest.mark.parametrize("workers", [None, 2])  # the default layout; worker processes
def test_night_notebook_runs(tmp_path, workers):
    nb = _run("night.ipynb", tmp_path, dashboard_address=":0", demo_size=128, demo_frames=5,
              workers=workers)
    text = _text(nb)
    assert "complete: {'done': 5" in text
    assert "dask dashboard" in json.dumps(nb)
    report = next(line for line in text.splitlines() if line.startswith("report: "))
    folder = Path(report.removeprefix("report: ")).parent
    assert (folder / "qa.json").exists() and (folder / "timeseries.png").exists()
    # time series, three masters, the mask, the frame, raw vs calibrated
    assert _pngs(nb) >= 7


@slow
def test_season_notebook_runs(tmp_path):
    nb = _run("season.ipynb", tmp_path, dashboard_address=":0", demo_size=96, demo_frames=3)
    text = _text(nb)
    assert "complete" in text and "failed" in text
    assert "no usable dark frames" in text
    assert "TOTAL" in text  # the season's table, its counts summed
    assert _pngs(nb) >= 2


DATES = ("2026-06-15", "2026-06-16")


@pytest.fixture(scope="module")
def calibrated_season(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny nights calibrated by ``astep-dask season --out`` with the default settings
    (cosmic-ray detection on): (raw root, output root)."""
    from astep_dask.cli import EXIT_OK, main

    base = tmp_path_factory.mktemp("made")
    root, out = base / "raw", base / "products"
    for i, date in enumerate(DATES):
        simulate_night(root, SimConfig(size=64, n_science=2, n_darks=3, n_flats=3, date=date,
                                       seed=60 + i))
    assert main(["season", str(root), "--out", str(out), "--workers", "2",
                 "--dashboard-address", ":0", "-q"]) == EXIT_OK
    return root, out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@slow
def test_settings_conflicts_names_what_differs(calibrated_season, tmp_path):
    root, out = calibrated_season
    night = root / DATES[0]
    assert settings_conflicts(night, out, Settings()) == []
    off = Settings().replace(cosmics={"enabled": False}, combine={"sigma_high": 4.0})
    assert settings_conflicts(night, out, off) == [
        "combine.sigma_high: 3.0 in the products, 4.0 here",
        "cosmics.enabled: True in the products, False here"]
    # Settings that do not shape the products (the cluster's, the search's) are no conflict.
    assert settings_conflicts(night, out, Settings().replace(search={"threshold": 9.0})) == []
    assert settings_conflicts(night, tmp_path / "nothing-here", off) == []


def _changed(settings: Settings, group: str) -> Settings | None:
    """``settings`` with one value of ``group`` changed (a flag flipped, a number halved
    or doubled), the first that the settings' checks accept; None when none is."""
    for key, value in getattr(settings, group).__dict__.items():
        if isinstance(value, bool):
            tries = [not value]
        elif isinstance(value, int | float) and value:
            tries = [value * 2, value / 2] if isinstance(value, float) else [value + 1]
        else:
            continue
        for new in tries:
            try:
                return settings.replace(**{group: {key: new}})
            except ValueError:
                continue
    return None


@slow
def test_settings_conflicts_cover_what_the_provenance_covers(calibrated_season):
    """A setting is a conflict exactly when it changes the night's provenance (what makes
    a run remake the products), group by group."""
    from astep_dask.io.provenance import night_provenance

    root, out = calibrated_season
    night = root / DATES[0]
    made = night_provenance(night, Settings())
    for group in Settings().to_dict():
        other = _changed(Settings(), group)
        assert other is not None, group
        remade = night_provenance(night, other) != made
        assert bool(settings_conflicts(night, out, other)) == remade, group


@slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_refuses_to_replace_products_of_other_settings(calibrated_season, tmp_path,
                                                                  name):
    """Products made with cosmic-ray detection on, a notebook asked to calibrate with it
    off (the season notebook's default, the night notebook's ``cosmics=False``) into the
    same output: it stops naming the nights and the setting, and not a byte changes."""
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    root, out = calibrated_season
    before = _files(out)
    parameters = ({"root": str(root), "run": True} if name == "season.ipynb"
                  else {"night": str(root / DATES[0]), "cosmics": False})
    with pytest.raises(papermill.PapermillExecutionError) as err:
        papermill.execute_notebook(
            str(NOTEBOOKS / name), str(tmp_path / name), cwd=str(tmp_path),
            parameters={**parameters, "out": str(out), "dashboard_address": ":0"},
            kernel_name="python3", progress_bar=False, execution_timeout=300)
    message = str(err.value)
    assert "RunError" in message
    assert "cosmics.enabled: True in the products, False here" in message
    assert "does not replace them" in message
    names = DATES if name == "season.ipynb" else DATES[:1]
    assert all(n in message for n in names)
    assert _files(out) == before
