"""Exposure times grouped with a tolerance (issue 29, item 5): flats and darks a hundredth
of a second apart are one master, whose header lists the times it holds, and the plan
says what the build does."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.config import Settings, SettingsError
from astep_dask.core.darks import dark_for_exptime
from astep_dask.core.exptimes import (
    ExptimeTolerance,
    exptime_groups,
    format_exptimes,
    matching_exptime,
)
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.masters.builder import MasterBuilder, frame_needs
from astep_dask.masters.store import frame_masters
from astep_dask.testing.simulate import SimConfig, simulate_night

TOL = ExptimeTolerance()  # 1 % or 0.05 s, whichever larger


def test_groups_by_tolerance_named_by_median():
    names = exptime_groups([10.0, 10.01, 10.0, 10.0, 90.0, 90.5, 89.98, 30.0], TOL)
    assert names == {10.0: 10.0, 10.01: 10.0, 89.98: 90.0, 90.0: 90.0, 90.5: 90.0,
                     30.0: 30.0}
    # 0.05 s floor for short exposures, 1 % for long ones
    assert len(set(exptime_groups([1.0, 1.06], TOL).values())) == 2
    assert len(set(exptime_groups([1.0, 1.05], TOL).values())) == 1
    assert len(set(exptime_groups([300.0, 302.9], TOL).values())) == 1
    # a group spans one tolerance from its shortest time, never a chain of small steps
    chain = exptime_groups([10.0, 10.04, 10.08, 10.12], TOL)
    assert len(set(chain.values())) == 2 and chain[10.04] == chain[10.0]
    # no tolerance: every distinct time its own group
    assert len(set(exptime_groups([10.0, 10.01], ExptimeTolerance(0, 0)).values())) == 2


def test_matching_and_card_text():
    assert matching_exptime(90.3, [10.0, 90.0], TOL) == 90.0
    assert matching_exptime(92.0, [10.0, 90.0], TOL) is None
    assert format_exptimes([10.01, 10.0, 10.0]) == "10 10.01"
    many = format_exptimes([10 + i / 100 for i in range(40)])
    assert many == "10-10.39 (40 values)"


def test_the_tolerance_is_a_bounded_setting():
    s = Settings().replace(combine={"exptime_rtol": 0.02, "exptime_atol": 0.1})
    assert ExptimeTolerance.of(s.combine) == ExptimeTolerance(0.02, 0.1)
    for key, value in (("exptime_rtol", 0.5), ("exptime_atol", -1.0), ("exptime_atol", 60)):
        with pytest.raises(SettingsError, match=key):
            Settings().replace(combine={key: value})


def test_a_dark_matches_within_the_tolerance():
    """A frame of 90.3 s takes the 90 s dark as it is (no bias: none to scale with)."""
    planes = type("P", (), {"data": np.ones((2, 2), np.float32),
                            "var": np.ones((2, 2), np.float32)})
    sol = dark_for_exptime(90.3, None, {90.0: planes()})
    assert sol.used == (90.0,) and sol.how == "dark 90s (carries the bias)"


@pytest.fixture(scope="module")
def jittered_night(tmp_path_factory):
    """A small night (no bias, ASTEP's case) whose flats are at 10.00 s and 10.01 s and
    one of whose flat darks is at 10.02 s: before, the 10.01 s flats needed a dark fit and
    the 10 s darks were too few (2 of 3) to make a master."""
    cfg = SimConfig(size=64, n_science=3, n_darks=3, n_flats=5, cr_per_mpix=0.0, seed=5)
    night = simulate_night(tmp_path_factory.mktemp("raw"), cfg)
    inv = scan_night(night)
    for i, rec in enumerate(inv.select(FrameType.FLAT)):
        if i % 2:
            with fits.open(rec.path, mode="update") as hdul:
                hdul[0].header["EXPTIME"] = 10.01
    dark = next(r for r in inv.select(FrameType.DARK) if r.exptime == 10.0)
    with fits.open(dark.path, mode="update") as hdul:
        hdul[0].header["EXPTIME"] = 10.02
    return night


def test_near_exposure_times_make_one_master_and_the_plan_agrees(jittered_night, tmp_path):
    inv = scan_night(jittered_night)
    assert sorted({r.exptime for r in inv.select(FrameType.FLAT)}) == [10.0, 10.01]
    builder = MasterBuilder(inv, tmp_path, Settings())
    steps = builder.plan()
    assert [s.role for s in steps] == ["dark", "dark", "flat", "mask"]
    paths = builder.build()
    assert {s.name for s in steps} == set(builder.report.built)
    assert not [n for n in builder.report.notes if "dark" in n or "flat" in n]
    for s in steps:  # each master from the frames the plan names, under its hash
        header = fits.getheader(tmp_path / s.name)
        assert header["ADHASH"] == s.digest
        if s.records:
            inputs = set(fits.getdata(tmp_path / s.name, "INPUTS")["FILE"])
            assert inputs == {r.path.name for r in s.records}
    darks = dict(paths.darks)
    assert sorted(darks) == [10.0, 90.0]
    flat_dark = fits.getheader(darks[10.0])
    assert flat_dark["EXPTIME"] == 10.0 and flat_dark["EXPTIMES"] == "10 10.02"
    assert flat_dark["NCOMBINE"] == 3
    flat = fits.getheader(dict(paths.flats)["RC"])
    assert flat["EXPTIMES"] == "10 10.01" and flat["NCOMBINE"] == 5
    assert flat["DARKMODE"] == "dark 10s (carries the bias)"  # one dark for all five


def test_science_frames_match_darks_with_the_runs_tolerance(jittered_night, tmp_path):
    """A 91.5 s frame is not the 90 s dark's exposure by default (1.7 % apart: no bias, so
    a fit through the darks), but it is with ``exptime_rtol = 0.03``: the frames, the plan
    and the masters all take the setting."""
    settings = Settings().replace(combine={"exptime_rtol": 0.03})
    inv = scan_night(jittered_night)
    paths = MasterBuilder(inv, tmp_path, settings).build()
    assert paths.tol == ExptimeTolerance.of(settings.combine)
    _, cards = frame_masters(paths, 91.5, "RC")
    assert cards["DARKMETH"][0] == "dark 90s (carries the bias)"
    _, default = frame_masters(dataclasses.replace(paths, tol=TOL), 91.5, "RC")
    assert default["DARKMETH"][0] != cards["DARKMETH"][0]
    assert "MDARK2" in default and "MDARK2" not in cards  # a fit through both darks
    steps = MasterBuilder(inv, tmp_path, settings).plan()
    dark_90 = next(s.name for s in steps if s.role == "dark" and s.exptime == 90.0)
    assert dark_90 in frame_needs(steps, 91.5, "RC", ExptimeTolerance.of(settings.combine))
