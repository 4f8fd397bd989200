"""Illumination correction from the night's own sky (a "night-sky flat"): numpy in, numpy out.

Twilight flats carry the twilight sky's own large-scale gradient, which the flat recipe
cannot tell from the telescope's response. The night's science sky, flat-fielded with that
flat, shows the same error inverted: a perfectly flat sky comes out as ``1 / I`` where
``I`` is the flat's illumination error. So:

1. :func:`sky_grid`: each flat-fielded science frame (a sample of its rows) is reduced to a
   coarse grid of block sky levels, stars excluded (detected against a first local sky
   and grown), masked pixels excluded, divided by the frame's own sky level;
2. :func:`screen_frames`: frames whose sky level is far off the night's (clouds, dawn),
   whose own gradient is far off the others' (moon, dawn) or whose sky has structure
   the others lack (clouds) are rejected, each with its reason;
3. :func:`combine_grids`: each kept frame's own gradient is replaced by the night's
   consensus (the median gradient), so no single frame pulls the plane, and the grids are
   combined per block by a clipped mean;
4. :func:`fit_surface`: the combined grid is reduced to a smooth surface (a low-order 2-D
   polynomial, or a heavy Gaussian smoothing) evaluated at every pixel;
5. :func:`illumination_correction` puts it together: the correction ``C = 1 / surface``,
   scaled so that ``flat / C`` has median 1 over good pixels. The master flat is divided
   by it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from astep_dask.config import IllumSettings
from astep_dask.core.stats import MAD_TO_SIGMA

__all__ = [
    "IllumResult",
    "SkyGrid",
    "block_edges",
    "combine_grids",
    "fit_surface",
    "grid_planes",
    "illumination_correction",
    "screen_frames",
    "sky_grid",
    "transfer_correction",
]


@dataclass(frozen=True)
class SkyGrid:
    """One frame's sky as a coarse grid of blocks.

    ``grid`` is each block's star-free sky divided by the frame's ``level`` (the median of
    the blocks, e-), NaN where too few pixels were usable; ``count`` the pixels used per
    block; ``noise`` the robust per-pixel noise (e-).
    """

    grid: np.ndarray
    count: np.ndarray
    level: float
    noise: float


def block_edges(n: int, block: int) -> np.ndarray:
    """Edges of about ``n / block`` (at least one) nearly equal blocks along an axis."""
    nb = max(1, round(n / max(block, 1)))
    return np.linspace(0, n, nb + 1).round().astype(int)


def _block_sum(values: np.ndarray, ry: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """Sums over blocks: rows start at indices ``ry`` (of the sampled rows), columns at
    ``ex`` (the last edge excluded). Empty row ranges give zero sums."""
    out = np.zeros((len(ry) - 1, len(ex) - 1))
    for k in range(len(ry) - 1):
        if ry[k + 1] > ry[k]:
            rows = values[ry[k]:ry[k + 1]].sum(axis=0, dtype=np.float64)
            out[k] = np.add.reduceat(rows, ex[:-1])
    return out


def sky_grid(image: np.ndarray, bad: np.ndarray, rows: np.ndarray, shape: tuple[int, int],
             settings: IllumSettings) -> SkyGrid:
    """The star-free sky of one flat-fielded frame on the block grid.

    Parameters
    ----------
    image
        Flat-fielded sky, e-, of the sampled rows ``rows`` of a frame of ``shape``
        (``image.shape == (len(rows), shape[1])``).
    bad
        Pixels to leave out (masked, saturated, no data), same shape as ``image``.
    rows
        The frame rows ``image`` holds (increasing).
    shape
        The whole frame's ``(ny, nx)``.
    settings
        Block size, star detection and growth, the usable fraction of a block.
    """
    ny, nx = shape
    ey, ex = block_edges(ny, settings.block), block_edges(nx, settings.block)
    ry = np.searchsorted(rows, ey)
    good = ~bad & np.isfinite(image)
    vals = np.where(good, image, 0).astype(np.float32)
    sample = image[good][:: max(1, int(good.sum()) // 200_000)]
    if sample.size < 10:
        empty = np.full((len(ey) - 1, len(ex) - 1), np.nan)
        return SkyGrid(empty, np.zeros_like(empty), float("nan"), float("nan"))
    centre = float(np.median(sample))
    # The noise from the lower half of the distribution: stars only lift the upper half.
    noise = float(centre - np.percentile(sample, 15.8655)) or 1.0
    k = settings.star_sigma
    # First local sky: a clipped block mean around the frame's median.
    use = good & (np.abs(image - centre) < k * noise)
    first = _block_sum(np.where(use, vals, 0), ry, ex) / np.maximum(
        _block_sum(use.astype(np.float32), ry, ex), 1)
    iy = np.clip(np.searchsorted(ey, rows, side="right") - 1, 0, len(ey) - 2)
    ix = np.clip(np.searchsorted(ex, np.arange(nx), side="right") - 1, 0, len(ex) - 2)
    resid = image - first[np.ix_(iy, ix)].astype(np.float32)
    resid[~good] = 0
    # Stars (and cosmic rays): high on a 5-pixel row average, or high by themselves;
    # grown by ``star_grow`` px in both axes (the rows read are ``step`` px apart).
    smooth = ndimage.uniform_filter1d(resid, 5, axis=1)
    star = (resid > k * noise) | (smooth > k * noise / np.sqrt(5))
    step = max(1, int(np.median(np.diff(rows)))) if len(rows) > 1 else 1
    gy = int(np.ceil(settings.star_grow / step))
    star = ndimage.maximum_filter(star, size=(2 * gy + 1, 2 * settings.star_grow + 1))
    keep = good & ~star & (resid > -2 * k * noise)
    count = _block_sum(keep.astype(np.float32), ry, ex)
    total = _block_sum(np.ones_like(keep, np.float32), ry, ex)
    with np.errstate(invalid="ignore", divide="ignore"):
        sky = _block_sum(np.where(keep, vals, 0), ry, ex) / count
    sky[(count < settings.min_block_fraction * total) | (count == 0)] = np.nan
    if not np.isfinite(sky).any():
        return SkyGrid(sky, count, float("nan"), noise)
    level = float(np.nanmedian(sky))
    return SkyGrid(sky / level, count, level, noise)


def _unit_coords(edges: np.ndarray) -> np.ndarray:
    """Block centres scaled to [-1, 1] over the frame."""
    n = edges[-1]
    centres = 0.5 * (edges[:-1] + edges[1:]) - 0.5
    return 2 * centres / max(n - 1, 1) - 1


def _design(y: np.ndarray, x: np.ndarray, order: int) -> np.ndarray:
    """Columns ``x^i y^j`` (i + j <= order) of a 2-D polynomial at points (y, x)."""
    return np.stack([x**i * y**j for i in range(order + 1) for j in range(order + 1 - i)],
                    axis=-1)


def grid_planes(grids: np.ndarray, ey: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """Least-squares plane ``a + b x + c y`` of each grid (x, y in [-1, 1] across the
    frame), as ``(n, 3)``: a, b, c. Grids with fewer than 3 finite blocks give NaN."""
    yc, xc = np.meshgrid(_unit_coords(ey), _unit_coords(ex), indexing="ij")
    a = _design(yc.ravel(), xc.ravel(), 1)  # 1, y, x
    out = np.full((len(grids), 3), np.nan)
    for i, g in enumerate(grids):
        ok = np.isfinite(g.ravel())
        if ok.sum() >= 3:
            c = np.linalg.lstsq(a[ok], g.ravel()[ok], rcond=None)[0]
            out[i] = c[0], c[2], c[1]
    return out


def screen_frames(grids: np.ndarray, levels: np.ndarray, exptimes: np.ndarray,
                  ey: np.ndarray, ex: np.ndarray,
                  settings: IllumSettings) -> list[str | None]:
    """Why each frame is left out of the correction (None: kept).

    A frame is rejected when it has no usable grid; when its sky rate is more than
    ``sky_ratio`` times off the night's median (clouds, twilight); when its own gradient
    (the plane of its grid, peak to peak across the field) is off the night's median
    gradient by more than ``gradient_sigma`` robust sigmas and ``gradient_floor`` (moon,
    dawn); when its grid's scatter about the others, its own plane removed, is more than
    ``structure_factor`` times the night's median scatter (clouds).
    """
    n = len(grids)
    why: list[str | None] = [None] * n
    for i in range(n):
        if not np.isfinite(levels[i]) or levels[i] <= 0 or not np.isfinite(grids[i]).any():
            why[i] = "no usable sky"
    rate = np.asarray(levels, float) / np.maximum(np.asarray(exptimes, float), 1e-3)
    ok = [i for i in range(n) if why[i] is None]
    if ok:
        med = np.median(rate[ok])
        for i in ok:
            r = rate[i] / med
            if max(r, 1 / r) > settings.sky_ratio:
                why[i] = f"sky level {r:.2f}x the night's median (clouds, twilight)"
    planes = grid_planes(grids, ey, ex)
    ok = [i for i in range(n) if why[i] is None and np.isfinite(planes[i]).all()]
    if len(ok) >= 3:
        slope = planes[ok, 1:]
        dev = np.hypot(*(slope - np.median(slope, axis=0)).T) * 2  # peak to peak, fraction
        scale = MAD_TO_SIGMA * np.median(dev)
        limit = max(settings.gradient_sigma * scale, settings.gradient_floor)
        for i, d in zip(ok, dev, strict=True):
            if d > limit:
                why[i] = f"own sky gradient {100 * d:.2f} % off the night's (moon, dawn)"
    ok = [i for i in range(n) if why[i] is None]
    if len(ok) >= 3:
        flat = _remove_own_planes(grids[ok], planes[ok], ey, ex)
        ref = np.nanmedian(flat, axis=0)
        rms = np.sqrt(np.nanmean((flat - ref) ** 2, axis=(1, 2)))
        limit = settings.structure_factor * np.median(rms)
        for i, r in zip(ok, rms, strict=True):
            if r > limit:
                why[i] = f"sky structure {100 * r:.2f} % rms (clouds)"
    return why


def _remove_own_planes(grids: np.ndarray, planes: np.ndarray, ey: np.ndarray,
                       ex: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Grids with each one's own gradient replaced by ``keep`` (b, c; zero when None)."""
    yc, xc = _unit_coords(ey), _unit_coords(ex)
    b = planes[:, 1] - (keep[0] if keep is not None else 0)
    c = planes[:, 2] - (keep[1] if keep is not None else 0)
    return grids - b[:, None, None] * xc[None, None, :] - c[:, None, None] * yc[None, :, None]


