"""The star finder counts every source it detects, not only the ones it measures."""

from __future__ import annotations

import numpy as np

from astep_dask.config import QaSettings, StarSettings
from astep_dask.core.register import count_stars, find_stars
from astep_dask.report.metrics import measure_planes
from astep_dask.testing.simulate import add_sources


def _grid_of_stars(n_side: int, spacing: int = 12, noise: float = 5.0, seed: int = 4):
    """``n_side``² isolated stars, each far above the detection threshold, on noise."""
    rng = np.random.default_rng(seed)
    size = n_side * spacing + spacing
    image = rng.normal(0.0, noise, (size, size))
    centres = np.arange(n_side) * spacing + spacing
    xs, ys = np.meshgrid(centres + rng.uniform(-0.5, 0.5, n_side),
                         centres + rng.uniform(-0.5, 0.5, n_side))
    fluxes = rng.uniform(3e3, 3e4, xs.size)
    add_sources(image, xs.ravel(), ys.ravel(), fluxes, 1.3)
    return image.astype(np.float32), xs.size, noise


def test_count_is_not_the_cap():
    image, n_true, noise = _grid_of_stars(25)  # 625 stars
    var = np.full(image.shape, noise**2, np.float32)
    mask = np.zeros(image.shape, np.int32)
    settings = StarSettings(max_stars=400)
    stars, detected = count_stars(image, var, mask, noise, settings)
    assert stars.size == 400  # the measured ones are capped...
    assert detected == n_true  # ...the count is not
    np.testing.assert_array_equal(find_stars(image, var, mask, noise, settings), stars)
    few, detected_few = count_stars(image, var, mask, noise, StarSettings(max_stars=10))
    assert few.size == 10 and detected_few == n_true


def test_qa_row_counts_every_star():
    image, n_true, noise = _grid_of_stars(25)
    sci = image + np.float32(500.0)
    var = np.full(image.shape, noise**2, np.float32)
    mask = np.zeros(image.shape, np.int32)
    row, stars = measure_planes(sci, var, mask, QaSettings(max_stars=100))
    assert stars.size == 100
    assert abs(row["n_stars"] - n_true) <= 0.02 * n_true
