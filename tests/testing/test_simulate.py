"""The simulator's raw frames follow its own truth."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.stats import mad_std

from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.stack import read_frame
from astep_dask.testing.simulate import add_sources, load_frame_truth, load_truth, psf_stamp


def test_dark_level_matches_truth(small_night):
    truth = load_truth(small_night)
    cfg = truth.config
    darks = scan_night(small_night).select(FrameType.DARK, exptime=90.0)
    stack = np.array([read_frame(r) for r in darks])
    excess_e = (stack.mean(axis=0) - truth.bias) * cfg.gain
    expected = truth.dark_rate * 90.0
    clean = ~truth.hot
    # Mean over clean pixels: unbiased within its standard error.
    n = clean.sum() * len(darks)
    err = np.sqrt(cfg.read_noise**2 + cfg.dark_rate * 90) / np.sqrt(n) + 0.5 * cfg.gain / np.sqrt(
        clean.sum()
    )
    assert abs(np.mean(excess_e[clean] - expected[clean])) < 5 * err
    # Hot pixels: the excess follows the truth pixel by pixel.
    ratio = excess_e[truth.hot & (expected > 200)] / expected[truth.hot & (expected > 200)]
    assert abs(np.median(ratio) - 1) < 0.03


def test_flat_shape_within_noise(small_night):
    truth = load_truth(small_night)
    cfg = truth.config
    inv = scan_night(small_night)
    dark = np.mean([read_frame(r) for r in inv.select(FrameType.DARK, exptime=10.0)], axis=0)
    flat_rec = inv.select(FrameType.FLAT)[-1]  # faintest flat
    flat = read_frame(flat_rec) - dark
    expected = truth.flat * truth.illumination
    good = ~truth.dead
    ratio = flat[good] / expected[good]
    ratio /= np.median(ratio)
    level_e = np.median(flat[good]) * cfg.gain
    photon = np.sqrt(level_e + cfg.read_noise**2) / level_e
    # Stars and the gradient's frame-to-frame change are small; the scatter is photon noise.
    assert mad_std(ratio) < 1.15 * photon
    assert mad_std(ratio) > 0.85 * photon


def test_science_model_and_cosmics(small_night):
    truth = load_truth(small_night)
    cfg = truth.config
    rec = scan_night(small_night).select(FrameType.SCIENCE)[2]
    ft = load_frame_truth(small_night, rec.path.name.removesuffix(".fits"))
    assert ft["model"].shape == (cfg.size, cfg.size)
    assert cfg.sky <= np.median(ft["model"]) < cfg.sky + 30
    raw = read_frame(rec)
    # Cosmic rays deposit their charge where the truth says.
    hit = ft["cr"] > 1000
    assert hit.any()
    expect = truth.bias + (truth.flat * ft["model"] + truth.dark_rate * 90 + ft["cr"]) / cfg.gain
    unsat = ~ft["saturated"]
    resid = (raw - expect)[unsat & ~truth.hot]
    assert abs(np.median(resid)) < 1.0
    assert np.all(raw[ft["saturated"]] == 65535)
    assert len(truth.frames) == cfg.n_science
    offsets = np.array([f["offset"] for f in truth.frames])
    assert np.allclose(offsets[0], 0)
    assert np.allclose(np.diff(offsets, axis=0).mean(axis=0), cfg.drift, atol=0.05)


def test_psf_stamp_is_a_pixel_integrated_gaussian():
    sigma = 1.3
    stamp, ys, xs = psf_stamp(20.3, 11.8, sigma)
    assert stamp.shape == (ys.size, xs.size) == (15, 15)  # ±ceil(5σ) around (20, 12)
    assert xs[7] == 20 and ys[7] == 12
    assert stamp.sum() == pytest.approx(1.0, abs=1e-6)
    # centroid at the centre; second moment σ² plus a pixel's 1/12 px² per axis
    cx, cy = np.sum(stamp.sum(axis=0) * xs), np.sum(stamp.sum(axis=1) * ys)
    assert cx == pytest.approx(20.3, abs=1e-6) and cy == pytest.approx(11.8, abs=1e-6)
    vx = np.sum(stamp.sum(axis=0) * (xs - cx) ** 2)
    assert vx == pytest.approx(sigma**2 + 1 / 12, rel=1e-4)
    # clipped to an image: the rows and columns inside it, same values
    part, ys2, xs2 = psf_stamp(1.2, 30.6, sigma, shape=(32, 40))
    full, ys3, xs3 = psf_stamp(1.2, 30.6, sigma)
    assert xs2.min() == 0 and ys2.max() == 31
    assert np.array_equal(part, full[np.ix_(np.isin(ys3, ys2), np.isin(xs3, xs2))])
    # add_sources adds exactly flux × stamp
    img = np.zeros((32, 40))
    add_sources(img, [1.2], [30.6], [500.0], sigma)
    assert np.array_equal(img[np.ix_(ys2, xs2)], 500.0 * part)
    assert img.sum() == pytest.approx(500.0 * part.sum())
