"""The files of the KBMOD export and the small pure pieces they are made of.

The export (:mod:`astep_dask.kbmod.export`, driven by :mod:`astep_dask.kbmod.stage`) reads
calibrated frames and writes, in the night's ``kbmod/`` folder, one KBMOD file per frame,
the reference frame's record, the night stack, the offsets table and ``kbmod.json``. This
module holds what those files are: their names, the observatory keywords, the planes of a
frame (:class:`Layers`) and how they are cleaned, sky-subtracted and differenced, the
layout of a KBMOD file (:func:`kbmod_hdul`), the calibrated frames of a night as the export
lists them (:class:`CalFrame`), the reference (:class:`Reference`, written and read back
so that a re-run keeps the same grid), the night's products (offsets CSV, stack file,
manifest) and the reading back of an existing KBMOD file's figures, which lets a re-run
skip a frame whose file has the same provenance. Every file is written atomically
(:mod:`astep_dask.io.fitsio`).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS, FITSFixedWarning

from astep_dask.config import KbmodSettings, SiteSettings
from astep_dask.core.background import Background
from astep_dask.core.bits import MASK_DTYPE, Bit, flag
from astep_dask.core.register import STAR_DTYPE
from astep_dask.io.fitsio import (
    add_checksums,
    atomic_path,
    atomic_write,
    copy_header,
    header_cards,
    image_hdu,
    mid_exposure,
    read_calibrated,
    verify_file,
    write_json,
)
from astep_dask.io.headers import exposure_time
from astep_dask.io.products import CAL_SUFFIX
from astep_dask.io.provenance import digest_of, stamp
from astep_dask.io.times import frame_site
from astep_dask.version import __version__

__all__ = [
    "CAL_SUFFIX",  # defined in astep_dask.io.products, with the other file names
    "OBSERVATORY",
    "OBS_ELEV",
    "OBS_LAT",
    "OBS_LONG",
    "PROV_KEY",
    "ROW_CARDS",
    "UNUSABLE",
    "WCS_KEYS",
    "WCS_PREFIXES",
    "CalFrame",
    "Layers",
    "Reference",
    "card_float",
    "clean_layers",
    "existing_row",
    "export_frames",
    "frames_table",
    "header_value",
    "kbmod_hdul",
    "observatory_cards",
    "read_layers",
    "read_reference",
    "reference_path",
    "reference_wcs",
    "science_plane",
    "sky_subtract",
    "stack_provenance",
    "strip_wcs",
    "trusted",
    "wcs_signature",
    "write_manifest",
    "write_offsets",
    "write_reference",
    "write_stack",
]

# ASTEP's site, Concordia Station, Dome C (Antarctica): the [site] default (config.py, with
# its reference), the observatory of products whose frames record no site.
OBSERVATORY = "Concordia, Dome C"
OBS_LAT = SiteSettings().latitude  # deg, north positive
OBS_LONG = SiteSettings().longitude  # deg, east positive
OBS_ELEV = SiteSettings().elevation  # m


def observatory_cards(header: fits.Header | None) -> dict[str, tuple]:
    """The observatory cards of a KBMOD product (``OBS-LAT``/``-LONG``/``-ELEV``,
    ``OBSGEO-B``/``-L``/``-H``, ``OBSERVAT``) from the header of what it was made from: the
    site the calibration used (a calibrated frame records it, from the raw header or the
    ``[site]`` setting, as ``OBSGEO-B``/``-L``/``-H``; a KBMOD file as ``OBS-LAT``...);
    Concordia (ASTEP's) when the header records none (frames calibrated before the site
    was written for frames without a pointing) or an impossible one."""
    site, _ = frame_site(header, OBS_LAT, OBS_LONG, OBS_ELEV) if header is not None else (
        None, "")
    if site is None or site.source == "setting":
        lat, lon, height, name = OBS_LAT, OBS_LONG, OBS_ELEV, OBSERVATORY
    else:
        lat, lon, height = site.latitude, site.longitude, site.elevation
        name = str(header.get("OBSERVAT", "") or "").strip()  # type: ignore[union-attr]
        if not name and abs(lat - OBS_LAT) < 0.05 and abs(lon - OBS_LONG) < 0.1:
            name = OBSERVATORY  # the [site] default: Concordia to 1 arcmin
    cards = {
        "OBS-LAT": (lat, "[deg] observatory latitude (north +)"),
        "OBS-LONG": (lon, "[deg] observatory longitude (east +)"),
        "OBS-ELEV": (height, "[m] observatory elevation"),
        "OBSGEO-B": (lat, "[deg] observatory geodetic latitude"),
        "OBSGEO-L": (lon, "[deg] observatory geodetic longitude (east +)"),
        "OBSGEO-H": (height, "[m] observatory height"),
    }
    if name:
        cards["OBSERVAT"] = (name, "observatory")
    return cards


PROV_KEY = "KBPROV"  # the provenance card of a KBMOD file


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
    frame itself or, given a static-sky template on the same grid (the export's default,
    see :func:`astep_dask.kbmod.difference.difference`), frame − template, variance
    frame + template, mask frame OR template.
    """
    if template is None:
        return frame
    return Layers(sci=(frame.sci - template.sci).astype(np.float32),
                  var=(frame.var + template.var).astype(np.float32),
                  mask=frame.mask | template.mask)


