"""Export a calibrated night in the input layout of KBMOD (Kernel-Based Moving Object
Detection, github.com/dirac-institute/kbmod): sky-subtracted frames registered onto one
reference grid, one FITS file per frame, plus a night stack file and an offsets table.

KBMOD's per-image FITS loader is ``load_deccam_layered_image`` in
``src/kbmod/util_functions.py`` of dirac-institute/kbmod (read at commit 091aca06, where it
starts at about line 67 and builds a C++ ``LayeredImage``, and in a later version, about
line 68, that builds a ``LayeredImagePy``; both read the file the same way). It

- refuses a file with fewer than 4 HDUs;
- takes the time from the first of the keys ``MJD``, ``DATE-AVG``, ``MJD-OBS`` found in
  HDU 0 or HDU 1; a value is used as an MJD only when it is a Python ``float`` (an
  integer-valued card would be skipped), a string is parsed by ``astropy.time.Time`` with
  the scale of ``TIMESYS`` (UTC when absent);
- builds the image from ``hdul[1]`` (science), ``hdul[3]`` (variance) and ``hdul[2]``
  (mask), each cast to float32. (Its prose documentation,
  ``docs/source/user_manual/input_files.rst``, lists science, variance, mask as
  extensions 1, 2, 3: the code is what counts.)

KBMOD's image stack (``src/kbmod/core/image_stack_py.py``, ``ImageStackPy``) masks a
pixel when its mask value is ``> 0`` (science and variance become NaN), and its search
config takes the PSF as a Gaussian standard deviation (``psf_val``, default 1.4 px).

So each ``kbmod/<stem>_KBMOD.fits`` is: PRIMARY (no data) with every keyword of the
calibrated frame (the raw header and calibration provenance), ``MJD`` = mid-exposure MJD
(UTC, a float), ``DATE-AVG``, ``MJD-AVG``, the observatory, registration, background and
PSF keywords; HDU 1 ``SCI`` float32 electrons (sky-subtracted, registered); HDU 2 ``MASK``
int32 bits (DESIGN.md: BAD=0, SAT=1, INTRP=2, CR=3, EDGE=4, SUSPECT=7, NO_DATA=8);
HDU 3 ``VAR`` float32 electrons². Variance is finite and positive wherever the mask is 0.

KBMOD searches difference images (on sky-subtracted frames the stars fill every result
slot), so by default the KBMOD files are *difference* frames: the registered frames are
written to ``kbmod/registered/<stem>_REG.fits`` (same layout), a static-sky template is
combined from them (or from neighbouring nights of the field) and each KBMOD file holds
frame − template, PSF-matched (``KBPLANE = 'difference'``); see
:mod:`astep_dask.kbmod.template`.
With the template disabled the KBMOD files are the registered frames, as before.

The work runs like calibration: one task per frame on the dask cluster (measure:
background, stars, PSF; then export: offset to the reference, sky subtraction,
resampling, write), atomic writes, and a re-run skips every frame whose file exists with
the same provenance hash.

This module holds the choice of the reference frame and the two worker tasks (measure,
export) with the pure steps they run; :mod:`astep_dask.kbmod.stage` submits them.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from astep_dask.config import KbmodSettings
from astep_dask.core.background import Background, estimate_background
from astep_dask.core.register import (
    FWHM_PER_SIGMA,
    Offset,
    RegistrationError,
    find_stars,
    measure_offset,
    resample,
    sigma_from_moment,
    stars_psf_sigma,
    windowed_centroids,
)
from astep_dask.io.fitsio import ascii_text, atomic_write
from astep_dask.io.provenance import digest_of
from astep_dask.kbmod.kernels import filter_factor
from astep_dask.kbmod.products import (
    PROV_KEY,
    CalFrame,
    Layers,
    Reference,
    card_float,
    existing_row,
    kbmod_hdul,
    observatory_cards,
    read_layers,
    science_plane,
    sky_subtract,
    wcs_signature,
)
from astep_dask.version import __version__

# The REGMETH card of each resampling kernel (astep_dask.core.register)
REGMETH = {"overlap": "2x2 overlap (bilinear), flux-conserving",
           "cubic": "4x4 Keys cubic convolution, flux-conserving"}

__all__ = [
    "ExportJob",
    "FrameMeasure",
    "MeasureJob",
    "choose_reference",
    "export_layers",
    "export_provenance",
    "export_task",
    "frame_cards",
    "measure_layers",
    "measure_task",
    "registration_check",
]


def choose_reference(rows: list[dict], requested: str = "") -> int:
    """Index of the night's reference frame among measured frames (rows with ``stem``,
    ``mjd``, ``n_stars``, ``psf_sigma``).

    A requested stem wins. Otherwise: among frames with at least 80 % of the largest star
    count, those within 10 % of the sharpest PSF, the one nearest the middle of the night
    (so that the largest offset, hence the area lost at the edges, stays small).
    """
    if requested:
        for i, r in enumerate(rows):
            if requested in (r["stem"], r.get("file"), r.get("raw")):
                return i
        raise ValueError(f"requested reference frame {requested!r} is not among the frames")
    counts = np.array([r["n_stars"] for r in rows], float)
    sigmas = np.array([r["psf_sigma"] if np.isfinite(r["psf_sigma"]) else np.inf
                       for r in rows])
    mjd = np.array([r["mjd"] for r in rows])
    rich = counts >= 0.8 * counts.max()
    sharp = rich & (sigmas <= 1.1 * np.min(sigmas[rich]))
    middle = 0.5 * (mjd.min() + mjd.max())
    candidates = np.nonzero(sharp)[0]
    return int(candidates[np.argmin(np.abs(mjd[candidates] - middle))])


def measure_layers(frame: Layers, ks: KbmodSettings) -> tuple[Background, np.ndarray, float]:
    """Background, star list (brightest first) and PSF σ of a calibrated frame."""
    bkg = estimate_background(frame.sci, frame.mask, ks.background())
    stars = find_stars(frame.sci - bkg.level(), frame.var, frame.mask, bkg.rms(), ks.stars())
    return bkg, stars, stars_psf_sigma(stars)


def registration_check(frame: Layers, ref_stars: np.ndarray, ks: KbmodSettings,
                       min_snr: float = 20.0) -> dict:
    """Re-measure the reference stars on a registered frame: mean and rms residual of
    their positions (px) and the frame's PSF σ after resampling."""
    bright = ref_stars[ref_stars["snr"] >= min_snr]
    if bright.size < 5:
        bright = ref_stars
    window = ks.psf_sigma_guess
    m = windowed_centroids(frame.sci, frame.var, frame.mask == 0, bright["x"], bright["y"],
                           window, int(np.ceil(3.5 * window)))
    ok = m["ok"]
    if not ok.any():
        nan = float("nan")
        return {"reg_dx": nan, "reg_dy": nan, "reg_rms": nan, "reg_n": 0, "psf_sigma": nan}
    d = np.column_stack([m["x"][ok] - bright["x"][ok], m["y"][ok] - bright["y"][ok]])
    med = np.median(d, axis=0)
    dist = np.hypot(*(d - med).T)
    inl = dist <= max(5 * 1.4826 * np.median(dist), 0.05)
    width = sigma_from_moment(m["m2"][ok][inl], window)
    return {
        "reg_dx": float(np.mean(d[inl, 0])), "reg_dy": float(np.mean(d[inl, 1])),
        "reg_rms": float(np.sqrt(np.mean(np.sum(d[inl] ** 2, axis=1)))),
        "reg_n": int(inl.sum()), "psf_sigma": float(np.nanmedian(width)),
    }


