"""A smooth 2-D sky background and its noise, per frame: numpy arrays in, numpy arrays out.

The recipe is the classic mesh one (as in SExtractor, Bertin & Arnouts 1996, A&AS 117,
393, §3.1; and photutils' ``Background2D``), written here from that description:

1. cut the frame into meshes of about ``mesh`` pixels (the frame is split into equal
   meshes, so no partial mesh is left at an edge);
2. in each mesh, drop masked and non-finite pixels and pixels of detected sources, then
   sigma-clip the rest around the median with a robust scale (interquartile range / 1.349); the mesh
   level is the median of what survives, its rms the standard deviation of it;
3. meshes with too few usable pixels take the value of their nearest good neighbour, then
   the mesh grid is median-filtered (``filter_size``) to remove meshes spoiled by a bright
   star or a satellite trail;
4. the grid is interpolated to full resolution by a bicubic spline through the mesh
   centres, extended half a mesh beyond the frame with the slope of a plane fitted to
   the grid (a gradient is followed to the edges without amplifying the noise of the
   outer meshes).

Sources are found on the residual after a first pass (smoothed by a Gaussian of about the
PSF size, thresholded at ``source_sigma`` times the noise of the smoothed image, grown by
``source_grow`` pixels) and excluded in a second pass, so star wings do not lift the sky.

The result is a :class:`Background`: the mesh grids only (a few kB for a 4k² frame), which
can be sent between processes and evaluated at full resolution where needed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline
from scipy.special import erf

from astep_dask.config import BackgroundSettings
from astep_dask.core.stats import IQR_TO_SIGMA, MEDIAN_ERROR

__all__ = [
    "Background",
    "clip_factor",
    "clipped_stats",
    "estimate_background",
    "evaluate_mesh",
    "fill_missing",
    "mesh_background",
    "mesh_blocks",
    "mesh_edges",
    "plane_slopes",
    "source_mask",
]


@dataclass(frozen=True)
class Background:
    """A background model on a mesh grid; :meth:`level` and :meth:`rms` give full frames.

    Attributes
    ----------
    shape : tuple of int
        Shape of the frame the model describes.
    edges_y, edges_x : ndarray
        Mesh boundaries (pixel indices, first 0, last the frame size).
    mesh_level, mesh_rms, mesh_error : ndarray
        Per mesh: sky level, pixel rms about it, and the uncertainty of the level.
    n_valid : ndarray
        Per mesh: pixels that entered the final statistics.
    """

    shape: tuple[int, int]
    edges_y: np.ndarray
    edges_x: np.ndarray
    mesh_level: np.ndarray
    mesh_rms: np.ndarray
    mesh_error: np.ndarray
    n_valid: np.ndarray

    def level(self) -> np.ndarray:
        """Full-resolution background level (float32)."""
        return evaluate_mesh(self.mesh_level, self.edges_y, self.edges_x)

    def rms(self) -> np.ndarray:
        """Full-resolution pixel noise of the sky (float32)."""
        return np.maximum(evaluate_mesh(self.mesh_rms, self.edges_y, self.edges_x), 0)

    def error(self) -> np.ndarray:
        """Full-resolution uncertainty of :meth:`level` (float32): its variance is what
        subtracting the model adds to each pixel's variance."""
        return np.maximum(evaluate_mesh(self.mesh_error, self.edges_y, self.edges_x), 0)

    @property
    def median_level(self) -> float:
        """Median of the mesh levels."""
        return float(np.median(self.mesh_level))

    @property
    def median_rms(self) -> float:
        """Median of the mesh rms values."""
        return float(np.median(self.mesh_rms))


def mesh_edges(n: int, mesh: int) -> np.ndarray:
    """Boundaries that split ``n`` pixels into ``round(n / mesh)`` (at least 1) near-equal
    meshes."""
    k = max(1, round(n / max(mesh, 1)))
    return np.linspace(0, n, k + 1).round().astype(np.int64)


def mesh_blocks(image: np.ndarray, usable: np.ndarray, edges_y: np.ndarray,
                edges_x: np.ndarray) -> np.ndarray:
    """Pixels of every mesh as an array ``(my, mx, npix)``, NaN where not usable or where a
    mesh is smaller than the largest one."""
    ny, nx = image.shape
    padded = np.full((ny + 1, nx + 1), np.nan, np.float32)
    padded[:ny, :nx] = np.where(usable, image, np.nan)

    def index(edges: np.ndarray, pad: int) -> np.ndarray:
        sizes = np.diff(edges)
        idx = np.full((sizes.size, int(sizes.max())), pad, np.int64)
        for i, (a, b) in enumerate(itertools.pairwise(edges)):
            idx[i, : b - a] = np.arange(a, b)
        return idx

    iy, ix = index(edges_y, ny), index(edges_x, nx)
    blocks = padded[iy[:, None, :, None], ix[None, :, None, :]]
    return blocks.reshape(iy.shape[0], ix.shape[0], -1)


