"""One science frame, end to end, as one task on a worker: read the raw frame, calibrate
it with the night's masters (:func:`astep_dask.core.calibrate.calibrate_frame`), write its
calibrated file atomically, and return a small summary row (never the image).

A :class:`FrameJob` carries only paths and settings. The planes a frame needs from the
masters are made once per run for each exposure time and filter (:func:`share_masters`)
and memory-mapped by the workers (:mod:`astep_dask.masters.shared`); a worker that cannot
see them makes its own, once per process and exposure time.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from distributed import Client

from astep_dask.config import Settings
from astep_dask.core.calibrate import Detector, calibrate_frame
from astep_dask.errors import CalibrationError
from astep_dask.io.fitsio import ascii_text, atomic_write_digest, calibrated_hdul, verify_file
from astep_dask.io.index import stamp_of
from astep_dask.io.layout import FrameRecord, detector_values
from astep_dask.io.provenance import frame_provenance, read_provenance
from astep_dask.io.rawfiles import content_digest
from astep_dask.io.stack import read_raw
from astep_dask.io.times import exposure_cards
from astep_dask.masters.shared import SharedMasters, load_shared, share_frame_masters
from astep_dask.masters.store import Master, MasterPaths, frame_masters

__all__ = ["FrameJob", "cached_frame_masters", "finite_cards", "job_masters", "process_frame",
           "raw_problem", "share_masters"]


@dataclass(frozen=True)
class FrameJob:
    """Everything a worker needs to calibrate one frame (small, picklable)."""

    record: FrameRecord
    output: Path
    masters: MasterPaths
    # The frame's provenance hash when the driver knows the raw file's digest (the night's
    # index knew it unchanged); else "": the worker takes the digest as it reads the file
    # and completes the hash from ``masters_digest``.
    provenance: str
    settings: Settings
    force: bool = False
    shared: SharedMasters | None = None  # the planes made once for the run, if any
    masters_digest: str = ""


@functools.lru_cache(maxsize=4)
def _frame_masters(paths: MasterPaths, exptime: float, filter: str, stamps: tuple
                   ) -> tuple:
    return frame_masters(paths, exptime, filter)


def cached_frame_masters(paths: MasterPaths, exptime: float, filter: str) -> tuple:
    """:func:`masters.frame_masters`, made once per worker process for each exposure time
    and filter (and again if a master file changes): the dark solution costs as much as
    the rest of a frame's arithmetic. The arrays are shared between frames, read only."""
    files = [paths.bias, *(p for _, p in paths.darks), *(p for _, p in paths.flats),
             paths.mask, *(p for _, p in paths.illums), paths.warm]
    stamps = tuple(p.stat().st_mtime_ns for p in files if p is not None)
    fm, cards = _frame_masters(paths, exptime, filter, stamps)
    return fm, dict(cards)


def job_masters(job: FrameJob) -> tuple:
    """The planes and header cards of a job's frame: the run's shared planes, mapped
    (:func:`~astep_dask.masters.shared.load_shared`), or, when this worker cannot read
    them, made here from the master files (:func:`cached_frame_masters`)."""
    if job.shared is not None:
        try:
            return load_shared(job.shared)
        except (OSError, ValueError):
            pass  # a node that does not see the run's folder: the master files will do
    return cached_frame_masters(job.masters, job.record.exptime, job.record.filter)


def share_masters(client: Client, masters: MasterPaths, jobs: Sequence[FrameJob],
                  folder: Path, masters_digest: str, loaded: dict[str, Master] | None = None
                  ) -> tuple[dict[tuple[float, str], SharedMasters], dict[tuple[float, str], str]]:
    """Make the shared planes of every exposure time and filter of ``jobs``
    (:func:`~astep_dask.masters.shared.share_frame_masters`): here, from ``loaded`` (the
    masters the night's builder holds in memory, so that no master file is read back),
    or one task each on the cluster from the master files.

    Returns
    -------
    shared
        The planes made, by ``(exptime, filter)``.
    reasons
        Why the planes of an ``(exptime, filter)`` cannot be made (no way to make its
        dark): its frames cannot be calibrated. A write error (disk full) is not among
        them: those frames make their own planes.
    """
    combos = sorted({(j.record.exptime, j.record.filter) for j in jobs})
    if loaded is not None:
        results = [_share(masters, et, f, folder, masters_digest, loaded) for et, f in combos]
    else:
        results = client.gather([
            client.submit(_share, masters, et, f, folder, masters_digest, pure=False,
                          key=f"share-masters-{et:g}-{f}-{time.time_ns()}")
            for et, f in combos])
    shared: dict[tuple[float, str], SharedMasters] = {}
    reasons: dict[tuple[float, str], str] = {}
    for combo, result in zip(combos, results, strict=True):
        if isinstance(result, SharedMasters):
            shared[combo] = result
        elif result is not None:
            reasons[combo] = result
    return shared, reasons


