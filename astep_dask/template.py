"""Static-sky templates and difference frames for the KBMOD export (issue 11).

KBMOD searches difference images: on registered, sky-subtracted frames the stars fill
every result slot. This module builds, per night, a **template** of the static sky on the
night's reference grid and turns each registered frame into ``frame − template``.

**PSF matching.** Registration resamples every frame with a 2 × 2 overlap kernel whose
variance, ``fx(1−fx)`` and ``fy(1−fy)`` px² per axis (``register.shift_weights``), depends on
the frame's fractional offset: up to 0.25 px² added to a PSF of about 1.7 px² (σ ≈ 1.3 px),
enough to leave a bright star's residual far above the noise. Each frame's effective PSF
variance per axis is its measured Gaussian σ² before resampling plus that kernel's
variance; every frame (of the night and of the template) is convolved with a small
separable kernel that brings both axes to the largest effective variance of the set (a
3-tap ``[a/2, 1−a, a/2]`` kernel of variance ``a`` below 0.5 px², a sampled Gaussian of the
same variance above). Second moments then agree exactly; what is left is a difference of
higher moments, about 1 % of a star's peak. Flagged pixels take no part (normalised
convolution; a pixel with too much of its kernel flagged is flagged); variance goes
through the weights (``Σ w·var / Σ w``, the "area" convention of the export, right for
PSF-matched sums).

**Combination.** Per pixel, over the frames that are usable there: a centre (the median,
then the weighted mean of the kept values), the frames within ``sigma`` of their own noise
(√var: "ccdclip", so a handful of frames clip as well as many) kept, ``iterations`` times;
the template is the mean of the kept values with per-frame weights ``1 / sky variance``
(one number per frame, so the weighting does not bias a pixel towards its low draws), its
variance ``Σ w² var / (Σ w)²``. The last centre, the sum of weights and the number of kept
frames are stored beside the template, which makes the combination reproducible for any
one frame.

**Leave one out.** A frame that is part of its own template would subtract ``1/N`` of
itself (its noise and any mover on it) and its difference would not have the variance
``frame + template``. So a frame of the night is differenced against the template
*without it*: where the frame was kept, ``T' = (W·T − w·f) / (W − w)`` and
``V' = (W²·V − w²·var) / (W − w)²`` (exact for the clipped weighted mean); elsewhere
``T`` itself. Then ``science = f − T'``, ``variance = var + V'`` exactly, ``mask = frame
OR template``. Static sources cancel; a stationary trajectory summed over the night is
identically zero, so a shift-and-stack never finds a static residual.

**Neighbouring nights.** A slow mover (less than a PSF width over the night) is in every
frame of its own template and subtracts itself. With ``nights = N`` the template is made
instead from the frames of the N nearest other nights of the same field (``OBJECT``),
registered onto this night's reference grid from their stars (offsets as in
``register.py``: any pointing difference, integer part by a vote), where the mover is
elsewhere.

Products, in the export folder: ``DATE_TEMPLATE.fits`` (HDU 1 SCI, 2 MASK, 3 VAR: the
template in KBMOD's layout; then CENTRE, WSUM, NKEEP and a FRAMES table), the registered
sky-subtracted frames in ``registered/`` and, with neighbouring nights, their frames on
this night's grid in ``template_frames/``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage
from scipy.optimize import brentq

from . import __version__
from .config import TemplateSettings
from .fitsio import atomic_write, stamp
from .kbmod import OBS_ELEV, OBS_LAT, OBS_LONG, OBSERVATORY, Layers
from .mask import MASK_DTYPE, Bit, flag, header_cards
from .masters import digest_of
from .register import shift_weights

REGISTERED_FOLDER = "registered"
NEIGHBOUR_FOLDER = "template_frames"
REG_SUFFIX = "_REG.fits"
TEMPLATE_SUFFIX = "_TEMPLATE.fits"
OFF = flag(Bit.NO_DATA, Bit.EDGE)  # beyond the frame (padding of the PSF-matching kernel)
NO_TEMPLATE = flag(Bit.NO_DATA)  # too few template frames at a pixel
BRIGHT_HALO = flag(Bit.SUSPECT)  # near a pixel saturated in a template frame
SATURATED = flag(Bit.SAT)


# --------------------------------------------------------------------------- PSF matching


def _discrete_gaussian(s: float) -> np.ndarray:
    half = int(np.ceil(4 * s))
    x = np.arange(-half, half + 1)
    k = np.exp(-0.5 * (x / s) ** 2)
    return k / k.sum()


def _variance(k: np.ndarray) -> float:
    x = np.arange(k.size) - k.size // 2
    return float(np.sum(k * x * x))


def kernel_1d(variance: float) -> np.ndarray:
    """A symmetric 1-D kernel summing to 1 whose variance is ``variance`` px².

    Below 0.5 px², ``[a/2, 1−a, a/2]``; from 0.5 px², a sampled Gaussian whose σ is chosen
    so that the *discrete* variance is exact. 0 (or less) gives the identity ``[1]``.
    """
    a = float(variance)
    if a <= 1e-6:
        return np.ones(1)
    if a < 0.5:
        return np.array([a / 2, 1 - a, a / 2])
    s = brentq(lambda s: _variance(_discrete_gaussian(s)) - a, 0.3, 50.0, xtol=1e-10)
    return _discrete_gaussian(s)


def effective_psf_variance(sigma0: float, dx: float, dy: float) -> tuple[float, float]:
    """PSF variance (x, y) of a registered frame: σ² before resampling plus the variance of
    the overlap kernel of its offset."""
    _, fx, fy = shift_weights(dx, dy)
    s2 = float(sigma0) ** 2
    return s2 + fx * (1 - fx), s2 + fy * (1 - fy)


def matching_variances(effective: dict[str, tuple[float, float]]
                       ) -> tuple[float, dict[str, tuple[float, float]]]:
    """Target PSF variance (the largest effective variance of the set, both axes) and, per
    frame, the kernel variances (x, y) that bring it there."""
    if not effective:
        return float("nan"), {}
    target = max(max(v) for v in effective.values())
    return target, {k: (max(target - vx, 0.0), max(target - vy, 0.0))
                    for k, (vx, vy) in effective.items()}


def halo(kernel_var: tuple[float, float]) -> int:
    """Half-width (px) of the larger of a frame's two matching kernels."""
    return max(kernel_1d(kernel_var[0]).size, kernel_1d(kernel_var[1]).size) // 2