def combine_grids(grids: np.ndarray, ey: np.ndarray, ex: np.ndarray,
                  settings: IllumSettings) -> tuple[np.ndarray, np.ndarray]:
    """The night's sky pattern from the kept frames' grids.

    Each frame's own gradient is replaced by the median gradient of all of them (a frame
    lit by the moon adds its higher-order shape only), then every block is a clipped mean
    (``clip_sigma`` robust sigmas around the median) over the frames.

    Returns
    -------
    grid, error
        The combined grid (NaN where no frame had the block) and the standard error of
        each block.
    """
    planes = grid_planes(grids, ey, ex)
    consensus = np.nanmedian(planes[:, 1:], axis=0)
    g = _remove_own_planes(grids, planes, ey, ex, consensus)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(g, axis=0)
        sig = MAD_TO_SIGMA * np.nanmedian(np.abs(g - med), axis=0)
        use = np.abs(g - med) <= settings.clip_sigma * np.where(sig > 0, sig, np.inf)
        use &= np.isfinite(g)
        n = use.sum(axis=0)
        mean = np.where(use, g, 0).sum(axis=0) / np.where(n > 0, n, np.nan)
        std = np.sqrt(np.where(use, (g - mean) ** 2, 0).sum(axis=0) / np.maximum(n - 1, 1))
    return mean, std / np.sqrt(np.maximum(n, 1))


