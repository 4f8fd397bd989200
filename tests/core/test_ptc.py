"""Photon transfer (core.ptc) against frames drawn with a known gain and read noise."""

from __future__ import annotations

import numpy as np
import pytest

from astep_dask.core.ptc import (
    central_region,
    difference_variance,
    gain_from_pairs,
    pair_stat,
    read_variance,
)

N = 192
READ_NOISE = 10.0  # e-


class _Camera:
    """Frames as a CCD makes them: a bias with structure, pixel response, a twilight
    gradient that changes between frames, a few stars, Poisson and read noise, ADU."""

    def __init__(self, gain: float, seed: int):
        self.gain = gain
        self.rng = np.random.default_rng(seed)
        self.bias = 1000.0 + 2.0 * np.sin(np.arange(N) / 7.0)[None, :] * np.ones((N, 1))
        self.response = 1.0 + 0.01 * self.rng.standard_normal((N, N))
        self.yy, self.xx = np.mgrid[:N, :N] / (N - 1) - 0.5

    def frame(self, level_e: float = 0.0, stars: int = 0) -> np.ndarray:
        rng = self.rng
        mean = np.zeros((N, N))
        if level_e:
            angle, amp = rng.normal(0.6, 0.1), 0.015 * rng.uniform(0.8, 1.2)
            mean = level_e * (1 + amp * (np.cos(angle) * self.xx + np.sin(angle) * self.yy))
            for _ in range(stars):  # a star that is not in the other frame of the pair
                x, y, f = rng.uniform(0, N), rng.uniform(0, N), 10 ** rng.uniform(4.3, 5.7)
                mean += f / (2 * np.pi * 4) * np.exp(-((self.xx * (N - 1) + (N - 1) / 2 - x) ** 2
                                                       + (self.yy * (N - 1) + (N - 1) / 2 - y)
                                                       ** 2) / 8)
        e = rng.poisson(mean * self.response) + rng.normal(0.0, READ_NOISE, (N, N))
        return np.rint(e / self.gain + self.bias)


def _measure(cam: _Camera, levels_adu=(27000, 20000, 15000)):
    darks = [cam.frame() for _ in range(4)]
    noise = [pair_stat(darks[0], darks[1], scale=False),
             pair_stat(darks[2], darks[3], scale=False)]
    level = np.mean(darks, axis=0)
    flats = []
    for adu in levels_adu:  # a fading twilight: the second frame 13 % fainter
        e = adu * cam.gain
        flats.append(pair_stat(cam.frame(e, stars=8), cam.frame(e / 1.13, stars=8), level))
    return noise, flats


@pytest.mark.parametrize("gain", [0.5, 1.5, 4.0])
def test_gain_and_read_noise_from_pairs(gain):
    noise, flats = _measure(_Camera(gain, seed=int(gain * 10)))
    rv = read_variance(noise)
    # Read noise in ADU: 10 e- / gain, plus the 1/12 ADU² of quantisation.
    assert np.sqrt(rv) == pytest.approx(np.sqrt((READ_NOISE / gain) ** 2 + 1 / 12), rel=0.02)
    g, gains, used = gain_from_pairs(flats, rv, rv / 4)
    assert used == rv and len(gains) == 3
    assert g == pytest.approx(gain, rel=0.02)
    assert all(gi == pytest.approx(gain, rel=0.03) for gi in gains)
    assert all(1.1 < p.ratio < 1.16 for p in flats)  # each pair scaled to one level


def test_stars_and_gradients_do_not_bias_the_variance():
    """The same flats measured naively (plain variance of the scaled difference) are off
    by far more than the robust measure: the check above would fail without it."""
    cam = _Camera(4.0, seed=7)
    a, b = cam.frame(27000 * 4.0, stars=15), cam.frame(27000 * 4.0 / 1.13, stars=15)
    level = cam.bias
    robust = pair_stat(a, b, level)
    truth = robust.mean_a * (1 + robust.ratio) / 4.0 + (1 + robust.ratio**2) * (
        (READ_NOISE / 4) ** 2 + 1 / 12)
    assert robust.variance == pytest.approx(truth, rel=0.02)
    naive = np.var((a - level) - robust.ratio * (b - level))
    assert naive > 1.05 * truth


def test_read_noise_fitted_when_no_bias_pairs():
    """Without bias or dark pairs, pairs at several levels give gain and read noise."""
    cam = _Camera(1.5, seed=11)
    _, flats = _measure(cam, levels_adu=(30000, 9000, 2000))
    g, _, rv = gain_from_pairs(flats, None)
    assert g == pytest.approx(1.5, rel=0.03)
    assert np.isfinite(rv) and rv > 0
    one_level, _, rv1 = gain_from_pairs(flats[:1], None)
    assert np.isnan(one_level) and np.isnan(rv1)  # one level cannot separate the two


