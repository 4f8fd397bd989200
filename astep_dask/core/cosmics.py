"""Cosmic rays of a calibrated frame: astroscrappy (LA Cosmic) where it can find some.

:func:`find_cosmics` looks for candidate pixels (far above a 3×3 smoothed sky, sharper
than a star of the frame's PSF can be), runs astroscrappy only on small windows around
groups of them (with a context margin that makes the result equal to the whole frame's),
fills bad pixels before (astroscrappy never flags a cosmic ray touching an ``inmask``
pixel) and gives back to the stars the pixels it took from them
(:func:`astep_dask.core.starfilter.unflag_stars`). While astroscrappy runs, its OpenMP
threads are limited per calling thread through threadpoolctl (:func:`limit_openmp`).

A pixel flagged in frame after frame is no cosmic ray but a warm pixel the bad-pixel mask
missed: :func:`warm_pixels` finds those in the flags of a sample of a night's frames.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext

import astroscrappy
import numpy as np
from scipy import ndimage
from scipy.stats import binom
from threadpoolctl import ThreadpoolController

from astep_dask.config import CosmicSettings
from astep_dask.core.bits import UNUSABLE, Bit, flag
from astep_dask.core.psf import (
    psf_sigma,
    sky_level,
)
from astep_dask.core.starfilter import unflag_stars
from astep_dask.core.stats import nonzero2d

__all__ = [
    "candidate_pixels",
    "fill_masked",
    "fill_values",
    "find_cosmics",
    "limit_openmp",
    "search_windows",
    "star_sharpness",
    "warm_pixels",
    "warm_threshold",
]


EDGE_PAD = 8  # pixels mirrored around a frame before cosmic-ray detection
MIN_WINDOW = 16  # px: smaller arrays given to astroscrappy are mirrored to this size
MOSAIC_WIDTH = 256  # px: windows are prepared side by side in a mosaic this wide
BRIGHT_FILL = np.float32(1e30)  # stands for saturated pixels when looking for candidates


def fill_masked(image: np.ndarray, bad: np.ndarray, half: int = 2) -> np.ndarray:
    """Copy of ``image`` with ``bad`` pixels replaced by the median of their good
    neighbours in a (2·half+1)² box (the global median where a box has none).

    Non-finite pixels do not count as good neighbours (see :func:`fill_values`).
    """
    out = image.copy()
    ys, xs = nonzero2d(bad)
    if ys.size:
        out[ys, xs] = fill_values(image, bad, ys, xs, half)
    return out


def fill_values(image: np.ndarray, bad: np.ndarray, ys: np.ndarray, xs: np.ndarray,
                half: int = 2) -> np.ndarray:
    """The values :func:`fill_masked` gives the pixels ``(ys, xs)``: the median of the
    good (not ``bad``, finite) pixels of the (2·half+1)² box around each, the median of
    all good pixels where a box has none.

    The boxes are sorted with the pixels that do not count pushed to their end, and each
    median is read off the sorted box from its own count of good pixels: the same values
    as ``np.nanmedian``, without its slow path for many small rows.
    """
    ny, nx = image.shape
    offsets = np.arange(-half, half + 1)
    yy = np.clip(ys[:, None, None] + offsets[None, :, None], 0, ny - 1)
    xx = np.clip(xs[:, None, None] + offsets[None, None, :], 0, nx - 1)
    values = image[yy, xx].reshape(ys.size, -1)
    good = ~bad[yy, xx].reshape(ys.size, -1) & np.isfinite(values)
    values = np.sort(np.where(good, values, np.inf), axis=1)
    n = good.sum(axis=1)
    rows = np.arange(ys.size)
    fill = (values[rows, np.maximum((n - 1) // 2, 0)] + values[rows, n // 2]) / 2
    if (n == 0).any():  # a box without any good pixel
        usable = ~bad & np.isfinite(image)
        fill[n == 0] = np.median(image[usable]) if usable.any() else 0.0
    return fill


def limit_openmp(threads: int) -> AbstractContextManager[object]:
    """A context in which astroscrappy's OpenMP loops use at most ``threads`` threads in
    the calling thread (0: leave them alone); leaving it restores the previous limit.

    astroscrappy parallelises each median filter with OpenMP, by default over all cores.
    On the small windows of :func:`find_cosmics` a parallel region costs more to start
    than its work, and on a machine whose cores are busy (dask workers, other jobs) the
    waiting threads spin: the same frame took 0.5 s or 4 s of wall time with the default
    threads, 0.5 s every time with one. The pipeline parallelises over frames instead.

    Parameters
    ----------
    threads : int
        The most OpenMP threads per calling thread; 0 or less for OpenMP's own default.

    Returns
    -------
    contextlib.AbstractContextManager
        Sets the limit when made, restores the previous one on exit.
    """
    if threads <= 0:
        return nullcontext()
    # Only the OpenMP runtimes: on exit threadpoolctl sets back the limit of every library
    # its controller holds, and OpenBLAS built with pthreads has one pool for the whole
    # process, which the other threads of a dask worker use meanwhile.
    controller = ThreadpoolController().select(user_api="openmp")
    return controller.limit(limits=threads, user_api="openmp")


def find_cosmics(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray, settings: CosmicSettings,
    read_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic-ray pixels of a calibrated frame (electrons, sky included) with astroscrappy.

    With ``settings.tile > 0`` astroscrappy runs only on small windows around groups of
    candidate pixels (see :func:`candidate_pixels` and :func:`search_windows`): its median
    filters cost the same on every pixel, and most of a frame is clean sky and stars.
    The frame's PSF width, measured once (:func:`astep_dask.core.psf.psf_sigma`), serves
    the candidates and :func:`unflag_stars`. With ``tile = 0``
    astroscrappy runs on the whole frame. Either way each window is prepared alike
    (:func:`_detect`): unusable pixels are filled from their neighbours rather than passed
    as ``inmask`` (astroscrappy grows an input mask and then misses cosmic rays touching
    it), saturated pixels are set above a ``satlevel`` that no other pixel of the window
    reaches (astroscrappy then protects saturated stars as it is designed to), and frame
    edges are mirrored over ``EDGE_PAD`` pixels (its median filters otherwise miss most
    cosmic rays within a few pixels of the edges).

    Returns the CR mask and a copy of ``sci`` in which the flagged pixels hold
    astroscrappy's cleaned values.
    """
    ny, nx = sci.shape
    pad = EDGE_PAD if min(sci.shape) > 2 * EDGE_PAD else 0
    usable = (mask & UNUSABLE) == 0
    sigma = None
    if settings.tile <= 0:
        boxes = [((0, ny, 0, nx), (-pad, ny + pad, -pad, nx + pad))]
    else:
        sigma = psf_sigma(sci, var, usable)
        ys, xs = candidate_pixels(sci, var, mask, settings, sigma, usable)
        boxes = search_windows(ys, xs, sci.shape, settings, pad)
    if boxes:
        with limit_openmp(settings.openmp_threads):
            index, cleaned = _detect(sci, var, mask, boxes, settings, read_noise)
    else:
        index, cleaned = np.zeros(0, np.int64), np.zeros(0, np.float32)
    crmask = np.zeros(sci.shape, bool)
    crmask.flat[index] = True  # cores may overlap: a pixel can be found twice, alike
    if settings.protect_stars and index.size:
        # LA Cosmic flags cores of sharp stars (FWHM ~3 px): unflag what a PSF fit explains.
        crmask = unflag_stars(crmask, sci, var, usable, psf_sigma=sigma)
    clean = sci.copy()
    kept = crmask.flat[index]
    clean.flat[index[kept]] = cleaned[kept]
    return crmask, clean


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices up to ``n - 1`` past either end of ``0..n-1`` mirrored back into it (as
    ``np.pad(mode="reflect")``: the edge pixel is not repeated)."""
    index = np.abs(index)
    return np.where(index >= n, 2 * (n - 1) - index, index)


def _pack(heights: np.ndarray, widths: np.ndarray, width: int = 0
          ) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """Place rectangles side by side on shelves ``width`` wide (at least the widest
    rectangle), the tallest first, each shelf as tall as its first rectangle.

    Returns the rectangles' row and column offsets, the first row of each shelf followed
    by the mosaic's height, and the mosaic's width.
    """
    order = np.argsort(-heights, kind="stable")
    width = max(int(widths.max()), width if heights.size > 1 else 0)
    oy, ox = np.zeros(heights.size, np.int64), np.zeros(heights.size, np.int64)
    shelves, tall, x = [0], int(heights[order[0]]), 0
    for i, h, w in zip(order.tolist(), heights[order].tolist(), widths[order].tolist(),
                       strict=True):
        if x + w > width:  # a new shelf
            shelves.append(shelves[-1] + tall)
            tall, x = h, 0
        oy[i], ox[i] = shelves[-1], x
        x += w
    shelves.append(shelves[-1] + tall)
    return oy, ox, shelves, width


def _detect(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray,
    boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]],
    settings: CosmicSettings, read_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """astroscrappy on the windows of the frame, prepared together in one mosaic.

    ``boxes`` are ``(core, window)`` pairs (see :func:`search_windows`); a window may
    reach past the frame's edges by up to ``EDGE_PAD`` pixels, that part being the frame
    mirrored. The windows' pixels (a few hundred windows on a 2048² frame) are gathered
    in one step, rather than with a dozen small numpy calls per window that hold the GIL,
    unusable ones filled from their good neighbours in the frame, saturated ones set above
    a ``satlevel`` that no other pixel of their window reaches; then each window, a view
    of the mosaic, is given to astroscrappy on its own.

    Returns the flat frame indices of the usable core pixels astroscrappy flags and its
    cleaned values there (a pixel in two overlapping cores may appear twice, alike).
    """
    ny, nx = sci.shape
    cores = np.array([c for c, _ in boxes], np.int64)
    wins = np.array([w for _, w in boxes], np.int64)
    heights, widths = wins[:, 1] - wins[:, 0], wins[:, 3] - wins[:, 2]
    oy, ox, shelves, mx = _pack(heights, widths, MOSAIC_WIDTH)
    my = shelves[-1]
    # Frame row and column of every mosaic pixel (-1: between windows), and the frame
    # flat index of every core pixel (-1: not in a core).
    rows = np.full((my, mx), -1, np.int32)
    cols = np.full((my, mx), -1, np.int32)
    core_at = np.full((my, mx), -1, np.int32 if ny * nx < 2**31 else np.int64)
    window_at = np.full((my, mx), -1, np.int32)
    for i, ((y0, y1, x0, x1), (c0, c1, d0, d1), h, w, py, px) in enumerate(zip(
            wins.tolist(), cores.tolist(), heights.tolist(), widths.tolist(), oy.tolist(),
            ox.tolist(), strict=True)):
        window_at[py:py + h, px:px + w] = i
        rows[py:py + h, px:px + w] = _reflect(np.arange(y0, y1), ny)[:, None]
        cols[py:py + h, px:px + w] = _reflect(np.arange(x0, x1), nx)[None, :]
        ry, rx = py + c0 - y0, px + d0 - x0
        core_at[ry:ry + c1 - c0, rx:rx + d1 - d0] = (
            np.arange(c0, c1)[:, None] * nx + np.arange(d0, d1)[None, :])
    covered = rows >= 0
    r, c = np.where(covered, rows, 0), np.where(covered, cols, 0)
    bits = mask[r, c]
    bad = ((bits & UNUSABLE) != 0) & covered
    data = sci[r, c]
    variance = var[r, c]
    if bad.any():
        frame_bad = (mask & UNUSABLE) != 0
        by, bx = rows[bad], cols[bad]
        data[bad] = fill_values(sci, frame_bad, by, bx)
        variance[bad] = fill_values(var, frame_bad, by, bx)
    else:
        data = data.copy()
    hot = ((bits & flag(Bit.SAT)) != 0) & covered
    # Each window's satlevel from its own brightest usable pixel: the value given to the
    # saturated pixels changes what astroscrappy finds next to them.
    plain = covered & ~hot
    top = np.full(len(boxes), -np.inf)
    np.maximum.at(top, window_at[plain], data[plain])
    satlevel = np.where(np.isfinite(top), 2.0 * np.abs(top) + 1.0, 1.0)
    data[hot] = 2.0 * satlevel[window_at[hot]]
    invar = np.maximum(variance, 1e-6).astype(np.float32, copy=False)
    data = data.astype(np.float32, copy=False)
    crmask = np.zeros(data.shape, bool)
    clean = np.empty(data.shape, np.float32)
    # One call per window: astroscrappy iterates while it finds new cosmic rays, so on a
    # mosaic every window would run as many iterations as the one that needs the most
    # (measured: 1.5 times the CPU time of separate calls on 2048² frames).
    for h, w, py, px, level in zip(heights.tolist(), widths.tolist(), oy.tolist(),
                                   ox.tolist(), satlevel.tolist(), strict=True):
        part = (slice(py, py + h), slice(px, px + w))
        crmask[part], clean[part] = _scrappy(data[part], invar[part], level, settings,
                                             read_noise)
    found = crmask & (core_at >= 0) & ((bits & UNUSABLE) == 0)
    return core_at[found], clean[found]


def _scrappy(data: np.ndarray, invar: np.ndarray, satlevel: float,
             settings: CosmicSettings, read_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """``astroscrappy.detect_cosmics`` on one image with our settings: CR mask and
    cleaned image."""
    shape = data.shape
    # astroscrappy corrupts memory on arrays narrower than 3 px: mirror tiny ones wider.
    extra = tuple((0, max(MIN_WINDOW - n, 0)) for n in shape)
    if any(e for _, e in extra):
        data = np.pad(data, extra, mode="symmetric")
        invar = np.pad(invar, extra, mode="symmetric")
    crmask, clean = astroscrappy.detect_cosmics(
        data, invar=invar, sigclip=settings.sigclip, sigfrac=settings.sigfrac,
        objlim=settings.objlim, gain=1.0, readnoise=read_noise, satlevel=satlevel,
        niter=settings.niter, sepmed=True, cleantype="meanmask", fsmode="median",
    )
    return crmask[:shape[0], :shape[1]], clean[:shape[0], :shape[1]]


def star_sharpness(sigma: float) -> float:
    """The most a star's light lifts a pixel above the mean of its 8 neighbours, as a
    fraction of its height above the sky, for a Gaussian PSF of ``sigma`` px.

    For a Gaussian the ratio of the mean of the neighbours to the pixel is at least
    ``exp(-mean(d²) / 2σ²)`` wherever the pixel is (Jensen's inequality; the mean of the
    squared offsets ``d`` of the 8 neighbours is 1.5 px²), with pixel integration adding
    1/12 px² to σ². About 0.34 for σ = 1.3 px (FWHM 3 px), 0.5 for σ = 1 px.
    """
    return float(1.0 - np.exp(-0.75 / (sigma**2 + 1.0 / 12.0)))


def candidate_pixels(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray, settings: CosmicSettings,
    psf_sigma: float | None = None, usable: np.ndarray | None = None, block: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that may be part of a cosmic ray, as row and column indices.

    A candidate stands ``candidate_sigma`` noise sigmas above the mean of its 8
    neighbours *and* is sharper than a star: its excess over the neighbours is more than
    ``candidate_sharpness`` of its excess over the sky (a Gaussian star of FWHM 3 px gives
    at most 0.34, a cosmic ray close to 1). On a star that test fails for a cosmic ray
    lower than the star; given the PSF width (``psf_sigma``, px), a pixel whose excess
    over its neighbours is ``candidate_sigma`` sigmas more than a star can give it (see
    :func:`star_sharpness`) is a candidate too. Unusable pixels (``usable`` when given,
    else from ``mask``) are never candidates; as neighbours they count as sky, except
    saturated ones, which count as infinitely bright, so that the rim of a saturated star
    (protected by astroscrappy anyway) does not look like a peak.

    The frame is processed in blocks of ``block`` rows, which keeps the temporaries in
    the CPU cache, and the sharpness tests are made only on the few pixels that pass the
    first one.
    """
    ny, nx = sci.shape
    if usable is None:
        usable = (mask & UNUSABLE) == 0
    stride = max(sci.size // 250_000, 1)  # the sky from a subsample, as sky_level does
    sky = np.float32(sky_level(sci.ravel()[::stride], usable.ravel()[::stride])[0])
    cut = np.float32(settings.candidate_sigma)
    star = np.inf if psf_sigma is None else star_sharpness(psf_sigma)
    sat = flag(Bit.SAT)
    part = np.empty((block + 2, nx + 2), np.float32)  # a block and its neighbours
    ys, xs = [], []
    for y0 in range(0, ny, block):
        y1 = min(y0 + block, ny)
        n = y1 - y0
        lo, hi = max(y0 - 1, 0), min(y1 + 1, ny)
        inner = part[lo - y0 + 1:hi - y0 + 1, 1:-1]
        np.copyto(inner, sci[lo:hi])
        br, bc = nonzero2d(~usable[lo:hi])
        inner[br, bc] = np.where((mask[lo:hi][br, bc] & sat) != 0, BRIGHT_FILL, sky)
        if lo == y0:  # the frame's edges: repeat the edge pixels
            part[0, 1:-1] = part[1, 1:-1]
        if hi == y1:
            part[n + 1, 1:-1] = part[n, 1:-1]
        view = part[:n + 2]
        view[:, 0] = view[:, 1]
        view[:, -1] = view[:, -2]
        rows = view[:-2] + view[1:-1]
        rows += view[2:]
        excess = rows[:, :-2] + rows[:, 1:-1]
        excess += rows[:, 2:]  # 3x3 sums
        data = view[1:-1, 1:-1]
        excess -= data
        excess *= np.float32(-1.0 / 8.0)
        excess += data  # data - mean of the 8 neighbours
        noise = np.sqrt(var[y0:y1])
        noise *= cut
        r, c = nonzero2d(excess > noise)
        e, above, lim = excess[r, c], data[r, c] - sky, noise[r, c]
        keep = ((e > settings.candidate_sharpness * above) | (e > star * above + lim))
        keep &= usable[y0:y1][r, c]
        ys.append(r[keep] + y0)
        xs.append(c[keep])
    return np.concatenate(ys), np.concatenate(xs)


def search_windows(
    ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], settings: CosmicSettings,
    pad: int = EDGE_PAD,
) -> list[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """The windows astroscrappy searches, around groups of candidate pixels.

    Candidates are grouped on a grid of ``tile``-pixel cells: 8-connected cells that hold
    candidates form a group. A group's *core* is the bounding box of its candidates grown
    by ``reach`` pixels (a cosmic ray's pixels that are not candidates themselves, and
    astroscrappy's growth of its detections); its *window* is the core grown by
    ``margin`` pixels, the context that astroscrappy's filter footprints need for the
    result in the core to be the one on the whole frame. Past the frame's edges a window
    extends by at most ``pad`` pixels (mirrored, see :func:`_detect`).

    Returns
    -------
    list of (core, window)
        Each as ``(y0, y1, x0, x1)`` (end exclusive); cores are within the frame.
    """
    if ys.size == 0:
        return []
    ny, nx = shape
    t = settings.tile
    cells = np.zeros((-(-ny // t), -(-nx // t)), bool)
    cells[ys // t, xs // t] = True
    labels, n = ndimage.label(cells, structure=np.ones((3, 3), bool))
    group = labels[ys // t, xs // t] - 1
    boxes = np.full((n, 4), [ny, 0, nx, 0])
    np.minimum.at(boxes[:, 0], group, ys)
    np.maximum.at(boxes[:, 1], group, ys + 1)
    np.minimum.at(boxes[:, 2], group, xs)
    np.maximum.at(boxes[:, 3], group, xs + 1)
    r, m = settings.reach, settings.margin
    out = []
    for y0, y1, x0, x1 in boxes.tolist():
        core = (max(y0 - r, 0), min(y1 + r, ny), max(x0 - r, 0), min(x1 + r, nx))
        window = (max(core[0] - m, -pad), min(core[1] + m, ny + pad),
                  max(core[2] - m, -pad), min(core[3] + m, nx + pad))
        out.append((core, window))
    return out




def warm_threshold(n_frames: int, settings: CosmicSettings, rate: float = 0.0,
                   n_pixels: int = 0, chance: float = 0.1) -> int:
    """The fewest frames of a sample of ``n_frames`` in which a pixel flagged as a cosmic
    ray is a warm pixel.

    More than ``settings.warm_fraction`` of them, at least ``settings.warm_min_count``,
    and, given the sample's flag ``rate`` (flags per pixel per frame) over ``n_pixels``
    pixels, so many that cosmic rays hitting one pixel that often by chance are expected
    on fewer than ``chance`` pixels of the frame (binomial tail). With Dome C's rate
    (~1e-4 of the pixels per 90 s frame), two chance hits of one pixel in 30 frames
    happen on ~70 of 16 million pixels, three on ~0.07: the count of 3 holds there;
    frames rich in cosmic rays (long exposures) raise the bar instead of flagging chance
    coincidences.
    """
    k = max(int(settings.warm_min_count), int(np.floor(settings.warm_fraction * n_frames)) + 1)
    if rate > 0 and n_pixels > 0:
        tails = n_pixels * binom.sf(np.arange(k, n_frames + 1) - 1, n_frames, min(rate, 1.0))
        below = np.flatnonzero(tails < chance)
        k += int(below[0]) if below.size else n_frames + 1 - k
    return k


def warm_pixels(flagged: Iterable[np.ndarray], n_frames: int, settings: CosmicSettings,
                n_pixels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Warm pixels: those flagged as cosmic rays in at least :func:`warm_threshold` of
    ``n_frames`` frames.

    Parameters
    ----------
    flagged
        For each frame of the sample, the flat indices of its pixels flagged as cosmic
        rays (a frame's few hundred, not its image: memory follows the flags, not the
        frame size or the night's length).
    n_frames
        The frames in the sample.
    settings
        ``warm_fraction`` and ``warm_min_count``.
    n_pixels
        Pixels in a frame: the threshold then also keeps out chance coincidences of
        cosmic rays at the sample's own flag rate (0: not).

    Returns
    -------
    pixels, counts
        The warm pixels' flat indices (sorted) and in how many frames each was flagged.
    """
    parts = [np.unique(np.asarray(f, np.int64)) for f in flagged]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pixels, counts = np.unique(np.concatenate(parts), return_counts=True)
    rate = counts.sum() / (n_frames * n_pixels) if n_pixels else 0.0
    keep = counts >= warm_threshold(n_frames, settings, rate, n_pixels)
    return pixels[keep], counts[keep]
