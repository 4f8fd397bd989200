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

By default (issue 11) the KBMOD files are *difference* frames: the registered frames are
written to ``kbmod/registered/<stem>_REG.fits`` (same layout), a static-sky template is
combined from them (or from neighbouring nights of the field) and each KBMOD file holds
frame − template, PSF-matched (``KBPLANE = 'difference'``); see :mod:`astep_dask.template`.
With the template disabled the KBMOD files are the registered frames, as before.

The work runs like calibration: one task per frame on the dask cluster (measure:
background, stars, PSF; then export: offset to the reference, sky subtraction,
resampling, write), atomic writes, and a re-run skips every frame whose file exists with
the same provenance hash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time, TimeDelta

from . import __version__
from .background import Background, estimate_background
from .config import KbmodSettings, Settings, TemplateSettings
from .fitsio import TMP_PREFIX, atomic_write, copy_header, remove_stale_temps, stamp
from .mask import MASK_DTYPE, Bit, flag, header_cards
from .masters import digest_of
from .register import (
    FWHM_PER_SIGMA,
    STAR_DTYPE,
    Offset,
    RegistrationError,
    find_stars,
    measure_offset,
    psf_sigma,
    resample,
    shift_weights,
    sigma_from_moment,
    windowed_centroids,
)
from .search import filter_variance_factor

# Concordia Station, Dome C (Antarctica), where ASTEP observes: 75°05'59" S, 123°19'56" E,
# 3233 m above sea level (Wikipedia, "Concordia Station", infobox: 75.099780 S,
# 123.332196 E, 3,233 m; the Italian programme PNRA gives 75°06' S, 123°20' E, 3,233 m at
# www.polarnet.cnr.it). Longitude east-positive, latitude north-positive.
OBSERVATORY = "Concordia, Dome C"
OBS_LAT = -75.099780  # deg
OBS_LONG = 123.332196  # deg, east
OBS_ELEV = 3233.0  # m

FOLDER = "kbmod"
SUFFIX = "_KBMOD.fits"
CAL_SUFFIX = "_CAL.fits"
MANIFEST = "kbmod.json"
PROV_KEY = "KBPROV"
UNUSABLE = flag(Bit.NO_DATA)
# Keywords that describe a frame's own pixel grid: stale once it is resampled.
WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CDELT", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_",
                "PV1_", "PV2_", "A_", "B_", "AP_", "BP_", "CROTA")
WCS_KEYS = {"WCSAXES", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "EPOCH", "WCSNAME"}


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class Layers:
    """Science, variance and mask planes of one frame on one grid."""

    sci: np.ndarray
    var: np.ndarray
    mask: np.ndarray


def mid_exposure(header: fits.Header) -> tuple[float, str, str]:
    """Mid-exposure time of a frame: (MJD in UTC, ISO date in the header's time scale,
    that scale), from ``DATE-OBS`` (else ``MJD-OBS``) + ``EXPTIME`` / 2.

    Raises
    ------
    ValueError
        When the header has neither ``DATE-OBS`` nor ``MJD-OBS``.
    """
    scale = str(header.get("TIMESYS", "UTC")).strip().lower()
    if scale not in Time.SCALES:
        scale = "utc"
    if header.get("DATE-OBS"):
        start = Time(str(header["DATE-OBS"]).strip(), scale=scale)
    elif header.get("MJD-OBS") is not None:
        start = Time(float(header["MJD-OBS"]), format="mjd", scale=scale)
    else:
        raise ValueError("no DATE-OBS or MJD-OBS: the frame has no time")
    mid = start + TimeDelta(float(header.get("EXPTIME", 0.0)) / 2.0, format="sec")
    mid.precision = 3
    return float(mid.utc.mjd), str(mid.isot), scale.upper()


def clean_layers(sci: np.ndarray, var: np.ndarray, mask: np.ndarray) -> Layers:
    """Flag NO_DATA on any pixel whose science or variance cannot be used (non-finite, or
    variance not positive), so that an unmasked pixel is always usable."""
    mask = np.asarray(mask, MASK_DTYPE).copy()
    with np.errstate(invalid="ignore"):
        broken = ~np.isfinite(sci) | ~np.isfinite(var) | ~(var > 0)
    mask[broken & (mask == 0)] |= UNUSABLE
    return Layers(np.asarray(sci, np.float32), np.asarray(var, np.float32), mask)


def sky_subtract(frame: Layers, background: Background) -> Layers:
    """Subtract the background model; its uncertainty is added to the variance."""
    return Layers(
        sci=(frame.sci - background.level()).astype(np.float32),
        var=(frame.var + background.error() ** 2).astype(np.float32),
        mask=frame.mask,
    )


