"""Cosmic-ray post-filter: give back to the stars the pixels LA Cosmic took from them.

astroscrappy (LA Cosmic) flags the cores of some bright, well-sampled stars as cosmic rays:
a core a few pixels wide passes its fine-structure test. This module keeps astroscrappy as
the detector and checks each connected group of its detections against point sources.

Around each group a stamp is cut, and pixel-integrated Gaussians (the PSF width measured on
the frame's stars by :func:`psf_sigma`, refitted per stamp within a narrow range; free
fluxes and centres; a constant background) are fitted by weighted least squares (the
variance plane), without unusable pixels and, iteratively, without pixels far above the
fit (cosmic rays on a star). More sources are added while the residuals outside the flagged
pixels show one (blends). A source counts as a star only when the unflagged pixels around
the group detect it on their own and its peak is well above the noise: a fit given nothing
but a cosmic ray makes a faint, unsupported "star" of it. A flagged pixel is unflagged when
those stars contribute significantly to it and it lies less than ``k`` standard deviations
above the fit; cosmic rays on stars stand out from the fit and keep their flags, and so do
groups with no star, or whose fit leaves pixels far below the data (a model it cannot
trust).

Everything is batched over stamps with numpy; see :func:`unflag_stars`.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import astroscrappy
import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.special import erf

from astep_dask.config import CosmicSettings
from astep_dask.core.bits import UNUSABLE, Bit, flag
from astep_dask.core.psf import (
    EDGE_SLACK,
    SQRT2,
    _images,
    _linear_fluxes,
    _stamp_stat,
    _stamps,
    _unpack,
    fit_stamps,
    psf_sigma,
    sky_level,
)
from astep_dask.core.stats import nonzero2d

EDGE_PAD = 8  # pixels mirrored around a frame before cosmic-ray detection


MIN_WINDOW = 16  # px: smaller arrays given to astroscrappy are mirrored to this size


BRIGHT_FILL = np.float32(1e30)  # stands for saturated pixels when looking for candidates


def fill_masked(image: np.ndarray, bad: np.ndarray, half: int = 2) -> np.ndarray:
    """Copy of ``image`` with ``bad`` pixels replaced by the median of their good
    neighbours in a (2·half+1)² box (the global median where a box has none).

    Non-finite pixels do not count as good neighbours. The boxes are sorted with the
    pixels that do not count pushed to their end, and each median is read off the sorted
    box from its own count of good pixels: the same values as ``np.nanmedian``, without
    its slow path for many small rows.
    """
    out = image.copy()
    ys, xs = nonzero2d(bad)
    if ys.size == 0:
        return out
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
    out[ys, xs] = fill
    return out


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (astroscrappy's libgomp among them),
    found in ``/proc/self/maps``; none where that does not exist."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = sorted({line.split()[-1] for line in maps.splitlines()
                    if any(name in line for name in ("libgomp", "libiomp", "libomp"))})
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            continue
        found.append(lib)
    return tuple(found)


def limit_openmp(threads: int) -> None:
    """Let astroscrappy's OpenMP loops use at most ``threads`` threads in the calling
    thread (0: leave them alone).

    astroscrappy parallelises each median filter with OpenMP, by default over all cores.
    On the small windows of :func:`find_cosmics` a parallel region costs more to start
    than its work, and on a machine whose cores are busy (dask workers, other jobs) the
    waiting threads spin: the same frame took 0.5 s or 4 s of wall time with the default
    threads, 0.5 s every time with one. The pipeline parallelises over frames instead.
    """
    if threads > 0:
        for lib in _openmp_runtimes():
            lib.omp_set_num_threads(threads)


def find_cosmics(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray, settings: CosmicSettings,
    read_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic-ray pixels of a calibrated frame (electrons, sky included) with astroscrappy.

    With ``settings.tile > 0`` astroscrappy runs only on small windows around groups of
    candidate pixels (see :func:`candidate_pixels` and :func:`search_windows`): its median
    filters cost the same on every pixel, and most of a frame is clean sky and stars.
    The frame's PSF width, measured once (:func:`astep_dask.cosmics.psf_sigma`), serves
    the candidates and :func:`astep_dask.cosmics.unflag_stars`. With ``tile = 0``
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
    limit_openmp(settings.openmp_threads)
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
    found, values = [], []
    for core, window in boxes:
        cr, cl = _detect(sci, var, mask, window, settings, read_noise)
        # Keep the core: its pixels have all the context astroscrappy's filters need.
        inner = (slice(core[0] - window[0], core[1] - window[0]),
                 slice(core[2] - window[2], core[3] - window[2]))
        cr = cr[inner] & ((mask[core[0]:core[1], core[2]:core[3]] & UNUSABLE) == 0)
        r, c = nonzero2d(cr)
        found.append((r + core[0]) * nx + c + core[2])
        values.append(cl[inner][r, c])
    index = np.concatenate(found) if found else np.zeros(0, int)
    cleaned = np.concatenate(values) if values else np.zeros(0, np.float32)
    crmask = np.zeros(sci.shape, bool)
    crmask.flat[index] = True  # cores may overlap: a pixel can be found twice, alike
    if settings.protect_stars and index.size:
        # LA Cosmic flags cores of sharp stars (FWHM ~3 px): unflag what a PSF fit explains.
        crmask = unflag_stars(crmask, sci, var, usable, psf_sigma=sigma)
    clean = sci.copy()
    kept = crmask.flat[index]
    clean.flat[index[kept]] = cleaned[kept]
    return crmask, clean


def _detect(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray, window: tuple[int, int, int, int],
    settings: CosmicSettings, read_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """astroscrappy on one window ``(y0, y1, x0, x1)`` of the frame.

    The window may reach past the frame's edges by up to ``EDGE_PAD`` pixels; that part
    is the frame mirrored. Returns astroscrappy's CR mask and cleaned image of the window.
    """
    ny, nx = sci.shape
    y0, y1, x0, x1 = window
    inside = (slice(max(y0, 0), min(y1, ny)), slice(max(x0, 0), min(x1, nx)))
    bits = mask[inside]
    bad = (bits & UNUSABLE) != 0
    data = sci[inside]
    variance = var[inside]
    if bad.any():
        data = fill_masked(data, bad)
        variance = fill_masked(variance, bad)
    else:
        data = data.copy()
    hot = (bits & flag(Bit.SAT)) != 0
    top = float(np.max(data, where=~hot, initial=-np.inf))
    satlevel = 2.0 * abs(top) + 1.0 if np.isfinite(top) else 1.0
    data[hot] = 2.0 * satlevel
    widths = ((max(-y0, 0), max(y1 - ny, 0)), (max(-x0, 0), max(x1 - nx, 0)))
    if any(w for pair in widths for w in pair):
        data = np.pad(data, widths, mode="reflect")
        variance = np.pad(variance, widths, mode="reflect")
    # astroscrappy corrupts memory on arrays narrower than 3 px: mirror tiny ones wider.
    shape = data.shape
    extra = tuple((0, max(MIN_WINDOW - n, 0)) for n in shape)
    if any(e for _, e in extra):
        data = np.pad(data, extra, mode="symmetric")
        variance = np.pad(variance, extra, mode="symmetric")
    crmask, clean = astroscrappy.detect_cosmics(
        data.astype(np.float32, copy=False),
        invar=np.maximum(variance, 1e-6).astype(np.float32, copy=False),
        sigclip=settings.sigclip, sigfrac=settings.sigfrac, objlim=settings.objlim,
        gain=1.0, readnoise=read_noise, satlevel=satlevel, niter=settings.niter,
        sepmed=True, cleantype="meanmask", fsmode="median",
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


EIGHT = np.ones((3, 3), bool)  # 8-connectivity


BRIGHT = 5.0  # stars this many times min_peak need no support from outside their group


SCREEN_SNR = 2.0  # groups with no point source this significant just outside them: no fit


@dataclass(frozen=True)
class _Rules:
    """The tunables of :func:`unflag_stars` that the fits use (see its parameters)."""

    k: float
    snr: float
    snr_out: float
    min_peak: float
    max_sources: int
    width: tuple[float, float] | None
    model_error: float


_measure_psf_sigma = psf_sigma  # reachable where a parameter named psf_sigma shadows it


def _matched_filter(
    resid: np.ndarray, weight: np.ndarray, sigma: float, bounds: np.ndarray,
    where: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best position, flux and significance of one more point source in residual stamps.

    Returns ``x, y, flux, snr`` per stamp (position restricted to ``bounds`` and to the
    pixels of ``where``).
    """
    n, size, _ = resid.shape
    half = max(int(np.ceil(3 * sigma)), 1)
    kern = _images(np.array([[half]], float), np.array([[half]], float),
                   np.array([sigma]), 2 * half + 1)[0, 0]
    num = ndimage.correlate(resid * weight, kern[None], mode="constant")
    den = ndimage.correlate(weight, (kern**2)[None], mode="constant")
    with np.errstate(all="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), -np.inf)
        flux = np.where(den > 0, num / den, 0.0)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((xx[None] >= bounds[:, 0, None, None]) & (xx[None] <= bounds[:, 1, None, None])
              & (yy[None] >= bounds[:, 2, None, None]) & (yy[None] <= bounds[:, 3, None, None]))
    snr = np.where(inside & where, snr, -np.inf)
    best = np.argmax(snr.reshape(n, -1), axis=1)
    y, x = np.divmod(best, size)
    rows = np.arange(n)
    return (x.astype(float), y.astype(float), flux.reshape(n, -1)[rows, best],
            snr.reshape(n, -1)[rows, best])


def _fit_groups(
    d: np.ndarray, v: np.ndarray, u: np.ndarray, group: np.ndarray, flagged: np.ndarray,
    frame: np.ndarray, sigma: float, rules: _Rules,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit stars to the stamps of some groups; return their star images and residuals.

    ``d, v, u`` are the stamps of data, variance and usable pixels, ``group`` the pixels
    of each stamp's group, ``flagged`` all flagged pixels of the stamps, ``frame`` the
    bounds of the stamps' part in the frame (see :func:`_stamps`). Stamps whose
    pixels outside the flagged ones show no point source near the group are not fitted.
    Sources are added one at a time while a star leaves pixels of the group more than
    ``k`` sigmas above the fit, or the fit is unsound (below), and the residuals outside
    the flagged pixels show a point source of significance ``snr`` near the group. A
    source counts as a star when its peak stands ``min_peak`` sigmas above the background
    and it is detected in the usable pixels outside the group (its flux refitted there
    alone, centres fixed, above ``snr_out`` times its error) or, centred in the frame and
    ``BRIGHT`` times brighter, the fit keeps most of the group's pixels. None does in a
    stamp where the fit leaves a pixel near the group more than ``k`` sigmas below the data
    (no cosmic ray explains that: the model is wrong). Returns the stars' image (n, s, s)
    and the residual in sigmas (n, s, s), both zero for the stamps not fitted.
    """
    n, size, _ = d.shape
    # Stars centred a little outside the frame still have their core on it.
    slack = EDGE_SLACK * sigma
    bounds = frame + np.array([-slack, slack, -slack, slack])
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(u, v, np.inf))
        inv = np.where(u & np.isfinite(v) & (v > 0), 1.0 / np.where(u, v, 1.0), 0.0)
        sky_std = np.sqrt(_stamp_stat(np.nanmedian, v, u))
    level = _stamp_stat(np.nanmedian, d, u & ~group)
    focus = ndimage.binary_dilation(group, EIGHT[None])
    close = ndimage.binary_dilation(group, EIGHT[None], iterations=2)
    # Added sources are sought near the group: only they matter for its pixels.
    near = ndimage.binary_dilation(group, EIGHT[None], iterations=int(np.ceil(2 * sigma)) + 1)
    stars = np.zeros((n, size, size))
    resid = np.zeros((n, size, size))
    # Cheap screen: no point source next to the group in the unflagged pixels, no star.
    screen = _matched_filter(d - np.nan_to_num(level)[:, None, None], inv * ~flagged, sigma,
                             bounds, close)[3]
    todo = np.nonzero(screen > SCREEN_SNR)[0]
    if todo.size == 0:
        return stars, resid
    opts: dict = {"k": rules.k, "model_error": rules.model_error}
    if rules.width is not None:
        opts.update(fit_sigma=True, sigma_range=(rules.width[0] * sigma, rules.width[1] * sigma))
    fit = fit_stamps(d[todo], v[todo], u[todo], sigma, bounds=bounds[todo], focus=focus[todo],
                     **opts)
    for m in range(1, rules.max_sources + 1):
        # A star must show in the pixels outside the group: its flux fitted there alone.
        outside = inv[todo] * fit.active * ~group[todo]
        unit = _images(fit.x, fit.y, fit.sigma, size)
        flux_out, err_out = _linear_fluxes(d[todo], outside, unit)
        with np.errstate(invalid="ignore"):
            resid[todo] = (d[todo] - fit.model) / np.sqrt(
                std[todo] ** 2 + (rules.model_error * fit.stars.sum(axis=1)) ** 2)
        sound = ~((resid[todo] < -rules.k) & near[todo]).any(axis=(1, 2))
        peak_frac = erf(0.5 / (SQRT2 * fit.sigma)) ** 2  # of a source centred on a pixel
        peak = fit.amp * peak_frac[:, None] / sky_std[todo, None]
        # Or, for a bright star, the group itself: a Gaussian not much sharper than the PSF
        # fits no cosmic ray, whose pixels are clipped, so most of the group kept says star.
        # (Not a star centred off the frame: its tail may pass for anything on the edge.)
        kept = (fit.active & group[todo]).sum(axis=(1, 2)) / group[todo].sum(axis=(1, 2))
        fb = frame[todo]
        on_frame = ((fit.x >= fb[:, 0:1]) & (fit.x <= fb[:, 1:2])
                    & (fit.y >= fb[:, 2:3]) & (fit.y <= fb[:, 3:4]))
        supported = (flux_out > rules.snr_out * err_out) | (
            (peak > BRIGHT * rules.min_peak) & on_frame & (kept >= 0.5)[:, None])
        real = supported & (peak > rules.min_peak) & sound[:, None]
        stars[todo] = (fit.stars * real[:, :, None, None]).sum(axis=1)
        if m == rules.max_sources:
            break
        unexplained = (group[todo] & (resid[todo] > rules.k)).any(axis=(1, 2))
        sub = np.nonzero((unexplained & real.any(axis=1)) | ~sound)[0]
        if sub.size == 0:
            break
        x, y, flux, sig = _matched_filter(d[todo][sub] - fit.model[sub],
                                          (inv * ~flagged)[todo][sub], sigma,
                                          bounds[todo][sub], near[todo][sub])
        more = sig > rules.snr
        if not more.any():
            break
        sub = sub[more]
        bg, amp, px, py, s = _unpack(fit.params()[sub])
        start = np.column_stack([bg, amp, flux[more], px, x[more], py, y[more], s])
        todo = todo[sub]
        fit = fit_stamps(d[todo], v[todo], u[todo], sigma, start=start, bounds=bounds[todo],
                         **opts)
    return stars, resid


def label_sparse(image: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """8-connected groups of a sparse boolean image: labels and bounding boxes.

    The same labels as ``ndimage.label(image, EIGHT)`` (1, 2, ... in the order of each
    group's first pixel in raster order), found from the set pixels alone: on a frame of
    a few million pixels with a few hundred set, labelling and ``find_objects`` cost more
    than everything else done with the groups.

    Returns
    -------
    labels : ndarray of int32
        0 outside the groups.
    y0, y1, x0, x1 : ndarray of int
        Bounding box of each group (end exclusive), in label order.
    """
    ny, nx = image.shape
    flat = np.flatnonzero(image)
    n = flat.size
    ys, xs = np.divmod(flat, nx)
    heads, tails = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # the other four are their mirrors
        ok = (ys + dy < ny) & (xs + dx >= 0) & (xs + dx < nx)
        target = flat + dy * nx + dx
        pos = np.minimum(np.searchsorted(flat, target), max(n - 1, 0))
        ok &= flat[pos] == target if n else ok
        heads.append(np.nonzero(ok)[0])
        tails.append(pos[ok])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = sparse.coo_matrix((np.ones(head.size, bool), (head, tail)), shape=(n, n))
    _, group = csgraph.connected_components(graph, directed=False)
    # Number the groups by their first pixel (``flat`` is in raster order).
    _, first = np.unique(group, return_index=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    number = rank[group]
    labels = np.zeros(image.shape, np.int32)
    labels.flat[flat] = number + 1
    m = first.size
    y0, x0 = np.full(m, ny), np.full(m, nx)
    y1, x1 = np.zeros(m, int), np.zeros(m, int)
    np.minimum.at(y0, number, ys)
    np.maximum.at(y1, number, ys + 1)
    np.minimum.at(x0, number, xs)
    np.maximum.at(x1, number, xs + 1)
    return labels, (y0, y1, x0, x1)


def unflag_stars(
    crmask: np.ndarray,
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    psf_sigma: float | None = None,
    k: float = 5.0,
    snr: float = 5.0,
    snr_out: float = 3.0,
    min_peak: float = 10.0,
    star_sigma: float = 2.0,
    max_sources: int = 3,
    width: tuple[float, float] | None = (0.85, 1.5),
    model_error: float = 0.0,
    max_half: int = 30,
) -> np.ndarray:
    """Remove from a cosmic-ray mask the pixels that are explained by stars.

    Each 8-connected group of flagged pixels gets a stamp covering it with a margin of
    about 3 PSF sigmas. Groups with no point source in the unflagged pixels next to them
    are left alone at once. For the others, pixel-integrated Gaussians (width fitted
    within ``width`` × ``psf_sigma``, free fluxes and centres, centres in the frame or
    just outside it) plus a constant are fitted with :func:`fit_stamps`: unusable pixels
    excluded, pixels ``k`` sigmas above the fit clipped iteratively. A source is added, up
    to ``max_sources``, while a star leaves flagged pixels unexplained (or pixels far below
    the fit) and the unflagged residuals show another point source near the group. A
    source is a star when the usable pixels outside the group detect it on their own
    (``snr_out``), its peak stands ``min_peak`` sigmas above the noise, and the fit leaves
    no pixel near the group ``k`` sigmas below the data. A flagged pixel is unflagged when
    the stars contribute more than ``star_sigma`` standard deviations to it and its excess
    over the fit is less than both ``k`` standard deviations and the stars' contribution.

    Parameters
    ----------
    crmask : ndarray of bool
        Cosmic-ray pixels from astroscrappy.
    sci, var : ndarray
        The calibrated image (electrons, sky included) and its variance.
    usable : ndarray of bool
        Pixels with valid data (neither bad, saturated nor without data).
    psf_sigma : float, optional
        Gaussian sigma of the PSF in pixels; measured with :func:`psf_sigma` when None.
    k : float
        Residual threshold, in standard deviations (from ``var``).
    snr : float
        Minimum significance of an added source (matched filter on the residuals of the
        unflagged pixels).
    snr_out : float
        Minimum significance of a star's flux measured outside the group alone.
    min_peak : float
        Minimum height of a star's peak, in sigmas of the stamp's typical pixel: LA
        Cosmic leaves faint stars alone, and faint "stars" are what a fit makes of the
        cosmic rays it is given.
    star_sigma : float
        Minimum contribution of the stars to a pixel, in its standard deviations, for the
        pixel to be unflagged.
    max_sources : int
        Most point sources fitted to one stamp.
    width : tuple of float, optional
        The width of the sources of a stamp is fitted too, between these multiples of
        ``psf_sigma``: the PSF varies across a field and with focus. Fits may not go much
        sharper than the PSF: a narrow Gaussian would pass cosmic rays for stars. Fixed at
        ``psf_sigma`` when None.
    model_error : float
        Fractional error of the fitted stars (the PSF is not exactly Gaussian), added in
        quadrature to each pixel's standard deviation in the residual tests: real stars
        then keep their cores flagged less often, cosmic rays fainter than that fraction
        of a star are unflagged with it.
    max_half : int
        Groups needing a stamp larger than ``2·max_half+1`` pixels are left as they are.

    Returns
    -------
    ndarray of bool
        The cleaned cosmic-ray mask (a new array).
    """
    out = np.array(crmask, dtype=bool, copy=True)
    if not out.any():
        return out
    sigma = psf_sigma if psf_sigma is not None else _measure_psf_sigma(sci, var, usable)
    rules = _Rules(k, snr, snr_out, min_peak, max_sources, width, model_error)
    labels, (y0, y1, x0, x1) = label_sparse(out)
    cy, cx = (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    margin = max(int(np.ceil(3.0 * sigma)), 3)
    extent = np.maximum(y1 - y0, x1 - x0)
    halves = np.maximum(extent // 2 + margin, margin + 2)
    halves = halves + (halves % 2 == 0)  # odd: fewer distinct stamp sizes
    for half in np.unique(halves):
        if half > max_half:
            continue
        idx = np.nonzero(halves == half)[0]
        (d, v, u, lab), frame = _stamps((sci, var, usable, labels), (0.0, 1.0, False, 0),
                                        cy[idx], cx[idx], int(half))
        group = lab == (idx + 1)[:, None, None]
        stars, resid = _fit_groups(d, v, u, group, lab > 0, frame, sigma, rules)
        with np.errstate(invalid="ignore", divide="ignore"):
            star = stars / np.sqrt(np.where(u, v, np.inf))  # in sigmas, like resid
        # Explained by the stars: they contribute significantly, and the excess over the
        # fit is below k sigmas and below their own contribution.
        clear = group & (star > star_sigma) & (resid < np.minimum(k, star))
        g, r, c = np.nonzero(clear)
        out[cy[idx][g] + r - half, cx[idx][g] + c - half] = False
    return out
