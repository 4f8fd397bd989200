"""The PSF-fit filter that keeps LA Cosmic off star cores."""

from __future__ import annotations

import numpy as np
import pytest

from astep_dask.core.psf import psf_sigma
from astep_dask.core.starfilter import unflag_stars
from astep_dask.testing.simulate import add_sources


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


def _sky_with_cosmics(seed: int, n: int = 256, n_stars: int = 60, n_cr: int = 40,
                      sigma: float = 1.3):
    """A calibrated-like frame: sky, stars (one saturated), bad pixels, cosmic rays, some
    of them on stars and at the edges. Returns sci, var, mask, true CR image, model."""
    from astep_dask.core.bits import Bit
    from astep_dask.testing.simulate import cosmic_rays

    rng = np.random.default_rng(seed)
    model = np.full((n, n), 600.0)
    xs, ys = rng.uniform(5, n - 5, n_stars), rng.uniform(5, n - 5, n_stars)
    flux = 10 ** rng.uniform(3.5, 5.5, n_stars)
    add_sources(model, xs, ys, flux, sigma)
    add_sources(model, [n / 2 + 0.3], [n / 3 + 0.2], [3e6], sigma)  # saturates
    cr = cosmic_rays((n, n), n_cr, rng)
    # Short tracks on the wings of the brightest stars, where a pixel does not stand above
    # its neighbours by more than a star's share of its height.
    for i in np.argsort(flux)[-5:]:
        y, x = int(ys[i]) + 4, int(xs[i])
        cr[y, x:x + 2] += model[y, x:x + 2] - 600.0 + 3000.0
    cr[0, 40] += 3000.0  # on the frame's edges
    cr[n - 1, n - 1] += 3000.0
    var = model + cr + 100.0
    sci = (model + cr + rng.normal(0, 1, model.shape) * np.sqrt(var)).astype(np.float32)
    mask = np.zeros((n, n), np.int32)
    sat = model + cr > 80_000.0
    mask[sat] |= 1 << Bit.SAT
    bad = rng.random((n, n)) < 2e-3
    bad[:, 77] = True  # a dead column
    mask[bad] |= 1 << Bit.BAD
    sci[bad] = rng.uniform(-500, 5e4, bad.sum())
    return sci, var.astype(np.float32), mask, cr, model


def _score(flagged, sci, var, mask, cr, model):
    """Pixel counts against the truth: true CR pixels that matter (usable, 5 sigmas off
    the model) found and in all, the same off stars, star-core flags, false flags."""
    from scipy import ndimage

    truth = cr > 0
    z = (sci - model) / np.sqrt(var)
    must = truth & (mask == 0) & (np.abs(z) > 5)
    near = ndimage.binary_dilation(truth, np.ones((3, 3), bool))
    core = (model - 600.0) > 20 * np.sqrt(600.0)
    sky = must & ((model - 600.0) < 3 * np.sqrt(600.0))
    return (int((flagged & must).sum()), int(must.sum()), int((flagged & sky).sum()),
            int(sky.sum()), int((flagged & core & ~near).sum()), int((flagged & ~near).sum()))


@pytest.mark.parametrize("seed", [0, 1])
def test_windows_find_what_the_whole_frame_finds(seed):
    """astroscrappy on windows around candidates: the whole frame's recall of the true
    cosmic rays (including those on star wings and frame edges), no star-core flags, no
    more false flags than the whole frame."""
    from astep_dask.config import CosmicSettings
    from astep_dask.core.cosmics import find_cosmics

    sci, var, mask, cr, model = _sky_with_cosmics(seed)
    windows, clean = find_cosmics(sci, var, mask, CosmicSettings(), 10.0)
    full, _ = find_cosmics(sci, var, mask, CosmicSettings(tile=0), 10.0)
    found_w, n_must, sky_w, n_sky, core_w, false_w = _score(windows, sci, var, mask, cr, model)
    found_f, _, sky_f, _, _, false_f = _score(full, sci, var, mask, cr, model)
    assert n_must > 150
    # On stars LA Cosmic itself misses some; the windows miss none it finds.
    assert found_w >= found_f
    assert found_w / n_must >= 0.97
    assert sky_w >= sky_f
    assert sky_w / n_sky >= 0.99
    assert core_w == 0
    assert false_w <= false_f
    assert not (windows & (mask != 0)).any()
    # The cleaned copy differs from the data only on flagged pixels, and is nearer the
    # truth there.
    assert np.array_equal(clean[~windows], sci[~windows])
    assert (np.abs(clean - model)[windows] < np.abs(sci - model)[windows]).mean() > 0.95


@pytest.mark.parametrize("sigma", [0.9, 1.3, 1.8])
def test_star_sharpness_bounds_stars(sigma):
    """No pixel of a star stands above its 8 neighbours' mean by more than
    star_sharpness(sigma) of its own height, wherever the star is centred."""
    from astep_dask.core.cosmics import star_sharpness

    rng = np.random.default_rng(2)
    worst = 0.0
    for _ in range(50):
        image = np.zeros((21, 21))
        add_sources(image, [10 + rng.uniform(-0.5, 0.5)], [10 + rng.uniform(-0.5, 0.5)],
                    [1e4], sigma)
        p = np.pad(image, 1, mode="edge")
        neighbours = sum(p[1 + dy:22 + dy, 1 + dx:22 + dx] for dy in (-1, 0, 1)
                         for dx in (-1, 0, 1) if dy or dx) / 8
        lit = image > 1e-3 * image.max()
        worst = max(worst, float(((image - neighbours)[lit] / image[lit]).max()))
    assert worst <= star_sharpness(sigma)
    assert worst > star_sharpness(sigma) - 0.05  # and the bound is close