def clipped_stats(values: np.ndarray, sigma: float = 3.0, iterations: int = 5
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sigma-clipped median, standard deviation and count along the last axis (NaN = absent).

    Each iteration keeps the values within ``sigma`` robust sigmas of the median of the
    survivors, the robust sigma being their interquartile range / 1.349. The values are
    sorted once, so the survivors of each row are a contiguous run of the sorted row and
    every statistic is an index look-up (about 30 times faster than NaN-masked medians on
    a 4k² frame). Returns the survivors' median (insensitive to the faint sources the
    clipping keeps), their standard deviation corrected for the clipping (the pixel noise,
    as the sigma of a Gaussian) and their number.
    """
    s = np.sort(np.asarray(values, dtype=np.float32), axis=-1)  # NaN sort last
    n_valid = np.sum(np.isfinite(s), axis=-1)
    lo = np.zeros_like(n_valid)
    hi = n_valid.copy()

    def at(frac: float) -> np.ndarray:
        count = np.maximum(hi - lo, 1)
        idx = np.minimum(lo + np.floor(frac * (count - 1) + 0.5).astype(np.int64),
                         s.shape[-1] - 1)
        return np.take_along_axis(s, idx[..., None], axis=-1)[..., 0]

    def median() -> np.ndarray:
        count = np.maximum(hi - lo, 1)
        a = np.take_along_axis(s, np.minimum(lo + (count - 1) // 2, s.shape[-1] - 1)[..., None],
                               axis=-1)[..., 0]
        b = np.take_along_axis(s, np.minimum(lo + count // 2, s.shape[-1] - 1)[..., None],
                               axis=-1)[..., 0]
        return 0.5 * (a + b)

    with np.errstate(invalid="ignore"):
        for _ in range(iterations):
            centre = median()
            scale = (at(0.75) - at(0.25)) / IQR_TO_SIGMA
            new_lo = np.maximum(lo, np.sum(s < (centre - sigma * scale)[..., None], axis=-1))
            new_hi = np.minimum(hi, np.sum(s <= (centre + sigma * scale)[..., None], axis=-1))
            new_hi = np.maximum(new_hi, new_lo)
            if np.array_equal(new_lo, lo) and np.array_equal(new_hi, hi):
                break
            lo, hi = new_lo, new_hi
        n = hi - lo
        centre = np.where(n > 0, median(), np.nan)
        idx = np.arange(s.shape[-1])
        keep = (idx >= lo[..., None]) & (idx < hi[..., None])
        std = np.sqrt(np.sum(np.where(keep, (s - centre[..., None]) ** 2, 0), axis=-1)
                      / np.maximum(n - 1, 1))
        std = np.where(n > 1, std / clip_factor(sigma), np.nan)
    return centre.astype(np.float32), std.astype(np.float32), n


def clip_factor(k: float) -> float:
    """Standard deviation of a unit Gaussian truncated at ±k (0.9866 for k = 3)."""
    inside = erf(k / np.sqrt(2.0))
    density = np.exp(-0.5 * k * k) / np.sqrt(2.0 * np.pi)
    return float(np.sqrt(1.0 - 2.0 * k * density / inside))


def fill_missing(grid: np.ndarray) -> np.ndarray:
    """Replace NaN cells of a mesh grid by their nearest finite neighbour."""
    bad = ~np.isfinite(grid)
    if not bad.any():
        return grid
    if bad.all():
        return np.zeros_like(grid)
    idx = ndimage.distance_transform_edt(bad, return_distances=False, return_indices=True)
    return grid[tuple(idx)]


def evaluate_mesh(grid: np.ndarray, edges_y: np.ndarray, edges_x: np.ndarray) -> np.ndarray:
    """Bicubic spline through the mesh centres, evaluated at every pixel (float32).

    The grid is extended by one cell on each side, half a mesh beyond the frame, with
    the slope of a plane fitted to the whole grid: the outer half-meshes follow a
    large-scale gradient without the noise of a two-cell extrapolation. Fewer than four
    cells along an axis lower the spline degree on that axis.
    """
    cy = (edges_y[:-1] + edges_y[1:] - 1) / 2.0
    cx = (edges_x[:-1] + edges_x[1:] - 1) / 2.0
    g = np.asarray(grid, np.float64)
    slope_y, slope_x = plane_slopes(g, cy, cx)
    cy, g = _extend(cy, g, slope_y, axis=0)
    cx, g = _extend(cx, g, slope_x, axis=1)
    ky, kx = min(3, cy.size - 1), min(3, cx.size - 1)
    spline = RectBivariateSpline(cy, cx, g, kx=kx, ky=ky, s=0)
    ys = np.arange(edges_y[-1], dtype=np.float64)
    xs = np.arange(edges_x[-1], dtype=np.float64)
    return spline(ys, xs).astype(np.float32)


def plane_slopes(grid: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> tuple[float, float]:
    """Slopes (per pixel, along y and x) of the least-squares plane through a mesh grid."""
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    cols = [np.ones(grid.size)]
    if cy.size > 1:
        cols.append(yy.ravel() - cy.mean())
    if cx.size > 1:
        cols.append(xx.ravel() - cx.mean())
    coef = np.linalg.lstsq(np.column_stack(cols), grid.ravel(), rcond=None)[0]
    slope_y = float(coef[1]) if cy.size > 1 else 0.0
    slope_x = float(coef[-1]) if cx.size > 1 else 0.0
    return slope_y, slope_x


def _extend(centres: np.ndarray, grid: np.ndarray, slope: float, axis: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Add a cell half a mesh beyond each end of ``axis``, following ``slope``."""
    n = centres.size
    step_first = (centres[1] - centres[0]) if n > 1 else centres[0] + 0.5
    step_last = (centres[-1] - centres[-2]) if n > 1 else centres[0] + 0.5
    before = np.take(grid, [0], axis=axis) - slope * step_first
    after = np.take(grid, [n - 1], axis=axis) + slope * step_last
    pos = np.concatenate([[centres[0] - step_first], centres, [centres[-1] + step_last]])
    return pos, np.concatenate([before, grid, after], axis=axis)


