"""Warm pixels (issue 29, item 8): a pixel flagged as a cosmic ray frame after frame is a
warm pixel the bad-pixel mask missed. The simulator adds warm pixels that only the science
frames show; a night's run must flag them WARM in every frame and never CR, and still flag
the real cosmic rays (the simulator's truth), from one extra read of a sample of frames."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.nddata import CCDData
from scipy import ndimage
from scipy.stats import binom

from astep_dask.config import Settings
from astep_dask.core.bits import UNUSABLE, Bit, flag
from astep_dask.core.cosmics import warm_pixels, warm_threshold
from astep_dask.io.fitsio import read_calibrated
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.products import output_dir
from astep_dask.masters.store import MasterPaths, frame_masters, read_master
from astep_dask.masters.warm import frame_cosmics, warm_name, warm_records
from astep_dask.report.graph import collapse, night_graph
from astep_dask.run.night import calibrate_night
from astep_dask.run.plan import plan_night
from astep_dask.testing.simulate import (
    SimConfig,
    load_frame_truth,
    load_truth,
    simulate_night,
)

CR = flag(Bit.CR)
WARM = flag(Bit.WARM)


def test_threshold_more_than_the_fraction_and_at_least_the_count():
    cs = Settings().replace(cosmics={"warm_fraction": 0.1, "warm_min_count": 3}).cosmics
    assert warm_threshold(20, cs) == 3  # more than 2 of 20
    assert warm_threshold(100, cs) == 11  # more than 10 of 100
    assert warm_threshold(5, cs) == 3  # never under the count
    # Chance coincidences: 16 Mpx, 30 frames. Dome C's rate (1e-4 per pixel and frame):
    # ~0.07 pixels hit 3 times by chance, the count holds; at 30 times that rate the
    # binomial tail (scipy, computed here apart) needs more.
    assert warm_threshold(30, Settings().cosmics, 1e-4, 4096**2) == 3
    k = warm_threshold(30, Settings().cosmics, 3e-3, 4096**2)
    assert k > 3
    assert 4096**2 * binom.sf(k - 1, 30, 3e-3) < 0.1 <= 4096**2 * binom.sf(k - 2, 30, 3e-3)


def test_warm_pixels_from_random_flags():
    """Random flags and a few pixels flagged in 60 % of the frames: exactly the latter
    are warm, with their counts, at Dome C's rate and at 10 times it (where chance
    coincidences of three hits are expected: the sample's own rate keeps them out)."""
    cs = Settings().cosmics  # 5 %, at least 3
    n_frames, npix = 40, 512 * 512
    for per_frame in (30, 300):
        rng = np.random.default_rng(8)
        warm = rng.choice(npix, 7, replace=False)
        flagged, truth_counts = [], np.zeros(7, int)
        for _ in range(n_frames):
            hits = rng.choice(npix, per_frame, replace=False)
            on = rng.random(7) < 0.6  # a warm pixel that is not flagged in every frame
            truth_counts += on
            flagged.append(np.concatenate([hits, warm[on], warm[on]]))  # twice: once
        pixels, counts = warm_pixels(flagged, n_frames, cs, npix)
        order = np.argsort(warm)
        np.testing.assert_array_equal(pixels, warm[order])
        np.testing.assert_array_equal(counts, truth_counts[order])
    # Without the frame size (no chance bound) the 10x rate lets chance triples in.
    assert warm_pixels(flagged, n_frames, cs)[0].size > 7
    assert warm_pixels([], 0, cs)[0].size == 0


# 20 science frames (all sampled; the default needs 100 for a sample), 8 warm pixels that
# only the science frames show and a warm corner (the last 4 pixels of row 0, as a real
# camera showed), a cosmic-ray rate that gives the recall statistics.
SIM = SimConfig(size=128, n_science=20, n_darks=5, n_flats=5, n_warm=8, warm_corner=4,
                cr_per_mpix=300.0, seed=29)
SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"}, illum={"enabled": False},
                              cosmics={"warm_min_frames": 20})


@pytest.fixture(scope="module")
def night(tmp_path_factory, client):
    night = simulate_night(tmp_path_factory.mktemp("warm_archive"), SIM)
    result = calibrate_night(night, client, SETTINGS)
    assert result.status == "complete", (result.counts, result.error)
    return night, output_dir(night, None), result


def _truth_warm(night: Path) -> np.ndarray:
    truth = load_truth(night)
    assert truth.warm is not None
    assert (truth.warm > 0).sum() == SIM.n_warm + SIM.warm_corner
    assert not (truth.hot | truth.dead)[truth.warm > 0].any()  # none the mask could find
    return truth.warm > 0


def test_without_the_warm_map_they_are_cosmic_rays(night):
    """The premise, on the night's own masters: calibrated without the warm map, the
    simulated warm pixels are flagged as cosmic rays in (nearly) every frame."""
    night_dir, _, result = night
    p = result.details["masters"]["paths"]
    paths = MasterPaths(None, tuple((float(k), Path(v)) for k, v in p["darks"].items()),
                        tuple((f, Path(v)) for f, v in p["flats"].items()), Path(p["mask"]))
    warm = np.flatnonzero(_truth_warm(night_dir))
    science = scan_night(night_dir).select(FrameType.SCIENCE)[:3]
    for rec in science:
        fm, _ = frame_masters(paths, rec.exptime, rec.filter, cache=False)
        assert not (fm.mask.flat[warm] & UNUSABLE).any()  # the mask misses them
        shape, flagged = frame_cosmics(rec, paths, SETTINGS)
        assert shape == (SIM.size, SIM.size)
        assert np.isin(warm, flagged).mean() >= 0.75