def test_fill_masked_is_the_median_of_good_neighbours():
    from astep_dask.core.cosmics import fill_masked

    rng = np.random.default_rng(3)
    image = rng.normal(size=(40, 30)).astype(np.float32)
    image[5, 5] = np.nan
    bad = rng.random(image.shape) < 0.3
    bad[:7, :7] = True  # boxes without any good pixel: the global median
    filled = fill_masked(image, bad)
    good = ~bad & np.isfinite(image)
    for y, x in zip(*np.nonzero(bad), strict=True):
        rows = np.clip(np.arange(y - 2, y + 3), 0, 39)[:, None]
        cols = np.clip(np.arange(x - 2, x + 3), 0, 29)[None, :]
        values = image[rows, cols][good[rows, cols]]
        expected = np.median(values) if values.size else np.median(image[good])
        assert filled[y, x] == pytest.approx(expected, abs=1e-6)
    assert np.array_equal(filled[~bad], image[~bad], equal_nan=True)


def test_label_sparse_matches_ndimage():
    from scipy import ndimage

    from astep_dask.core.starfilter import EIGHT, label_sparse

    rng = np.random.default_rng(4)
    for _ in range(50):
        shape = tuple(rng.integers(1, 50, 2))
        image = rng.random(shape) < rng.uniform(0.0, 0.4)
        expected, _ = ndimage.label(image, EIGHT)
        labels, (y0, y1, x0, x1) = label_sparse(image)
        assert np.array_equal(labels, expected)
        boxes = ndimage.find_objects(expected)
        assert [(b[0].start, b[0].stop, b[1].start, b[1].stop) for b in boxes] == list(
            zip(y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist(), strict=True))


def test_psf_sigma_from_strips_of_a_large_frame():
    rng = np.random.default_rng(5)
    n = 512
    model = np.full((n, n), 600.0)
    add_sources(model, rng.uniform(10, n - 10, 400), rng.uniform(10, n - 10, 400),
                10 ** rng.uniform(4.0, 5.3, 400), 1.5)
    var = model + 100.0
    sci = (model + rng.normal(0, 1, model.shape) * np.sqrt(var)).astype(np.float32)
    usable = np.ones(sci.shape, bool)
    assert psf_sigma(sci, var, usable, max_pixels=n * n // 4) == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("shape", [(1, 40), (2, 2), (12, 12), (40, 3)])
def test_tiny_frames(shape):
    """Frames (and windows) narrower than astroscrappy copes with are mirrored wider:
    nothing crashes, and a cosmic ray in a small frame is found."""
    from astep_dask.config import CosmicSettings
    from astep_dask.core.cosmics import find_cosmics

    rng = np.random.default_rng(6)
    var = np.full(shape, 700.0, np.float32)
    sci = (600.0 + rng.normal(0, 1, shape) * np.sqrt(var)).astype(np.float32)
    y, x = shape[0] // 2, shape[1] // 2
    sci[y, x] += 5000.0
    for tile in (0, 8):
        flagged, clean = find_cosmics(sci, var, np.zeros(shape, np.int32),
                                      CosmicSettings(tile=tile), 10.0)
        assert flagged.shape == clean.shape == shape
        assert flagged[y, x] or min(shape) < 5  # too narrow for LA Cosmic's filters


def test_openmp_threads_do_not_change_the_result():
    """One OpenMP thread for astroscrappy (the default) or two: the same flags, and a
    recall of the true cosmic rays that does not depend on it."""
    from astep_dask.config import CosmicSettings
    from astep_dask.core.cosmics import find_cosmics

    sci, var, mask, cr, model = _sky_with_cosmics(2)
    two, _ = find_cosmics(sci, var, mask, CosmicSettings(openmp_threads=2), 10.0)
    one, _ = find_cosmics(sci, var, mask, CosmicSettings(openmp_threads=1), 10.0)
    assert np.array_equal(one, two)
    found, n_must, *_ = _score(one, sci, var, mask, cr, model)
    assert found / n_must >= 0.97


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_openmp_limit_applies_during_astroscrappy_only(monkeypatch, threads):
    """While astroscrappy runs, the calling thread's OpenMP limit is ``openmp_threads``
    (0: the limit it had); once find_cosmics returns, the limit it had is back."""
    import astroscrappy
    from threadpoolctl import threadpool_info, threadpool_limits

    from astep_dask.config import CosmicSettings
    from astep_dask.core.cosmics import find_cosmics

    def openmp_limits():
        return {d["filepath"]: d["num_threads"] for d in threadpool_info()
                if d["user_api"] == "openmp"}

    if not openmp_limits():
        pytest.skip("astroscrappy is built without OpenMP here")
    real = astroscrappy.detect_cosmics
    seen = []

    def spy(*args, **kwargs):
        seen.append(openmp_limits())
        return real(*args, **kwargs)

    monkeypatch.setattr(astroscrappy, "detect_cosmics", spy)
    rng = np.random.default_rng(7)
    var = np.full((48, 48), 700.0, np.float32)
    sci = (600.0 + rng.normal(0, 1, var.shape) * np.sqrt(var)).astype(np.float32)
    sci[20, 30] += 5000.0
    mask = np.zeros(sci.shape, np.int32)
    # A limit of its own before the call (3: neither the setting nor the core count), so
    # that a limit left behind or never applied cannot pass for the right one.
    with threadpool_limits(limits=3, user_api="openmp"):
        before = openmp_limits()
        flagged, _ = find_cosmics(sci, var, mask,
                                  CosmicSettings(tile=0, openmp_threads=threads), 10.0)
        after = openmp_limits()
    assert flagged[20, 30]
    assert seen and set(before.values()) == {3}
    expected = threads or 3
    assert all(set(limits.values()) == {expected} for limits in seen)
    assert after == before