def _share(masters: MasterPaths, exptime: float, filter: str, folder: Path,
           masters_digest: str, loaded: dict[str, Master] | None = None
           ) -> SharedMasters | str | None:
    """:func:`share_frame_masters` as a task: the planes, or why they cannot be made (a
    :class:`CalibrationError`), or None when they could not be written."""
    try:
        return share_frame_masters(masters, exptime, filter, folder, masters_digest, loaded)
    except CalibrationError as exc:
        return str(exc)
    except OSError:
        return None


def process_frame(job: FrameJob) -> dict:
    """Calibrate one frame and write its file (runs on a worker). Returns a summary row.

    An output already written with the same provenance is kept ("skipped") when its data
    verify (``[resume] verify``); a damaged one is remade, and the row's ``note`` says
    why. Any error of this frame (unreadable raw file, no flat for the filter, every pixel
    masked, a header that cannot be written, a bug) gives a ``failed`` row with the reason
    instead of raising, so that the night goes on and the error is not retried: it would
    happen again. A write error (disk full, permissions) gives a ``failed`` row with
    ``write_error`` set: the night then stops (see :func:`~astep_dask.run.night.run_frames`).
    """
    rec = job.record
    row: dict = {"file": rec.path.name, "output": job.output.name, "mjd": rec.mjd,
                 "exptime": rec.exptime, "filter": rec.filter, "started": time.time()}
    try:
        return _process(job, row)
    except Exception as exc:  # this frame's problem, not the night's: name it and go on
        return {**row, "status": "failed", "reason": _reason(exc)}