def export_layers(frame: Layers, bkg: Background, offset: Offset, ref_stars: np.ndarray,
                  ks: KbmodSettings, template: Layers | None = None) -> tuple[Layers, dict]:
    """Sky-subtract and register one frame; returns the planes to write and figures."""
    sub = sky_subtract(frame, bkg)
    reg = resample(sub.sci, sub.var, sub.mask, offset.dx, offset.dy, ks.variance,
                   kind=ks.resampling)
    registered = Layers(reg.sci, reg.var, reg.mask)
    check = registration_check(registered, ref_stars, ks)
    out = science_plane(registered, template)
    info = {
        **check,
        "var_pixel_factor": reg.var_pixel_factor,
        "kernel_var_x": reg.kernel_var[0], "kernel_var_y": reg.kernel_var[1],
        "n_masked": int(np.count_nonzero(out.mask)),
    }
    return out, info


@dataclass(frozen=True)
class FrameMeasure:
    """What the measuring task learns of a frame (small: no image)."""

    stem: str
    background: Background
    stars: np.ndarray
    psf_sigma: float
    shape: tuple[int, int]
    seconds: float


@dataclass(frozen=True)
class MeasureJob:
    """A frame to measure and the settings to measure it with."""

    frame: CalFrame
    settings: KbmodSettings


