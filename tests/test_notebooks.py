"""The notebooks run top to bottom on small simulated nights (papermill, a real Jupyter
kernel), and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each notebook runs a whole night (papermill)

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


@pytest.mark.parametrize("name", ["night.ipynb", "season.ipynb"])
def test_committed_without_outputs(name):
    nb = json.loads((NOTEBOOKS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and not _outputs(nb)
    assert all(c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "one cell tagged `parameters` (papermill)"


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


def test_season_notebook_runs(tmp_path):
    nb = _run("season.ipynb", tmp_path, dashboard_address=":0", demo_size=96, demo_frames=3)
    text = _text(nb)
    assert "complete" in text and "failed" in text
    assert "no usable dark frames" in text
    assert _pngs(nb) >= 2
