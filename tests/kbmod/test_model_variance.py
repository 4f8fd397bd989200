"""The difference frames' variance takes the frame's Poisson term from the scene (the
template), not from each pixel's own value: with the own value, a matched filter weighted
by 1/VAR is biased low on blank sky (Monte Carlo against the expected bias, with and
without a registration's resampling in between)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from astep_dask.core.register import resample
from astep_dask.kbmod.difference import MODEL_CLIP, difference, model_variance, poisson_slope
from astep_dask.kbmod.products import Layers

SKY, READ = 200.0, 5.0  # e- per pixel
PSF = 1.5  # px, Gaussian sigma of the matched filter
N = 16  # frames in the template: its noise is 1/N of a frame's


def _psf() -> np.ndarray:
    r = np.arange(-6, 7)
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / PSF**2)
    return g / g.sum()


def _blank_night(rng: np.random.Generator, size: int = 384) -> tuple[Layers, Layers]:
    """A sky-subtracted calibrated frame whose VAR is, as the calibration makes it, read
    noise plus its own electrons clipped at 0; and a blank template of N frames."""
    electrons = rng.normal(SKY, math.sqrt(SKY + READ**2), (size, size))
    var = np.maximum(electrons, 0) + READ**2
    frame = Layers((electrons - SKY).astype(np.float32), var.astype(np.float32),
                   np.zeros((size, size), np.uint16))
    tvar = np.full((size, size), (SKY + READ**2) / N, np.float32)
    template = Layers(rng.normal(0.0, np.sqrt(tvar)).astype(np.float32), tvar,
                      np.zeros((size, size), np.uint16))
    return frame, template


def _matched_filter_z(diff: Layers) -> np.ndarray:
    """KBMOD's per-frame ψ/√φ at every interior pixel (a PSF-weighted flux over its
    predicted sigma)."""
    p = _psf()
    psi = ndimage.correlate(diff.sci / diff.var, p, mode="constant")
    phi = ndimage.correlate(1.0 / diff.var, p * p, mode="constant")
    return (psi / np.sqrt(phi))[20:-20, 20:-20]


@pytest.mark.parametrize("shift", [None, (0.5, 0.3)])
def test_matched_filter_of_blank_sky_is_unbiased_with_the_model_variance(shift):
    rng = np.random.default_rng(5)
    zs_own, zs_model = [], []
    for _ in range(3):
        frame, template = _blank_night(rng)
        if shift is not None:  # registration: the area convention, as the export's;
            # the template is combined from registered frames, so its noise is resampled too
            frame, template = (Layers(r.sci, r.var, r.mask) for r in (
                resample(x.sci, x.var, x.mask, *shift) for x in (frame, template)))
        zs_own.append(_matched_filter_z(difference(frame, template)))
        zs_model.append(_matched_filter_z(difference(frame, template, poisson=1.0)))
    own, model = np.concatenate(zs_own).ravel(), np.concatenate(zs_model).ravel()
    # independent samples: about one per PSF area (~4πσ²), so the error of a mean is
    effective = own.size / (4 * math.pi * PSF**2)
    err = 1.0 / math.sqrt(effective)
    if shift is None:
        # Own-value variance: E[z] ≈ −Σp / √(V0 Σp²) (1/VAR to first order in the noise),
        # the template's share of the difference aside.
        v0 = SKY + READ**2
        expected = -1.0 / math.sqrt(v0 * (_psf() ** 2).sum())
        assert own.mean() == pytest.approx(expected, abs=0.25 * abs(expected))
    assert own.mean() < -8 * err  # the bias this fixes is there
    assert abs(model.mean()) < 4 * err
    assert model.std() == pytest.approx(own.std(), rel=0.1)  # the scale is unchanged


def test_pixel_convention_follows_its_smaller_slope():
    # VAR resampled through the squared weights follows SCI by Σw² only: the header's
    # slope says so, and with it blank sky is unbiased (with the area convention's 1 it
    # would be biased high, as much as the own value biases it low).
    rng = np.random.default_rng(8)
    header = fits.Header({"BKGLEVEL": SKY, "BKGRMS": math.sqrt(SKY + READ**2),
                          "VARMODE": "pixel"})
    zs: dict[str, list[np.ndarray]] = {"own": [], "slope": [], "one": []}
    for _ in range(3):
        frame, template = _blank_night(rng)
        r, rt = (resample(x.sci, x.var, x.mask, 0.5, 0.5, variance="pixel")
                 for x in (frame, template))
        header["VARPIXF"] = r.var_pixel_factor
        frame, template = Layers(r.sci, r.var, r.mask), Layers(rt.sci, rt.var, rt.mask)
        zs["own"].append(_matched_filter_z(difference(frame, template)))
        zs["slope"].append(_matched_filter_z(difference(frame, template,
                                                        poisson=poisson_slope(header))))
        zs["one"].append(_matched_filter_z(difference(frame, template, poisson=1.0)))
    assert poisson_slope(header) == pytest.approx(0.25)
    mean = {k: float(np.concatenate(v).mean()) for k, v in zs.items()}
    err = 1.0 / math.sqrt(np.concatenate(zs["own"]).size / (4 * math.pi * PSF**2))
    assert mean["own"] < -8 * err and mean["one"] > 8 * err
    assert abs(mean["slope"]) < 4 * err


def test_only_the_frames_share_of_the_difference_leaves_its_variance():
    # frame var 400, template var 100: the frame holds 0.8 of the difference's noise
    frame = Layers(np.array([[10.0, -10.0]], np.float32), np.full((1, 2), 400, np.float32),
                   np.zeros((1, 2), np.uint16))
    template = Layers(np.zeros((1, 2), np.float32), np.full((1, 2), 100, np.float32),
                      np.zeros((1, 2), np.uint16))
    assert np.allclose(model_variance(frame, template, 1.0), [[392.0, 408.0]])
    assert np.allclose(model_variance(frame, template, 0.5), [[396.0, 404.0]])


def test_model_variance_keeps_a_movers_poisson_term_beyond_the_clip():
    # A source in the frame and not in the template (a mover): its pixels' variance loses
    # at most MODEL_CLIP of the frame's sigma, and keeps the rest of its photons' term.
    var = np.full((3, 3), 400.0, np.float32)
    sci = np.array([[0, 0, 0], [0, 1000, 0], [0, 30, 0]], np.float32)
    frame = Layers(sci, var + np.maximum(sci, 0), np.zeros((3, 3), np.uint16))
    template = Layers(np.zeros((3, 3), np.float32), np.zeros((3, 3), np.float32),
                      np.zeros((3, 3), np.uint16))
    out = model_variance(frame, template, 1.0)
    assert out[1, 1] == pytest.approx(1400 - MODEL_CLIP * math.sqrt(1400), rel=1e-6)
    assert out[2, 1] == pytest.approx(400.0, rel=1e-6)  # within the clip: from the scene
    assert out[0, 0] == pytest.approx(400.0)
    # A static star (in both): its Poisson term stays.
    star = Layers(sci, frame.var, frame.mask)
    assert np.allclose(model_variance(frame, star, 1.0), frame.var)


def test_poisson_slope_from_the_sky_level_and_noise():
    assert poisson_slope(fits.Header({"BKGLEVEL": 600.0, "BKGRMS": 27.0})) == pytest.approx(1)
    # a sky near 0: half its pixels had their electrons clipped at 0 by the calibration
    assert poisson_slope(fits.Header({"BKGLEVEL": 0.0, "BKGRMS": 10.0})) == pytest.approx(0.5)
    assert poisson_slope(fits.Header()) == 0.0  # unknown sky: VAR left as it is
    assert poisson_slope(fits.Header({"BKGLEVEL": 5.0, "BKGRMS": 0.0})) == 0.0
    pixel = {"BKGLEVEL": 600.0, "BKGRMS": 27.0, "VARMODE": "pixel", "VARPIXF": 0.3}
    assert poisson_slope(fits.Header(pixel)) == pytest.approx(0.3)
    assert poisson_slope(fits.Header({**pixel, "VARMODE": "area"})) == pytest.approx(1)