def fit_surface(grid: np.ndarray, error: np.ndarray, ey: np.ndarray, ex: np.ndarray,
                settings: IllumSettings) -> tuple[np.ndarray, np.ndarray]:
    """A smooth surface through the combined grid, at every pixel and at the blocks.

    ``method = "poly"``: weighted least-squares 2-D polynomial of total degree ``order``;
    ``"smooth"``: a Gaussian smoothing of the grid (σ ``smooth_blocks`` blocks, NaN blocks
    filled by normalised convolution), interpolated bilinearly to every pixel.

    Returns
    -------
    image, at_blocks
        ``(ny, nx)`` float32 and the surface at the block centres.
    """
    ny, nx = int(ey[-1]), int(ex[-1])
    ok = np.isfinite(grid) & np.isfinite(error)
    if settings.method == "poly":
        yc, xc = np.meshgrid(_unit_coords(ey), _unit_coords(ex), indexing="ij")
        a = _design(yc[ok], xc[ok], settings.order)
        floor = np.median(error[ok][error[ok] > 0]) if (error[ok] > 0).any() else 1.0
        w = 1 / np.maximum(error[ok], 0.1 * floor)
        coef = np.linalg.lstsq(a * w[:, None], grid[ok] * w, rcond=None)[0]
        at_blocks = _design(yc, xc, settings.order) @ coef
        ypix = 2 * np.arange(ny) / max(ny - 1, 1) - 1
        xpix = 2 * np.arange(nx) / max(nx - 1, 1) - 1
        image = np.zeros((ny, nx), np.float64)
        terms = [(i, j) for i in range(settings.order + 1)
                 for j in range(settings.order + 1 - i)]
        for c, (i, j) in zip(coef, terms, strict=True):
            image += c * np.outer(ypix**j, xpix**i)
        return image.astype(np.float32), at_blocks
    s = settings.smooth_blocks
    filled = ndimage.gaussian_filter(np.where(ok, grid, 0), s, mode="nearest")
    weight = ndimage.gaussian_filter(ok.astype(float), s, mode="nearest")
    with np.errstate(invalid="ignore", divide="ignore"):
        at_blocks = filled / weight
    cy = 0.5 * (ey[:-1] + ey[1:]) - 0.5
    cx = 0.5 * (ex[:-1] + ex[1:]) - 0.5
    py = np.interp(np.arange(ny), cy, np.arange(len(cy)))
    px = np.interp(np.arange(nx), cx, np.arange(len(cx)))
    yy, xx = np.meshgrid(py, px, indexing="ij", sparse=True)
    image = ndimage.map_coordinates(at_blocks, [np.broadcast_to(yy, (ny, nx)),
                                                np.broadcast_to(xx, (ny, nx))],
                                    order=1, mode="nearest")
    return image.astype(np.float32), at_blocks


