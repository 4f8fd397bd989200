"""Robust statistics and array helpers shared by the core: numpy in, numpy out.

The Gaussian conversion constants are defined once here (MAD and interquartile range to
sigma, the standard error of a median), with :func:`robust_sigma` and a fast exact
:func:`median`.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "IQR_TO_SIGMA",
    "MAD_TO_SIGMA",
    "MEDIAN_ERROR",
    "mad_sigma",
    "median",
    "nonzero2d",
    "robust_sigma",
]

MAD_TO_SIGMA = 1.482602218505602  # 1 / Phi^-1(3/4): MAD of a Gaussian → its sigma
IQR_TO_SIGMA = 1.3489795003921634  # interquartile range of a unit Gaussian
MEDIAN_ERROR = 1.2533141373155  # sqrt(pi/2): standard error of a median / that of a mean


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 × MAD of the finite values."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return float("nan")
    return mad_sigma(v, median(v))


def mad_sigma(values: np.ndarray, level: float) -> float:
    """1.4826 × median |values - level| (float32 arithmetic, as numpy's median gives)."""
    return float(MAD_TO_SIGMA * np.float32(median(np.abs(values - np.float32(level)))))


def median(values: np.ndarray, skip_nan: bool = False) -> float:
    """``np.median`` (or, with ``skip_nan``, ``np.nanmedian``) of all the values, exactly,
    several times faster on large images.

    A strided sample of the values brackets the middle ranks; only the values inside the
    bracket are then partitioned. When the bracket misses (a pathological sample), the
    plain partition of everything runs instead, so the result never depends on the sample.
    """
    v = np.asarray(values).ravel()
    if skip_nan or v.dtype.kind == "f":
        nan = np.isnan(v)
        if nan.any():
            if not skip_nan:
                return float("nan")
            v = v[~nan]
    n = v.size
    if n < 1 << 16:
        return float(np.median(v)) if n else float("nan")
    k1, k2 = (n - 1) // 2, n // 2
    sample = np.sort(v[:: n // 16384])
    m = sample.size
    margin = 3 * int(np.sqrt(m)) + 8  # ranks: 6 sigma of the sample median's rank scatter
    lo, hi = sample[max(m // 2 - margin, 0)], sample[min(m // 2 + margin, m - 1)]
    below = int(np.count_nonzero(v < lo))
    inside = v[(v >= lo) & (v <= hi)]
    if below <= k1 and below + inside.size > k2:
        part = np.partition(inside, (k1 - below, k2 - below))
        return float(np.mean(part[k1 - below : k2 - below + 1]))
    return float(np.median(v))


def nonzero2d(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the true pixels of a 2-D array, as ``np.nonzero``.

    Through the flat indices: ``np.nonzero`` on a 2-D array is many times slower than on
    its flattened view, which matters on the blocks of a frame and the many small windows.
    """
    flat = np.flatnonzero(image)
    return np.divmod(flat, image.shape[1])
