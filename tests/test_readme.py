"""The README's "From Python" section runs as written (issue 17)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.nddata import VarianceUncertainty

from astep_dask.config import Settings
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, simulate_night

README = Path(__file__).parents[1] / "README.md"


def _blocks() -> list[str]:
    """The Python code blocks of the README's "From Python" section, in order."""
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_pipeline_and_the_products():
    pipeline, products = _blocks()
    assert "ad.calibrate_night(" in pipeline
    for call in ("ad.open_calibrated(", "CCDData.read(", "ImageFileCollection("):
        assert call in products


def test_products_block_runs_on_a_calibrated_night(tmp_path, client):
    """The products block, as written, on a small night calibrated here (the pipeline
    block's ``night`` and ``result``), and what it computes checked against the files."""
    night = simulate_night(tmp_path, SimConfig(size=64, n_science=3, n_darks=5, n_flats=7,
                                               seed=8, wcs_center=(10.0, -80.0)))
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    result = calibrate_night(night, client, settings)
    assert result.status == "complete"
    import astep_dask as ad

    ns = {"ad": ad, "night": night, "result": result}
    exec(compile(_blocks()[1], str(README), "exec"), ns)
    assert isinstance(ns["ccd"].uncertainty, VarianceUncertainty)
    assert ns["ccd"].wcs.has_celestial
    assert len(ns["lights"]) == 3
    assert np.median(ns["flat"].data) == pytest.approx(1.0, abs=0.02)
    stack = np.stack([ad.read_calibrated(p)[1] for p in ns["frames"].path.values])
    masks = np.stack([ad.read_calibrated(p)[3] for p in ns["frames"].path.values])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels masked in every frame
        expected = np.nanmedian(np.where(masks == 0, stack, np.nan), axis=0)
    np.testing.assert_allclose(ns["night_median"].values, expected, rtol=1e-6)
    np.testing.assert_array_equal(ns["sci"], stack[0])


@pytest.mark.slow
def test_whole_section_runs_verbatim(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for block in _blocks():
        exec(compile(block, str(README), "exec"), ns)
    assert ns["result"].status == "complete"
    assert (tmp_path / "demo").is_dir()