def test_warm_pixels_flagged_warm_not_cosmic_rays(night):
    night_dir, out, result = night
    truth_warm = _truth_warm(night_dir)
    path = out / warm_name(SIM.date)
    assert path.name in result.details["masters"]["built"]
    assert result.details["masters"]["paths"]["warm"] == str(path)
    m = read_master(path)
    assert m.role == "warm" and m.cards["NSAMPLE"][0] == SIM.n_science
    # A product like the other masters: CCDData reads it, fitsverify passes it.
    ccd = CCDData.read(path, hdu="SCI", hdu_uncertainty="VAR", hdu_mask="MASK")
    assert ccd.unit == u.dimensionless_unscaled and ccd.uncertainty is None
    np.testing.assert_array_equal(ccd.data, m.data)
    if shutil.which("fitsverify"):
        verdict = subprocess.run(["fitsverify", str(path)], capture_output=True, text=True)
        assert "0 warning(s) and 0 error(s)" in verdict.stdout, verdict.stdout
    found = (m.data & WARM) != 0
    assert found[truth_warm].all()  # every one
    # Nothing else but a few of their neighbours, which astroscrappy's growth of each
    # detection flags with them in a good part of the frames (by the rule, warm too).
    near = ndimage.binary_dilation(truth_warm, structure=np.ones((3, 3), bool))
    assert not (found & ~near).any()
    assert (found & ~truth_warm).sum() <= SIM.n_warm + SIM.warm_corner
    frames = sorted(out.glob("*_CAL.fits"))
    assert len(frames) == SIM.n_science
    for f in frames:
        header, _, _, mask = read_calibrated(f)
        assert header["MWARM"] == path.name and header["HIERARCH MP_WARM"] == Bit.WARM
        assert ((mask[truth_warm] & WARM) != 0).all()
        assert not (mask[truth_warm] & CR).any()
    row_cr = sum(r["n_cr"] for r in result.frames)
    assert row_cr == sum(int(((read_calibrated(f)[3] & CR) != 0).sum()) for f in frames)


def test_real_cosmic_rays_still_found(night):
    """The truth's cosmic-ray pixels that stand out (> 5 sigma) are flagged CR (or were
    unusable anyway), 99 % of them, as before the warm map."""
    night_dir, out, _ = night
    n_cr = n_ok = 0
    for f in sorted(out.glob("*_CAL.fits")):
        header, sci, var, mask = read_calibrated(f)
        ft = load_frame_truth(night_dir, header["RAWFILE"].removesuffix(".fits"))
        z = (sci - ft["model"]) / np.sqrt(var)
        must = (ft["cr"] > 0) & (np.abs(z) > 5) & ((mask & ~CR) == 0)
        n_cr += must.sum()
        n_ok += (must & ((mask & CR) != 0)).sum()
    assert n_cr > 200
    assert n_ok / n_cr >= 0.99


def test_a_rerun_reuses_the_warm_map(night):
    night_dir, _, _ = night
    plan = plan_night(night_dir, SETTINGS)
    steps = {s.name: s for s in plan.steps}
    assert steps[warm_name(SIM.date)].action == "reuse"
    assert all(s.action == "done" for s in plan.frames())
    assert all(warm_name(SIM.date) in s.needs for s in plan.frames())


def test_flow_chart_draws_the_warm_step(night):
    """The flow chart (drawn from the same plan) reads the sample and writes the map, and
    every frame's calibration reads it."""
    night_dir, _, _ = night
    inv = scan_night(night_dir)
    g = night_graph(inv, SETTINGS)
    flow = collapse(g.dependencies, g.stage_of, g.stages, g.file_edges, g.night)
    assert flow.stages["read warm"].tasks == SIM.n_science
    name = f"file {warm_name(SIM.date)}"
    assert name in flow.stages
    assert any(a == name for a, _ in flow.edges)  # read by the frames' planes
    off = night_graph(inv, SETTINGS.replace(cosmics={"enabled": False}))
    assert "read warm" not in off.stages


def test_small_nights_and_disabled_cosmics_make_none(tmp_path):
    """Fewer science frames than warm_min_frames, or no cosmic-ray search: no sample."""
    night = simulate_night(tmp_path, replace(SIM, n_science=3, size=32, n_darks=2,
                                             n_flats=2, n_warm=0, warm_corner=0))
    science = scan_night(night).select(FrameType.SCIENCE)
    assert len(science) == 3
    assert warm_records(science, {SIM.filter}, Settings()) == []
    assert warm_records(science, {SIM.filter}, SETTINGS) == []  # 3 < 20
    s = Settings().replace(cosmics={"warm_min_frames": 2})
    assert len(warm_records(science, {SIM.filter}, s)) == 3
    assert warm_records(science, {"V"}, s) == []
    assert warm_records(science, {SIM.filter}, s.replace(cosmics={"enabled": False})) == []