def _process(job: FrameJob, row: dict) -> dict:
    """:func:`process_frame` without its catch-all."""
    rec = job.record
    t0 = time.perf_counter()
    try:  # one read of the raw file: its pixels, headers and content digest
        raw_read = read_raw(rec.path, rec.hdu)
    except (OSError, ValueError, TypeError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read raw frame: {_reason(exc)}"}
    provenance = job.provenance or frame_provenance(rec, job.masters_digest, job.settings,
                                                    raw_read.digest)
    row.update(provenance=provenance, raw_digest=raw_read.digest,
               raw_stamp=stamp_of(raw_read.stat).to_list() if raw_read.stat else None,
               raw_checked_ns=raw_read.checked_ns, raw_gz_size=raw_read.gz_size)
    if not job.force and read_provenance(job.output) == provenance:
        # An output the night's index does not vouch for (an earlier version's, a copied
        # archive's): kept when its data verify, and its digest and status recorded.
        damage = verify_file(job.output) if job.settings.resume.verify else None
        if damage is None:
            return {**row, "status": "skipped", **_product_facts(job.output)}
        row["note"] = f"previous output damaged ({damage}); remade"
    try:
        fm, cards = job_masters(job)
        raw = raw_read.data
        if problem := raw_problem(raw):
            return {**row, "status": "failed", "reason": problem}
        raw_header = raw_read.header
    except CalibrationError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    except (OSError, ValueError, TypeError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read raw frame: {_reason(exc)}"}
    det_s = job.settings.detector
    values = detector_values(rec, det_s)
    detector = Detector(gain=values.gain, read_noise=values.read_noise,
                        saturation=values.saturation)
    overscan = rec.overscan if det_s.overscan == "auto" else None
    trim = rec.trim if det_s.overscan == "auto" else None
    t1 = time.perf_counter()
    sci, var, mask, summary = calibrate_frame(raw, fm, detector, job.settings.cosmics,
                                              overscan, trim)
    if summary["n_masked"] >= mask.size:
        why = (f"{summary['n_saturated']} at or above SATURATE = {detector.saturation:g} adu"
               if summary["n_saturated"] else "see the MASK bits")
        return {**row, "status": "failed",
                "reason": f"every pixel is masked ({why}): nothing to calibrate"}
    cs = job.settings.cosmics
    cards.update({
        "ADPROV": (provenance, "hash of input, masters and settings"),
        "RAWFILE": (ascii_text(rec.path.name), "raw frame (non-ASCII %-encoded)"),
        # the filter as the inventory read it (io.headers.FILTER_KEYS: FILTNAME, ...), so
        # that every reader of the product finds it under FILTER
        "FILTER": (ascii_text(rec.filter), "filter (from the raw header's filter keyword)"),
        "GAIN": (detector.gain, "[e-/ADU] gain applied"),
        "RDNOISE": (detector.read_noise, "[e-] read noise used for VAR"),
        "SATURATE": (detector.saturation, "[adu] raw level flagged SAT"),
        "GAINSRC": (values.source("gain"), "GAIN from: header, setting or measured"),
        "RDNSRC": (values.source("read_noise"), "RDNOISE from: header, setting or measured"),
        "SATSRC": (values.source("saturation"), "SATURATE from the raw header or a setting"),
        "OVERSCAN": (overscan.to_fits() if overscan else "none", "overscan subtracted"),
        "FLATNORM": ("median of unmasked pixels = 1", "flat normalisation"),
        "CRMETH": ("astroscrappy" if cs.enabled else "none", "cosmic-ray detection"),
        "CRSIGCLP": (cs.sigclip, "astroscrappy sigclip"),
        "CROBJLIM": (cs.objlim, "astroscrappy objlim"),
        "CRCLEAN": (cs.replace, "T: CR pixels replaced in SCI"),
        "NCRPIX": (summary["n_cr"], "pixels flagged CR"),
        "SCIMED": (summary["median"], "[e-] median of unmasked SCI, stars included"),
        "SCIMAD": (summary["mad_sigma"], "[e-] 1.4826 MAD of unmasked SCI"),
    })
    if trim is not None:
        cards["TRIMSEC"] = (trim.to_fits(), "raw section kept")
    site = job.settings.site  # MJD-MID, BJD_TDB, CENTALT, AIRMASS (io.times)
    t_cards, t_notes = exposure_cards(raw_header, rec.exptime, site.latitude,
                                      site.longitude, site.elevation)
    cards.update(t_cards)
    if t_notes:
        row["note"] = "; ".join(n for n in (row.get("note", ""), *t_notes) if n)
    out_s = job.settings.output
    quantize = out_s.quantize_level if out_s.compress else None
    hdul = calibrated_hdul(raw_header, sci, var, mask, finite_cards(cards), quantize, trim)
    t2 = time.perf_counter()
    try:
        digest = atomic_write_digest(hdul, job.output)
        written = os.stat(job.output)
    except Exception as exc:
        if (err := _os_error(exc)) is None:
            raise
        return {**row, "status": "failed", "write_error": True,
                "reason": f"cannot write {job.output}: {err.strerror or err}"}
    t3 = time.perf_counter()
    return {**row, "status": "done", **summary, "t_read": t1 - t0, "t_write": t3 - t2,
            "t_total": t3 - t0, "finished": time.time(),
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "product_digest": digest, "product_stamp": stamp_of(written).to_list()}


# A product's header cards that hold the figures of its manifest row (calibrate_frame's
# summary): a frame kept from its product (no manifest row to take them from) has them.
_FIGURE_CARDS = {"median": "SCIMED", "mad_sigma": "SCIMAD", "n_cr": "NCRPIX"}


def _product_facts(path: Path) -> dict:
    """The content digest and status of an existing product (it is read once) and the
    figures its header holds."""
    st = os.stat(path)
    facts = {"product_digest": content_digest(path), "product_stamp": stamp_of(st).to_list()}
    try:
        header = fits.getheader(path, 0)
    except (OSError, ValueError):
        return facts
    facts.update({k: header[card] for k, card in _FIGURE_CARDS.items() if card in header})
    return facts


def finite_cards(cards: dict[str, tuple]) -> dict[str, tuple]:
    """The header cards without those whose value is a NaN or infinite number, which FITS
    headers cannot hold (the sky level of a frame with no unmasked pixel, ...)."""
    def finite(value: object) -> bool:
        return not (isinstance(value, float | np.floating) and not np.isfinite(value))

    return {k: v for k, v in cards.items()
            if finite(v[0] if isinstance(v, tuple) else v)}


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or one it was raised while handling: astropy's
    free-space check can fail with an AttributeError on some file objects), or None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _reason(exc: BaseException) -> str:
    """One line for a failed frame: the exception's type and message."""
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text}"


def raw_problem(raw: np.ndarray) -> str | None:
    """Why a raw frame's pixels make no sense (all NaN, constant), else None."""
    finite = np.isfinite(raw)
    if not finite.any():
        return "no finite pixel (all NaN)"
    values = raw[finite]
    if values.min() == values.max():
        return f"every pixel has the same value ({values.min():g}): no signal"
    return None