def science_plane(frame: Layers, template: Layers | None = None) -> Layers:
    """The planes written to a KBMOD file from a registered, sky-subtracted frame: the
    frame itself or, given a static-sky template on the same grid (issue 11, see
    :func:`astep_dask.template.difference`), frame − template, variance frame + template,
    mask frame OR template.
    """
    if template is None:
        return frame
    return Layers(sci=(frame.sci - template.sci).astype(np.float32),
                  var=(frame.var + template.var).astype(np.float32),
                  mask=frame.mask | template.mask)


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
    return bkg, stars, psf_sigma(stars)


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
    reg = resample(sub.sci, sub.var, sub.mask, offset.dx, offset.dy, ks.variance)
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


def reference_wcs(header: fits.Header) -> fits.Header | None:
    """The celestial WCS of a frame's header, as cards to copy onto the common grid, or
    None when the header has none."""
    if not any(k.startswith("CTYPE") for k in header):
        return None
    from astropy.wcs import WCS, FITSFixedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, relax=True)
        except Exception:  # a malformed WCS is no WCS for the export
            return None
        if not wcs.has_celestial:
            return None
        return wcs.celestial.to_header(relax=True)


def strip_wcs(header: fits.Header) -> fits.Header:
    """A copy without the keywords of the frame's own pixel grid (stale after resampling)."""
    out = header.copy()
    for key in list(out.keys()):
        if key in WCS_KEYS or key.startswith(WCS_PREFIXES):
            del out[key]
    return out


def kbmod_hdul(cal_header: fits.Header, layers: Layers, cards: dict[str, tuple],
               wcs: fits.Header | None) -> fits.HDUList:
    """The KBMOD file: PRIMARY (header only), SCI (HDU 1), MASK (HDU 2), VAR (HDU 3)."""
    primary = fits.PrimaryHDU(header=copy_header(strip_wcs(cal_header)))
    h = primary.header
    for key, value in cards.items():
        h[key] = value
    header_cards(h)
    stamp(h)
    planes = [
        fits.ImageHDU(layers.sci.astype(np.float32, copy=False), name="SCI"),
        fits.ImageHDU(layers.mask.astype(MASK_DTYPE, copy=False), name="MASK"),
        fits.ImageHDU(layers.var.astype(np.float32, copy=False), name="VAR"),
    ]
    planes[0].header["BUNIT"] = ("electron", "sky-subtracted, registered signal")
    planes[1].header["BUNIT"] = ("", "mask bits, value 1<<bit, see MP_* keywords")
    header_cards(planes[1].header)
    planes[2].header["BUNIT"] = ("electron2", "variance of SCI")
    for hdu in planes:
        if wcs is not None:
            hdu.header.update(wcs)
    return fits.HDUList([primary, *planes])


# --------------------------------------------------------------------------- I/O edges


def read_calibrated(path: Path) -> tuple[fits.Header, Layers]:
    """Primary header and planes of a calibrated frame (``*_CAL.fits``)."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header.copy()
        sci = np.asarray(hdul["SCI"].data, np.float32)
        var = np.asarray(hdul["VAR"].data, np.float32)
        mask = np.asarray(hdul["MASK"].data, MASK_DTYPE)
    return header, clean_layers(sci, var, mask)


@dataclass(frozen=True)
class CalFrame:
    """A calibrated frame of the night, from its primary header only."""

    path: Path
    stem: str
    mjd: float  # mid-exposure, UTC
    date_avg: str
    timesys: str
    exptime: float
    filter: str
    raw: str
    adprov: str


def calibrated_frames(cal_dir: Path) -> tuple[list[CalFrame], list[dict]]:
    """The calibrated frames of a night's output folder in time order, and rows for files
    that cannot be used (unreadable header, no time)."""
    frames, problems = [], []
    for path in sorted(cal_dir.glob(f"*{CAL_SUFFIX}")):
        try:
            header = fits.getheader(path, 0)
            mjd, date_avg, timesys = mid_exposure(header)
        except (OSError, ValueError, TypeError) as exc:
            problems.append({"file": path.name, "status": "failed", "stage": "list",
                             "reason": f"cannot read calibrated frame: {exc}"})
            continue
        adprov = str(header.get("ADPROV") or "")
        frames.append(CalFrame(
            path=path, stem=path.name.removesuffix(CAL_SUFFIX), mjd=mjd, date_avg=date_avg,
            timesys=timesys, exptime=float(header.get("EXPTIME", 0.0)),
            filter=str(header.get("FILTER", "")), raw=str(header.get("RAWFILE", "")),
            adprov=adprov or f"size{path.stat().st_size}-mtime{path.stat().st_mtime_ns}",
        ))
    frames.sort(key=lambda f: (f.mjd, f.stem))
    return frames, problems


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
class Reference:
    """The night's reference frame: its grid is the common grid of the export."""

    stem: str
    adprov: str
    shape: tuple[int, int]
    stars: np.ndarray
    psf_sigma: float
    mjd: float
    wcs: fits.Header | None


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
        _, layers = read_calibrated(frame.path)
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


