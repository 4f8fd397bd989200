"""The per-frame calibration chain: numpy in, numpy out.

``raw ADU → overscan/trim → − (bias + dark) → × gain → ÷ flat`` gives the science plane in
electrons; the variance plane propagates Poisson noise of the photo-electrons and of the
dark current, read noise and the noise of the masters through the same steps; the mask
combines the static bad-pixel mask, saturation and NO_DATA, then cosmic rays found by
astroscrappy. Nothing here does I/O.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from astep_dask.config import CosmicSettings
from astep_dask.core.bits import MASK_DTYPE, Bit, flag
from astep_dask.core.cosmics import find_cosmics
from astep_dask.core.stats import MAD_TO_SIGMA, robust_sigma

__all__ = [
    "Detector",
    "FrameMasters",
    "Section",
    "calibrate_frame",
    "overscan_level",
    "overscan_trim",
    "sky_and_noise",
]

MIN_FLAT = 1e-3  # flat response below which a pixel holds no usable data


def overscan_level(region: np.ndarray) -> float:
    """The bias level of a frame from its overscan pixels: a 3-sigma clipped mean.

    Not the median: raw values are integers, and the median of integers is quantised to
    half an ADU, a bias that would survive averaging over frames.
    """
    values = np.asarray(region, np.float64).ravel()
    centre = np.median(values)
    scale = MAD_TO_SIGMA * np.median(np.abs(values - centre))
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
    level, spread = sky_and_noise(sci, mask == 0)
    summary = {
        "median": level,  # of the unmasked pixels, stars included: not the QA report's
        "mad_sigma": spread,  # star-free mesh "sky" and "noise" (report.metrics)
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


@dataclass(frozen=True)
class Section:
    """A rectangular region in 0-based numpy order, ``data[y0:y1, x0:x1]``."""

    y0: int
    y1: int
    x0: int
    x1: int

    @classmethod
    def from_fits(cls, text: str) -> Section:
        """Parse a FITS section string ``[x1:x2,y1:y2]`` (1-based, inclusive)."""
        m = re.fullmatch(r"\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*", text)
        if not m:
            raise ValueError(f"not a FITS section: {text!r}")
        x1, x2, y1, y2 = (int(g) for g in m.groups())
        return cls(min(y1, y2) - 1, max(y1, y2), min(x1, x2) - 1, max(x1, x2))

    def to_fits(self) -> str:
        """The FITS section string for this region."""
        return f"[{self.x0 + 1}:{self.x1},{self.y0 + 1}:{self.y1}]"

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, columns)`` slices for numpy indexing."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the region."""
        return self.y1 - self.y0, self.x1 - self.x0
