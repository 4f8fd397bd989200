"""Masters against the simulator's truth, and against ccdproc computed the slow way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from scipy import ndimage

from astep_dask.config import CombineSettings, Settings
from astep_dask.core.bits import Bit
from astep_dask.core.combine import clip_combine
from astep_dask.core.darks import dark_for_exptime
from astep_dask.errors import CalibrationError
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.stack import open_strips, read_frame
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.reduce import combine
from astep_dask.masters.store import read_master
from astep_dask.testing.simulate import load_truth, simulate_night
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def built(small_night, tmp_path_factory):
    out = tmp_path_factory.mktemp("masters")
    builder = MasterBuilder(scan_night(small_night), out, Settings())
    return builder.build(), builder, out


def test_master_files_and_report(built, small_night):
    paths, builder, _out = built
    night = small_night.name
    assert paths.bias is None
    assert [p.name for _, p in paths.darks] == [
        f"{night}_MASTERDARK_FLAT.fits", f"{night}_MASTERDARK.fits"
    ]
    assert paths.flats[0][1].name == f"{night}_MASTERFLAT_RC.fits"
    assert paths.mask.name == f"{night}_MASK.fits"
    assert not builder.report.rejected
    header = fits.getheader(paths.flats[0][1])
    assert header["NCOMBINE"] == SMALL.n_flats
    assert header["ADHASH"]
    assert "median of unmasked" in header["NORMMETH"]
    with fits.open(paths.flats[0][1]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "VAR", "COUNT", "INPUTS"]
        assert hdul[0].data is None  # the image is in SCI, as in a calibrated frame
        assert len(hdul["INPUTS"].data) == SMALL.n_flats


def test_master_flat_matches_truth_to_photon_noise(built, small_night):
    paths, _, _ = built
    truth = load_truth(small_night)
    cfg = truth.config
    flat = read_master(paths.flats[0][1])
    mask = read_master(paths.mask).data
    expected = truth.flat * truth.illumination
    good = (mask == 0) & ~truth.dead
    expected = expected / np.median(expected[good])
    ratio = flat.data / expected
    # Photon-noise limit of the flats used: inverse-variance sum of per-flat relative noise.
    levels_e = np.asarray(flat.inputs or fits.getdata(paths.flats[0][1], "INPUTS")["LEVEL"])
    levels_e = levels_e * cfg.gain
    rel_var = (levels_e + cfg.read_noise**2 * (1 + 1 / cfg.n_darks)) / levels_e**2
    limit = np.sqrt(1.0 / np.sum(1.0 / rel_var))
    scatter = mad_std(ratio[good])
    assert scatter < 1.3 * limit, (scatter, limit)
    assert abs(np.median(ratio[good]) - 1) < 3 * limit
    # Stars in the twilight flats leave no trace: star-core pixels look like the rest.
    resid = (ratio - np.median(ratio[good])) / scatter
    yy, xx = np.mgrid[0 : cfg.size, 0 : cfg.size]
    core = np.zeros_like(good)
    for _, x, y, _f in truth.flat_stars:
        core |= (xx - x) ** 2 + (yy - y) ** 2 < (1.5 * cfg.psf_sigma) ** 2
    core &= good
    assert core.sum() > 100
    # The stacked residual at star cores is zero within 3 standard errors, and star cores
    # hold no more 5-sigma outliers than chance and the clipped mean's tails allow.
    assert abs(np.mean(resid[core])) < 3 / np.sqrt(core.sum())
    assert np.mean(np.abs(resid[core]) > 5) < 0.005


def test_master_dark_unbiased_in_no_bias_night(built, small_night):
    paths, _, _ = built
    truth = load_truth(small_night)
    cfg = truth.config
    for et, path in paths.darks:
        dark = read_master(path)
        current_e = (dark.data - truth.bias) * cfg.gain
        err = current_e - truth.dark_rate * et
        clean = ~truth.hot
        sem = np.std(err[clean]) / np.sqrt(clean.sum())
        assert abs(np.mean(err[clean])) < 4 * sem + 0.5 * cfg.gain / np.sqrt(clean.sum()), et
        # The recorded per-pixel noise is right too.
        assert np.std(err[clean]) / cfg.gain == pytest.approx(np.median(np.sqrt(dark.var)), rel=0.1)


def test_bad_pixel_mask_recall_and_purity(built, small_night):
    paths, _, _ = built
    truth = load_truth(small_night)
    cfg = truth.config
    mask = read_master(paths.mask).data
    hot = (mask & (1 << Bit.HOT)) != 0
    dead = (mask & (1 << Bit.DEAD)) != 0
    # Issue 19: hot pixels are repaired by the dark (HOT only); dead pixels by the flat
    # (DEAD), and BAD as well only when their true response is too low to repair.
    bad = (mask & (1 << Bit.BAD)) != 0
    assert not np.any(bad & ~dead)
    response = truth.flat / ndimage.median_filter(truth.flat, 15)
    cut = Settings().mask.bad_response
    assert np.all(bad[truth.dead & dead & (response < 0.7 * cut)])
    assert not np.any(bad[truth.dead & (response > 1.5 * cut)])
    assert 0 < bad.sum() < 0.5 * truth.dead.sum()
    # Hot pixels that stand 5 sigma above the noise of a 90 s science exposure.
    sigma_sci = np.sqrt(cfg.sky + cfg.dark_rate * 90 + cfg.read_noise**2)
    significant = truth.hot & ((truth.dark_rate - cfg.dark_rate) * 90 > 5 * sigma_sci)
    assert significant.sum() > 5
    assert (hot & significant).sum() / significant.sum() >= 0.99
    assert (dead & truth.dead).sum() / truth.dead.sum() >= 0.99
    dead_cols = np.all(truth.dead, axis=0)
    assert dead_cols.sum() == cfg.dead_columns
    assert np.all(dead[:, dead_cols])
    false = (mask != 0) & ~truth.hot & ~truth.dead
    assert false.mean() <= 0.005


def test_masters_are_reused_not_rebuilt(built, small_night):
    paths, _, out = built
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = MasterBuilder(scan_night(small_night), out, Settings())
    assert again.build() == paths
    assert not again.report.built
    assert len(again.report.reused) == 4
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # Changed settings: the masters they affect are rebuilt.
    changed = MasterBuilder(scan_night(small_night), out,
                            Settings().replace(combine={"sigma_high": 4.0}))
    changed.build()
    assert len(changed.report.built) == 4


def test_foreign_master_reused_only_when_asked(small_night, tmp_path):
    inv = scan_night(small_night)
    night = small_night.name
    data = np.ones((SMALL.size, SMALL.size), np.float32)
    fits.PrimaryHDU(data).writeto(tmp_path / f"{night}_MASTERFLAT_RC.fits")
    b = MasterBuilder(inv, tmp_path, Settings())
    b.build()
    assert f"{night}_MASTERFLAT_RC.fits" in b.report.built
    fits.PrimaryHDU(data * 2).writeto(tmp_path / f"{night}_MASTERFLAT_RC.fits", overwrite=True)
    for p in tmp_path.glob("*MASK*"):
        p.unlink()
    b = MasterBuilder(inv, tmp_path, Settings(), reuse_foreign=True)
    paths = b.build()
    assert any("another tool" in r for r in b.report.reused)
    assert np.all(read_master(paths.flats[0][1]).data == 2)


def test_sigclip_matches_ccdproc(small_night):
    ccdproc = pytest.importorskip("ccdproc")
    recs = scan_night(small_night).select(FrameType.DARK, exptime=90.0)
    ours = combine(open_strips(recs, budget_mb=0.3),
                   CombineSettings(iterations=1, sigma_low=3, sigma_high=3))
    theirs = ccdproc.combine(
        [str(r.path) for r in recs], method="average", unit="adu",
        sigma_clip=True, sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
        sigma_clip_func=np.ma.median, sigma_clip_dev_func=mad_std, dtype=np.float64,
    )
    np.testing.assert_allclose(ours.data, theirs.data, rtol=2e-7, atol=0)
    medians = ccdproc.combine([str(r.path) for r in recs], method="median", unit="adu")
    ours_med = combine(open_strips(recs, budget_mb=0.3), CombineSettings(method="median"))
    np.testing.assert_allclose(ours_med.data, medians.data, rtol=2e-7)


def test_clip_combine_rejects_outliers_and_counts():
    rng = np.random.default_rng(5)
    cube = rng.normal(100, 1, (20, 8, 8)).astype(np.float32)
    cube[3, 2, 2] = 1e4
    cube[7, 5, 1] = np.nan
    mean, var, count = clip_combine(cube)
    assert count[2, 2] <= 19 and count[5, 1] <= 19
    assert abs(mean[2, 2] - 100) < 1.5
    assert np.all(np.isfinite(mean))
    assert np.median(var) == pytest.approx(1 / 20, rel=0.4)


@pytest.fixture(scope="module")
def biased_night(tmp_path_factory):
    """Bias frames, an overscan strip, and a third dark exposure time."""
    cfg = dataclasses.replace(SMALL, n_bias=5, overscan=16, extra_dark_exptimes=(30.0,), seed=9)
    return simulate_night(tmp_path_factory.mktemp("biased"), cfg)


def test_overscan_trim_and_bias(biased_night, tmp_path):
    truth = load_truth(biased_night)
    cfg = truth.config
    inv = scan_night(biased_night)
    rec = inv.select(FrameType.SCIENCE)[0]
    assert rec.shape == (cfg.size, cfg.size + 16) and rec.data_shape == (cfg.size, cfg.size)
    paths = MasterBuilder(inv, tmp_path, Settings()).build()
    bias = read_master(paths.bias)
    assert bias.data.shape == (cfg.size, cfg.size)
    # Overscan-subtracted bias: the fixed pattern relative to the overscan level.
    pattern = truth.bias - cfg.bias_level
    err = bias.data - pattern
    assert abs(np.mean(err)) < 0.2
    dark = read_master(dict(paths.darks)[90.0])
    assert fits.getheader(dict(paths.darks)[90.0])["DARKBIAS"] is True
    err_e = dark.data * cfg.gain - truth.dark_rate * 90
    assert abs(np.mean(err_e[~truth.hot])) < 0.3


def test_dark_scaling_with_bias(biased_night, tmp_path):
    truth = load_truth(biased_night)
    cfg = truth.config
    inv = scan_night(biased_night)
    b = MasterBuilder(inv, tmp_path, Settings())
    bias = b.bias()
    darks = b.darks(bias)
    sol = dark_for_exptime(60.0, bias, darks)
    assert "scaled" in sol.how and sol.bias_used
    current = sol.current
    expected = truth.dark_rate * 60 / cfg.gain
    hot = truth.hot & (truth.dark_rate > 5)
    assert np.median(current[hot] / expected[hot]) == pytest.approx(1, abs=0.02)


def test_dark_fit_without_bias(tmp_path):
    """10 s and 90 s darks, no bias: a 60 s frame's dark from the per-pixel fit."""
    cfg = dataclasses.replace(SMALL, n_science=1, n_flats=3, seed=11)
    night = simulate_night(tmp_path / "a", cfg)
    truth = load_truth(night)
    b = MasterBuilder(scan_night(night), tmp_path / "out", Settings())
    darks = b.darks(None)
    assert sorted(darks) == [10.0, 90.0]
    sol = dark_for_exptime(60.0, None, darks)
    assert "fit" in sol.how and sol.used == (10.0, 90.0)
    total, var = sol.total, sol.var
    expected = truth.bias + truth.dark_rate * 60 / cfg.gain
    err = total - expected
    assert abs(np.mean(err[~truth.hot])) < 0.3
    assert np.std(err[~truth.hot]) == pytest.approx(np.median(np.sqrt(var)), rel=0.15)
    with pytest.raises(CalibrationError, match="only one dark exposure time"):
        dark_for_exptime(60.0, None, {90.0: darks[90.0]})


