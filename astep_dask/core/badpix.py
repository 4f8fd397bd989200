"""The bad-pixel mask: hot pixels from the master dark, dead pixels from the master flat.

Hot pixels get HOT: the dark subtraction repairs them (their dark current's noise is in
VAR). Dead pixels and columns get DEAD, the flat repairs them, and BAD as well only when
their response is below ``bad_response`` (unusable). See :mod:`astep_dask.core.bits`.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from astep_dask.config import MaskSettings
from astep_dask.core.bits import MASK_DTYPE, Bit, flag
from astep_dask.core.combine import masked_median
from astep_dask.core.stats import mad_sigma, median, robust_sigma

__all__ = ["bad_pixel_mask", "dead_pixels", "hot_pixels", "smooth_flat"]


def hot_pixels(dark: np.ndarray, settings: MaskSettings) -> np.ndarray:
    """Pixels whose dark signal exceeds the robust level by ``hot_sigma`` robust sigmas.

    ``dark`` is a master dark (any exposure; the longer the better). The robust sigma of
    the master over the whole frame is its noise, so the test is a significance test of
    each pixel's excess dark current.
    """
    finite = np.isfinite(dark)
    values = dark[finite]
    level = np.float32(median(values))
    sigma = mad_sigma(values, level)  # robust_sigma(dark), sharing the level
    with np.errstate(invalid="ignore"):
        return finite & (dark - level > settings.hot_sigma * sigma)


def smooth_flat(flat: np.ndarray, box: int) -> np.ndarray:
    """Large-scale shape of a flat: medians of ``box``×``box`` blocks, interpolated back.

    Block medians ignore isolated dead pixels and columns; the bilinear interpolation
    follows vignetting and broad illumination. Much cheaper than a sliding median filter
    on a 4k² frame (about 40 ms at 2048²: one sort of every block's pixels, and an
    interpolation done one axis at a time).
    """
    ny, nx = flat.shape
    by, bx = -(-ny // box), -(-nx // box)
    padded = np.full((by * box, bx * box), np.nan, np.float32)
    padded[:ny, :nx] = flat
    padded[~np.isfinite(padded)] = np.nan
    blocks = padded.reshape(by, box, bx, box).swapaxes(1, 2).reshape(by, bx, box * box)
    med = masked_median(blocks, axis=2)
    if np.isnan(med).any():  # blocks with no data: fill from neighbours
        idx = ndimage.distance_transform_edt(np.isnan(med), return_distances=False,
                                             return_indices=True)
        med = med[tuple(idx)]
    # Block centres sit at (i + 0.5) * box - 0.5 in pixel coordinates. Bilinear
    # interpolation is separable: along y to (ny, bx), then along x; beyond the outer
    # centres the edge value holds (as map_coordinates' "nearest" mode).
    wy = _linear_weights(ny, box, by)
    wx = _linear_weights(nx, box, bx)
    rows = med.astype(np.float64)[wy[0]] * wy[2][:, None] + med[wy[1]] * wy[3][:, None]
    rows = rows.astype(np.float32)  # the full-size step in float32: half the memory traffic
    out = rows[:, wx[0]]
    out *= wx[2].astype(np.float32)
    right = rows[:, wx[1]]
    right *= wx[3].astype(np.float32)
    out += right
    return out


def _linear_weights(n: int, box: int, nb: int) -> tuple[np.ndarray, ...]:
    """For pixels ``0..n-1`` and block centres ``(i + 0.5) * box - 0.5`` (``nb`` blocks):
    the two blocks each pixel interpolates between and their weights."""
    pos = (np.arange(n) + 0.5) / box - 0.5
    base = np.floor(pos)
    frac = pos - base
    lo = np.clip(base, 0, nb - 1).astype(np.intp)
    hi = np.clip(base + 1, 0, nb - 1).astype(np.intp)
    return lo, hi, 1.0 - frac, frac


def dead_pixels(flat: np.ndarray, settings: MaskSettings) -> tuple[np.ndarray, np.ndarray]:
    """Dead / low-response pixels and columns of a normalised master flat.

    A pixel is dead when its ratio to the smoothed flat falls below 1 by more than
    ``max(dead_sigma × sigma, dead_floor)``, sigma being the robust scatter of the ratio
    (pixel response non-uniformity plus noise). A column is dead when the median of its
    ratios falls below 1 by more than ``column_sigma`` times the robust scatter of the
    column medians (and by at least 1 %). Returns ``(pixels, columns)`` as boolean images.
    """
    smooth = smooth_flat(flat, settings.smooth_box)
    with np.errstate(all="ignore"):
        ratio = flat / smooth
    sigma = robust_sigma(ratio)
    cut = max(settings.dead_sigma * sigma, settings.dead_floor)
    with np.errstate(invalid="ignore"):
        pixels = np.isfinite(ratio) & (ratio < 1.0 - cut)
    with warnings.catch_warnings():  # a fully dead column has no good pixel: NaN is right
        warnings.simplefilter("ignore", RuntimeWarning)
        col_med = masked_median(np.where(pixels, np.nan, ratio), axis=0)
        col_all = masked_median(ratio, axis=0)
    col_sigma = robust_sigma(col_med)
    col_cut = max(settings.column_sigma * col_sigma, 0.01)
    with np.errstate(invalid="ignore"):
        bad_cols = (col_all < 1.0 - col_cut) | (col_med < 1.0 - col_cut)
    columns = np.zeros_like(pixels)
    columns[:, bad_cols] = True
    return pixels, columns


def bad_pixel_mask(
    flat: np.ndarray | None, dark: np.ndarray | None, settings: MaskSettings
) -> np.ndarray:
    """The static bad-pixel mask of a night (int32 bit flags).

    Hot pixels (from the master dark) get HOT; dead pixels and columns (from the master
    flat) DEAD, and BAD too where their response (flat over smoothed flat; a column's:
    its median) is below ``settings.bad_response``; pixels where the flat is NaN or not
    positive get NO_DATA.
    """
    shape = (flat if flat is not None else dark).shape
    mask = np.zeros(shape, MASK_DTYPE)
    if dark is not None:
        mask[hot_pixels(dark, settings)] |= flag(Bit.HOT)
    if flat is not None:
        with np.errstate(invalid="ignore"):
            no_data = ~np.isfinite(flat) | (flat <= 0)
        mask[no_data] |= flag(Bit.NO_DATA)
        clean = np.where(no_data, np.nan, flat)
        pixels, columns = dead_pixels(clean, settings)
        mask[pixels | columns] |= flag(Bit.DEAD)
        mask[_unusable(clean, pixels, columns, settings)] |= flag(Bit.BAD)
    return mask


def _unusable(flat: np.ndarray, pixels: np.ndarray, columns: np.ndarray,
              settings: MaskSettings) -> np.ndarray:
    """Dead pixels and columns whose response (a pixel's ratio to the smoothed flat; a
    column's median ratio) is below ``bad_response``: too little signal to repair."""
    smooth = smooth_flat(flat, settings.smooth_box)
    with np.errstate(all="ignore"):
        ratio = flat / smooth
        low = pixels & ~(ratio >= settings.bad_response)
    cols = columns.any(axis=0)
    if cols.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            col_resp = masked_median(ratio[:, cols], axis=0)
        dead_cols = np.zeros(flat.shape[1], bool)
        dead_cols[np.nonzero(cols)[0][~(col_resp >= settings.bad_response)]] = True
        low |= dead_cols[None, :] & columns
    return low