def reference_wcs(header: fits.Header) -> fits.Header | None:
    """The celestial WCS of a frame's header, as cards to copy onto the common grid, or
    None when the header has none."""
    if not any(k.startswith("CTYPE") for k in header):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, relax=True)
        except Exception:  # a malformed WCS is no WCS for the export
            return None
        if not wcs.has_celestial:
            return None
        return wcs.celestial.to_header(relax=True)


def wcs_signature(header: fits.Header | None) -> str:
    """A WCS as text for provenance hashes: axis types, reference pixel and value, and the
    pixel-to-world matrix to 10 significant digits (so that the same WCS read back from a
    file, whose cards may print the numbers differently, gives the same text); "" for
    None."""
    if header is None:
        return ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header, relax=True).celestial
    values = np.concatenate([w.wcs.crpix, w.wcs.crval, w.pixel_scale_matrix.ravel()])
    return ",".join([*w.wcs.ctype, *(f"{v:.10g}" for v in values)])


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
        image_hdu(layers.sci, "SCI", dtype=np.float32),
        image_hdu(layers.mask, "MASK", dtype=MASK_DTYPE),
        image_hdu(layers.var, "VAR", dtype=np.float32),
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


def read_layers(path: Path) -> tuple[fits.Header, Layers]:
    """Primary header and cleaned planes (:func:`clean_layers`) of a calibrated frame
    (``*_CAL.fits``) or of a registered one (same planes), read by
    :func:`astep_dask.io.fitsio.read_calibrated`."""
    header, sci, var, mask = read_calibrated(path)
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


def export_frames(cal_dir: Path) -> tuple[list[CalFrame], list[dict]]:
    """The calibrated frames of a night's output folder as the KBMOD export lists them:
    in mid-exposure order, with their provenance hashes, and rows for files that cannot
    be used (unreadable header, no time) instead of an error. (The lazy dataset of a
    night's frames is :func:`astep_dask.io.calibrated.open_calibrated`.)"""
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
            timesys=timesys, exptime=exposure_time(header),
            filter=str(header.get("FILTER", "")), raw=str(header.get("RAWFILE", "")),
            adprov=adprov or f"size{path.stat().st_size}-mtime{path.stat().st_mtime_ns}",
        ))
    frames.sort(key=lambda f: (f.mjd, f.stem))
    return frames, problems


# Header keywords of a KBMOD file that make up a row of the night's table.
ROW_CARDS = {
    "mjd": "MJD", "date_avg": "DATE-AVG", "dx": "REGDX", "dy": "REGDY",
    "dx_err": "REGDXERR", "dy_err": "REGDYERR", "n_match": "REGNMAT", "match_rms": "REGMRMS",
    "sky": "BKGLEVEL", "sky_rms": "BKGRMS", "psf_sigma": "PSFSIGMA", "psf_fwhm": "PSFFWHM",
    "psf_sigma_cal": "PSFSIG0", "reg_rms": "REGRMS", "reg_n": "REGNSTAR",
    "var_pixel_factor": "VARPIXF", "exptime": "EXPTIME", "filter": "FILTER",
}


def header_value(path: Path, key: str, ext: int = 0) -> str | None:
    """A header card of a file as a string; None when the file or the card is missing or
    the file cannot be read (so that a product is remade rather than trusted)."""
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            value = hdul[ext].header.get(key)
            return None if value is None else str(value)
    except (OSError, ValueError, TypeError, IndexError):
        return None


def trusted(path: Path, key: str, provenance: str, *more: Path) -> bool:
    """True when a night-level product (template, stack, WorkUnit) may be reused: its
    ``key`` card is ``provenance`` and it verifies (:func:`~astep_dask.io.fitsio.verify_file`:
    every byte there, every DATASUM and CHECKSUM), as do the files in ``more`` (the shards
    of a WorkUnit). A damaged one is remade, whatever its provenance says."""
    return (header_value(path, key) == provenance
            and all(verify_file(p) is None for p in (path, *more)))


def existing_row(path: Path, provenance: str) -> dict | None:
    """The table row of an existing KBMOD file whose provenance matches and whose data
    verify (:func:`~astep_dask.io.fitsio.verify_file`), else None: a file that is
    incomplete, damaged or unreadable is remade."""
    try:
        with fits.open(path, memmap=False) as hdul:
            if len(hdul) < 4 or hdul[0].header.get(PROV_KEY) != provenance:
                return None
            h = hdul[0].header
            row = {k: h.get(card) for k, card in ROW_CARDS.items()}
    except (OSError, ValueError, TypeError):
        return None
    return row if verify_file(path) is None else None


