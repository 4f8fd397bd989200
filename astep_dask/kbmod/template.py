"""Static-sky templates for the difference frames of the KBMOD export.

KBMOD searches difference images: on registered, sky-subtracted frames the stars fill
every result slot. This module builds, per night, a **template** of the static sky on the
night's reference grid and turns each registered frame into ``frame − template``.

**PSF matching.** Frames differ in seeing, and registration's resampling kernel can widen
the PSF too: the 2 × 2 overlap kernel (the default) by ``fx(1−fx)`` and ``fy(1−fy)`` px²
per axis, up to 0.25 px² on a PSF of about 1.7 px² (σ ≈ 1.3 px), enough to leave a bright
star's residual far above the noise; the cubic kernel by nothing
(:func:`astep_dask.core.register.kernel_moment`). Each frame's effective PSF
variance per axis is its measured Gaussian σ² before resampling plus that kernel's
second moment. The template's PSF variance ``T`` is chosen
(:func:`astep_dask.kbmod.kernels.template_target`, ``[template] psf_target = "snr"``) to
maximise the night's summed matched-filter SNR²: the frames no wider than ``T`` make the
template, each convolved with a small separable kernel that brings both axes to ``T`` (a
3-tap ``[a/2, 1−a, a/2]`` kernel of variance ``a`` below 0.5 px², a sampled Gaussian of the
same variance above); a frame wider than ``T`` (bad seeing) is left out of the template,
which is convolved to that frame's PSF instead of blurring every frame to it. With steady
seeing ``T`` is the widest frame's and every frame is in (``psf_target = "widest"``
always does that). Second moments then agree exactly; what is left is a difference of
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

**Movers.** Leaving one frame out is not enough for a mover that moves only a few PSF
widths over the night: at its pixels in frame i, the frames next to i in time hold it too,
and a faint one is below the clipping (on a 20-frame night at 0.5 px a frame it kept
0.59–0.63 of its flux). So, per pixel, the runs of consecutive frames that hold a
transient excursion are left out as well (``mover_sigma`` > 0, :func:`moving_runs`): the
matched-filter contrast of windows of 1, 3, 7, ... frames against the rest of the night,
above ``mover_sigma``, marks the window's frames, grown by one PSF σ in each frame; each
pixel keeps the time ranks ``[first, last]`` of its marks (planes ``MOVFIRST`` and
``MOVLAST``; the frames' ranks in the FRAMES table), narrowed where they would leave fewer
than ``min_frames`` + 1 frames (the template there is then made of the frames furthest
in time from the mover's passage: noisier, its VAR says so, but clean), and a frame's
leave-one-out knows whether it was in a run
(:func:`~astep_dask.kbmod.difference.leave_one_out`). A slower mover the longer windows
see more deeply; on noise alone about 1 % of the values are left out.

**Tracks.** A faint slow mover is below ``mover_sigma`` in every window at one pixel, yet
summed along its track over the night it is well above the noise. With the night's own
frames, a third pass searches linear tracks up to ``track_reach`` PSF σ long
(:func:`moving_tracks`: every pixel, a grid of end-to-end displacements, frames binned in
time) in the residuals from the template so far; a track above ``track_sigma`` has its
frames marked along it, grown by 2 σ, and they join the runs. Bright residuals (a bright
mover, which the windows find) are left out of this search with their wings, and each
time bin adds at most 3 of its σ, so that a bright mover crossing a slow track does not
make one.
On a simulated 1024², 20-frame night on 2 workers the template stage (template and
differences) takes 27.4 s with it against 17.0 s without
(``benchmarks/template_movers.py --size 1024 --mover-sigma 4 --track-sigma 5 0``), and
the overlap between blocks grows from 14 rows and columns to about 60.

**Neighbouring nights.** A mover slower still (less than a PSF width over the night) is in
every frame of its own template and subtracts itself. With ``nights = N`` the template is made
instead from the frames of the N nearest other nights of the same field (``OBJECT``),
registered onto this night's reference grid from their stars (offsets as in
:mod:`astep_dask.core.register`: any pointing difference, integer part by a vote), where
the mover is elsewhere.

Products, in the export folder: ``DATE_TEMPLATE.fits`` (HDU 1 SCI, 2 MASK, 3 VAR: the
template in KBMOD's layout; then CENTRE, WSUM, NKEEP, a FRAMES table, MOVFIRST, MOVLAST),
the registered sky-subtracted frames in ``registered/`` and, with neighbouring nights,
their frames on this night's grid in ``template_frames/``.

This module holds the pure steps (PSF matching, combination), the strip task that combines
rows of the template on a worker, the template file, and the choice of neighbouring
nights; :mod:`astep_dask.kbmod.stage` runs them and :mod:`astep_dask.kbmod.difference`
makes the difference frames.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from astep_dask.config import TemplateSettings
from astep_dask.core.bits import MASK_DTYPE, SEARCH_IGNORED, Bit, flag
from astep_dask.io.fitsio import atomic_write, header_cards
from astep_dask.io.products import KBMOD_TEMPLATE_SUFFIX, output_dir
from astep_dask.io.provenance import digest_of, stamp
from astep_dask.kbmod.kernels import kernel_1d, psf_1d
from astep_dask.kbmod.products import (
    OBS_ELEV,
    OBS_LAT,
    OBS_LONG,
    OBSERVATORY,
    Layers,
    export_frames,
)
from astep_dask.version import __version__

__all__ = [
    "BRIGHT_HALO",
    "MAX_MASKED_WEIGHT",
    "NO_TEMPLATE",
    "OFF",
    "SATURATED",
    "TEMPLATE_BYTES",
    "TRACK_BRIGHT",
    "TRACK_BRIGHT_GROW",
    "TRACK_CLIP",
    "TRACK_FINE",
    "TRACK_GROW",
    "TRACK_MIN",
    "TRACK_STEP",
    "StripJob",
    "Template",
    "TemplateFrame",
    "TrackSearch",
    "assemble",
    "blocks",
    "bright_halo",
    "combine_frames",
    "disk",
    "homogenise",
    "in_run",
    "kept",
    "mover_pad",
    "moving_runs",
    "moving_tracks",
    "neighbour_nights",
    "read_rows",
    "read_template",
    "run_grow",
    "spread",
    "strip_task",
    "template_cards",
    "template_path",
    "template_provenance",
    "time_ranks",
    "track_displacements",
    "track_grow",
    "track_halo",
    "track_runs",
    "tracks_searched",
    "windows",
    "write_template",
]

OFF = flag(Bit.NO_DATA, Bit.EDGE)  # beyond the frame (padding of the PSF-matching kernel)


NO_TEMPLATE = flag(Bit.NO_DATA)  # too few template frames at a pixel


BRIGHT_HALO = flag(Bit.SUSPECT)  # near a pixel saturated in a template frame


SATURATED = flag(Bit.SAT)


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
    """One axis of :func:`homogenise` (normalised convolution over usable pixels: those
    without flags, or with only the bits of repaired pixels, HOT and DEAD, which keep their
    bits)."""
    usable = (mask & ~SEARCH_IGNORED) == 0
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
            np.where(ok, mask & SEARCH_IGNORED, _grow(mask, k, axis)).astype(MASK_DTYPE))


def homogenise(frame: Layers, kernel_var: tuple[float, float]) -> Layers:
    """Convolve a registered frame with its PSF-matching kernels (x then y).

    A normalised convolution: flagged pixels take no part (repaired ones, HOT or DEAD only,
    do, and keep their bits), and the weights of the others
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
    bad = (mask & ~SEARCH_IGNORED) != 0
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
    # int16, the time ranks (among the template's frames) of the first and last frame of
    # a mover's run at each pixel, left out of the template (-1: none)
    first: np.ndarray | None = None
    last: np.ndarray | None = None


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