def mesh_background(image: np.ndarray, usable: np.ndarray, settings: BackgroundSettings
                    ) -> Background:
    """One pass of the mesh estimate over the ``usable`` pixels of ``image``."""
    ny, nx = image.shape
    ey, ex = mesh_edges(ny, settings.mesh), mesh_edges(nx, settings.mesh)
    blocks = mesh_blocks(image, usable, ey, ex)
    level, std, n = clipped_stats(blocks, settings.sigma, settings.iterations)
    sizes = np.outer(np.diff(ey), np.diff(ex))
    poor = (n < settings.min_valid * sizes) | (n < 3)
    level = np.where(poor, np.nan, level)
    std = np.where(poor, np.nan, std)
    level, std = fill_missing(level), fill_missing(std)
    if settings.filter_size > 1 and min(level.shape) >= settings.filter_size:
        level = ndimage.median_filter(level, settings.filter_size, mode="nearest")
        std = ndimage.median_filter(std, settings.filter_size, mode="nearest")
    error = MEDIAN_ERROR * std / np.sqrt(np.maximum(n, 1))
    return Background(shape=(ny, nx), edges_y=ey, edges_x=ex,
                      mesh_level=level.astype(np.float32), mesh_rms=std.astype(np.float32),
                      mesh_error=error.astype(np.float32), n_valid=n.astype(np.int32))


def source_mask(residual: np.ndarray, rms: np.ndarray, usable: np.ndarray,
                settings: BackgroundSettings) -> np.ndarray:
    """Pixels belonging to sources in a background-subtracted image.

    The residual (0 where not usable) is smoothed by a Gaussian of ``source_smooth`` px;
    a pixel is a source pixel when the smoothed value exceeds ``source_sigma`` times the
    noise of the smoothed image (the pixel rms times the kernel's root sum of squares);
    source pixels are then grown by a disk of radius ``source_grow``.
    """
    data = np.where(usable, residual, 0).astype(np.float32)
    s = settings.source_smooth
    smooth = ndimage.gaussian_filter(data, s, mode="nearest")
    impulse = np.zeros((int(8 * s) + 1,) * 2)
    impulse[impulse.shape[0] // 2, impulse.shape[1] // 2] = 1
    kernel_norm = float(np.sqrt(np.sum(ndimage.gaussian_filter(impulse, s) ** 2)))
    hits = usable & (smooth > settings.source_sigma * kernel_norm * rms)
    r = settings.source_grow
    if r > 0 and hits.any():
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        hits = ndimage.binary_dilation(hits, structure=(xx**2 + yy**2) <= r * r)
    return hits


def estimate_background(image: np.ndarray, mask: np.ndarray | None = None,
                        settings: BackgroundSettings | None = None) -> Background:
    """Robust smooth background of a frame.

    Parameters
    ----------
    image : ndarray
        The frame (any units; NaN allowed).
    mask : ndarray, optional
        Pixels to ignore: boolean, or integer bit flags (any non-zero value is ignored).
    settings : BackgroundSettings, optional
        Mesh size, clipping and source exclusion.

    Returns
    -------
    Background
        The model on its mesh grid; ``.level()``, ``.rms()``, ``.error()`` at full size.
    """
    settings = settings or BackgroundSettings()
    usable = np.isfinite(image)
    if mask is not None:
        usable &= np.asarray(mask) == 0
    bkg = mesh_background(image, usable, settings)
    for _ in range(settings.source_passes):
        sources = source_mask(image - bkg.level(), bkg.rms(), usable, settings)
        bkg = mesh_background(image, usable & ~sources, settings)
    return bkg
