"""The illumination correction's algorithm on synthetic skies with a known pattern."""

from __future__ import annotations

import numpy as np
import pytest

from astep_dask.config import IllumSettings
from astep_dask.core.illumination import (
    block_edges,
    grid_planes,
    illumination_correction,
    screen_frames,
    sky_grid,
)
from astep_dask.testing.simulate import add_sources

N = 256
SET = IllumSettings(block=32, min_frames=10)


def _unit(n: int) -> np.ndarray:
    return 2 * np.arange(n) / (n - 1) - 1


def _plane(n: int, bx: float, cy: float) -> np.ndarray:
    """1 + bx x + cy y over an n² frame, x and y in [-1, 1]."""
    return 1 + bx * _unit(n)[None, :] + cy * _unit(n)[:, None]


def _sky(rng, pattern: np.ndarray, level: float = 600.0, stars: int = 260) -> np.ndarray:
    """A flat-fielded frame: sky ``level * pattern`` (e-), stars (dN/dF ~ F^-1.5 from
    300 e-, as the simulator's), Poisson and read noise."""
    img = level * pattern
    flux = np.minimum(300 * rng.random(stars) ** -2, 3e5)
    add_sources(img, rng.uniform(0, N, stars), rng.uniform(0, N, stars), flux, 1.3)
    return rng.poisson(img).astype(np.float32) + rng.normal(0, 10, img.shape).astype(
        np.float32)


def test_sky_grid_follows_the_pattern_and_ignores_stars():
    rng = np.random.default_rng(1)
    pattern = _plane(N, 0.01, -0.005)
    img = _sky(rng, pattern)
    rows = np.arange(2, N, 4)
    bad = np.zeros((len(rows), N), bool)
    bad[:, 100] = True  # a dead column
    g = sky_grid(img[rows], bad, rows, (N, N), SET)
    ey, ex = block_edges(N, SET.block), block_edges(N, SET.block)
    cy, cx = (ey[:-1] + ey[1:] - 1) / 2, (ex[:-1] + ex[1:] - 1) / 2
    true = pattern[np.ix_(cy.round().astype(int), cx.round().astype(int))]
    true = true / np.median(true)
    # Each block is right within its own noise (pixel noise over sqrt(pixels used)).
    z = (g.grid - true) / (g.noise / g.level / np.sqrt(g.count))
    assert np.isfinite(z).all()
    assert np.abs(z).max() < 5 and np.std(z) < 1.5, (np.abs(z).max(), np.std(z))
    assert g.level == pytest.approx(600, rel=0.01)  # stars did not lift the sky
    assert g.noise == pytest.approx(np.sqrt(600 + 100), rel=0.1)
    # A plain block mean (no star mask) is biased by the stars: the mask matters.
    plain = img[rows].reshape(len(rows), 8, 32).mean(axis=2).mean()
    assert plain > 1.01 * 600


def _grids(rng, n_frames: int, bx: float, cy: float, own: float = 0.0, turns: float = 1.0):
    """Block grids of frames whose sky is (1 / (1 + bx x + cy y)) times each frame's own
    gradient of ``own`` peak to peak, turning through the night."""
    ey = block_edges(N, SET.block)
    u = 2 * ((ey[:-1] + ey[1:] - 1) / 2) / (N - 1) - 1
    base = 1 / (1 + bx * u[None, :] + cy * u[:, None])
    grids = []
    for i in range(n_frames):
        a = 0.3 + 2 * np.pi * turns * i / n_frames
        sky = base * (1 + own / 2 * (np.cos(a) * u[None, :] + np.sin(a) * u[:, None]))
        sky = sky * (1 + rng.normal(0, 0.002, sky.shape))
        grids.append(sky / np.median(sky))
    return np.array(grids), ey