def windows(n_frames: int) -> list[int]:
    """Half-widths ``h`` of the time windows of :func:`moving_runs` (``2h + 1`` consecutive
    frames: 1, 3, 7, 15, ... up to half the frames)."""
    out, h = [0], 1
    while 2 * h + 1 <= n_frames // 2:
        out.append(h)
        h = 2 * h + 1
    return out


def moving_runs(sci: np.ndarray, var: np.ndarray, keep: np.ndarray, centre: np.ndarray,
                rank: np.ndarray, psf_sigma: float, nsigma: float, grow: int = 0,
                floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The runs of consecutive frames that hold a transient excursion (a mover), per pixel.

    The residuals ``sci − centre`` of the values ``keep`` go through the matched filter of
    a Gaussian PSF of σ ``psf_sigma`` (``ψ = Σ g·r``, ``φ = Σ g²·var`` per frame). For
    windows of 1, 3, 7, ... frames consecutive in time (:func:`windows`; ``rank`` is each
    frame's place in time order), the contrast is the window's mean ψ minus the mean ψ of
    the other frames (not the residual from ``centre``: a slow mover is in many frames at a
    pixel, so in the centre too), its noise from φ, plus ``(floor · ψ_centre)²`` (a static
    star's model error). A window whose contrast is above ``nsigma`` times its noise marks
    its frames; the marks are grown by ``grow`` px in each frame (:func:`run_grow`: the
    mover's wings). A mover of flux F per frame moving v px per frame stays on a pixel for
    about 2.5 × √2 σ / v frames, which a window of that length sees with √(that many) times
    its per-frame SNR: the slower it is (the more of its own template it would fill), the
    fainter it can be and still be seen.

    Returns ``(first, last)``, int16 planes: the time ranks between which (inclusive) the
    frames are a mover's at each pixel, −1 where none.
    """
    n = sci.shape[0]
    ny, nx = sci.shape[1:]
    psi, phi, pc = _filtered(sci, var, keep, centre, psf_sigma)
    order = np.argsort(rank, kind="stable")

    def cumulative(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.zeros((1, ny, nx)), np.cumsum(a[order], axis=0,
                                                                 dtype=np.float64)])

    cpsi, cphi, cnum = cumulative(psi), cumulative(phi), cumulative(keep.astype(np.float32))
    marked = np.zeros((n, ny, nx), bool)  # in time order
    j = np.arange(n)
    for h in windows(n):
        lo, hi = np.maximum(j - h, 0), np.minimum(j + h, n - 1) + 1
        k = cnum[hi] - cnum[lo]
        m = cnum[-1][None] - k
        with np.errstate(invalid="ignore", divide="ignore"):
            sk, sm = np.where(k > 0, k, 1), np.where(m > 0, m, 1)
            contrast = (cpsi[hi] - cpsi[lo]) / sk - (cpsi[-1][None] - cpsi[hi] + cpsi[lo]) / sm
            noise = ((cphi[hi] - cphi[lo]) / sk**2 + (cphi[-1][None] - cphi[hi] + cphi[lo])
                     / sm**2 + (floor * pc[None]) ** 2)
            hit = (k > 0) & (m > 0) & (contrast > nsigma * np.sqrt(noise))
        if hit.any():
            marked |= ndimage.maximum_filter1d(hit, 2 * h + 1, axis=0, mode="constant") \
                if h else hit
    return _first_last(marked, grow)


def _filtered(sci: np.ndarray, var: np.ndarray, keep: np.ndarray, centre: np.ndarray,
              psf_sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each frame's matched-filter residual ``ψ = Σ g·(sci − centre)`` and its variance
    ``φ = Σ g²·var`` over the values ``keep`` (0 elsewhere), and ``|Σ g·centre|``."""
    g = psf_1d(psf_sigma)
    c = np.nan_to_num(centre.astype(np.float32))
    with np.errstate(invalid="ignore"):
        r = np.where(keep, sci - c, 0).astype(np.float32)
        v = np.where(keep, var, 0).astype(np.float32)
    psi = ndimage.correlate1d(ndimage.correlate1d(r, g, axis=1, mode="constant"), g, axis=2,
                              mode="constant")
    g2 = g * g
    phi = ndimage.correlate1d(ndimage.correlate1d(v, g2, axis=1, mode="constant"), g2, axis=2,
                              mode="constant")
    pc = np.abs(ndimage.correlate1d(ndimage.correlate1d(c, g, axis=0, mode="constant"), g,
                                    axis=1, mode="constant")).astype(np.float64)
    return psi, phi, pc


def _first_last(marked: np.ndarray, grow: int) -> tuple[np.ndarray, np.ndarray]:
    """``(first, last)`` time ranks of the marks ``(frame in time order, y, x)``, grown by
    ``grow`` px in each frame; −1 where none."""
    n, ny, nx = marked.shape
    if not marked.any():
        return np.full((ny, nx), -1, np.int16), np.full((ny, nx), -1, np.int16)
    if grow > 0:
        marked = ndimage.binary_dilation(marked, structure=disk(grow)[None])
    anyof = marked.any(axis=0)
    first = np.where(anyof, np.argmax(marked, axis=0), -1)
    last = np.where(anyof, n - 1 - np.argmax(marked[::-1], axis=0), -1)
    return first.astype(np.int16), last.astype(np.int16)


def track_runs(sci: np.ndarray, var: np.ndarray, usable: np.ndarray, centre: np.ndarray,
               rank: np.ndarray, psf_sigma: float, search: TrackSearch, grow: int = 0,
               floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The runs of frames on the tracks :func:`moving_tracks` finds, per pixel: ``(first,
    last)`` time ranks as :func:`moving_runs` gives them. The residuals are of every
    usable value (the windows' runs included: they are a bright part of the same track)
    from ``centre``, which should be the template without the runs found so far."""
    psi, phi, pc = _filtered(sci, var, usable, centre, psf_sigma)
    marked = moving_tracks(psi, phi, pc, search, psf_sigma, floor)
    return _first_last(marked[np.argsort(rank, kind="stable")], grow)


TRACK_STEP = 2.0  # PSF σ: the track search's grid of end-to-end displacements
TRACK_FINE = 0.5  # PSF σ: the grid a found track's displacement is refined on
TRACK_MIN = 2.0  # PSF σ: shorter tracks are the windows' (a pixel's excursion in time);
# the refinement may end a little below it
TRACK_GROW = 2.0  # PSF σ: a track's marks are grown by this (its light below 14 % of peak)
TRACK_CLIP = 3.0  # a time bin (a frame, on short nights) adds at most this many σ to a track
TRACK_BRIGHT = 5.0  # a frame's residual above this many σ (a bright mover, found by the
# windows) is left out of the track search with its wings ...
TRACK_BRIGHT_GROW = 4.0  # ... within this many PSF σ (a 5,000 e- mover's wings there: ~1 σ)


@dataclass(frozen=True)
class TrackSearch:
    """What :func:`moving_tracks` needs beyond the filtered frames: each frame's time
    (days, in the order of the stack), the detection threshold and the longest track (PSF
    σ over the frames' time span)."""

    times: tuple[float, ...]
    nsigma: float
    reach: float


def track_displacements(reach: float, psf_sigma: float) -> np.ndarray:
    """The end-to-end displacements (px, ``(k, 2)`` as ``(dx, dy)``) that
    :func:`moving_tracks` searches: a square grid of :data:`TRACK_STEP` PSF σ, from
    :data:`TRACK_MIN` to ``reach`` PSF σ long. A track between nodes is at most 1 σ off the
    nearest node's track at its ends and 0 at mid-time, so the matched filter keeps more
    than 90 % of its signal; the best node is then refined."""
    step = TRACK_STEP * psf_sigma
    k = int(np.floor(reach / TRACK_STEP))
    kk = np.arange(-k, k + 1) * step
    dx, dy = np.meshgrid(kk, kk)
    length = np.hypot(dx, dy)
    ok = (length <= reach * psf_sigma + 1e-9) & (length >= TRACK_MIN * psf_sigma - 1e-9)
    return np.column_stack([dx[ok], dy[ok]])


def track_halo(reach: float, psf_sigma: float) -> int:
    """Pixels a track reaches from its mid-time pixel: half its longest displacement,
    refinement included."""
    if reach <= 0 or psf_sigma <= 0:
        return 0
    return int(np.ceil((reach + TRACK_STEP) * psf_sigma / 2)) + 1


def track_grow(psf_sigma: float) -> int:
    """How far (px) a found track's marks are grown: :data:`TRACK_GROW` PSF σ."""
    return int(np.ceil(TRACK_GROW * psf_sigma))


def _along(planes: np.ndarray, h: int, ys: np.ndarray, xs: np.ndarray, d: np.ndarray,
           tau: np.ndarray) -> np.ndarray:
    """``Σ_i planes[i](p + D·τ_i)`` for pixels ``(ys, xs)`` and displacements ``d`` (one
    per pixel, ``(k, 2)``), on planes padded by ``h``."""
    y = ys[:, None] + h + np.rint(d[:, 1:2] * tau[None]).astype(int)
    x = xs[:, None] + h + np.rint(d[:, 0:1] * tau[None]).astype(int)
    return planes[np.arange(tau.size)[None], y, x].sum(axis=1)


def _without_bright(psi: np.ndarray, phi: np.ndarray, psf_sigma: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """ψ and φ with each frame's bright residuals (above :data:`TRACK_BRIGHT` σ) and their
    surroundings (a square of :data:`TRACK_BRIGHT_GROW` PSF σ each side) set to 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        bright = np.abs(psi) > TRACK_BRIGHT * np.sqrt(np.maximum(phi, 0))
    if not bright.any():
        return psi, phi
    r = int(np.ceil(TRACK_BRIGHT_GROW * psf_sigma))
    grown = bright.view(np.uint8)  # a square of side 2r + 1: two 1-D passes, cheap
    grown = ndimage.maximum_filter1d(grown, 2 * r + 1, axis=1, mode="constant")
    bright = ndimage.maximum_filter1d(grown, 2 * r + 1, axis=2, mode="constant") > 0
    psi, phi = psi.copy(), phi.copy()
    psi[bright] = 0
    phi[bright] = 0
    return psi, phi


def _capped(psi: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """ψ limited to ± :data:`TRACK_CLIP` × √φ."""
    cap = TRACK_CLIP * np.sqrt(np.maximum(phi, 0))
    return np.clip(psi, -cap, cap).astype(np.float32)


def moving_tracks(psi: np.ndarray, phi: np.ndarray, pc: np.ndarray, search: TrackSearch,
                  psf_sigma: float, floor: float = 0.0) -> np.ndarray:
    """Frames of a faint slow mover found along its track (issue 31).

    A mover too faint for any window of frames at one pixel (:func:`moving_runs`) is seen
    when its matched-filter residuals are summed along its track over the night: for each
    end-to-end displacement ``D`` (:func:`track_displacements`) and each pixel ``p`` (the
    track's place at mid-time ``t0``), ``S = Σ ψ_i(p + D·τ_i)`` and ``N = Σ φ_i(p +
    D·τ_i)`` with ``τ_i = (t_i − t0) / span`` (positions rounded to the pixel). A faint
    mover is a few σ in any one frame; a bright one (the windows' business) crossing or
    running beside a slow track would alone lift it above the threshold, and make a fan
    of false tracks around its path: each frame's residuals above :data:`TRACK_BRIGHT` σ
    are left out with their wings (:data:`TRACK_BRIGHT_GROW` PSF σ around them), and a
    time bin (below) adds at most :data:`TRACK_CLIP` of its σ. Frames
    close in time are summed first (bins in which the longest track moves one step, 2 σ;
    a track half as long, 1 σ), so the work grows with the reach (as its cube:
    displacements × bins), not with the number of frames. Each pixel keeps its
    best ``D``; where ``S / √N`` there is above ``nsigma`` and is the highest of its 3 × 3
    neighbours (one track, not the fan of its neighbouring nodes and pixels), ``D`` is
    refined on a :data:`TRACK_FINE` σ grid, the static sources' model error
    ``(floor · Σ |ψ_centre|)²`` (coherent along the track) is added to ``N``, and if the
    track still passes its frames are marked at its pixel in each, grown by
    :func:`track_grow`.

    The residuals are from a centre that still holds part of a faint slow mover (that is
    the point), so both the signal and the noise of a slow track are below their
    independent-frames values (by the fraction ``c`` of the night the mover stays on a
    pixel: signal ``1 − c``, noise ``√(1 − c)``): the threshold is conservative, and on
    noise alone it is rarely reached.

    Parameters
    ----------
    psi, phi
        ``(frame, y, x)``: each frame's matched-filter residual ``Σ g·(sci − centre)``
        and its variance ``Σ g²·var`` (0 where a value is not used).
    pc
        ``(y, x)``: ``|Σ g·centre|``, a static source's matched-filter flux.
    search
        Times, threshold and reach (:class:`TrackSearch`).
    psf_sigma
        Gaussian PSF σ (px) of the frames.
    floor
        Model error of a static source, a fraction of ``pc``.

    Returns
    -------
    numpy.ndarray
        bool ``(frame, y, x)``: a frame is on a found track at a pixel (not yet grown).
    """
    n, ny, nx = psi.shape
    marked = np.zeros((n, ny, nx), bool)
    t = np.asarray(search.times, np.float64)
    if t.size != n:
        raise ValueError(f"{t.size} times for {n} frames")
    span = float(t.max() - t.min()) if t.size and np.isfinite(t).all() else 0.0
    disp = track_displacements(search.reach, psf_sigma)
    if not span > 0 or search.nsigma <= 0 or not disp.size or n < 3:
        return marked
    tau = (t - 0.5 * (t.max() + t.min())) / span  # in [-1/2, 1/2]
    nbin = max(1, int(np.ceil(search.reach / TRACK_STEP)))
    b = np.minimum(((tau + 0.5) * nbin).astype(int), nbin - 1)
    used = np.unique(b)
    btau = np.array([tau[b == u].mean() for u in used])
    h = track_halo(search.reach, psf_sigma)
    pad = ((0, 0), (h, h), (h, h))
    psi, phi = _without_bright(psi, phi, psf_sigma)
    bphi = np.array([phi[b == u].sum(axis=0) for u in used], np.float32)
    bpsi = _capped(np.array([psi[b == u].sum(axis=0) for u in used], np.float32), bphi)
    bpsi, bphi = np.pad(bpsi, pad), np.pad(bphi, pad)
    best = np.full((ny, nx), -np.inf, np.float32)
    which = np.zeros((ny, nx), np.int32)
    s = np.empty((ny, nx), np.float32)
    v = np.empty((ny, nx), np.float32)
    better = np.empty((ny, nx), bool)
    for k, (dx, dy) in enumerate(disp):
        ox = np.rint(dx * btau).astype(int)
        oy = np.rint(dy * btau).astype(int)
        s.fill(0)
        v.fill(0)
        for j in range(used.size):
            win = (slice(h + oy[j], h + oy[j] + ny), slice(h + ox[j], h + ox[j] + nx))
            s += bpsi[j][win]
            v += bphi[j][win]
        np.sqrt(v, out=v)
        # S / √N; where N is 0, S is 0 too (ψ is capped at ± 3 √φ) and stays so
        np.divide(s, v, out=s, where=v > 0)
        np.greater(s, best, out=better)
        np.copyto(best, s, where=better)
        which[better] = k
    peak = (best > search.nsigma) & (best >= ndimage.maximum_filter(best, size=3,
                                                                      mode="constant"))
    if not peak.any():
        return marked
    ys, xs = np.nonzero(peak)
    # refine each peak's displacement on the fine grid around its node (with the bins)
    steps = np.arange(-TRACK_STEP / 2, TRACK_STEP / 2 + 1e-9, TRACK_FINE) * psf_sigma
    offsets = np.array([(a, c) for a in steps for c in steps])
    top = np.full(ys.size, -np.inf)
    d = disp[which[ys, xs]]
    chosen = d.copy()
    for off in offsets:
        cand = d + off
        s, v = _along(bpsi, h, ys, xs, cand, btau), _along(bphi, h, ys, xs, cand, btau)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.where(v > 0, s / np.sqrt(np.where(v > 0, v, 1)), -np.inf)
        better = snr > top
        top[better], chosen[better] = snr[better], cand[better]
    if floor > 0:  # the static sources' model error, where it can matter
        s, v = _along(bpsi, h, ys, xs, chosen, btau), _along(bphi, h, ys, xs, chosen, btau)
        pcp = np.pad(pc, h)
        p = sum(np.sum(b == u) * pcp[ys + h + np.rint(chosen[:, 1] * btau[j]).astype(int),
                                     xs + h + np.rint(chosen[:, 0] * btau[j]).astype(int)]
                for j, u in enumerate(used))
        top = np.where(s > search.nsigma * np.sqrt(v + (floor * p) ** 2), top, -np.inf)
    ok = top > search.nsigma
    ys, xs, chosen = ys[ok], xs[ok], chosen[ok]
    for i in range(n):
        y = ys + np.rint(chosen[:, 1] * tau[i]).astype(int)
        x = xs + np.rint(chosen[:, 0] * tau[i]).astype(int)
        inside = (y >= 0) & (y < ny) & (x >= 0) & (x < nx)
        marked[i, y[inside], x[inside]] = True
    return marked


def _shrink(first: np.ndarray, last: np.ndarray, keep: np.ndarray, rank: np.ndarray,
            need: int) -> tuple[np.ndarray, np.ndarray]:
    """Narrow the runs, one frame at a time from each end in turn, where they leave fewer
    than ``need`` of the kept frames: the frames furthest in time from a slow mover's
    passage, where it is faintest, make the template there."""
    first, last = first.copy(), last.copy()
    for step in range(2 * len(rank)):
        few = (first >= 0) & ((keep & ~in_run(rank, first, last)).sum(axis=0) < need)
        if not few.any():
            break
        if step % 2:
            first[few] += 1
        else:
            last[few] -= 1
        gone = few & (first > last)
        first[gone], last[gone] = -1, -1
    return first, last


def run_grow(psf_sigma: float) -> int:
    """How far (px) a mover's runs are grown: 2.5 PSF σ, where its light is below 1/5 of
    its peak (within it, it holds 1 − e^(−3.1) = 96 % of its flux)."""
    return int(np.ceil(1.0 * psf_sigma))


def mover_pad(ts: TemplateSettings, psf_sigma: float, tracks: bool = False) -> int:
    """Rows beyond a block on which its mover runs depend: the matched filter's half-width
    and the runs' growth, for each of the two passes (0 without the mover rejection), and
    with ``tracks`` (:func:`tracks_searched`: the track search, a third pass) twice a
    track's reach from its mid-time pixel (once to the ψ it sums, once to the pixels it
    marks), its filter's half-width, the bright residuals' surroundings, the peak's
    neighbours and the marks' growth. Columns depend alike (tiles, :func:`blocks`)."""
    if ts.mover_sigma <= 0 or psf_sigma <= 0:
        return 0
    pad = 2 * (psf_1d(psf_sigma).size // 2 + run_grow(psf_sigma))
    if tracks:
        pad += psf_1d(psf_sigma).size // 2 + int(np.ceil(TRACK_BRIGHT_GROW * psf_sigma)) \
            + 2 * track_halo(ts.track_reach, psf_sigma) + 1 + track_grow(psf_sigma)
    return pad


def in_run(rank: np.ndarray | int, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Whether frames of time rank ``rank`` (one, or an array for a stack) are in the mover
    runs ``[first, last]`` of each pixel."""
    r = np.asarray(rank)
    if r.ndim:
        r = r.reshape(-1, 1, 1)
    return (first >= 0) & (r >= first) & (r <= last)


def _mean(sci: np.ndarray, var: np.ndarray, keep: np.ndarray, w: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted mean of the kept values, its variance and the sum of weights."""
    wk = np.where(keep, w, 0.0)
    wsum = wk.sum(axis=0)
    safe = np.where(wsum > 0, wsum, 1)
    mean = np.where(wsum > 0, np.sum(wk * np.where(keep, sci, 0.0), axis=0) / safe, np.nan)
    q = np.sum(wk * wk * np.where(keep, var, 0.0), axis=0)
    return mean, np.where(wsum > 0, q / safe**2, np.nan), wsum


def combine_frames(sci: np.ndarray, var: np.ndarray, usable: np.ndarray, weights: np.ndarray,
                   ts: TemplateSettings, grow: int = 0, rank: np.ndarray | None = None,
                   psf_sigma: float = 0.0, times: np.ndarray | None = None) -> Template:
    """Clipped weighted mean of a stack ``(frame, y, x)`` (see the module doc); a frame's
    rejection is grown by ``grow`` px (IRAF ``imcombine``'s ``grow``), so the wings of a
    mover whose core is rejected go with it.

    With ``ts.mover_sigma`` > 0 and a PSF σ ``psf_sigma``, the frames that hold a mover at
    a pixel (:func:`moving_runs`, on the time ranks ``rank``; frame order when None) are
    left out too, twice (the centre recomputed without them in between), except where that
    would leave fewer than ``ts.min_frames + 1`` frames; the runs are stored in the
    template (``first``, ``last``) so that :func:`~astep_dask.kbmod.difference.leave_one_out`
    knows them. With the frames' ``times`` (days; a template of one night's own frames)
    and ``ts.track_sigma`` > 0, a third pass leaves out the frames of the faint slow
    movers' tracks as well (:func:`track_runs`)."""
    sci = np.asarray(sci, np.float32)
    var = np.asarray(var, np.float32)
    n = sci.shape[0]
    usable = usable & np.isfinite(sci) & np.isfinite(var) & (var > 0)
    w = np.asarray(weights, np.float64).reshape(-1, 1, 1)
    if rank is None:  # time order: from the times when given (the tracks run in time)
        rank = (np.arange(n) if times is None
                else np.argsort(np.argsort(np.asarray(times), kind="stable"), kind="stable"))
    rank = np.asarray(rank)
    first = np.full(sci.shape[1:], -1, np.int16)
    last = np.full(sci.shape[1:], -1, np.int16)
    with np.errstate(invalid="ignore", divide="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = np.nanmedian(np.where(usable, sci, np.nan), axis=0).astype(np.float32)
        for it in range(max(ts.iterations, 1)):
            keep = kept(sci, var, usable, centre, ts.sigma, grow, ts.residual_floor)
            mean, tvar, wsum = _mean(sci, var, keep, w)
            if it < ts.iterations - 1:
                centre = np.where(wsum > 0, mean, centre).astype(np.float32)
        if ts.mover_sigma > 0 and psf_sigma > 0 and n >= 3:
            # on every usable value (a bright mover's core, clipped, is the best evidence
            # of its wings, which the clipping's own grow may not reach)
            tracks = (TrackSearch(tuple(float(x) for x in times), ts.track_sigma,
                                  ts.track_reach)
                      if times is not None and ts.track_sigma > 0 else None)
            for p in range(3 if tracks is not None else 2):
                now = np.where(wsum > 0, mean, centre)
                if p < 2:
                    f, la = moving_runs(sci, var, usable & ~in_run(rank, first, last), now,
                                        rank, psf_sigma, ts.mover_sigma, run_grow(psf_sigma),
                                        ts.residual_floor)
                else:
                    f, la = track_runs(sci, var, usable, now, rank, psf_sigma, tracks,
                                       track_grow(psf_sigma), ts.residual_floor)
                first = np.where(first >= 0, np.where(f >= 0, np.minimum(first, f), first),
                                 f).astype(np.int16)
                last = np.maximum(last, la).astype(np.int16)
                first, last = _shrink(first, last, keep, rank, ts.min_frames + 1)
                mean, tvar, wsum = _mean(sci, var, keep & ~in_run(rank, first, last), w)
            keep = keep & ~in_run(rank, first, last)
    nkeep = keep.sum(axis=0).astype(np.int16)
    mask = np.where(nkeep < max(ts.min_frames, 1), NO_TEMPLATE, 0).astype(MASK_DTYPE)
    return Template(sci=mean.astype(np.float32), var=tvar.astype(np.float32), mask=mask,
                    centre=centre, wsum=wsum.astype(np.float32), nkeep=nkeep,
                    first=first, last=last)


def bright_halo(saturated: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` px of a pixel saturated in any template frame. A saturated
    star's wings are too bright, and its saturated area changes too much from frame to
    frame, to be subtracted to the noise: they are SUSPECT in the template."""
    if radius <= 0 or not saturated.any():
        return saturated
    return ndimage.binary_dilation(saturated, structure=disk(radius))


# --------------------------------------------------------------------------- I/O


def template_path(kdir: Path, night: str) -> Path:
    """Where a night's template is written."""
    return kdir / f"{night}{KBMOD_TEMPLATE_SUFFIX}"


def read_rows(path: Path, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> Layers:
    """Rows ``[y0, y1)`` (and columns ``[x0, x1)``, all by default) of a registered frame
    (KBMOD layout: 1 SCI, 2 MASK, 3 VAR)."""
    cols = slice(x0, x1)
    with fits.open(path, memmap=True) as hdul:
        sci = np.array(hdul[1].data[y0:y1, cols], dtype=np.float32)
        mask = np.array(hdul[2].data[y0:y1, cols], dtype=MASK_DTYPE)
        var = np.array(hdul[3].data[y0:y1, cols], dtype=np.float32)
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
    """Rows ``[y0, y1)`` and columns ``[x0, x1)`` of a template (a block; all columns when
    ``x1`` is 0): every frame is read with ``pad`` rows and columns more on each side."""

    frames: tuple[TemplateFrame, ...]
    y0: int
    y1: int
    ny: int
    pad: int
    settings: TemplateSettings
    grow: int = 0
    sat_halo: int = 0
    psf_sigma: float = 0.0  # of the matched frames, for the mover rejection (0: none)
    x0: int = 0
    x1: int = 0  # 0: to the last column
    nx: int = 0  # the frame's columns (needed with x1)


def time_ranks(frames: tuple[TemplateFrame, ...] | list[TemplateFrame]) -> np.ndarray:
    """Each frame's place in time order (by MJD, then by its place in the list)."""
    order = sorted(range(len(frames)), key=lambda i: (frames[i].mjd, i))
    rank = np.empty(len(frames), np.int64)
    rank[order] = np.arange(len(frames))
    return rank


def strip_task(job: StripJob) -> tuple[int, int, Template, float]:
    """Worker task: homogenise and combine one block (rows, and columns when ``x1`` is set)
    of every template frame. Returns ``y0``, ``y1``, the block's template and seconds."""
    t0 = time.perf_counter()
    a, b = max(job.y0 - job.pad, 0), min(job.y1 + job.pad, job.ny)
    lo, n = job.y0 - a, job.y1 - job.y0
    if job.x1:  # a tile: its columns too, with the pad
        c, d = max(job.x0 - job.pad, 0), min(job.x1 + job.pad, job.nx)
        cols = slice(job.x0 - c, job.x1 - c)
    else:
        c, d, cols = 0, None, slice(None)
    sci, var, usable = [], [], []
    saturated = None
    for fr in job.frames:
        block = read_rows(fr.path, a, b, c, d)
        if job.settings.psf_match:
            # Beyond rows a and b (columns c and d) the homogenisation pads as beyond the
            # frame: at the frame's edges that is what the whole-frame computation does;
            # inside, it only touches the ``pad`` extra rows and columns, which are dropped.
            block = homogenise(block, fr.kernel_var)
        sci.append(block.sci)
        var.append(block.var)
        usable.append(block.mask == 0)
        sat = (block.mask & SATURATED) != 0
        saturated = sat if saturated is None else saturated | sat
    weights = np.array([fr.weight for fr in job.frames])
    # The clipping's grown rejections, the movers' filters and the saturation halo reach
    # across rows: combine the extra rows too, keep the strip's own.
    times = (np.array([fr.mjd for fr in job.frames])
             if tracks_searched(job.settings, job.frames, job.psf_sigma) else None)
    full = combine_frames(np.array(sci), np.array(var), np.array(usable), weights,
                          job.settings, job.grow, time_ranks(job.frames), job.psf_sigma,
                          times)
    full.mask[bright_halo(saturated, job.sat_halo)] |= BRIGHT_HALO
    own = (slice(lo, lo + n), cols)
    tpl = Template(**{f.name: np.ascontiguousarray(getattr(full, f.name)[own])
                      for f in dataclasses.fields(Template)
                      if getattr(full, f.name) is not None})
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
    movers = [fits.ImageHDU(_runs(tpl.first, tpl.sci.shape), name="MOVFIRST"),
              fits.ImageHDU(_runs(tpl.last, tpl.sci.shape), name="MOVLAST")]
    movers[0].header["COMMENT"] = "time rank (FRAMES.RANK) of a mover's first frame; -1 none"
    movers[1].header["COMMENT"] = "time rank (FRAMES.RANK) of a mover's last frame; -1 none"
    planes[0].header["BUNIT"] = ("electron", "static sky, sky-subtracted, PSF-matched")
    planes[1].header["BUNIT"] = ("", "mask bits, value 1<<bit, see MP_* keywords")
    header_cards(planes[1].header)
    planes[2].header["BUNIT"] = ("electron2", "variance of SCI")
    planes[3].header["COMMENT"] = "centre of the final clipping (leave-one-out rebuilds)"
    planes[4].header["COMMENT"] = "sum of the weights of the kept frames"
    planes[5].header["COMMENT"] = "number of kept frames"
    for hdu in planes + movers:
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
        fits.Column("RANK", "J", array=time_ranks(frames)),
    ]
    table = fits.BinTableHDU.from_columns(cols, name="FRAMES")
    return atomic_write(fits.HDUList([primary, *planes, table, *movers]), path)


def _runs(plane: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A mover-run plane, -1 everywhere when there is none."""
    return np.full(shape, -1, np.int16) if plane is None else plane.astype(np.int16)


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` when under it, else as it is."""
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
            first=np.asarray(hdul["MOVFIRST"].data, np.int16) if "MOVFIRST" in hdul else None,
            last=np.asarray(hdul["MOVLAST"].data, np.int16) if "MOVLAST" in hdul else None,
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
                     round(target, 9), ts.digest(template=True), __version__)


def spread(items: list, n: int) -> list:
    """At most ``n`` items evenly spread through the list (all when ``n`` <= 0)."""
    if n <= 0 or len(items) <= n:
        return list(items)
    idx = np.unique(np.round(np.linspace(0, len(items) - 1, n)).astype(int))
    return [items[i] for i in idx]


# Bytes a combination task holds per pixel and frame at its peak (the frames read, their
# stacked copies and the clipping's and the mover passes' working arrays): 128 measured
# with tracemalloc on combine_frames (40 frames of 213 x 1024 px, the track search on or
# off alike)
TEMPLATE_BYTES = 128


def _split(n: int, size: int) -> list[tuple[int, int]]:
    """``[0, n)`` in about equal parts of at most ``size``."""
    edges = np.linspace(0, n, int(np.ceil(n / max(size, 1))) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def blocks(ny: int, nx: int, n_frames: int, memory_mb: float, pad: int = 0
           ) -> list[tuple[int, int, int, int]]:
    """The combination tasks' blocks ``(y0, y1, x0, x1)``, covering the frame once.

    A task holds :data:`TEMPLATE_BYTES` per pixel and frame of its block with ``pad`` more
    rows and columns on each side. Full-width strips of rows when one of at least ``pad``
    rows fits in ``memory_mb``; else square tiles of the side that fits, but at least
    ``pad`` (a task then holds 9 × its block, where smaller ones would read the same
    overlap again and again). Tiles bound a task's memory whatever the frame's width: a
    strip of a 4096-wide frame read with 71 rows each side would hold 22 GB for 200
    frames, a tile 1.2 GB.
    """
    per_px = TEMPLATE_BYTES * max(n_frames, 1)
    budget = max(memory_mb * 1e6 / per_px, 1.0)  # pixels a task may hold
    rows = int(budget // (nx + 2 * pad)) - 2 * pad  # full-width strips
    if rows >= max(pad, 1) or nx <= max(pad, 1):
        return [(a, b, 0, nx) for a, b in _split(ny, min(max(rows, pad, 1), ny))]
    side = max(int(np.sqrt(budget)) - 2 * pad, pad, 1)
    return [(a, b, c, d) for a, b in _split(ny, min(side, ny))
            for c, d in _split(nx, min(side, nx))]


def assemble(parts: list[tuple[int, int, int, int, Template]], ny: int, nx: int) -> Template:
    """One template from its blocks ``(y0, y1, x0, x1, template)``."""
    out = {name: np.zeros((ny, nx), dtype) for name, dtype in (
        ("sci", np.float32), ("var", np.float32), ("mask", MASK_DTYPE),
        ("centre", np.float32), ("wsum", np.float32), ("nkeep", np.int16),
        ("first", np.int16), ("last", np.int16))}
    out["first"][:] = -1
    out["last"][:] = -1
    for y0, y1, x0, x1, t in parts:
        for name in out:
            if getattr(t, name) is not None:
                out[name][y0:y1, x0:x1] = getattr(t, name)
    return Template(**out)


def tracks_searched(ts: TemplateSettings, frames: list[TemplateFrame] | tuple,
                    psf_sigma: float) -> bool:
    """Whether the combination searches movers' tracks (:func:`moving_tracks`): the
    setting, the mover rejection it is part of, a PSF (σ ``psf_sigma``), at least 3
    frames, all of this night (other nights' frames hold a mover elsewhere). The one
    place this is decided: the strips' overlap (:func:`mover_pad`), the strip task and
    the template's ``TPLTRKS`` card follow it."""
    return (ts.track_sigma > 0 and ts.mover_sigma > 0 and np.isfinite(psf_sigma)
            and psf_sigma > 0 and len(frames) >= 3 and all(f.own for f in frames))


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
        "TPLMOVS": (ts.mover_sigma, "movers' runs left out above this SNR (0: off)"),
        "TPLTRKS": (ts.track_sigma if tracks_searched(ts, frames, float(np.sqrt(target)))
                    else 0.0,
                    "movers' tracks left out above this SNR (0: off)"),
        "TPLTRKR": (ts.track_reach, "[sigma] longest track searched over the night"),
        "TPLSATH": (ts.saturation_halo, "SUSPECT within this x FWHM of SAT pixels"),
        "PSFMATCH": (ts.psf_match, "T: frames PSF-matched before combination"),
        "PSFVAR": (round(target, 6), "[px2] PSF variance per axis after matching"),
        "PSFSIGMA": (round(float(np.sqrt(target)), 4) if np.isfinite(target) else -1.0,
                     "[px] Gaussian PSF sigma of SCI"),
        "BUNIT": ("electron", "unit of SCI"),
    }


# --------------------------------------------------------------------------- orchestration


def _night_date(name: str) -> datetime.date | None:
    """The date of a night folder named ``YYYY-MM-DD...``; None for another name."""
    try:
        return datetime.date.fromisoformat(name[:10])
    except ValueError:
        return None


def neighbour_nights(night_dir: Path, out: Path | None, n: int, field: str, filt: str
                     ) -> tuple[list[tuple[str, list]], list[dict]]:
    """The ``n`` nights nearest in date to ``night_dir`` (other than it) with calibrated
    frames of the same field (``OBJECT``, when both say) and filter: ``[(night, frames)]``
    nearest first, and rows for the nights passed over (with the reason)."""
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
        frames, _ = export_frames(cal)
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
