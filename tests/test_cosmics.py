"""The PSF-fit filter that keeps LA Cosmic off star cores."""

from __future__ import annotations

import numpy as np
import pytest

from astep_dask.cosmics import psf_sigma, unflag_stars
from astep_dask.simulate import add_sources


def _field(sigma: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 160
    model = np.full((n, n), 600.0)
    xs, ys = rng.uniform(15, n - 15, 25), rng.uniform(15, n - 15, 25)
    flux = 10 ** rng.uniform(4.0, 5.3, 25)
    add_sources(model, xs, ys, flux, sigma)
    var = model + 100.0
    sci = (model + rng.normal(0, 1, model.shape) * np.sqrt(var)).astype(np.float32)
    return sci, var.astype(np.float32), xs, ys, model


@pytest.mark.parametrize("sigma", [1.0, 1.3, 1.8])
def test_psf_sigma_recovered(sigma):
    sci, var, *_ = _field(sigma)
    assert psf_sigma(sci, var, np.ones(sci.shape, bool)) == pytest.approx(sigma, abs=0.05)


def test_star_flags_removed_cosmic_rays_kept():
    sci, var, xs, ys, _ = _field(1.3, seed=1)
    crmask = np.zeros(sci.shape, bool)
    # Flag the cores of three stars, as LA Cosmic does, and add three real cosmic rays:
    # two on empty sky, one on top of a star.
    for x, y in zip(xs[:3], ys[:3], strict=True):
        iy, ix = int(np.rint(y)), int(np.rint(x))
        crmask[iy - 1 : iy + 2, ix - 1 : ix + 2] = True
    hits = [(20, 20), (140, 30), (int(np.rint(ys[5])), int(np.rint(xs[5])) + 1)]
    for y, x in hits:
        sci[y, x] += 3000.0
        crmask[y, x] = True
    cleaned = unflag_stars(crmask, sci, var, np.ones(sci.shape, bool))
    for y, x in hits:
        assert cleaned[y, x], (y, x)
    for x, y in zip(xs[:3], ys[:3], strict=True):
        iy, ix = int(np.rint(y)), int(np.rint(x))
        assert not cleaned[iy - 1 : iy + 2, ix - 1 : ix + 2].any()
    assert not (cleaned & ~crmask).any()  # it only ever removes flags