@dataclass
class IllumResult:
    """An illumination correction and how it was made."""

    correction: np.ndarray | None  # divide the master flat by it; None: too few frames
    grid: np.ndarray | None = None  # combined sky pattern (1 / correction, blocks)
    model: np.ndarray | None = None  # fitted surface at the blocks
    reasons: list[str | None] = field(default_factory=list)  # per frame, None: used
    n_used: int = 0
    amplitude: float = float("nan")  # peak to peak of the correction over good pixels
    residual: float = float("nan")  # rms of grid - model over blocks (fraction)
    noise: float = float("nan")  # median standard error of a block (fraction)
    why: str = ""  # with correction None although enough frames passed: why none was made


def illumination_correction(grids: np.ndarray, levels: np.ndarray, exptimes: np.ndarray,
                            shape: tuple[int, int], flat: np.ndarray, good: np.ndarray,
                            settings: IllumSettings) -> IllumResult:
    """The correction by which the master ``flat`` is divided, from the frames' sky grids
    (:func:`sky_grid`), or ``correction=None`` when fewer than ``min_frames`` frames pass
    :func:`screen_frames`.

    The correction is ``1 / surface`` (:func:`fit_surface`), scaled so that
    ``flat / correction`` has median 1 over ``good`` pixels.
    """
    ey, ex = block_edges(shape[0], settings.block), block_edges(shape[1], settings.block)
    reasons = screen_frames(grids, levels, exptimes, ey, ex, settings)
    used = [i for i, r in enumerate(reasons) if r is None]
    if len(used) < settings.min_frames:
        return IllumResult(None, reasons=reasons, n_used=len(used))
    grid, error = combine_grids(grids[used], ey, ex, settings)
    blocks = int(np.isfinite(grid).sum())
    need = max(4, (settings.order + 1) * (settings.order + 2) // 2 + 1)
    if blocks < need:  # a detector smaller than a few blocks, or a sky masked everywhere
        return IllumResult(None, reasons=reasons, n_used=len(used),
                           why=f"{blocks} usable sky blocks of {settings.block} px, need "
                               f"{need} (a smaller [illum] block fits a small detector)")
    norm = np.nanmedian(grid)
    grid, error = grid / norm, error / norm
    surface, at_blocks = fit_surface(grid, error, ey, ex, settings)
    correction = np.reciprocal(surface, dtype=np.float32)
    sel = good & np.isfinite(flat) & (flat > 0)
    ratio = flat[sel] / correction[sel]
    correction *= np.float32(np.median(ratio))
    values = correction[sel]
    lo, hi = np.percentile(values, [0.5, 99.5])
    return IllumResult(
        correction=correction, grid=grid, model=at_blocks, reasons=reasons, n_used=len(used),
        amplitude=float((hi - lo) / np.median(values)),
        residual=float(np.sqrt(np.nanmean((grid - at_blocks) ** 2))),
        noise=float(np.nanmedian(error)),
    )


def transfer_correction(correction: np.ndarray, flat_from: np.ndarray, flat_to: np.ndarray,
                        good: np.ndarray, settings: IllumSettings) -> np.ndarray:
    """Another night's correction made to fit this night's flat.

    ``correction`` corrects ``flat_from`` (its night's master flat). Each night's twilight
    gradient is its own, the telescope's response is not: the large-scale ratio
    ``flat_to / flat_from`` (block means over ``good`` pixels, fitted like the sky grid by
    :func:`fit_surface`) is the difference of the two nights' twilight errors, so
    ``correction × ratio`` corrects ``flat_to``. Scaled so that ``flat_to / result`` has
    median 1 over ``good`` pixels.
    """
    ny, nx = flat_to.shape
    ey, ex = block_edges(ny, settings.block), block_edges(nx, settings.block)
    rows = np.arange(ny)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = flat_to / flat_from
    ok = good & np.isfinite(ratio) & (flat_from > 0)
    r = np.where(ok, ratio, 0).astype(np.float64)
    n = _block_sum(ok.astype(np.float32), np.searchsorted(rows, ey), ex)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = _block_sum(r, np.searchsorted(rows, ey), ex) / n
        var = _block_sum(r * r, np.searchsorted(rows, ey), ex) / n - mean**2
        err = np.sqrt(np.maximum(var, 0) / np.maximum(n - 1, 1))
    mean[n < settings.min_block_fraction * np.diff(ey)[:, None] * np.diff(ex)[None, :]] = np.nan
    norm = np.nanmedian(mean)
    surface, _ = fit_surface(mean / norm, err / norm, ey, ex, settings)
    out = (correction * surface).astype(np.float32)
    sel = good & np.isfinite(flat_to) & (flat_to > 0) & (out > 0)
    out *= np.float32(np.median(flat_to[sel] / out[sel]))
    return out