def test_difference_variance_monte_carlo():
    """Pure noise, with a plane and a few outliers: the clipped, plane-removed variance
    is unbiased (mean over draws within its own standard error)."""
    rng = np.random.default_rng(5)
    values = []
    for _ in range(20):
        d = rng.normal(0.0, 7.0, (128, 128)) + np.linspace(0, 50, 128)[None, :]
        d[rng.integers(0, 128, 20), rng.integers(0, 128, 20)] += 500.0
        v, kept = difference_variance(d)
        values.append(v)
        assert kept.sum() > 0.9 * d.size
    mean = np.mean(values)
    sem = np.std(values) / np.sqrt(len(values))
    assert abs(mean - 49.0) < 3 * sem + 0.005 * 49.0


def test_central_region():
    rows, cols = central_region((400, 4096))
    assert (rows.stop - rows.start, cols.stop - cols.start) == (300, 1024)
    assert rows.start == 50 and cols.start == (4096 - 1024) // 2


def _twilight_pair(gain: float, seed: int, smear: float = 0.0, n: int = 256):
    """Two flats of one exposure as twilight gives them: the second 6 % fainter, each with
    its own smooth gradient (0.5 % and 2 % across the frame, in other directions), four
    bright stars that moved and brightened between the frames, 1 % pixel response,
    Poisson and read noise, ADU over a bias of 1000. ``smear``: the fraction of each
    pixel's charge moved into the next pixel along its row (charge-transfer
    inefficiency) before read-out."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] / (n - 1) - 0.5
    response = 1.0 + 0.01 * rng.standard_normal((n, n))
    stars = [(rng.uniform(10, n - 10), rng.uniform(10, n - 10), 10 ** rng.uniform(6, 6.7))
             for _ in range(4)]

    def frame(level_e, grad, angle, stars):
        mean = level_e * (1 + grad * (np.cos(angle) * xx + np.sin(angle) * yy))
        for x, y, f in stars:
            r2 = (xx * (n - 1) + (n - 1) / 2 - x) ** 2 + (yy * (n - 1) + (n - 1) / 2 - y) ** 2
            mean = mean + f / (2 * np.pi * 4.0) * np.exp(-r2 / 8.0)
        e = rng.poisson(mean * response).astype(np.float64)
        if smear:
            e = (1 - smear) * e + smear * np.roll(e, 1, axis=1)
        return np.rint((e + rng.normal(0.0, READ_NOISE, (n, n))) / gain + 1000.0)

    level = 27000 * gain
    a = frame(level, 0.005, 0.3, stars)
    moved = [(x + rng.normal(0, 3), y + rng.normal(0, 3), 1.3 * f) for x, y, f in stars]
    b = frame(level / 1.06, 0.02, 2.0, moved)
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twilight_pair_gain(seed):
    """A twilight pair (level down 6 %, gradients of 0.5 % and 2 % in other directions,
    bright stars that moved): the plain variance of the scaled difference (no structure
    removed, nothing clipped) gives a gain of 0.094, 0.075, 0.032 times the truth (seeds
    0-2); with the stars clipped at 5 sigma (MAD) but the gradients left, 0.329, 0.325,
    0.326 times; the robust statistic 1.0025, 1.0056, 1.0011 times."""
    gain = 4.0
    a, b = _twilight_pair(gain, seed)
    read_var = (READ_NOISE / gain) ** 2 + 1 / 12
    a1, b1 = a - 1000.0, b - 1000.0
    r = np.median(a1) / np.median(b1)
    plain = np.var(a1 - r * b1)
    g_plain = np.mean(a1) * (1 + r) / (plain - (1 + r**2) * read_var)
    assert g_plain < 0.15 * gain
    d = a1 - r * b1
    centre = np.median(d)
    kept = np.abs(d - centre) < 5 * 1.4826 * np.median(np.abs(d - centre))
    g_clipped = np.mean(a1) * (1 + r) / (np.var(d[kept]) - (1 + r**2) * read_var)
    assert g_clipped == pytest.approx(0.33 * gain, rel=0.05)  # the gradients alone
    p = pair_stat(a, b, 1000.0)
    assert p.ratio == pytest.approx(1.06, rel=0.005)
    g, _, _ = gain_from_pairs([p], read_var)
    assert g == pytest.approx(gain, rel=0.015)
    assert abs(p.rho_x) < 0.01 and abs(p.rho_y) < 0.01  # shot noise is white


def test_shared_charge_is_seen_in_the_neighbours_correlation():
    """Charge moved into the next pixel of a row (4 %) lowers single pixels' variance by
    (1 - s)² + s² = 0.923, so their gain reads 8 % high; the difference's correlation
    along rows, s (1 - s) / 0.923 = 0.042, says so, and counting it gives the gain back."""
    gain, s = 4.0, 0.04
    read_var = (READ_NOISE / gain) ** 2 + 1 / 12
    stats = [pair_stat(*_twilight_pair(gain, seed, smear=s), 1000.0) for seed in (3, 4)]
    g, _, _ = gain_from_pairs(stats, read_var)
    assert g == pytest.approx(gain / ((1 - s) ** 2 + s**2), rel=0.015)
    rho_x = np.mean([p.rho_x for p in stats])
    rho_y = np.mean([p.rho_y for p in stats])
    assert rho_x == pytest.approx(s * (1 - s) / ((1 - s) ** 2 + s**2), abs=0.006)
    assert abs(rho_y) < 0.006
    assert g / (1 + 2 * (rho_x + rho_y)) == pytest.approx(gain, rel=0.015)
