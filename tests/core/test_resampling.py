"""The resampling kernels of registration (issue 31): what each does to flux, to the PSF, to
masks and to the noise, checked against independent truths (analytic Gaussians, Monte
Carlo noise)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import correlate1d
from scipy.special import erf

from astep_dask.core.bits import Bit, flag
from astep_dask.core.register import axis_weights, kernel_moment, resample
from astep_dask.kbmod.kernels import effective_psf_variance, filter_factor, psf_1d

KINDS = ("overlap", "cubic")


def _star(n: int, x: float, y: float, sigma: float) -> np.ndarray:
    """A pixel-integrated Gaussian of unit flux at (x, y), separable, numpy only."""
    def axis(c: float) -> np.ndarray:
        edges = np.arange(n + 1) - 0.5
        return np.diff(0.5 * erf((edges - c) / (sigma * np.sqrt(2.0))))
    return np.outer(axis(y), axis(x))


def _moments(img: np.ndarray) -> tuple[float, float, float, float]:
    """Centroid and second central moments (x, y) of an image."""
    yy, xx = np.indices(img.shape)
    t = img.sum()
    cx, cy = (img * xx).sum() / t, (img * yy).sum() / t
    return cx, cy, (img * (xx - cx) ** 2).sum() / t, (img * (yy - cy) ** 2).sum() / t


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("f", [0.0, 0.13, 0.5, 0.81])
def test_axis_weights_sum_to_one_and_keep_the_centroid(kind, f):
    first, w = axis_weights(f, kind)
    x = first + np.arange(w.size) - f
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.sum(w * x) == pytest.approx(0.0, abs=1e-12)
    want = f * (1 - f) if kind == "overlap" else 0.0
    assert kernel_moment(f, kind) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_a_star_keeps_its_flux_place_and_width(kind):
    # a star at (30.4, 28.7) seen in a frame offset by (2.37, -1.62): on the reference
    # grid it must be at (30.4 - 2.37, 28.7 + 1.62), with the same flux, and with the PSF
    # variance the kernel's second moment says (none for the cubic kernel)
    n, sigma, dx, dy = 64, 1.06, 2.37, -1.62
    img = _star(n, 30.4, 28.7, sigma).astype(np.float32)
    r = resample(img, np.ones_like(img), np.zeros(img.shape, np.int32), dx, dy, kind=kind)
    cx, cy, vx, vy = _moments(np.nan_to_num(r.sci).astype(np.float64))
    assert np.nansum(r.sci) == pytest.approx(1.0, abs=1e-5)
    assert (cx, cy) == pytest.approx((30.4 - dx, 28.7 - dy), abs=2e-3)
    vx0, vy0 = _moments(img.astype(np.float64))[2:]
    ex, ey = effective_psf_variance(np.sqrt(vx0), dx, dy, kind)
    assert r.kernel_var == pytest.approx((ex - vx0, ey - vx0), abs=1e-9)
    assert vx == pytest.approx(vx0 + r.kernel_var[0], abs=2e-3)
    assert vy == pytest.approx(vy0 + r.kernel_var[1], abs=2e-3)
    if kind == "cubic":
        assert r.kernel_var == pytest.approx((0.0, 0.0), abs=1e-12)
    else:
        assert r.kernel_var == pytest.approx((0.37 * 0.63, 0.38 * 0.62))


@pytest.mark.parametrize("kind, side", [("overlap", 2), ("cubic", 4)])
def test_masks_grow_by_the_kernel_and_an_integer_shift_is_exact(kind, side):
    rng = np.random.default_rng(3)
    sci = rng.uniform(0, 100, (40, 50)).astype(np.float32)
    var = np.full(sci.shape, 4.0, np.float32)
    mask = np.zeros(sci.shape, np.int32)
    mask[20, 25] = flag(Bit.CR)
    r = resample(sci, var, mask, 2.3, -1.6, kind=kind)
    assert ((r.mask & flag(Bit.CR)) != 0).sum() == side * side
    off = (r.mask & flag(Bit.NO_DATA, Bit.EDGE)) == flag(Bit.NO_DATA, Bit.EDGE)
    assert np.isnan(r.sci[off]).all() and np.isfinite(r.sci[~off]).all()
    ri = resample(sci, var, mask, 3.0, -2.0, kind=kind)
    np.testing.assert_array_equal(ri.sci[2:, :-3], sci[:-2, 3:])
    assert ((ri.mask & flag(Bit.CR)) != 0).sum() == 1 and ri.var_pixel_factor == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_variance_conventions_match_monte_carlo_noise(kind):
    # white noise of variance v: the one-pixel variance of the resampled noise is v Σw²
    # ("pixel"); the "area" plane stays v, and stays positive beside a bright star
    rng = np.random.default_rng(5)
    n, v, dx, dy = 300, 9.0, 0.42, 0.71
    noise = rng.normal(0, 3.0, (n, n)).astype(np.float32)
    var = np.full((n, n), v, np.float32)
    zero = np.zeros((n, n), np.int32)
    r = resample(noise, var, zero, dx, dy, kind=kind)
    inner = r.sci[5:-5, 5:-5]
    assert inner.var() == pytest.approx(v * r.var_pixel_factor, rel=0.02)
    assert np.allclose(r.var[5:-5, 5:-5], v)
    rp = resample(noise, var, zero, dx, dy, variance="pixel", kind=kind)
    assert np.allclose(rp.var[5:-5, 5:-5], v * r.var_pixel_factor, rtol=1e-5)
    spiky = var.copy()
    spiky[100, 100] = 1e6
    assert (resample(noise, spiky, zero, dx, dy, kind=kind).var[5:-5, 5:-5] > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_filter_factor_makes_the_matched_filter_snr_of_resampled_noise_unit(kind):
    # psi / sqrt(phi) of a PSF-matched filter at fixed positions, VAR times FILTVARF:
    # unit standard deviation (Monte Carlo over many frames' worth of positions)
    rng = np.random.default_rng(7)
    n, v, sigma, dx, dy = 512, 25.0, 1.06, 0.45, 0.3
    noise = rng.normal(0, 5.0, (n, n)).astype(np.float32)
    r = resample(noise, np.full((n, n), v, np.float32), np.zeros((n, n), np.int32), dx, dy,
                 kind=kind)
    c = filter_factor(dx, dy, (0.0, 0.0), sigma, kind=kind)
    p = psf_1d(sigma)
    psi = correlate1d(correlate1d(r.sci.astype(np.float64), p, axis=0), p, axis=1) / (v * c)
    phi = float(np.sum(p * p)) ** 2 / (v * c)
    snr = (psi / np.sqrt(phi))[10:-10:6, 10:-10:6].ravel()
    assert np.std(snr) == pytest.approx(1.0, abs=0.03)
    assert 0.75 < c < 1.0
    assert filter_factor(0.0, 0.0, (0.0, 0.0), sigma, kind=kind) == pytest.approx(1.0)