def test_screening_rejects_clouds_and_own_gradients_only():
    rng = np.random.default_rng(2)
    grids, ey = _grids(rng, 30, 0.01, 0.005, own=0.005)
    levels = np.full(30, 600.0)
    levels[3] = 2000.0  # a bright cloud
    grids[7] *= 1 + 0.02 * _unit(grids.shape[1])[None, :]  # dawn: 4 % own gradient
    grids[11, 2:5, 2:5] *= 1.03  # a cloud's patch
    grids[15] = np.nan  # nothing usable
    why = screen_frames(grids, levels, np.full(30, 90.0), ey, ey, SET)
    assert "sky level" in why[3]
    assert "own sky gradient" in why[7]
    assert "structure" in why[11]
    assert why[15] == "no usable sky"
    assert sum(w is None for w in why) == 26


@pytest.mark.parametrize("own", [0.0, 0.005])
def test_correction_recovers_the_flat_error(own):
    rng = np.random.default_rng(3)
    bx, cy = 0.01, 0.005  # the flat's error: 2 % peak to peak in x, 1 % in y
    grids, ey = _grids(rng, 40, bx, cy, own=own)
    grids[5] *= 1 + 0.03 * _unit(grids.shape[1])[None, :]  # a moonlit frame: rejected
    flat = np.ones((N, N), np.float32)
    res = illumination_correction(grids, np.full(40, 600.0), np.full(40, 90.0), (N, N),
                                  flat, np.ones((N, N), bool), SET)
    assert res.n_used == 39 and res.reasons[5] is not None
    truth = _plane(N, bx, cy)
    ratio = res.correction / truth
    assert np.median(flat / res.correction) == pytest.approx(1, abs=1e-6)
    assert np.std(ratio / ratio.mean()) < 0.0005
    lo, hi = np.percentile(truth, [0.5, 99.5])  # the amplitude's definition
    assert res.amplitude == pytest.approx((hi - lo) / np.median(truth), rel=0.05)
    planes = grid_planes(1 / res.correction[None, ::32, ::32], ey, ey)
    assert np.isfinite(planes).all()


def test_too_few_frames_gives_no_correction():
    rng = np.random.default_rng(4)
    grids, _ = _grids(rng, 12, 0.01, 0.0)
    levels = np.full(12, 600.0)
    levels[:4] = 3000.0  # clouds: 8 usable < min_frames = 10
    res = illumination_correction(grids, levels, np.full(12, 90.0), (N, N),
                                  np.ones((N, N), np.float32), np.ones((N, N), bool), SET)
    assert res.correction is None and res.n_used == 8


def test_a_detector_of_few_blocks_gives_no_correction_and_says_why():
    # A 48-px frame is one 64-px block: no surface can be fitted (a 500-frame night of
    # 48 px frames once crashed on a NaN header card here).
    rng = np.random.default_rng(6)
    s = IllumSettings(block=64, min_frames=10)
    grids = 1 + 0.001 * rng.standard_normal((30, 1, 1))
    res = illumination_correction(grids, np.full(30, 600.0), np.full(30, 90.0), (48, 48),
                                  np.ones((48, 48), np.float32), np.ones((48, 48), bool), s)
    assert res.correction is None and res.n_used == 30
    assert "usable sky blocks of 64 px, need 7" in res.why


def test_smooth_method_and_settings_checks():
    rng = np.random.default_rng(5)
    grids, _ = _grids(rng, 20, 0.01, 0.0)
    s = IllumSettings(block=32, min_frames=10, method="smooth", smooth_blocks=1.0)
    res = illumination_correction(grids, np.full(20, 600.0), np.full(20, 90.0), (N, N),
                                  np.ones((N, N), np.float32), np.ones((N, N), bool), s)
    truth = _plane(N, 0.01, 0.0)
    inner = slice(32, -32)
    ratio = (res.correction / truth)[inner, inner]
    assert np.std(ratio / ratio.mean()) < 0.002
    with pytest.raises(ValueError, match="method"):
        IllumSettings(method="spline")
