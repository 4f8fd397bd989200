"""The per-frame calibration chain: numpy in, numpy out.

``raw ADU → overscan/trim → − (bias + dark) → × gain → ÷ flat`` gives the science plane in
electrons; the variance plane propagates Poisson noise of the photo-electrons and of the
dark current, read noise and the noise of the masters through the same steps; the mask
combines the static bad-pixel mask, saturation and NO_DATA, then cosmic rays found by
astroscrappy. Nothing here does I/O.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import astroscrappy
import numpy as np

from .config import CosmicSettings
from .cosmics import unflag_stars
from .layout import Section
from .mask import MASK_DTYPE, Bit, flag, robust_sigma

# Pixels that astroscrappy must not see as data: filled from their neighbours first.
UNUSABLE = flag(Bit.BAD, Bit.NO_DATA, Bit.SAT)
MIN_FLAT = 1e-3  # flat response below which a pixel holds no usable data
EDGE_PAD = 8  # pixels mirrored around a frame before cosmic-ray detection
TILE_MARGIN = 16  # context around a tile: covers astroscrappy's filter footprints


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
    neighbours in a (2·half+1)² box (the global median where a box has none)."""
    out = image.copy()
    ys, xs = np.nonzero(bad)
    if ys.size == 0:
        return out
    ny, nx = image.shape
    offsets = np.arange(-half, half + 1)
    yy = np.clip(ys[:, None, None] + offsets[None, :, None], 0, ny - 1)
    xx = np.clip(xs[:, None, None] + offsets[None, None, :], 0, nx - 1)
    values = np.where(bad[yy, xx], np.nan, image[yy, xx]).reshape(ys.size, -1)
    with warnings.catch_warnings():  # all-NaN boxes are expected; handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        fill = np.nanmedian(values, axis=1)
    good = ~bad & np.isfinite(image)
    fallback = np.median(image[good]) if good.any() else 0.0
    out[ys, xs] = np.where(np.isfinite(fill), fill, fallback)
    return out


def find_cosmics(
    sci: np.ndarray, var: np.ndarray, mask: np.ndarray, settings: CosmicSettings,
    read_noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic-ray pixels of a calibrated frame (electrons, sky included) with astroscrappy.

    Unusable pixels are filled from their neighbours rather than passed as ``inmask``
    (astroscrappy grows an input mask and then misses cosmic rays touching it).
    Saturated pixels are set above a ``satlevel`` that no real pixel reaches, so that
    astroscrappy protects saturated stars as it is designed to. Returns the CR mask and
    astroscrappy's cleaned image.
    """
    unusable = (mask & UNUSABLE) != 0
    data = fill_masked(sci, unusable)
    variance = fill_masked(var, unusable)
    sat = (mask & flag(Bit.SAT)) != 0
    top = float(np.max(data[~sat])) if (~sat).any() else 1.0
    satlevel = 2.0 * abs(top) + 1.0
    data[sat] = 2.0 * satlevel
    # Mirror a margin around the frame: astroscrappy's median filters otherwise miss most
    # cosmic rays within a few pixels of the edges.
    pad = EDGE_PAD if min(sci.shape) > 2 * EDGE_PAD else 0
    data = np.pad(data, pad, mode="reflect").astype(np.float32)
    variance = np.pad(np.maximum(variance, 1e-6), pad, mode="reflect").astype(np.float32)

    def detect(window: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
        return astroscrappy.detect_cosmics(
            data[window], invar=variance[window], sigclip=settings.sigclip,
            sigfrac=settings.sigfrac, objlim=settings.objlim, gain=1.0, readnoise=read_noise,
            satlevel=satlevel, niter=settings.niter, sepmed=True, cleantype="meanmask",
            fsmode="median",
        )

    if settings.tile <= 0:
        crmask, clean = detect((slice(None), slice(None)))
    else:
        crmask = np.zeros(data.shape, bool)
        clean = data.copy()
        for core in candidate_tiles(data, variance, settings):
            window = tuple(
                slice(max(c.start - TILE_MARGIN, 0), min(c.stop + TILE_MARGIN, n))
                for c, n in zip(core, data.shape, strict=True)
            )
            cr, cl = detect(window)
            inner = tuple(slice(c.start - w.start, c.stop - w.start)
                          for c, w in zip(core, window, strict=True))
            crmask[core] = cr[inner]
            clean[core] = cl[inner]
    if pad:
        crmask, clean = crmask[pad:-pad, pad:-pad], clean[pad:-pad, pad:-pad]
    crmask &= ~unusable
    if settings.protect_stars:
        # LA Cosmic flags cores of sharp stars (FWHM ~3 px): unflag what a PSF fit explains.
        crmask = unflag_stars(crmask, sci, var, ~unusable)
    return crmask, clean


def candidate_tiles(
    data: np.ndarray, variance: np.ndarray, settings: CosmicSettings
) -> list[tuple[slice, slice]]:
    """Tiles of the frame that may hold a cosmic ray: those with a pixel that stands
    ``candidate_sigma`` noise sigmas above the mean of its 8 neighbours *and* is sharper
    than a star (its excess over the neighbours is more than ``candidate_sharpness`` of
    its excess over the sky; a Gaussian star of FWHM 3 px gives about 0.3, a cosmic ray
    close to 1). Clean sky and stars need no cosmic-ray search, and skipping them is
    where the time goes: astroscrappy's median filters cost the same on every pixel.
    """
    padded = np.pad(data, 1, mode="edge")
    ny, nx = data.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + ny, 1 + dx : 1 + dx + nx]
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx
    ) / np.float32(8)
    excess = data - neighbours
    above_sky = data - np.float32(np.median(data))
    cand = (excess > settings.candidate_sigma * np.sqrt(variance)) & (
        excess > settings.candidate_sharpness * above_sky
    )
    ys, xs = np.nonzero(cand)
    t = settings.tile
    keys = np.unique(np.stack([ys // t, xs // t], axis=1), axis=0) if ys.size else []
    return [(slice(ty * t, min((ty + 1) * t, ny)), slice(tx * t, min((tx + 1) * t, nx)))
            for ty, tx in keys]


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
    electrons = (adu - masters.dark) * g
    flat = masters.flat
    with np.errstate(invalid="ignore", divide="ignore"):
        no_data = ~np.isfinite(flat) | (flat <= MIN_FLAT) | ~np.isfinite(electrons)
        safe_flat = np.where(no_data, np.float32(1), flat)
        sci = electrons / safe_flat
        # Poisson of photo-electrons and dark current, read noise, master noise; then the flat.
        var_e = (
            np.maximum(electrons, 0)
            + np.maximum(masters.dark_current, 0) * g
            + np.float32(detector.read_noise**2)
            + masters.dark_var * g * g
        )
        var = var_e / safe_flat**2 + sci**2 * masters.flat_var / safe_flat**2
        no_data |= ~np.isfinite(sci) | ~np.isfinite(var)  # overflow: nothing to trust
    mask = masters.mask.astype(MASK_DTYPE, copy=True)
    mask[saturated] |= flag(Bit.SAT)
    mask[no_data] |= flag(Bit.NO_DATA)
    sci = sci.astype(np.float32)
    var = var.astype(np.float32)
    t1 = time.perf_counter()
    n_cr = 0
    if cosmics.enabled:
        read_noise_e = detector.read_noise / float(np.median(safe_flat))
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