# Header keywords of a KBMOD file that make up a row of the night's table.
ROW_CARDS = {
    "mjd": "MJD", "date_avg": "DATE-AVG", "dx": "REGDX", "dy": "REGDY",
    "dx_err": "REGDXERR", "dy_err": "REGDYERR", "n_match": "REGNMAT", "match_rms": "REGMRMS",
    "sky": "BKGLEVEL", "sky_rms": "BKGRMS", "psf_sigma": "PSFSIGMA", "psf_fwhm": "PSFFWHM",
    "psf_sigma_cal": "PSFSIG0", "reg_rms": "REGRMS", "reg_n": "REGNSTAR",
    "var_pixel_factor": "VARPIXF", "exptime": "EXPTIME", "filter": "FILTER",
}


def frame_provenance(frame: CalFrame, reference: Reference, ks: KbmodSettings) -> str:
    """Hash of a frame's calibrated input, the reference and the export settings."""
    return digest_of(frame.path.name, frame.adprov, reference.stem, reference.adprov,
                     ks.digest(), __version__)


def _header_value(path: Path, key: str, ext: int = 0) -> str | None:
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            value = hdul[ext].header.get(key)
            return None if value is None else str(value)
    except (OSError, ValueError, TypeError, IndexError):
        return None


def existing_row(path: Path, provenance: str) -> dict | None:
    """The table row of an existing KBMOD file whose provenance matches, else None (also
    when the file is incomplete or unreadable: it is then remade)."""
    try:
        with fits.open(path, memmap=False) as hdul:
            if len(hdul) < 4 or hdul[0].header.get(PROV_KEY) != provenance:
                return None
            h = hdul[0].header
            return {k: h.get(card) for k, card in ROW_CARDS.items()}
    except (OSError, ValueError, TypeError):
        return None


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
        cal_header, layers = read_calibrated(f.path)
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
    cards = frame_cards(f, job, offset, bkg, info, figures, ks)
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


def _f(value: float, digits: int = 6) -> float:
    """A finite float for a header card (NaN is not allowed in FITS headers)."""
    value = float(value)
    return round(value, digits) if np.isfinite(value) else -1.0


