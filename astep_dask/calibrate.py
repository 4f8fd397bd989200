"""The per-frame calibration chain: numpy in, numpy out.

``raw ADU → overscan/trim → − (bias + dark) → × gain → ÷ flat`` gives the science plane in
electrons; the variance plane propagates Poisson noise of the photo-electrons and of the
dark current, read noise and the noise of the masters through the same steps; the mask
combines the static bad-pixel mask, saturation and NO_DATA, then cosmic rays found by
astroscrappy. Nothing here does I/O.
"""

from __future__ import annotations

import ctypes
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import astroscrappy
import numpy as np
from scipy import ndimage

from .config import CosmicSettings
from .cosmics import nonzero2d, psf_sigma, sky_level, unflag_stars
from .layout import Section
from .mask import MASK_DTYPE, Bit, flag, robust_sigma

# Pixels that astroscrappy must not see as data: filled from their neighbours first.
UNUSABLE = flag(Bit.BAD, Bit.NO_DATA, Bit.SAT)
MIN_FLAT = 1e-3  # flat response below which a pixel holds no usable data
EDGE_PAD = 8  # pixels mirrored around a frame before cosmic-ray detection
MIN_WINDOW = 16  # px: smaller arrays given to astroscrappy are mirrored to this size
BRIGHT = np.float32(1e30)  # stands for saturated pixels when looking for candidates


def overscan_level(region: np.ndarray) -> float:
    """The bias level of a frame from its overscan pixels: a 3-sigma clipped mean.

    Not the median: raw values are integers, and the median of integers is quantised to
    half an ADU, a bias that would survive averaging over frames.
    """
    values = np.asarray(region, np.float64).ravel()
    centre = np.median(values)
    scale = 1.482602218505602 * np.median(np.abs(values - centre))
    if scale > 0:
        values = values[np.abs(values - centre) < 3 * scale]
    return float(values.mean())


def overscan_trim(
    raw: np.ndarray, overscan: Section | None, trim: Section | None
) -> np.ndarray:
    """Subtract the overscan level (when there is an overscan) and trim to the data section."""
    out = raw.astype(np.float32, copy=False)
    if overscan is not None:
        out = out - np.float32(overscan_level(raw[overscan.slices]))
    if trim is not None:
        out = out[trim.slices]
    return out


@dataclass(frozen=True)
class FrameMasters:
    """What the chain needs from the masters for one frame (all on the trimmed grid).

    ``dark`` is everything subtracted before the gain (bias + dark current for this
    exposure, in ADU), ``dark_var`` its variance (ADU²), ``dark_current`` the part of
    ``dark`` that is dark current (ADU, for its Poisson noise). ``flat`` is normalised to
    median 1, ``flat_var`` its variance.
    """

    dark: np.ndarray
    dark_var: np.ndarray
    dark_current: np.ndarray
    flat: np.ndarray
    flat_var: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class Detector:
    """Per-frame detector facts (header values, or configured fallbacks)."""

    gain: float  # e-/ADU
    read_noise: float  # e-
    saturation: float  # raw ADU


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
        inner[br, bc] = np.where((mask[lo:hi][br, bc] & sat) != 0, BRIGHT, sky)
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


def calibrate_frame(
    raw: np.ndarray,
    masters: FrameMasters,
    detector: Detector,
    cosmics: CosmicSettings,
    overscan: Section | None = None,
    trim: Section | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Calibrate one raw frame.

    Returns
    -------
    sci, var, mask, summary
        SCI (float32, electrons), VAR (float32, electrons²), MASK (int32 bits) and a small
        dict of figures (sky, noise, pixel counts, timings). SCI and VAR are NaN only
        where MASK has NO_DATA.
    """
    t0 = time.perf_counter()
    saturated = raw >= detector.saturation
    if trim is not None:
        saturated = saturated[trim.slices]
    adu = overscan_trim(raw, overscan, trim)
    g = np.float32(detector.gain)
    # In-place float32 arithmetic: a 2048² plane is 16 MB, and every temporary counts
    # against a worker's memory.
    electrons = np.subtract(adu, masters.dark, dtype=np.float32)
    electrons *= g
    flat = masters.flat
    with np.errstate(invalid="ignore", divide="ignore"):
        no_data = ~np.isfinite(flat) | (flat <= MIN_FLAT) | ~np.isfinite(electrons)
        inv_flat = np.where(no_data, np.float32(1), flat).astype(np.float32, copy=False)
        np.reciprocal(inv_flat, out=inv_flat)
        sci = electrons * inv_flat
        # Poisson of photo-electrons and dark current, read noise, master noise; then the
        # flat: var = var_e / flat² + sci² var(flat) / flat².
        var = np.maximum(electrons, np.float32(0), out=electrons)
        term = np.maximum(masters.dark_current, np.float32(0))
        term *= g
        var += term
        var += np.float32(detector.read_noise**2)
        np.multiply(masters.dark_var, g * g, out=term)
        var += term
        np.square(sci, out=term)
        term *= masters.flat_var
        var += term
        np.square(inv_flat, out=term)
        var *= term
        del term
        no_data |= ~np.isfinite(sci) | ~np.isfinite(var)  # overflow: nothing to trust
    mask = masters.mask.astype(MASK_DTYPE, copy=True)
    mask[saturated] |= flag(Bit.SAT)
    mask[no_data] |= flag(Bit.NO_DATA)
    sci = sci.astype(np.float32, copy=False)
    var = var.astype(np.float32, copy=False)
    t1 = time.perf_counter()
    n_cr = 0
    if cosmics.enabled:
        step = max(inv_flat.size // STAT_SAMPLE, 1)
        read_noise_e = detector.read_noise * float(np.median(inv_flat.ravel()[::step]))
        crmask, clean = find_cosmics(sci, var, mask, cosmics, read_noise_e)
        mask[crmask] |= flag(Bit.CR)
        n_cr = int(crmask.sum())
        if cosmics.replace:
            sci = np.where(crmask, clean, sci).astype(np.float32)
    sci[no_data] = np.nan
    var[no_data] = np.nan
    t2 = time.perf_counter()
    sky, noise = sky_and_noise(sci, mask == 0)
    summary = {
        "sky": sky,
        "noise": noise,
        "n_masked": int((mask != 0).sum()),
        "n_saturated": int(saturated.sum()),
        "n_cr": n_cr,
        "n_no_data": int(no_data.sum()),
        "t_calibrate": t1 - t0,
        "t_cosmics": t2 - t1,
    }
    return sci, var, mask, summary


STAT_SAMPLE = 1 << 18  # pixels: the sky median to ~0.003 noise sigma, at any frame size


def sky_and_noise(sci: np.ndarray, good: np.ndarray) -> tuple[float, float]:
    """Median and robust sigma (1.4826 MAD) of the good pixels of a frame.

    Computed on an even subsample (every k-th pixel in memory order, about
    :data:`STAT_SAMPLE` of them, the good ones kept): these are summary figures for the
    header and the manifest, and full-frame medians cost more than the calibration
    arithmetic itself at 2048².
    """
    step = max(sci.size // STAT_SAMPLE, 1)
    sample = sci.ravel()[::step][good.ravel()[::step]]
    if sample.size == 0 and good.any():
        sample = sci[good]
    if sample.size == 0:
        return float("nan"), float("nan")
    return float(np.median(sample)), robust_sigma(sample)