def _grow(mask: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """OR of the mask over every tap of ``k`` along ``axis`` (mask already padded)."""
    half = k.size // 2
    if half == 0:
        return mask
    out = mask.copy()
    n = mask.shape[axis]
    for j in range(-half, half + 1):
        if j == 0 or k[j + half] <= 0:
            continue
        dst = [slice(None)] * 2
        src = [slice(None)] * 2
        dst[axis] = slice(max(0, -j), n - max(0, j))
        src[axis] = slice(max(0, j), n - max(0, -j))
        out[tuple(dst)] |= mask[tuple(src)]
    return out


MAX_MASKED_WEIGHT = 0.25  # of a matching kernel, for its output pixel to stay usable


def _smooth_axis(sci: np.ndarray, var: np.ndarray, mask: np.ndarray, k: np.ndarray,
                 axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One axis of :func:`homogenise` (normalised convolution over usable pixels)."""
    usable = mask == 0
    s = ndimage.correlate1d(np.where(usable, sci, 0).astype(np.float32), k, axis=axis,
                            mode="constant")
    v = ndimage.correlate1d(np.where(usable, var, 0).astype(np.float32), k, axis=axis,
                            mode="constant")
    w = ndimage.correlate1d(usable.astype(np.float32), k, axis=axis, mode="constant")
    # beyond the frame (and registration's NO_DATA bands) is never filled in: a one-sided
    # kernel on a star's wing at an edge would bias it the same way in every frame
    off = _grow(((mask & OFF) != 0).astype(MASK_DTYPE), k, axis) != 0
    ok = usable & ~off & (w >= np.float32(1 - MAX_MASKED_WEIGHT - 1e-6))
    safe = np.where(ok, w, np.float32(1))
    return (np.where(ok, s / safe, 0).astype(np.float32),
            np.where(ok, v / safe, 0).astype(np.float32),
            np.where(ok, 0, _grow(mask, k, axis)).astype(MASK_DTYPE))


def homogenise(frame: Layers, kernel_var: tuple[float, float]) -> Layers:
    """Convolve a registered frame with its PSF-matching kernels (x then y).

    A normalised convolution: flagged pixels take no part, and the weights of the others
    are rescaled to 1, so that a cosmic ray does not flag its neighbours; an output pixel is
    flagged (with the bits of the flagged pixels under the kernel) when its own input pixel
    is, when more than :data:`MAX_MASKED_WEIGHT` of the kernel falls on flagged pixels, or
    when any of it falls beyond the frame (NO_DATA | EDGE: filling in there would bias a
    star's wing at the edge alike in every frame). Variance goes through the normalised weights
    (``Σ w·var / Σ w``, the area convention). The arithmetic of a pixel depends only on
    the rows and columns within the kernel's half-width, so a strip read with that many
    extra rows gives the same values, bit for bit, as the whole frame.
    """
    kx, ky = kernel_1d(kernel_var[0]), kernel_1d(kernel_var[1])
    hx, hy = kx.size // 2, ky.size // 2
    if hx == 0 and hy == 0:
        return frame
    pad = ((hy, hy), (hx, hx))
    sci = np.pad(np.nan_to_num(frame.sci).astype(np.float32), pad)
    var = np.pad(np.nan_to_num(frame.var).astype(np.float32), pad)
    mask = np.pad(frame.mask.astype(MASK_DTYPE), pad, constant_values=OFF)
    if hx:
        sci, var, mask = _smooth_axis(sci, var, mask, kx, 1)
    if hy:
        sci, var, mask = _smooth_axis(sci, var, mask, ky, 0)
    ny, nx = frame.sci.shape
    crop = (slice(hy, hy + ny), slice(hx, hx + nx))
    mask = mask[crop]
    bad = mask != 0
    return Layers(np.where(bad, np.nan, sci[crop]).astype(np.float32),
                  np.where(bad, np.nan, var[crop]).astype(np.float32), mask)


# --------------------------------------------------------------------------- combination


@dataclass(frozen=True)
class Template:
    """A template on the reference grid (or a strip of it)."""

    sci: np.ndarray  # float32, clipped weighted mean
    var: np.ndarray  # float32, its variance
    mask: np.ndarray  # int32, NO_DATA where fewer than min_frames were kept
    centre: np.ndarray  # float32, the centre the final clipping used
    wsum: np.ndarray  # float32, Σ w of the kept frames
    nkeep: np.ndarray  # int16, kept frames


def disk(radius: int) -> np.ndarray:
    """Boolean disk of ``radius`` px (a single pixel for 0)."""
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    return (xx * xx + yy * yy) <= r * r + 1e-9


def kept(sci: np.ndarray, var: np.ndarray, usable: np.ndarray, centre: np.ndarray,
         sigma: float, grow: int = 0, floor: float = 0.0) -> np.ndarray:
    """The clipping rule. A pixel of a frame is rejected when it is further than ``sigma``
    times its noise from the centre, the noise being √(var + (floor·centre)²) (the model
    error of a static source: a bright star's few per cent of registration and PSF
    mismatch is not a reason to reject a frame); a pixel *above* the centre (a mover, a
    cosmic ray) also rejects its frame within ``grow`` px. Works on one frame ``(y, x)`` or
    a stack ``(frame, y, x)``; float64, so the template task and a frame's difference task
    decide alike."""
    c = centre.astype(np.float64)
    with np.errstate(invalid="ignore"):
        dev = sci.astype(np.float64) - c
        limit = sigma * np.sqrt(var.astype(np.float64) + (floor * c) ** 2)
        high = usable & ~(dev <= limit)
        low = usable & ~(-dev <= limit)
    if grow > 0 and high.any():
        foot = disk(grow)
        if high.ndim == 3:
            foot = foot[None]
        high = ndimage.binary_dilation(high, structure=foot)
    return usable & ~high & ~low


def combine_frames(sci: np.ndarray, var: np.ndarray, usable: np.ndarray, weights: np.ndarray,
                   ts: TemplateSettings, grow: int = 0) -> Template:
    """Clipped weighted mean of a stack ``(frame, y, x)`` (see the module doc); a frame's
    rejection is grown by ``grow`` px (IRAF ``imcombine``'s ``grow``), so the wings of a
    mover whose core is rejected go with it."""
    sci = np.asarray(sci, np.float32)
    var = np.asarray(var, np.float32)
    usable = usable & np.isfinite(sci) & np.isfinite(var) & (var > 0)
    w = np.asarray(weights, np.float64).reshape(-1, 1, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = np.nanmedian(np.where(usable, sci, np.nan), axis=0).astype(np.float32)
        for it in range(max(ts.iterations, 1)):
            keep = kept(sci, var, usable, centre, ts.sigma, grow, ts.residual_floor)
            wk = np.where(keep, w, 0.0)
            wsum = wk.sum(axis=0)
            total = np.sum(wk * np.where(keep, sci, 0.0), axis=0)
            mean = np.where(wsum > 0, total / np.where(wsum > 0, wsum, 1), np.nan)
            if it < ts.iterations - 1:
                centre = np.where(wsum > 0, mean, centre).astype(np.float32)
        q = np.sum(wk * wk * np.where(keep, var, 0.0), axis=0)
        tvar = np.where(wsum > 0, q / np.where(wsum > 0, wsum, 1) ** 2, np.nan)
    nkeep = keep.sum(axis=0).astype(np.int16)
    mask = np.where(nkeep < max(ts.min_frames, 1), NO_TEMPLATE, 0).astype(MASK_DTYPE)
    return Template(sci=mean.astype(np.float32), var=tvar.astype(np.float32), mask=mask,
                    centre=centre, wsum=wsum.astype(np.float32), nkeep=nkeep)


def bright_halo(saturated: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` px of a pixel saturated in any template frame. A saturated
    star's wings are too bright, and its saturated area changes too much from frame to
    frame, to be subtracted to the noise: they are SUSPECT in the template."""
    if radius <= 0 or not saturated.any():
        return saturated
    return ndimage.binary_dilation(saturated, structure=disk(radius))


def leave_one_out(template: Template, frame: Layers, weight: float, ts: TemplateSettings,
                  grow: int = 0) -> Layers:
    """The template without one of its own frames (``frame`` homogenised as it was when the
    template was combined, ``weight`` its weight there)."""
    usable = (frame.mask == 0) & np.isfinite(frame.sci) & np.isfinite(frame.var) & (
        frame.var > 0)
    mine = kept(frame.sci, frame.var, usable, template.centre, ts.sigma, grow,
                ts.residual_floor)
    w = float(weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        wsum = template.wsum.astype(np.float64)
        rest = np.where(mine, wsum - w, wsum)
        good = rest > 1e-6 * max(w, 1e-30)
        safe = np.where(good, rest, 1.0)
        f = np.where(mine, frame.sci, 0.0).astype(np.float64)
        v = np.where(mine, frame.var, 0.0).astype(np.float64)
        tsci = (template.sci * wsum - w * f) / safe
        tvar = (template.var * wsum**2 - w * w * v) / safe**2
    n = template.nkeep.astype(np.int32) - mine
    bad = ~good | (n < max(ts.min_frames, 1)) | ~np.isfinite(tsci) | ~(tvar > 0)
    mask = np.where(bad, NO_TEMPLATE, 0).astype(MASK_DTYPE) | (template.mask & ~NO_TEMPLATE)
    return Layers(np.where(bad, np.nan, tsci).astype(np.float32),
                  np.where(bad, np.nan, np.maximum(tvar, 0)).astype(np.float32), mask)


def difference(frame: Layers, template: Layers, residual_floor: float = 0.0) -> Layers:
    """``frame − template``, variance ``frame + template (+ (floor·template)²)``, mask OR;
    pixels without a value get NO_DATA."""
    from .kbmod import science_plane

    out = science_plane(frame, template)
    var = out.var
    if residual_floor > 0:
        var = var + (residual_floor * np.abs(template.sci)) ** 2
    mask = out.mask.copy()
    with np.errstate(invalid="ignore"):
        broken = ~np.isfinite(out.sci) | ~np.isfinite(var) | ~(var > 0)
    mask[broken & (mask == 0)] |= NO_TEMPLATE
    return Layers(out.sci.astype(np.float32), var.astype(np.float32), mask)


# --------------------------------------------------------------------------- I/O


def template_path(kdir: Path, night: str) -> Path:
    """Where a night's template is written."""
    return kdir / f"{night}{TEMPLATE_SUFFIX}"


def read_rows(path: Path, y0: int, y1: int) -> Layers:
    """Rows ``[y0, y1)`` of a registered frame (KBMOD layout: 1 SCI, 2 MASK, 3 VAR)."""
    with fits.open(path, memmap=True) as hdul:
        sci = np.array(hdul[1].data[y0:y1], dtype=np.float32)
        mask = np.array(hdul[2].data[y0:y1], dtype=MASK_DTYPE)
        var = np.array(hdul[3].data[y0:y1], dtype=np.float32)
    return Layers(sci, var, mask)


@dataclass(frozen=True)
class TemplateFrame:
    """A frame going into a template (a row of the template's FRAMES table)."""

    stem: str
    night: str
    path: Path  # registered frame on this night's grid
    mjd: float
    weight: float
    kernel_var: tuple[float, float]
    own: bool  # a frame of the night itself (left out of its own template)
    provenance: str


@dataclass(frozen=True)
class StripJob:
    """Rows ``[y0, y1)`` of a template: every frame is read with ``pad`` rows more."""

    frames: tuple[TemplateFrame, ...]
    y0: int
    y1: int
    ny: int
    pad: int
    settings: TemplateSettings
    grow: int = 0
    sat_halo: int = 0


def strip_task(job: StripJob) -> tuple[int, int, Template, float]:
    """Worker task: homogenise and combine one strip of every template frame."""
    t0 = time.perf_counter()
    a, b = max(job.y0 - job.pad, 0), min(job.y1 + job.pad, job.ny)
    lo, n = job.y0 - a, job.y1 - job.y0
    sci, var, usable = [], [], []
    saturated = None
    for fr in job.frames:
        block = read_rows(fr.path, a, b)
        if job.settings.psf_match:
            # Beyond rows a and b the homogenisation pads as beyond the frame: at the frame's
            # edges that is what the whole-frame computation does; inside, it only touches
            # the ``pad`` extra rows, which are dropped.
            block = homogenise(block, fr.kernel_var)
        sci.append(block.sci)
        var.append(block.var)
        usable.append(block.mask == 0)
        sat = (block.mask & SATURATED) != 0
        saturated = sat if saturated is None else saturated | sat
    weights = np.array([fr.weight for fr in job.frames])
    # The clipping's grown rejections and the saturation halo reach across rows: combine
    # the extra rows too, keep the strip's own.
    full = combine_frames(np.array(sci), np.array(var), np.array(usable), weights,
                          job.settings, job.grow)
    full.mask[bright_halo(saturated, job.sat_halo)] |= BRIGHT_HALO
    rows = slice(lo, lo + n)
    tpl = Template(**{f.name: np.ascontiguousarray(getattr(full, f.name)[rows])
                      for f in dataclasses.fields(Template)})
    return job.y0, job.y1, tpl, time.perf_counter() - t0


def write_template(path: Path, tpl: Template, frames: list[TemplateFrame], cards: dict,
                   wcs: fits.Header | None) -> Path:
    """The template file: PRIMARY, SCI, MASK, VAR (KBMOD's layout), CENTRE, WSUM, NKEEP,
    FRAMES."""
    primary = fits.PrimaryHDU()
    h = primary.header
    for key, value in cards.items():
        h[key] = value
    h["OBSERVAT"] = (OBSERVATORY, "Concordia Station, Antarctica")
    h["OBS-LAT"] = (OBS_LAT, "[deg] observatory latitude (north +)")
    h["OBS-LONG"] = (OBS_LONG, "[deg] observatory longitude (east +)")
    h["OBS-ELEV"] = (OBS_ELEV, "[m] observatory elevation")
    header_cards(h)
    stamp(h)
    planes = [
        fits.ImageHDU(tpl.sci, name="SCI"), fits.ImageHDU(tpl.mask, name="MASK"),
        fits.ImageHDU(tpl.var, name="VAR"), fits.ImageHDU(tpl.centre, name="CENTRE"),
        fits.ImageHDU(tpl.wsum, name="WSUM"), fits.ImageHDU(tpl.nkeep, name="NKEEP"),
    ]
    planes[0].header["BUNIT"] = ("electron", "static sky, sky-subtracted, PSF-matched")
    planes[1].header["BUNIT"] = ("", "mask bits, value 1<<bit, see MP_* keywords")
    header_cards(planes[1].header)
    planes[2].header["BUNIT"] = ("electron2", "variance of SCI")
    planes[3].header["COMMENT"] = "centre of the final clipping (leave-one-out rebuilds)"
    planes[4].header["COMMENT"] = "sum of the weights of the kept frames"
    planes[5].header["COMMENT"] = "number of kept frames"
    for hdu in planes:
        if wcs is not None:
            hdu.header.update(wcs)
    cols = [
        fits.Column("STEM", "48A", array=[f.stem for f in frames]),
        fits.Column("NIGHT", "16A", array=[f.night for f in frames]),
        fits.Column("FILE", "80A", array=[_relative(f.path, path.parent) for f in frames]),
        fits.Column("MJD", "D", unit="d", array=[f.mjd for f in frames]),
        fits.Column("WEIGHT", "D", array=[f.weight for f in frames]),
        fits.Column("KVAR_X", "D", unit="pix2", array=[f.kernel_var[0] for f in frames]),
        fits.Column("KVAR_Y", "D", unit="pix2", array=[f.kernel_var[1] for f in frames]),
        fits.Column("OWN", "L", array=[f.own for f in frames]),
    ]
    table = fits.BinTableHDU.from_columns(cols, name="FRAMES")
    return atomic_write(fits.HDUList([primary, *planes, table]), path)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def read_template(path: Path) -> tuple[fits.Header, Template, dict[str, float]]:
    """Header, planes and the weights of the template's frames by stem."""
    with fits.open(path, memmap=False) as hdul:
        h = hdul[0].header.copy()
        tpl = Template(
            sci=np.asarray(hdul["SCI"].data, np.float32),
            var=np.asarray(hdul["VAR"].data, np.float32),
            mask=np.asarray(hdul["MASK"].data, MASK_DTYPE),
            centre=np.asarray(hdul["CENTRE"].data, np.float32),
            wsum=np.asarray(hdul["WSUM"].data, np.float32),
            nkeep=np.asarray(hdul["NKEEP"].data, np.int16),
        )
        table = hdul["FRAMES"].data
        weights = {str(s).strip(): float(w) for s, w in zip(table["STEM"], table["WEIGHT"],
                                                             strict=True)}
    return h, tpl, weights


def template_provenance(frames: list[TemplateFrame], target: float, ts: TemplateSettings
                        ) -> str:
    """Hash of the template's frames (their provenance, weights, kernels) and settings."""
    return digest_of([(f.stem, f.provenance, round(f.weight, 9),
                       [round(v, 9) for v in f.kernel_var]) for f in frames],
                     round(target, 9), ts.digest(), __version__)


def spread(items: list, n: int) -> list:
    """At most ``n`` items evenly spread through the list (all when ``n`` <= 0)."""
    if n <= 0 or len(items) <= n:
        return list(items)
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


def strips(ny: int, nx: int, n_frames: int, memory_mb: float) -> list[tuple[int, int]]:
    """Row ranges of the combination tasks: about ``memory_mb`` of pixels of all frames
    (about 40 bytes a pixel a frame, reading and working copies) per task."""
    rows = int(max(1, memory_mb * 1e6 // max(40 * nx * max(n_frames, 1), 1)))
    rows = min(rows, ny)
    n = int(np.ceil(ny / rows))
    edges = np.linspace(0, ny, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def assemble(parts: list[tuple[int, int, Template]], ny: int, nx: int) -> Template:
    """One template from its strips."""
    out = {name: np.zeros((ny, nx), dtype) for name, dtype in (
        ("sci", np.float32), ("var", np.float32), ("mask", MASK_DTYPE),
        ("centre", np.float32), ("wsum", np.float32), ("nkeep", np.int16))}
    for y0, y1, t in parts:
        for name in out:
            out[name][y0:y1] = getattr(t, name)
    return Template(**out)


# --------------------------------------------------------------------------- difference task


@dataclass(frozen=True)
class DifferenceJob:
    """One frame of the night to difference against the template."""

    stem: str
    registered: Path
    output: Path
    template: Path
    kernel_var: tuple[float, float]
    weight: float | None  # the frame's weight in its own template; None: not in it
    provenance: str
    template_provenance: str
    target_sigma: float
    settings: TemplateSettings
    wcs: fits.Header | None
    mode: str
    force: bool = False
    grow: int = 0


def difference_task(job: DifferenceJob) -> dict:
    """Worker task: the KBMOD file of one frame, ``registered − template``.

    Returns a summary row (``status`` done, skipped or failed with a ``reason``); write
    errors raise, naming the output.
    """
    from .kbmod import PROV_KEY, existing_row, filter_factor, kbmod_hdul, read_calibrated

    row: dict = {"stem": job.stem, "output": job.output.name, "stage": "difference",
                 "provenance": job.provenance}
    if not job.force and (old := existing_row(job.output, job.provenance)) is not None:
        return {**row, **old, "status": "skipped"}
    t0 = time.perf_counter()
    try:
        header, frame = read_calibrated(job.registered)
        _, tpl, _ = read_template(job.template)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read inputs: {exc}"}
    if frame.sci.shape != tpl.sci.shape:
        return {**row, "status": "failed",
                "reason": f"shape {frame.sci.shape} differs from the template's"}
    ts = job.settings
    if ts.psf_match:
        frame = homogenise(frame, job.kernel_var)
    if job.weight is not None:
        used = leave_one_out(tpl, frame, job.weight, ts, job.grow)
    else:
        used = Layers(tpl.sci, tpl.var, tpl.mask)
    out = difference(frame, used, ts.residual_floor)
    cards = {
        PROV_KEY: (job.provenance, "hash of registered frame, template and settings"),
        "KBPLANE": ("difference", "SCI = registered frame - static-sky template"),
        "TEMPLATE": (job.template.name, "static-sky template subtracted"),
        "TPLPROV": (job.template_provenance, "provenance hash of the template"),
        "TPLMODE": (job.mode, "template: this night (leave-one-out) or other nights"),
        "TPLLOO": (job.weight is not None, "T: this frame left out of its template"),
        "TPLFLOOR": (ts.residual_floor, "fraction of |template| added to VAR (quadr.)"),
        "REGFILE": (f"{REGISTERED_FOLDER}/{job.registered.name}",
                    "registered sky-subtracted frame"),
        "PSFMATCH": (ts.psf_match, "T: PSF matched to the template's (Gaussian var)"),
        "PSFKVARX": (float(job.kernel_var[0]), "[px2] x variance of the matching kernel"),
        "PSFKVARY": (float(job.kernel_var[1]), "[px2] y variance of the matching kernel"),
        "PSFSIGRG": (header.get("PSFSIGMA", -1.0), "[px] PSF sigma of the registered frame"),
    }
    sigma = float(header.get("PSFSIGMA", -1.0))
    if ts.psf_match:
        sigma = job.target_sigma
        cards["PSFSIGMA"] = (round(job.target_sigma, 4),
                             "[px] Gaussian PSF sigma of SCI (KBMOD psf)")
        cards["PSFFWHM"] = (round(2.354820045 * job.target_sigma, 4), "[px] PSF FWHM of SCI")
    # The frame's noise went through its registration and matching kernels; the
    # template's, through its own frames' kernels, alike to within a few per cent, and it
    # is a small part of VAR: the frame's factor is used for the whole of VAR.
    cards["FILTVARF"] = (round(filter_factor(
        float(header.get("REGDX", 0.0)), float(header.get("REGDY", 0.0)),
        job.kernel_var if ts.psf_match else (0.0, 0.0), sigma,
        float(header.get("VARPIXF", 1.0)), str(header.get("VARMODE", "area"))), 5),
        "Var(psi)/phi of PSFSIGMA filter: use VAR x this")
    hdul = kbmod_hdul(header, out, cards, job.wcs)
    hdul[1].header["BUNIT"] = ("electron", "registered frame minus static-sky template")
    try:
        atomic_write(hdul, job.output)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {job.output}: {exc.strerror}") from exc
    usable = out.mask == 0
    return {**row, "status": "done", "n_masked": int((~usable).sum()),
            "psf_sigma": job.target_sigma if ts.psf_match else header.get("PSFSIGMA"),
            "t_difference": time.perf_counter() - t0}


def template_cards(night: str, mode: str, frames: list[TemplateFrame], target: float,
                   provenance: str, reference: str, ts: TemplateSettings) -> dict:
    """Primary-header cards of the template file."""
    mjd = float(np.mean([f.mjd for f in frames])) if frames else 0.0
    return {
        "NIGHT": (night, "night of the export"),
        "MJD": (mjd, "[d] mean mid-exposure MJD of the template frames"),
        "REFFRAME": (reference, "reference frame: its grid is this grid"),
        "TPLMODE": (mode, "this night (leave-one-out) or other nights"),
        "TPLNFRM": (len(frames), "frames combined"),
        "TPLNGHTS": (",".join(sorted({f.night for f in frames})), "nights of the frames"),
        "TPLPROV": (provenance, "hash of the frames and settings"),
        "TPLSIG": (ts.sigma, "clipping threshold (each frame's own noise)"),
        "TPLITER": (ts.iterations, "clipping iterations"),
        "TPLMINF": (ts.min_frames, "fewer kept frames: NO_DATA"),
        "TPLGROW": (ts.grow, "rejections grown by this x PSF sigma"),
        "TPLSATH": (ts.saturation_halo, "SUSPECT within this x FWHM of SAT pixels"),
        "PSFMATCH": (ts.psf_match, "T: frames PSF-matched before combination"),
        "PSFVAR": (round(target, 6), "[px2] PSF variance per axis after matching"),
        "PSFSIGMA": (round(float(np.sqrt(target)), 4) if np.isfinite(target) else -1.0,
                     "[px] Gaussian PSF sigma of SCI"),
        "BUNIT": ("electron", "unit of SCI"),
    }


# --------------------------------------------------------------------------- orchestration


def _night_date(name: str):
    import datetime

    try:
        return datetime.date.fromisoformat(name[:10])
    except ValueError:
        return None


def neighbour_nights(night_dir: Path, out: Path | None, n: int, field: str, filt: str
                     ) -> tuple[list[tuple[str, list]], list[dict]]:
    """The ``n`` nights nearest in date to ``night_dir`` (other than it) with calibrated
    frames of the same field (``OBJECT``, when both say) and filter: ``[(night, frames)]``
    nearest first, and rows for the nights passed over (with the reason)."""
    from .kbmod import calibrated_frames
    from .pipeline import output_dir

    this = _night_date(night_dir.name)
    names = {p.name for p in night_dir.parent.iterdir() if p.is_dir()}
    if out is not None and Path(out).is_dir():
        names |= {p.name for p in Path(out).iterdir() if p.is_dir()}
    names.discard(night_dir.name)

    def distance(name: str) -> tuple:
        d = _night_date(name)
        return (abs((d - this).days) if d and this else 10**6, name)

    chosen, skipped = [], []
    for name in sorted(names, key=distance):
        if len(chosen) >= n:
            break
        cal = output_dir(night_dir.parent / name, Path(out) if out is not None else None)
        if not cal.is_dir():
            continue
        frames, _ = calibrated_frames(cal)
        if not frames:
            continue
        other = str(fits.getheader(frames[0].path, 0).get("OBJECT", "") or "").strip()
        if field and other and other != field:
            skipped.append({"night": name, "reason": f"field {other!r}, not {field!r}"})
            continue
        frames = [f for f in frames if not filt or not f.filter or f.filter == filt]
        if not frames:
            skipped.append({"night": name, "reason": f"no frame in filter {filt!r}"})
            continue
        chosen.append((name, frames))
    return chosen, skipped


def _as_written(row: dict) -> dict:
    """A registration row with the figures the template uses rounded as the file's header
    holds them, so a re-run that reads them back (skipped frames) makes the same template."""
    from .kbmod import _f

    out = dict(row)
    for key, digits in (("sky_rms", 3), ("psf_sigma_cal", 4), ("dx", 6), ("dy", 6)):
        if out.get(key) is not None:
            out[key] = _f(out[key], digits)
    return out


def _weight(row: dict) -> float:
    rms = row.get("sky_rms")
    try:
        rms = float(rms)
    except (TypeError, ValueError):
        return 1.0
    return 1.0 / rms**2 if np.isfinite(rms) and rms > 0 else 1.0


def _sigma0(row: dict, fallback: float) -> float:
    try:
        s = float(row.get("psf_sigma_cal"))
    except (TypeError, ValueError):
        return fallback
    return s if np.isfinite(s) and s > 0 else fallback


def run_template_stage(client, *, night_dir: Path, out: Path | None, kdir: Path, night: str,
                       reference, field: str, filt: str, rows: list[dict], ks, ts:
                       TemplateSettings, force: bool, window: int, retries: int,
                       progress=None) -> tuple[list[dict], dict]:
    """Template, then one difference task per registered frame of the night.

    ``rows`` are the registration rows (``output`` a file of ``registered/``). Returns the
    rows of the KBMOD files (registration figures plus the difference's ``output``,
    ``status``, ``provenance``, ``psf_sigma``) and a summary of the template (``file``,
    ``mode``, ``frames``, ``nights``, ``skipped_nights``, ``failed_frames``, ``psf_sigma``,
    ``provenance``, ``error``).
    """
    from .kbmod import ExportJob, _run_bounded, export_task, frame_provenance

    reg_dir = kdir / REGISTERED_FOLDER
    good = [_as_written(r) for r in rows if r.get("status") in ("done", "skipped")]
    info: dict = {"file": None, "mode": None, "frames": 0, "nights": [], "skipped_nights": [],
                  "failed_frames": [], "psf_sigma": None, "provenance": None, "error": None,
                  "seconds": 0.0}
    t0 = time.perf_counter()
    sig_med = float(np.median([_sigma0(r, np.nan) for r in good] or [np.nan]))
    sig_med = sig_med if np.isfinite(sig_med) else ks.psf_sigma_guess

    def tframe(r: dict, path: Path, night_name: str, own: bool) -> TemplateFrame:
        return TemplateFrame(stem=r["stem"], night=night_name, path=path, mjd=float(r["mjd"]),
                             weight=_weight(r), kernel_var=(0.0, 0.0), own=own,
                             provenance=str(r.get("provenance", "")))

    tframes: list[TemplateFrame] = []
    effective: dict[str, tuple[float, float]] = {}
    if ts.nights <= 0:
        info["mode"] = "night, leave-one-out"
        tframes = [tframe(r, reg_dir / r["output"], night, True)
                   for r in spread(good, ts.max_frames)]
    else:
        nights, skipped = neighbour_nights(night_dir, out, ts.nights, field, filt)
        info["skipped_nights"] = skipped
        info["nights"] = [n for n, _ in nights]
        info["mode"] = "nights " + ",".join(info["nights"])
        per_night = (ts.max_frames // max(len(nights), 1)) if ts.max_frames > 0 else 0
        ndir = kdir / NEIGHBOUR_FOLDER
        jobs = []
        for _, frames in nights:
            for f in spread(frames, per_night):
                jobs.append(ExportJob(frame=f, output=ndir / f"{f.stem}{REG_SUFFIX}",
                                      provenance=frame_provenance(f, reference, ks),
                                      reference=reference, settings=ks, force=force))
        night_of = {f.stem: n for n, frames in nights for f in frames}
        done_rows: list[dict] = []

        def registered(job, row) -> None:
            done_rows.append(row)
            if progress:
                progress(len(done_rows), len(jobs), {**row, "stage": "template frame"})

        _run_bounded(client, export_task, jobs, window, retries, f"kbmod-tframe-{night}",
                     registered)
        for r in sorted(done_rows, key=lambda r: (r["mjd"], r["stem"])):
            if r["status"] in ("done", "skipped"):
                r = _as_written(r)
                tframes.append(tframe(r, ndir / r["output"], night_of.get(r["stem"], ""),
                                      False))
                effective[r["stem"]] = effective_psf_variance(
                    _sigma0(r, sig_med), float(r["dx"]), float(r["dy"]))
            else:
                info["failed_frames"].append({k: r.get(k) for k in ("file", "reason")})
    for r in good:
        effective[r["stem"]] = effective_psf_variance(_sigma0(r, sig_med), float(r["dx"]),
                                                      float(r["dy"]))
    need = max(ts.min_frames, 1) + (1 if ts.nights <= 0 else 0)
    if len(tframes) < need:
        where = "this night" if ts.nights <= 0 else f"{ts.nights} neighbouring night(s)"
        info["error"] = (f"template: {len(tframes)} usable frame(s) from {where}, at least "
                         f"{need} needed (use the sky-only export or other nights)")
        return [], info
    if ts.psf_match:
        target, kvars = matching_variances(effective)
    else:
        target, kvars = float(np.mean([max(v) for v in effective.values()])), {}
    mean_w = float(np.mean([f.weight for f in tframes]))
    tframes = [dataclasses.replace(f, weight=f.weight / mean_w,
                                   kernel_var=kvars.get(f.stem, (0.0, 0.0)))
               for f in tframes]
    grow = round(ts.grow * float(np.sqrt(target)))
    sat_halo = round(ts.saturation_halo * 2.354820045 * float(np.sqrt(target)))
    tprov = template_provenance(tframes, target, ts)
    tpath = template_path(kdir, night)
    info.update(file=tpath, frames=len(tframes), provenance=tprov,
                psf_sigma=float(np.sqrt(target)))
    if force or _card(tpath, "TPLPROV") != tprov:
        ny, nx = reference.shape
        # a row's result depends on rows within the kernel's half-width, then on the
        # rejections grown by ``grow`` px at each clipping iteration
        pad = max([halo(f.kernel_var) for f in tframes] + [0]) + max(
            (ts.iterations + 1) * grow, sat_halo)
        jobs = [StripJob(frames=tuple(tframes), y0=a, y1=b, ny=ny, pad=pad, settings=ts,
                         grow=grow, sat_halo=sat_halo)
                for a, b in strips(ny, nx, len(tframes), ts.memory_mb)]
        parts: list = []

        def combined(job, res) -> None:
            parts.append(res[:3])
            if progress:
                progress(len(parts), len(jobs), {"file": f"rows {job.y0}-{job.y1}",
                                                 "status": "combined", "stage": "template"})

        _run_bounded(client, strip_task, jobs, window, retries, f"kbmod-template-{night}",
                     combined)
        cards = template_cards(night, info["mode"], tframes, target, tprov, reference.stem, ts)
        write_template(tpath, assemble(parts, ny, nx), tframes, cards, reference.wcs)
    weights = {f.stem: f.weight for f in tframes if f.own}
    by_stem = {r["stem"]: r for r in good}
    djobs = [
        DifferenceJob(
            stem=r["stem"], registered=reg_dir / r["output"],
            output=kdir / r["output"].replace(REG_SUFFIX, "_KBMOD.fits"), template=tpath,
            kernel_var=kvars.get(r["stem"], (0.0, 0.0)), weight=weights.get(r["stem"]),
            provenance=digest_of(r.get("provenance"), tprov, ts.digest(), __version__),
            template_provenance=tprov, target_sigma=float(np.sqrt(target)), settings=ts,
            wcs=reference.wcs, mode=info["mode"], force=force, grow=grow)
        for r in good
    ]
    out_rows: list[dict] = []

    def differenced(job, row) -> None:
        merged = {**by_stem[job.stem], **{k: v for k, v in row.items() if v is not None}}
        merged["registered"] = by_stem[job.stem]["output"]
        merged["provenance_registered"] = by_stem[job.stem].get("provenance")
        out_rows.append(merged)
        if progress:
            progress(len(out_rows), len(djobs), {**merged, "file": job.output.name})

    _run_bounded(client, difference_task, djobs, window, retries, f"kbmod-diff-{night}",
                 differenced)
    info["seconds"] = time.perf_counter() - t0
    return out_rows, info


def _card(path: Path, key: str) -> str | None:
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            value = hdul[0].header.get(key)
            return None if value is None else str(value)
    except (OSError, ValueError, TypeError, IndexError):
        return None