def frame_cards(f: CalFrame, job: ExportJob, offset: Offset, bkg: Background, info: dict,
                figures: dict, ks: KbmodSettings) -> dict[str, tuple]:
    """Primary-header cards of a KBMOD file."""
    cards: dict[str, tuple] = {
        "MJD": (float(f.mjd), "[d] mid-exposure MJD (UTC): KBMOD obstime"),
        "MJD-AVG": (float(Time(f.date_avg, scale=f.timesys.lower()).mjd),
                    f"[d] mid-exposure MJD ({f.timesys})"),
        "DATE-AVG": (f.date_avg, f"mid-exposure date ({f.timesys})"),
        "TIMESYS": (f.timesys, "time scale of DATE-* keywords"),
        "OBSERVAT": (OBSERVATORY, "Concordia Station, Antarctica"),
        "OBS-LAT": (OBS_LAT, "[deg] observatory latitude (north +)"),
        "OBS-LONG": (OBS_LONG, "[deg] observatory longitude (east +)"),
        "OBS-ELEV": (OBS_ELEV, "[m] observatory elevation"),
        "OBSGEO-B": (OBS_LAT, "[deg] observatory geodetic latitude"),
        "OBSGEO-L": (OBS_LONG, "[deg] observatory geodetic longitude (east +)"),
        "OBSGEO-H": (OBS_ELEV, "[m] observatory height"),
        "BUNIT": ("electron", "unit of SCI"),
        "KBLAYOUT": ("SCI,MASK,VAR", "HDUs 1,2,3 as KBMOD's FITS loader reads them"),
        "CALFILE": (f.path.name, "calibrated frame exported"),
        "REFFRAME": (job.reference.stem, "reference frame: its grid is this grid"),
        "REFADPRV": (job.reference.adprov, "ADPROV of the reference frame"),
        PROV_KEY: (job.provenance, "hash of input, reference and export settings"),
        "REGMETH": ("2x2 overlap (bilinear), flux-conserving", "resampling"),
        "REGDX": (_f(offset.dx), "[px] x offset: ref (x,y) is (x+dx,y+dy) here"),
        "REGDY": (_f(offset.dy), "[px] y offset to the reference frame"),
        "REGDXERR": (_f(offset.err_x), "[px] uncertainty of REGDX"),
        "REGDYERR": (_f(offset.err_y), "[px] uncertainty of REGDY"),
        "REGNMAT": (offset.n_match, "stars matched to the reference"),
        "REGMRMS": (_f(offset.rms), "[px] weighted rms of matched star residuals"),
        "REGRMS": (_f(info["reg_rms"]), "[px] rms of ref star positions after resampling"),
        "REGNSTAR": (info["reg_n"], "ref stars re-measured after resampling"),
        "VARMODE": (ks.variance, "VAR convention: area (sums, filters) or pixel"),
        "VARPIXF": (_f(info["var_pixel_factor"]), "one-pixel variance / area variance"),
        "BKGMETH": ("mesh sigma-clip, median filter, bicubic", "background subtracted"),
        "BKGMESH": (ks.mesh, "[px] background mesh size"),
        "BKGLEVEL": (_f(bkg.median_level, 3), "[e-] median background subtracted"),
        "BKGRMS": (_f(bkg.median_rms, 3), "[e-] median sky noise per pixel"),
        "PSFSIGMA": (_f(figures["psf_sigma"], 4), "[px] Gaussian PSF sigma of SCI (KBMOD psf)"),
        "PSFFWHM": (_f(figures["psf_fwhm"], 4), "[px] PSF FWHM of SCI"),
        "PSFSIG0": (_f(figures["psf_sigma_cal"], 4), "[px] PSF sigma before resampling"),
        "NSTARS": (int(figures["n_stars"]), "stars measured on the frame"),
        "FILTVARF": (_f(filter_factor(offset.dx, offset.dy, (0.0, 0.0), figures["psf_sigma"],
                                      info["var_pixel_factor"], ks.variance), 5),
                     "Var(psi)/phi of PSFSIGMA filter: use VAR x this"),
    }
    return cards


def filter_factor(dx: float, dy: float, kernel_var: tuple[float, float], sigma: float,
                  var_pixel_factor: float = 1.0, variance: str = "area") -> float:
    """FILTVARF of a frame registered with offset ``(dx, dy)`` then PSF-matched with
    kernels of variance ``kernel_var``: what its VAR is multiplied by for the variance of a
    matched filter of σ ``sigma`` (:func:`search.filter_variance_factor`; with the "pixel"
    convention, VAR is ``var_pixel_factor`` times the area one, so that is divided out).
    1 when σ is not known."""
    from .template import kernel_1d

    if not (np.isfinite(sigma) and sigma > 0):
        return 1.0
    _, fx, fy = shift_weights(dx, dy)
    kx = [np.array([1 - fx, fx]), kernel_1d(kernel_var[0])]
    ky = [np.array([1 - fy, fy]), kernel_1d(kernel_var[1])]
    c = filter_variance_factor(kx, ky, sigma)
    return c / var_pixel_factor if variance == "pixel" and var_pixel_factor > 0 else c


# --------------------------------------------------------------------------- reference file


def reference_path(kdir: Path, night: str) -> Path:
    """Where the reference frame and its star list are recorded."""
    return kdir / f"{night}_REFERENCE.fits"


def write_reference(path: Path, ref: Reference, ks: KbmodSettings) -> Path:
    """Record the reference frame (header) and its star list (table) atomically."""
    primary = fits.PrimaryHDU()
    h = primary.header
    h["REFFRAME"] = (ref.stem, "reference frame of the KBMOD export")
    h["REFADPRV"] = (ref.adprov, "ADPROV of the reference frame")
    h["KBSETHSH"] = (ks.digest(), "hash of the export settings")
    h["REFNY"], h["REFNX"] = ref.shape
    h["MJD"] = (float(ref.mjd), "[d] mid-exposure MJD (UTC) of the reference")
    h["PSFSIGMA"] = (_f(ref.psf_sigma, 4), "[px] PSF sigma of the reference")
    stamp(h)
    table = fits.BinTableHDU(Table(ref.stars), name="STARS")
    hdus = [primary, table]
    if ref.wcs is not None:
        hdus.append(fits.ImageHDU(header=ref.wcs, name="WCS"))
    return atomic_write(fits.HDUList(hdus), path)