def test_too_few_flats_falls_back_to_nearest_night(small_night, tmp_path):
    other = tmp_path / "other"
    MasterBuilder(scan_night(small_night), other, Settings()).build()
    cfg = dataclasses.replace(SMALL, date="2026-06-17", n_flats=2, n_science=1, seed=4)
    night = simulate_night(tmp_path / "arch", cfg)
    b = MasterBuilder(scan_night(night), tmp_path / "out", Settings(), fallbacks=[other])
    paths = b.build()
    assert any("flat" in n and "too few" in n for n in b.report.notes)
    header = fits.getheader(paths.flats[0][1])
    assert header["FALLBACK"] == f"{small_night.name}_MASTERFLAT_RC.fits"


def test_dim_and_saturated_flats_are_rejected_and_named(tmp_path):
    cfg = dataclasses.replace(SMALL, n_science=1, n_flats=6, flat_levels=(64000.0, 2500.0),
                              seed=12)
    night = simulate_night(tmp_path / "a", cfg)
    b = MasterBuilder(scan_night(night), tmp_path / "out", Settings())
    b.build()
    reasons = [r["reason"] for r in b.report.rejected]
    assert any("near saturation" in r for r in reasons)
    assert any("too little signal" in r for r in reasons)
    assert all(Path(r["path"]).exists() for r in b.report.rejected)


