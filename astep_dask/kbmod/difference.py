"""Difference frames of the KBMOD export: a registered frame minus the static-sky
template, as KBMOD files (KBMOD searches difference images: on registered, sky-subtracted
frames the stars fill every result slot).

The template is combined by :mod:`astep_dask.kbmod.template`; this module turns each
registered frame of the night into its KBMOD file: PSF-matched as when the template was
combined, differenced against the template *without it* (:func:`leave_one_out`: exact for
the clipped weighted mean, so a frame never subtracts part of itself; where the frame is in
a mover's run of frames, it was left out of the template already) or against the whole
template when it is made from other nights; where the frame's PSF is wider than the
template's (a frame of bad seeing, left out of the template), the template is convolved to
the frame's PSF instead (``template_kernel_var``), so no frame is blurred to the worst.
Variance ``frame + template``, the frame's Poisson term taken from the template rather than
from each pixel's own value (:func:`model_variance`), mask ``frame OR template``
(:func:`difference`). One worker task per frame (:func:`difference_task`), skipped on a
re-run when the file has the same provenance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from astep_dask.config import TemplateSettings
from astep_dask.core.bits import MASK_DTYPE
from astep_dask.io.fitsio import ascii_text, atomic_write
from astep_dask.io.products import KBMOD_REGISTERED_FOLDER
from astep_dask.kbmod.kernels import filter_factor
from astep_dask.kbmod.products import (
    PROV_KEY,
    Layers,
    existing_row,
    kbmod_hdul,
    read_layers,
    science_plane,
)
from astep_dask.kbmod.template import (
    NO_TEMPLATE,
    Template,
    homogenise,
    in_run,
    kept,
    read_template,
)

__all__ = ["DifferenceJob", "NearFrame", "difference", "difference_task", "leave_one_out",
           "leave_out", "model_variance", "poisson_slope"]


def _taken_out(template: Template, frames: Iterable[tuple[Layers, float, int | None]],
               ts: TemplateSettings, grow: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         np.ndarray, float]:
    """What ``frames`` (homogenised frame, weight, rank; read one at a time when an
    iterator) put into the template, per pixel: the sums of weights, of weighted values
    and of squared-weighted variances, how many of them the template kept there, and the
    smallest weight."""
    shape = template.sci.shape
    w_sum, f_sum, v_sum = (np.zeros(shape) for _ in range(3))
    n = np.zeros(shape, np.int32)
    w_min = np.inf
    for frame, weight, rank in frames:
        w_min = min(w_min, float(weight))
        usable = (frame.mask == 0) & np.isfinite(frame.sci) & np.isfinite(frame.var) & (
            frame.var > 0)
        mine = kept(frame.sci, frame.var, usable, template.centre, ts.sigma, grow,
                    ts.residual_floor)
        if rank is not None and template.first is not None and template.last is not None:
            mine &= ~in_run(rank, template.first, template.last)
        w = float(weight)
        with np.errstate(invalid="ignore"):
            w_sum += np.where(mine, w, 0.0)
            f_sum += w * np.where(mine, frame.sci, 0.0).astype(np.float64)
            v_sum += w * w * np.where(mine, frame.var, 0.0).astype(np.float64)
        n += mine
    return w_sum, f_sum, v_sum, n, w_min


def leave_out(template: Template, frames: list[tuple[Layers, float, int | None]],
              ts: TemplateSettings, grow: int = 0,
              near: Iterable[tuple[Layers, float, int | None]] | None = None,
              rank: int | None = None) -> Layers:
    """The template without some of its own frames. Each ``(frame, weight, rank)`` is a
    frame homogenised as it was when the template was combined, its weight there and its
    place in time among the template's frames (where it is in a mover's run, it was left
    out already). ``frames`` are always left out (exact for the clipped weighted mean);
    ``near`` (frames close in time to the one being differenced, of time rank ``rank``)
    only where that leaves ``min_frames`` and where no mover's run around ``rank`` was
    found already (those pixels left the mover's frames out). ``near`` may be an iterator
    that reads its frames one at a time (memory: one frame more)."""
    wsum = template.wsum.astype(np.float64)
    w_out, f_out, v_out, n_out, w_min = _taken_out(template, frames, ts, grow)
    n = template.nkeep.astype(np.int32) - n_out
    if near is not None:
        w_near, f_near, v_near, n_near, w_near_min = _taken_out(template, near, ts, grow)
        w_min = min(w_min, w_near_min)
    floor = 1e-6 * max(w_min if np.isfinite(w_min) else 1.0, 1e-30)
    if near is not None:
        use = (n - n_near >= max(ts.min_frames, 1)) & (wsum - w_out - w_near > floor)
        if rank is not None and template.first is not None and template.last is not None:
            use &= ~in_run(rank, template.first, template.last)
        w_out = w_out + np.where(use, w_near, 0.0)
        f_out = f_out + np.where(use, f_near, 0.0)
        v_out = v_out + np.where(use, v_near, 0.0)
        n = n - np.where(use, n_near, 0)
    rest = wsum - w_out
    with np.errstate(invalid="ignore", divide="ignore"):
        good = rest > floor
        safe = np.where(good, rest, 1.0)
        tsci = (template.sci * wsum - f_out) / safe
        tvar = (template.var * wsum**2 - v_out) / safe**2
    bad = ~good | (n < max(ts.min_frames, 1)) | ~np.isfinite(tsci) | ~(tvar > 0)
    mask = np.where(bad, NO_TEMPLATE, 0).astype(MASK_DTYPE) | (template.mask & ~NO_TEMPLATE)
    return Layers(np.where(bad, np.nan, tsci).astype(np.float32),
                  np.where(bad, np.nan, np.maximum(tvar, 0)).astype(np.float32), mask)


def leave_one_out(template: Template, frame: Layers, weight: float, ts: TemplateSettings,
                  grow: int = 0, rank: int | None = None) -> Layers:
    """The template without one of its own frames (``frame`` homogenised as it was when the
    template was combined, ``weight`` its weight there, ``rank`` its place in time among
    the template's frames: where it is in a mover's run, it was left out already)."""
    return leave_out(template, [(frame, weight, rank)], ts, grow)


# The frame's difference from the template, beyond which (in its own sigma) the frame's
# variance keeps its Poisson term from its own value (a mover, a bright residual). Below
# it, a source that is not in the template loses its own photons' term, so its
# significance comes out a little high; a smaller clip leaves part of the noise's bias.
# benchmarks/model_variance.py (sky 600 e-, PSF σ 1.1 px, one frame's ψ/√φ over its value
# with the true variance; blank sky: its mean, 0 with the true variance): unregistered
# frame, clip 3 / 2 / 1.5 / own value: blank sky −0.001 / −0.007 / −0.019 / −0.129,
# 300 e- 1.016 / 1.009 / 1.001 / 0.954, 2,500 e- 1.043 / 1.027 / 1.018 / 0.995.
MODEL_CLIP = 2.0


def poisson_slope(header: fits.Header) -> float:
    """How much a registered frame's variance grows per electron of its own value
    (``∂VAR/∂SCI``, the regression of its VAR's noise on its SCI's).

    1 where its sky is well above 0, since the calibration takes the Poisson term from
    each pixel's electrons clipped at 0 (:func:`astep_dask.core.calibrate.
    calibrate_frame`), and the fraction of sky pixels above 0, Φ(sky / its rms), below.
    Registered in the "pixel" convention (``VARMODE``; VAR through the squared weights),
    VAR follows SCI by ``VARPIXF`` (Σw²) of that: exact for a shift split evenly between
    pixels, close otherwise. 0 without ``BKGLEVEL`` and ``BKGRMS`` (the variance left as
    it is). The flat's 1/flat is taken as 1 (it is normalised to a median of 1).
    """
    try:
        level, rms = float(header["BKGLEVEL"]), float(header["BKGRMS"])
        pixel = float(header.get("VARPIXF", 1.0)) if str(
            header.get("VARMODE", "area")).strip() == "pixel" else 1.0
    except (KeyError, TypeError, ValueError):
        return 0.0
    if not (np.isfinite(level) and rms > 0 and 0 < pixel <= 1):
        return 0.0
    return float(0.5 * (1.0 + math.erf(level / rms / math.sqrt(2.0))) * pixel)


def model_variance(frame: Layers, template: Layers, slope: float,
                   clip: float = MODEL_CLIP) -> np.ndarray:
    """The frame's variance with its Poisson term taken from the scene (the template)
    rather than from the pixel's own value.

    The calibration's variance follows each pixel's own electrons, so on blank sky a pixel
    that noise pushed up has a larger variance than one pushed down; a matched filter that
    weights by 1/VAR then comes out low (on ``benchmarks/yield.py``'s night, KBMOD's
    likelihood of random trajectories had mean −0.25 where the ideal's is 0; the
    correlation of SCI and VAR on blank sky, 0.65). Registration and PSF matching are
    linear in both planes with the same weights (the area convention), so removing
    ``slope`` (:func:`poisson_slope`) times the frame's difference from the template
    removes that dependence exactly; the share ``frame / (frame + template)`` of it, as
    only the frame's noise is in the frame's variance. Differences beyond ``clip`` times
    the frame's sigma (a mover, a star's residual) keep the rest of their Poisson term.
    """
    var = frame.var.astype(np.float32, copy=False)  # float32 throughout: frame-sized
    with np.errstate(invalid="ignore", divide="ignore"):
        limit = np.sqrt(var) * np.float32(clip)
        own = np.subtract(frame.sci, template.sci, dtype=np.float32)
        np.clip(own, -limit, limit, out=own)
        own *= var / (var + template.var)  # the frame's share
        own *= np.float32(slope)
        return np.maximum(var - own, var * np.float32(0.5))


def difference(frame: Layers, template: Layers, residual_floor: float = 0.0,
               poisson: float = 0.0) -> Layers:
    """``frame − template``, variance ``frame + template (+ (floor·template)²)``, mask OR;
    pixels without a value get NO_DATA. ``poisson`` > 0: the frame's variance from the
    scene model (:func:`model_variance`, with that :func:`poisson_slope`)."""
    if poisson > 0:
        frame = Layers(frame.sci, model_variance(frame, template, poisson), frame.mask)
    out = science_plane(frame, template)
    var = out.var
    if residual_floor > 0:
        var = var + (residual_floor * np.abs(template.sci)) ** 2
    mask = out.mask.copy()
    with np.errstate(invalid="ignore"):
        broken = ~np.isfinite(out.sci) | ~np.isfinite(var) | ~(var > 0)
    mask[broken & (mask == 0)] |= NO_TEMPLATE
    return Layers(out.sci.astype(np.float32), var.astype(np.float32), mask)


# --------------------------------------------------------------------------- difference task


@dataclass(frozen=True)
class NearFrame:
    """A frame of the template taken close in time to the frame being differenced: left
    out of its template too, so that a slow mover does not subtract its own light
    (``[template] near_speed``)."""

    registered: Path
    kernel_var: tuple[float, float]
    weight: float
    rank: int


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
    rank: int | None = None  # the frame's time rank among the template's frames
    # the kernel variances (x, y) that bring the template to this frame's PSF where the
    # frame is wider than the template (kbmod.kernels.template_kernels)
    template_kernel_var: tuple[float, float] = (0.0, 0.0)
    near: tuple[NearFrame, ...] = ()  # other template frames close in time, left out too
    near_window: float = 0.0  # days: the half-width of the window they were chosen in


def _near_frames(near: tuple[NearFrame, ...], match: bool
                 ) -> Iterator[tuple[Layers, float, int | None]]:
    """The near frames, read and homogenised one at a time, as :func:`leave_out` takes
    them."""
    for nf in near:
        _, other = read_layers(nf.registered)
        yield (homogenise(other, nf.kernel_var) if match else other), nf.weight, nf.rank


def difference_task(job: DifferenceJob) -> dict:
    """Worker task: the KBMOD file of one frame, ``registered − template``.

    Returns a summary row (``status`` done, skipped or failed with a ``reason``); write
    errors raise, naming the output.
    """
    row: dict = {"stem": job.stem, "output": job.output.name, "stage": "difference",
                 "provenance": job.provenance}
    if not job.force and (old := existing_row(job.output, job.provenance)) is not None:
        return {**row, **old, "status": "skipped"}
    t0 = time.perf_counter()
    try:
        header, frame = read_layers(job.registered)
        _, tpl, _ = read_template(job.template)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read inputs: {exc}"}
    if frame.sci.shape != tpl.sci.shape:
        return {**row, "status": "failed",
                "reason": f"shape {frame.sci.shape} differs from the template's"}
    ts = job.settings
    if ts.psf_match:
        frame = homogenise(frame, job.kernel_var)
    own = [(frame, job.weight, job.rank)] if job.weight is not None else []
    if own or job.near:
        try:
            used = leave_out(tpl, own, ts, job.grow, _near_frames(job.near, ts.psf_match),
                             job.rank)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return {**row, "status": "failed", "reason": f"cannot read a nearby frame: {exc}"}
    else:
        used = Layers(tpl.sci, tpl.var, tpl.mask)
    if ts.psf_match:
        used = homogenise(used, job.template_kernel_var)
    slope = poisson_slope(header) if ts.model_variance else 0.0
    out = difference(frame, used, ts.residual_floor, slope)
    cards = {
        PROV_KEY: (job.provenance, "hash of registered frame, template and settings"),
        "KBPLANE": ("difference", "SCI = registered frame - static-sky template"),
        "TEMPLATE": (ascii_text(job.template.name), "static-sky template subtracted"),
        "TPLPROV": (job.template_provenance, "provenance hash of the template"),
        "TPLMODE": (job.mode, "template: this night (leave-one-out) or other nights"),
        "TPLLOO": (job.weight is not None, "T: this frame left out of its template"),
        "TPLNEAR": (len(job.near), "frames near in time also left out (slow movers)"),
        "TPLNEARW": (job.near_window, "[d] half-width of that time window"),
        "TPLFLOOR": (ts.residual_floor, "fraction of |template| added to VAR (quadr.)"),
        "VARMODEL": (round(slope, 4), "VAR Poisson term from template x this (0: own)"),
        "REGFILE": (ascii_text(f"{KBMOD_REGISTERED_FOLDER}/{job.registered.name}"),
                    "registered sky-subtracted frame"),
        "PSFMATCH": (ts.psf_match, "T: PSF matched to the template's (Gaussian var)"),
        "PSFKVARX": (float(job.kernel_var[0]), "[px2] x variance of the matching kernel"),
        "PSFKVARY": (float(job.kernel_var[1]), "[px2] y variance of the matching kernel"),
        "TPLKVARX": (float(job.template_kernel_var[0]),
                     "[px2] x variance of the template's kernel to this PSF"),
        "TPLKVARY": (float(job.template_kernel_var[1]),
                     "[px2] y variance of the template's kernel to this PSF"),
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
        float(header.get("VARPIXF", 1.0)), str(header.get("VARMODE", "area")),
        str(header.get("REGKERN", "overlap"))), 5),
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