def read_reference(path: Path, frames: list[CalFrame], ks: KbmodSettings
                   ) -> Reference | None:
    """The recorded reference when it is still valid (same frame and calibration, same
    settings, frame still in the night), else None."""
    try:
        with fits.open(path, memmap=False) as hdul:
            h = hdul[0].header
            stars = np.asarray(hdul["STARS"].data)
            wcs = hdul["WCS"].header.copy() if "WCS" in hdul else None
    except (OSError, KeyError, ValueError, TypeError):
        return None
    by_stem = {f.stem: f for f in frames}
    frame = by_stem.get(str(h.get("REFFRAME")))
    if frame is None or h.get("REFADPRV") != frame.adprov or h.get("KBSETHSH") != ks.digest():
        return None
    if ks.reference and ks.reference not in (frame.stem, frame.raw, frame.path.name):
        return None
    if wcs is not None:
        wcs = fits.Header([c for c in wcs.cards if c.keyword not in
                           ("XTENSION", "BITPIX", "NAXIS", "PCOUNT", "GCOUNT", "EXTNAME")])
    converted = np.zeros(stars.size, dtype=STAR_DTYPE)
    for name in converted.dtype.names:
        converted[name] = stars[name]
    return Reference(stem=frame.stem, adprov=frame.adprov,
                     shape=(int(h["REFNY"]), int(h["REFNX"])), stars=converted,
                     psf_sigma=float(h.get("PSFSIGMA", float("nan"))), mjd=frame.mjd, wcs=wcs)


# --------------------------------------------------------------------------- night products


def write_offsets(path: Path, rows: list[dict]) -> Path:
    """The night's offsets table as CSV (one row per frame, time order), atomically."""
    cols = ["stem", "mjd", "status", "dx", "dy", "dx_err", "dy_err", "n_match", "match_rms",
            "reg_rms", "sky", "sky_rms", "psf_sigma", "psf_fwhm", "reason"]
    table = Table(rows=[[_cell(r.get(c)) for c in cols] for r in rows], names=cols)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    table.write(tmp, format="ascii.csv", overwrite=True)
    os.replace(tmp, path)
    return path


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float) and not np.isfinite(value):
        return ""
    return value


def frames_table(rows: list[dict]) -> fits.BinTableHDU:
    """BinTable ``FRAMES`` of the stack file: one row per plane of the cubes."""
    cols = [
        fits.Column("FILE", "40A", array=[r["raw"] or r["stem"] for r in rows]),
        fits.Column("KBMOD", "48A", array=[r["output"] for r in rows]),
        fits.Column("MJD", "D", unit="d", array=[r["mjd"] for r in rows]),
        fits.Column("DX", "D", unit="pix", array=[r["dx"] for r in rows]),
        fits.Column("DY", "D", unit="pix", array=[r["dy"] for r in rows]),
        fits.Column("DX_ERR", "E", unit="pix", array=[r["dx_err"] for r in rows]),
        fits.Column("DY_ERR", "E", unit="pix", array=[r["dy_err"] for r in rows]),
        fits.Column("N_MATCH", "J", array=[r["n_match"] for r in rows]),
        fits.Column("REG_RMS", "E", unit="pix", array=[r["reg_rms"] for r in rows]),
        fits.Column("BACKGROUND", "E", unit="electron", array=[r["sky"] for r in rows]),
        fits.Column("BKG_RMS", "E", unit="electron", array=[r["sky_rms"] for r in rows]),
        fits.Column("PSF_SIGMA", "E", unit="pix", array=[r["psf_sigma"] for r in rows]),
        fits.Column("PSF_FWHM", "E", unit="pix", array=[r["psf_fwhm"] for r in rows]),
        fits.Column("EXPTIME", "E", unit="s", array=[r["exptime"] for r in rows]),
    ]
    return fits.BinTableHDU.from_columns(cols, name="FRAMES")


def stack_provenance(rows: list[dict], ks: KbmodSettings) -> str:
    """Hash of the frames (their provenance, in order) and of what the stack holds."""
    return digest_of([r["provenance"] for r in rows], ks.stack_images, __version__)