def card_float(value: float, digits: int = 6) -> float:
    """A float for a header card, rounded to ``digits``; -1 when not finite (NaN is not
    allowed in FITS headers)."""
    value = float(value)
    return round(value, digits) if np.isfinite(value) else -1.0


# --------------------------------------------------------------------------- reference file


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


def reference_path(kdir: Path, night: str) -> Path:
    """Where the reference frame and its star list are recorded."""
    return kdir / f"{night}_REFERENCE.fits"


def write_reference(path: Path, ref: Reference, ks: KbmodSettings,
                    cards: dict[str, tuple] | None = None) -> Path:
    """Record the reference frame (header, plus ``cards``) and its star list (table)
    atomically."""
    primary = fits.PrimaryHDU()
    h = primary.header
    for key, value in (cards or {}).items():
        h[key] = value
    h["REFFRAME"] = (ref.stem, "reference frame of the KBMOD export")
    h["REFADPRV"] = (ref.adprov, "ADPROV of the reference frame")
    h["KBSETHSH"] = (ks.digest(), "hash of the export settings")
    h["REFNY"], h["REFNX"] = ref.shape
    h["MJD"] = (float(ref.mjd), "[d] mid-exposure MJD (UTC) of the reference")
    h["PSFSIGMA"] = (card_float(ref.psf_sigma, 4), "[px] PSF sigma of the reference")
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
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.csv", overwrite=True)
    return path


def _cell(value: object) -> object:
    """A CSV cell: empty for a missing or non-finite value."""
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
    with atomic_path(path) as tmp:
        _stack_primary(rows, reference, ks, provenance, kdir).writeto(tmp, overwrite=True)
        if ks.stack_images and rows:
            for name, ext, bitpix, dtype in (("SCI", 1, -32, ">f4"), ("MASK", 2, 32, ">i4"),
                                             ("VAR", 3, -32, ">f4")):
                shdu = fits.StreamingHDU(str(tmp), _cube_header(name, bitpix, len(rows),
                                                                reference))
                for r in rows:
                    with fits.open(kdir / r["output"], memmap=False) as hdul:
                        shdu.write(np.ascontiguousarray(hdul[ext].data, dtype=dtype))
                shdu.close()
        table = frames_table(rows)
        fits.append(tmp, table.data, table.header, checksum=True)
        add_checksums(tmp)  # the streamed cubes too: a re-run verifies before it reuses
    return path


def _stack_primary(rows: list[dict], reference: Reference, ks: KbmodSettings,
                   provenance: str, kdir: Path) -> fits.PrimaryHDU:
    """The primary HDU of the stack file (night, reference, observatory, provenance)."""
    primary = fits.PrimaryHDU()
    h = primary.header
    h["NFRAMES"] = (len(rows), "frames (planes of each cube), time order")
    h["REFFRAME"] = (reference.stem, "reference frame: grid of every plane")
    h["MJD"] = (float(rows[0]["mjd"]) if rows else 0.0, "[d] mid-exposure MJD of plane 0")
    h["MJD-BEG"] = (float(rows[0]["mjd"]) if rows else 0.0, "[d] first mid-exposure MJD")
    h["MJD-END"] = (float(rows[-1]["mjd"]) if rows else 0.0, "[d] last mid-exposure MJD")
    site = fits.getheader(kdir / rows[0]["output"], 0) if rows else None
    h.update({k: v for k, v in observatory_cards(site).items() if not k.startswith("OBSGEO")})
    h["STKPROV"] = (provenance, "hash of the frames' provenance")
    h["KBSETHSH"] = (ks.digest(), "hash of the export settings")
    h["STKIMGS"] = (ks.stack_images, "T: SCI, MASK, VAR cubes present")
    header_cards(h)
    stamp(h)
    return primary


def _cube_header(name: str, bitpix: int, n_frames: int, reference: Reference) -> fits.Header:
    """Header of one streamed cube (``n_frames`` planes on the reference grid)."""
    ny, nx = reference.shape
    eh = fits.Header()
    eh["XTENSION"] = "IMAGE"
    eh["BITPIX"] = bitpix
    eh["NAXIS"] = 3
    eh["NAXIS1"], eh["NAXIS2"], eh["NAXIS3"] = nx, ny, n_frames
    eh["PCOUNT"], eh["GCOUNT"] = 0, 1
    eh["EXTNAME"] = name
    if name == "MASK":
        header_cards(eh)
    if reference.wcs is not None:
        eh.update(reference.wcs)
        eh["WCSAXES"] = 2
    return eh


def write_manifest(path: Path, result: dict, ks: KbmodSettings) -> Path:
    """``kbmod.json``: the export's summary (:func:`~astep_dask.kbmod.stage.export_night`'s
    result), its settings and version, then the rows of the frames; NaN written as null."""
    data = {
        **{k: v for k, v in result.items() if k != "frames"},
        "settings": dataclasses.asdict(ks),
        "version": __version__,
        "frames": result["frames"],
    }
    return write_json(path, data, finite=True)