@pytest.mark.slow
def test_memory_is_bounded_by_strips(small_night):
    recs = scan_night(small_night).select(FrameType.DARK)
    strips = open_strips(recs * 50, budget_mb=2.0)
    band = strips.data.chunks[1][0]
    assert band * len(recs) * 50 * SMALL.size * 4 * 4 <= 2e6
    assert band < SMALL.size
    assert read_frame(recs[0]).shape == (SMALL.size, SMALL.size)


def test_sorting_network_sorts_every_binary_input():
    """0-1 principle: a comparator network that sorts every 0/1 input sorts any input."""
    import itertools

    from astep_dask.core.combine import sort_frames

    for n in range(1, 11):
        cube = np.array(list(itertools.product([0, 1], repeat=n)), np.float32).T
        np.testing.assert_array_equal(np.stack(sort_frames(cube)), np.sort(cube, axis=0))


def test_fast_medians_equal_numpy():
    from astep_dask.core.combine import masked_median
    from astep_dask.core.stats import median

    rng = np.random.default_rng(2)
    for shape, axis in [((9, 40, 30), 0), ((8, 50), 0), ((70, 20), 0), ((300, 225), 1)]:
        a = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(masked_median(a, axis), np.median(a, axis))
        a[rng.random(shape) < 0.2] = np.nan
        np.testing.assert_array_equal(masked_median(a, axis), np.nanmedian(a, axis))
    for values in (rng.normal(size=300_001), rng.integers(0, 5, 200_000),
                   np.sort(rng.exponential(size=100_000))):
        v = values.astype(np.float32)
        assert median(v) == float(np.median(v))
        v[::7] = np.nan
        assert median(v, skip_nan=True) == float(np.nanmedian(v))