def measure_task(job: MeasureJob) -> FrameMeasure | dict:
    """Worker task: background, stars and PSF of one calibrated frame (or a failed row)."""
    frame, ks = job.frame, job.settings
    t0 = time.perf_counter()
    try:
        _, layers = read_layers(frame.path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {"file": frame.path.name, "stem": frame.stem, "mjd": frame.mjd,
                "status": "failed", "stage": "measure",
                "reason": f"cannot read calibrated frame: {exc}"}
    bkg, stars, sigma = measure_layers(layers, ks)
    return FrameMeasure(stem=frame.stem, background=bkg, stars=stars, psf_sigma=sigma,
                        shape=layers.sci.shape, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class ExportJob:
    """Everything a worker needs to export one frame (small, picklable)."""

    frame: CalFrame
    output: Path
    provenance: str
    reference: Reference
    settings: KbmodSettings
    measure: FrameMeasure | None = None
    force: bool = False


def export_provenance(frame: CalFrame, reference: Reference, ks: KbmodSettings) -> str:
    """Hash of a frame's calibrated input, the reference (with its WCS) and the export
    settings."""
    return digest_of(frame.path.name, frame.adprov, reference.stem, reference.adprov,
                     ks.digest(), wcs_signature(reference.wcs), __version__)


def export_task(job: ExportJob) -> dict:
    """Worker task: offset, sky subtraction, registration and the KBMOD file of one frame.

    Returns a summary row; reading or registration problems give a ``failed`` row with the
    reason, write errors (disk full, permissions) raise, naming the output.
    """
    f = job.frame
    row: dict = {"file": f.path.name, "stem": f.stem, "raw": f.raw, "output": job.output.name,
                 "mjd": f.mjd, "stage": "export", "provenance": job.provenance}
    if not job.force and (old := existing_row(job.output, job.provenance)) is not None:
        return {**row, **old, "status": "skipped"}
    t0 = time.perf_counter()
    ks = job.settings
    try:
        cal_header, layers = read_layers(f.path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read calibrated frame: {exc}"}
    ref = job.reference
    if layers.sci.shape != tuple(ref.shape):
        return {**row, "status": "failed",
                "reason": f"shape {layers.sci.shape} differs from the reference's {ref.shape}"}
    if job.measure is not None:
        bkg, stars, sigma0 = job.measure.background, job.measure.stars, job.measure.psf_sigma
    else:
        bkg, stars, sigma0 = measure_layers(layers, ks)
    try:
        offset = measure_offset(stars, ref.stars, ks.match())
    except RegistrationError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    t1 = time.perf_counter()
    out, info = export_layers(layers, bkg, offset, ref.stars, ks)
    sigma = info["psf_sigma"] if np.isfinite(info["psf_sigma"]) else sigma0
    figures = {
        "mjd": f.mjd, "date_avg": f.date_avg, "exptime": f.exptime, "filter": f.filter,
        "dx": offset.dx, "dy": offset.dy, "dx_err": offset.err_x, "dy_err": offset.err_y,
        "n_match": offset.n_match, "match_rms": offset.rms,
        "sky": bkg.median_level, "sky_rms": bkg.median_rms,
        "psf_sigma": sigma, "psf_fwhm": FWHM_PER_SIGMA * sigma, "psf_sigma_cal": sigma0,
        "reg_rms": info["reg_rms"], "reg_n": info["reg_n"],
        "var_pixel_factor": info["var_pixel_factor"], "n_stars": int(stars.size),
    }
    cards = frame_cards(f, job, offset, bkg, info, figures, ks, cal_header)
    t2 = time.perf_counter()
    try:
        atomic_write(kbmod_hdul(cal_header, out, cards, ref.wcs), job.output)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {job.output}: {exc.strerror}") from exc
    t3 = time.perf_counter()
    return {**row, **figures, "status": "done", "n_masked": info["n_masked"],
            "n_vote": offset.n_vote, "reg_dx": info["reg_dx"], "reg_dy": info["reg_dy"],
            "t_measure": (job.measure.seconds if job.measure else 0.0),
            "t_register": t2 - t1, "t_write": t3 - t2, "t_total": t3 - t0,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def frame_cards(f: CalFrame, job: ExportJob, offset: Offset, bkg: Background, info: dict,
                figures: dict, ks: KbmodSettings, cal_header: fits.Header | None = None
                ) -> dict[str, tuple]:
    """Primary-header cards of a KBMOD file (the observatory from the calibrated frame's
    header ``cal_header``: :func:`~astep_dask.kbmod.products.observatory_cards`)."""
    filtvarf = filter_factor(offset.dx, offset.dy, (0.0, 0.0), figures["psf_sigma"],
                             info["var_pixel_factor"], ks.variance, ks.resampling)
    cards: dict[str, tuple] = {
        "MJD": (float(f.mjd), "[d] mid-exposure MJD (UTC): KBMOD obstime"),
        "MJD-AVG": (float(Time(f.date_avg, scale=f.timesys.lower()).mjd),
                    f"[d] mid-exposure MJD ({f.timesys})"),
        "DATE-AVG": (f.date_avg, f"mid-exposure date ({f.timesys})"),
        "TIMESYS": (f.timesys, "time scale of DATE-* keywords"),
        **observatory_cards(cal_header),
        "BUNIT": ("electron", "unit of SCI"),
        "KBLAYOUT": ("SCI,MASK,VAR", "HDUs 1,2,3 as KBMOD's FITS loader reads them"),
        "CALFILE": (ascii_text(f.path.name), "calibrated frame exported"),
        "REFFRAME": (job.reference.stem, "reference frame: its grid is this grid"),
        "REFADPRV": (job.reference.adprov, "ADPROV of the reference frame"),
        PROV_KEY: (job.provenance, "hash of input, reference and export settings"),
        "REGMETH": (REGMETH[ks.resampling], "resampling onto the reference grid"),
        "REGKERN": (ks.resampling, "resampling kernel (astep_dask.core.register)"),
        "REGDX": (card_float(offset.dx), "[px] x offset: ref (x,y) is (x+dx,y+dy) here"),
        "REGDY": (card_float(offset.dy), "[px] y offset to the reference frame"),
        "REGDXERR": (card_float(offset.err_x), "[px] uncertainty of REGDX"),
        "REGDYERR": (card_float(offset.err_y), "[px] uncertainty of REGDY"),
        "REGNMAT": (offset.n_match, "stars matched to the reference"),
        "REGMRMS": (card_float(offset.rms), "[px] weighted rms of matched star residuals"),
        "REGRMS": (card_float(info["reg_rms"]), "[px] rms of ref star positions after resampling"),
        "REGNSTAR": (info["reg_n"], "ref stars re-measured after resampling"),
        "VARMODE": (ks.variance, "VAR convention: area (sums, filters) or pixel"),
        "VARPIXF": (card_float(info["var_pixel_factor"]), "one-pixel variance / area variance"),
        "BKGMETH": ("mesh sigma-clip, median filter, bicubic", "background subtracted"),
        "BKGMESH": (ks.mesh, "[px] background mesh size"),
        "BKGLEVEL": (card_float(bkg.median_level, 3), "[e-] median background subtracted"),
        "BKGRMS": (card_float(bkg.median_rms, 3), "[e-] median sky noise per pixel"),
        "PSFSIGMA": (card_float(figures["psf_sigma"], 4),
                     "[px] Gaussian PSF sigma of SCI (KBMOD psf)"),
        "PSFFWHM": (card_float(figures["psf_fwhm"], 4), "[px] PSF FWHM of SCI"),
        "PSFSIG0": (card_float(figures["psf_sigma_cal"], 4), "[px] PSF sigma before resampling"),
        "NSTARS": (int(figures["n_stars"]), "stars measured on the frame"),
        "FILTVARF": (card_float(filtvarf, 5), "Var(psi)/phi of PSFSIGMA filter: use VAR x this"),
    }
    return cards