def write_stack(path: Path, rows: list[dict], kdir: Path, reference: Reference,
                ks: KbmodSettings, provenance: str) -> Path:
    """The night stack file, streamed frame by frame (memory: one frame).

    PRIMARY (night, reference, observatory, provenance), then when ``stack_images``:
    cubes ``SCI`` (float32), ``MASK`` (int32), ``VAR`` (float32) of shape
    (frames, y, x) in time order, as the per-frame files hold them; then ``FRAMES``
    (file, MJD, offsets, background, PSF σ and FWHM per plane).
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    ny, nx = reference.shape
    primary = fits.PrimaryHDU()
    h = primary.header
    h["NFRAMES"] = (len(rows), "frames (planes of each cube), time order")
    h["REFFRAME"] = (reference.stem, "reference frame: grid of every plane")
    h["MJD"] = (float(rows[0]["mjd"]) if rows else 0.0, "[d] mid-exposure MJD of plane 0")
    h["MJD-BEG"] = (float(rows[0]["mjd"]) if rows else 0.0, "[d] first mid-exposure MJD")
    h["MJD-END"] = (float(rows[-1]["mjd"]) if rows else 0.0, "[d] last mid-exposure MJD")
    h["OBSERVAT"] = (OBSERVATORY, "Concordia Station, Antarctica")
    h["OBS-LAT"] = (OBS_LAT, "[deg] observatory latitude (north +)")
    h["OBS-LONG"] = (OBS_LONG, "[deg] observatory longitude (east +)")
    h["OBS-ELEV"] = (OBS_ELEV, "[m] observatory elevation")
    h["STKPROV"] = (provenance, "hash of the frames' provenance")
    h["KBSETHSH"] = (ks.digest(), "hash of the export settings")
    h["STKIMGS"] = (ks.stack_images, "T: SCI, MASK, VAR cubes present")
    header_cards(h)
    stamp(h)
    try:
        primary.writeto(tmp, overwrite=True)
        if ks.stack_images and rows:
            for name, ext, bitpix, dtype in (("SCI", 1, -32, ">f4"), ("MASK", 2, 32, ">i4"),
                                             ("VAR", 3, -32, ">f4")):
                eh = fits.Header()
                eh["XTENSION"] = "IMAGE"
                eh["BITPIX"] = bitpix
                eh["NAXIS"] = 3
                eh["NAXIS1"], eh["NAXIS2"], eh["NAXIS3"] = nx, ny, len(rows)
                eh["PCOUNT"], eh["GCOUNT"] = 0, 1
                eh["EXTNAME"] = name
                if name == "MASK":
                    header_cards(eh)
                if reference.wcs is not None:
                    eh.update(reference.wcs)
                    eh["WCSAXES"] = 2
                shdu = fits.StreamingHDU(str(tmp), eh)
                for r in rows:
                    with fits.open(kdir / r["output"], memmap=False) as hdul:
                        shdu.write(np.ascontiguousarray(hdul[ext].data, dtype=dtype))
                shdu.close()
        table = frames_table(rows)
        fits.append(tmp, table.data, table.header, checksum=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- orchestration

Progress = Callable[[int, int, dict], None]


def _run_bounded(client, fn: Callable, items: list, window: int, retries: int, prefix: str,
                 on_result: Callable[[object, object], None]) -> None:
    """Submit ``fn(item)`` for every item, at most ``window`` at once; ``on_result(item,
    result)`` as each finishes. On an error the queued tasks are cancelled and it raises."""
    from distributed import as_completed

    pending = enumerate(items)
    seq = as_completed()
    owner: dict = {}

    def submit_next() -> None:
        i, item = next(pending, (None, None))
        if i is not None:
            fut = client.submit(fn, item, pure=False, retries=retries,
                                key=f"{prefix}-{i}-{time.time_ns()}")
            owner[fut.key] = item
            seq.add(fut)

    for _ in range(max(window, 1)):
        submit_next()
    try:
        for fut in seq:
            on_result(owner.pop(fut.key), fut.result())
            submit_next()
    except BaseException:
        for f in list(seq.futures):
            f.cancel()
        raise


def _measure_row(frame: CalFrame, m: FrameMeasure) -> dict:
    return {"stem": frame.stem, "file": frame.path.name, "raw": frame.raw, "mjd": frame.mjd,
            "n_stars": int(m.stars.size), "psf_sigma": m.psf_sigma}


def export_night(
    night_dir: str | Path,
    client,
    settings: Settings | None = None,
    kbmod_settings: KbmodSettings | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    template: TemplateSettings | None = None,
) -> dict:
    """Export a calibrated night for KBMOD on the given dask client.

    Reads ``*_CAL.fits`` from the night's output folder (``pipeline.output_dir``), chooses
    (or re-uses) a reference frame, then runs one task per frame: background, stars and
    PSF; offset to the reference; sky subtraction; resampling onto the reference grid.
    With a template (the default, issue 11) the registered frames go to ``registered/``,
    the static-sky template is combined (strip tasks) and each KBMOD file is a difference
    frame (one task per frame; see :mod:`astep_dask.template`); without, the KBMOD file is
    the registered frame itself. Then writes the stack file, the offsets table and
    ``kbmod.json``.

    Parameters
    ----------
    night_dir
        The raw night folder (``ROOT/DATE``), as given to ``calibrate``.
    client
        A ``distributed.Client``.
    settings
        The run's settings (cluster: retries, frames in flight).
    kbmod_settings
        Export settings; defaults when None.
    out
        The ``--out`` of the calibration (None: beside the raw night).
    force
        Redo every frame and choose the reference again.
    progress
        Called as ``progress(done, total, row)`` after every frame of each stage (rows
        have ``file``, ``status`` and ``stage``: ``measure``, ``export``, ``template
        frame``, ``template`` or ``difference``).
    template
        Template and difference options; None: ``settings.template`` (difference frames
        by default).

    Returns
    -------
    dict
        ``night``, ``status`` (complete, partial, failed), ``error``, ``kbmod_dir``,
        ``reference``, ``counts`` (done, skipped, failed), ``frames`` (rows in time
        order), ``stack``, ``offsets``, ``reference_file``, ``manifest``,
        ``wall_seconds``, ``template`` (summary of the template stage, or None) and
        ``registered_dir`` (None when the KBMOD files are the registered frames).

    Raises
    ------
    pipeline.RunError
        Before any work: no calibrated frame, output not writable, or locked.
    """
    from .cluster import worker_threads
    from .pipeline import RunError, check_writable, night_lock, output_dir
    from .template import REG_SUFFIX, REGISTERED_FOLDER, run_template_stage

    started = time.time()
    settings = settings or Settings()
    ks = kbmod_settings or settings.kbmod
    ts = template or settings.template
    if ks.variance not in ("area", "pixel"):
        raise RunError(f"kbmod variance must be 'area' or 'pixel', not {ks.variance!r}")
    night_dir = Path(night_dir)
    night = night_dir.name
    cal_dir = output_dir(night_dir, Path(out) if out is not None else None)
    frames, problems = calibrated_frames(cal_dir) if cal_dir.is_dir() else ([], [])
    if not frames:
        raise RunError(f"{cal_dir}: no calibrated frame (*{CAL_SUFFIX}); "
                       f"run astep-dask calibrate first")
    kdir = cal_dir / ks.folder
    check_writable(kdir)
    window = settings.cluster.frames_in_flight or 2 * worker_threads(client)
    retries = settings.cluster.retries
    reg_dir = kdir / REGISTERED_FOLDER if ts.enabled else kdir
    reg_suffix = REG_SUFFIX if ts.enabled else SUFFIX
    result: dict = {"night": night, "kbmod_dir": kdir, "error": None, "reference": None,
                    "stack": None, "offsets": None, "reference_file": None, "manifest": None,
                    "template": None, "registered_dir": reg_dir if ts.enabled else None}
    result["template_settings"] = dataclasses.asdict(ts)
    failed: list[dict] = list(problems)
    with night_lock(kdir):
        for folder in (kdir, reg_dir, kdir / "template_frames"):
            remove_stale_temps(folder)
        ref_file = reference_path(kdir, night)
        reference = None if force else read_reference(ref_file, frames, ks)
        measures: dict[str, FrameMeasure] = {}
        if reference is None:
            done = [0]

            def measured(job: MeasureJob, res: object) -> None:
                frame = job.frame
                done[0] += 1
                if isinstance(res, FrameMeasure):
                    measures[frame.stem] = res
                    row = {"file": frame.path.name, "status": "measured", "stage": "measure"}
                else:
                    failed.append(res)  # type: ignore[arg-type]
                    row = res  # type: ignore[assignment]
                if progress:
                    progress(done[0], len(frames), row)

            _run_bounded(client, measure_task, [MeasureJob(f, ks) for f in frames], window,
                         retries,
                         f"kbmod-measure-{night}", measured)
            candidates = [f for f in frames if f.stem in measures
                          and measures[f.stem].stars.size >= ks.min_matches]
            if not candidates:
                result["error"] = (f"no frame has {ks.min_matches} measurable stars: "
                                   "cannot choose a reference")
                return _finish(result, [], failed, ks, started)
            rows = [_measure_row(f, measures[f.stem]) for f in candidates]
            try:
                idx = choose_reference(rows, ks.reference)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            ref_frame = candidates[idx]
            m = measures[ref_frame.stem]
            ref_header = fits.getheader(ref_frame.path, 0)
            reference = Reference(stem=ref_frame.stem, adprov=ref_frame.adprov, shape=m.shape,
                                  stars=m.stars, psf_sigma=m.psf_sigma, mjd=ref_frame.mjd,
                                  wcs=reference_wcs(ref_header))
            write_reference(ref_file, reference, ks)
        result["reference"] = reference.stem
        result["reference_file"] = ref_file
        failed_stems = {r.get("stem") for r in failed}
        jobs = [
            ExportJob(frame=f, output=reg_dir / f"{f.stem}{reg_suffix}",
                      provenance=frame_provenance(f, reference, ks), reference=reference,
                      settings=ks, measure=measures.get(f.stem), force=force)
            for f in frames if f.stem not in failed_stems
        ]
        rows_out: list[dict] = []

        def exported(job: ExportJob, row: object) -> None:
            rows_out.append(row)  # type: ignore[arg-type]
            if progress:
                progress(len(rows_out), len(jobs), row)  # type: ignore[arg-type]

        try:
            _run_bounded(client, export_task, jobs, window, retries, f"kbmod-export-{night}",
                         exported)
        except OSError as exc:
            result["error"] = str(exc)
            remove_stale_temps(kdir)
        rows_out.sort(key=lambda r: (r["mjd"], r["file"]))
        if ts.enabled and result["error"] is None:
            ref_frame = next(f for f in frames if f.stem == reference.stem)
            field = str(fits.getheader(ref_frame.path, 0).get("OBJECT", "") or "").strip()
            try:
                diff_rows, info = run_template_stage(
                    client, night_dir=night_dir, out=Path(out) if out is not None else None,
                    kdir=kdir, night=night, reference=reference, field=field,
                    filt=ref_frame.filter, rows=rows_out, ks=ks, ts=ts, force=force,
                    window=window, retries=retries, progress=progress)
            except OSError as exc:
                diff_rows, info = [], {"error": str(exc)}
                remove_stale_temps(kdir)
                remove_stale_temps(reg_dir)
            result["template"] = info
            result["error"] = info.get("error")
            by_stem = {r["stem"]: r for r in diff_rows}
            rows_out = [by_stem.get(r["stem"], r) if r["status"] != "failed" else r
                        for r in rows_out] if diff_rows else rows_out
        return _finish(result, rows_out, failed, ks, started, reference)


def _finish(result: dict, rows: list[dict], failed: list[dict], ks: KbmodSettings,
            started: float, reference: Reference | None = None) -> dict:
    """Write the stack, offsets table and manifest (when there is something to write) and
    complete the summary."""
    kdir: Path = result["kbmod_dir"]
    night = result["night"]
    all_rows = sorted([*rows, *[r for r in failed if r not in rows]],
                      key=lambda r: (r.get("mjd") or 0.0, r.get("file", "")))
    good = [r for r in rows if r["status"] in ("done", "skipped")]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for r in all_rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if good and reference is not None and result["error"] is None:
        try:
            result["offsets"] = write_offsets(kdir / f"{night}_OFFSETS.csv", all_rows)
            stack = kdir / f"{night}_STACK.fits"
            prov = stack_provenance(good, ks)
            if counts["done"] or _header_value(stack, "STKPROV") != prov:
                write_stack(stack, good, kdir, reference, ks, prov)
            result["stack"] = stack
        except OSError as exc:
            result["error"] = f"night products not written: {exc}"
            remove_stale_temps(kdir)
    if result["error"] or not good:
        status = "failed"
    elif counts["failed"]:
        status = "partial"
    else:
        status = "complete"
    result.update(status=status, counts=counts, frames=all_rows,
                  wall_seconds=time.time() - started)
    try:
        result["manifest"] = _write_manifest(kdir / MANIFEST, result, ks)
    except OSError as exc:
        result["error"] = f"{result['error'] or ''}; manifest not written: {exc}".lstrip("; ")
    return result


def _write_manifest(path: Path, result: dict, ks: KbmodSettings) -> Path:
    data = {
        **{k: v for k, v in result.items() if k != "frames"},
        "settings": dataclasses.asdict(ks),
        "version": __version__,
        "frames": result["frames"],
    }
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(_finite(data), indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


def _finite(obj: object) -> object:
    """A copy of nested dicts and lists with NaN and infinities as None (valid JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))