def test_writing_a_master_never_touches_its_arrays(tmp_path, monkeypatch):
    # Masters are written on a background thread while other threads read them (the dark
    # while the flats are combined); astropy swaps a native array's bytes in place while
    # writing it, so the writer must hand astropy copies. (It did not, and one flat build
    # in ten came out different.)
    from astep_dask.masters import store as masters_mod

    rng = np.random.default_rng(2)
    m = masters_mod.Master(role="dark", data=rng.normal(100, 5, (32, 32)).astype(np.float32),
                           var=np.full((32, 32), 2.0, np.float32),
                           count=np.full((32, 32), 7, np.int16), cards={"EXPTIME": (90.0, "")})
    given = []
    real_primary, real_image = fits.PrimaryHDU, fits.ImageHDU

    def primary(data=None, *args, **kwargs):
        given.append(data)
        return real_primary(data, *args, **kwargs)

    def image(data=None, *args, **kwargs):
        given.append(data)
        return real_image(data, *args, **kwargs)

    monkeypatch.setattr(masters_mod.fits, "PrimaryHDU", primary)
    monkeypatch.setattr(masters_mod.fits, "ImageHDU", image)
    before = [m.data.copy(), m.var.copy(), m.count.copy()]
    path = masters_mod.write_master(m, tmp_path / "dark.fits")
    given = [a for a in given if a is not None]  # the primary HDU holds no image
    assert len(given) == 3
    for arr in given:
        assert not any(np.shares_memory(arr, a) for a in (m.data, m.var, m.count))
    for a, b in zip(before, (m.data, m.var, m.count), strict=True):
        np.testing.assert_array_equal(a, b)
    back = read_master(path)
    np.testing.assert_array_equal(back.data, m.data)
    np.testing.assert_array_equal(back.var, m.var)


def test_the_plan_is_what_build_makes(small_night, tmp_path):
    """Every master of the plan is built under its name, from the frames it names, and
    the plan's dependencies are the calibration's own (each dark a flat needs exists)."""
    from astep_dask.masters.builder import frame_needs

    inv = scan_night(small_night)
    b = MasterBuilder(inv, tmp_path, Settings())
    steps = b.plan()
    assert [s.role for s in steps] == ["dark", "dark", "flat", "mask"]  # no bias: ASTEP
    b.build()
    names = {s.name for s in steps}
    assert names == set(b.report.built)
    for s in steps:
        assert set(s.needs) <= names - {s.name}
        if s.records:
            inputs = set(fits.getdata(tmp_path / s.name, "INPUTS")["FILE"])
            assert inputs <= {r.path.name for r in s.records}
            assert len(inputs) >= Settings().combine.min_frames
    flat = next(s for s in steps if s.role == "flat")
    science = inv.select(FrameType.SCIENCE)[0]
    needs = frame_needs(steps, science.exptime, science.filter)
    assert flat.name in needs and any("DARK" in n and "FLAT" not in n for n in needs)
    assert needs[-1].endswith("_MASK.fits")


def test_masters_on_a_cluster_send_no_pixels_with_the_graph_and_warn_of_nothing(
        small_night, client, tmp_path):
    """On a distributed cluster, the dark subtracted from the flats is scattered strip by
    strip (dask warned of a large graph on every 2048² night), and reading the masters
    back makes astropy warn of nothing (it warned of the mask's HIERARCH bit names on
    every worker). Both were console noise on every run (issue 16)."""
    import warnings

    import cloudpickle
    import dask.array as da
    import xarray as xr

    from astep_dask.masters.reduce import strip_chunked

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = MasterBuilder(scan_night(small_night), tmp_path, Settings()).build()
        for path in (paths.mask, *(p for _, p in paths.flats), *(p for _, p in paths.darks)):
            read_master(path)
    image = np.arange(1024 * 512, dtype=np.float32).reshape(1024, 512)  # 2 MB
    stack = xr.DataArray(da.zeros((3, 1024, 512), chunks=(3, 300, 512)),
                         dims=("frame", "y", "x"))
    lazy = strip_chunked(image, stack)
    assert lazy.data.chunks == ((300, 300, 300, 124), (512,))
    # The graph holds futures of the strips, not the pixels.
    assert len(cloudpickle.dumps(dict(lazy.data.__dask_graph__()))) < image.nbytes / 10
    np.testing.assert_array_equal(lazy.values, image)
