"""The ASTEP archive layout: finding nights and classifying their frames from headers.

An archive night is ``ROOT/YYYY-MM-DD/`` holding ``YYYY-MM-DD-CAMS/`` (science frames and
their darks) and ``YYYY-MM-DD-CAMS_SKYFLAT/`` (twilight flats and their darks). Every FITS
file found there becomes one :class:`FrameRecord`, built from its header alone: pixel data
is never read here. A file that cannot be used is kept in the inventory with the reason,
so that no frame silently disappears: an entry with a FITS name that is not a regular file
(a FIFO, a folder, a dangling or looping link) is listed with the reason and never opened.

Content digests (:func:`content_digest`) are taken where they are needed and cost least:
the inventory reads the bytes of the calibration frames (the masters' provenance names
them), of gzip files (a truncated stream is found here) and of science frames that could
be copies of another (same size and start time: duplicates are identical bytes); every
other science frame is hashed by the worker that reads it for calibration. A file the
night's index (:mod:`astep_dask.io.index`) knows unchanged is not read at all: a re-run
reads headers only.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.utils.exceptions import AstropyUserWarning

from astep_dask.config import DetectorSettings, machine_cores
from astep_dask.core.calibrate import Section
from astep_dask.errors import ArchiveError, CalibrationError
from astep_dask.io.headers import (
    GAIN_KEYS,
    RDNOISE_KEYS,
    SATURATE_KEYS,
    FrameType,
    classify,
    exposure_time,
    filter_label,
    frame_filter,
    header_float,
    header_section,
    image_hdu_index,
    value_problems,
)
from astep_dask.io.rawfiles import (
    FITS_SUFFIXES,
    content_digest,
    entry_problem,
    is_fits_name,
    is_gzip,
    known_content,
    read_content,
    stem,
)
from astep_dask.io.times import READING_VERSION, frame_start

__all__ = [
    "FLAT_FOLDER",
    "INVENTORY_THREADS",
    "NO_GAIN",
    "NO_READ_NOISE",
    "READER_VERSION",
    "SCIENCE_FOLDER",
    "DetectorValues",
    "FrameRecord",
    "Inventory",
    "check_night",
    "detector_values",
    "find_nights",
    "format_table",
    "inventory_threads",
    "is_night",
    "iter_fits",
    "known_record",
    "night_folders",
    "read_record",
    "remember_record",
    "scan",
    "scan_night",
]

NIGHT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SCIENCE_FOLDER = "CAMS"
FLAT_FOLDER = "CAMS_SKYFLAT"


@dataclass(frozen=True)
class FrameRecord:
    """One raw file as the inventory sees it (header facts only).

    ``problem`` is ``None`` for a usable frame, else a short reason it cannot be used.
    ``shape`` is the full raw shape; ``trim`` and ``overscan`` are the data and overscan
    sections when the header declares them. ``size`` and ``digest`` are the file's size and
    content digest (:func:`content_digest`; empty when it was not needed here: a science
    frame is hashed by the worker that calibrates it, see the module docstring).
    ``out_stem`` is set when the default output stem is taken by another input
    (:attr:`output_stem`).
    """

    path: Path
    night: str
    folder: str
    kind: FrameType = FrameType.UNKNOWN
    exptime: float = float("nan")
    filter: str = ""
    date_obs: str = ""
    mjd: float = float("nan")
    shape: tuple[int, int] = (0, 0)
    bitpix: int = 0
    hdu: int = 0
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    trim: Section | None = None
    overscan: Section | None = None
    note: str = ""
    problem: str | None = None
    size: int = 0
    digest: str = ""
    out_stem: str = ""
    # What the night's own frames measured (masters.detector), for frames whose header
    # and settings give no gain or read noise: the gain (e-/ADU) and the read noise in
    # ADU, each with how it was measured ("flat pairs, 4 pairs").
    gain_measured: float | None = None
    gain_method: str = ""
    read_noise_adu_measured: float | None = None
    read_noise_method: str = ""

    @property
    def usable(self) -> bool:
        """True when the frame can enter calibration."""
        return self.problem is None

    @property
    def output_stem(self) -> str:
        """Stem of this frame's products: the file's stem unless another input has it."""
        return self.out_stem or stem(self.path)

    @property
    def data_shape(self) -> tuple[int, int]:
        """Shape after trimming (the shape of every calibrated product)."""
        return self.trim.shape if self.trim else self.shape

    @property
    def mjd_mid(self) -> float:
        """MJD (UTC) at mid-exposure."""
        return self.mjd + self.exptime / 2.0 / 86400.0

    @classmethod
    def from_dict(cls, d: dict) -> FrameRecord:
        """The record :meth:`to_dict` made."""
        values = {k: d[k] for k in d if k in cls.__dataclass_fields__}
        values["path"] = Path(d["path"])
        values["kind"] = FrameType(d.get("kind", FrameType.UNKNOWN))
        values["shape"] = tuple(d.get("shape") or (0, 0))
        for key in ("trim", "overscan"):
            values[key] = Section.from_fits(d[key]) if d.get(key) else None
        for key in ("exptime", "mjd"):
            values[key] = float("nan") if d.get(key) is None else float(d[key])
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["kind"] = str(self.kind)
        d["trim"] = self.trim.to_fits() if self.trim else None
        d["overscan"] = self.overscan.to_fits() if self.overscan else None
        for key in ("exptime", "mjd"):
            if isinstance(d[key], float) and not np.isfinite(d[key]):
                d[key] = None
        return d


@dataclass(frozen=True)
class DetectorValues:
    """A frame's gain, read noise and saturation level, and where each came from
    (``header``, ``setting`` or how the night's frames measured it, e.g.
    ``flat pairs, 4 pairs``): :func:`detector_values`."""

    gain: float  # e-/ADU
    read_noise: float  # e-
    saturation: float  # ADU
    sources: tuple[tuple[str, str], ...]  # (value name, source)

    def source(self, name: str) -> str:
        return dict(self.sources)[name]


NO_GAIN = ("no gain for {name}: no GAIN in its header, no [detector] gain setting and no "
           "pair of flats of one exposure time to measure it; give [detector] gain = "
           "<e-/ADU> in the settings file (--config)")
NO_READ_NOISE = ("no read noise for {name}: no RDNOISE in its header, no [detector] "
                 "read_noise setting and no pair of bias or dark frames to measure it; give "
                 "[detector] read_noise = <e-> in the settings file (--config)")


def detector_values(record: FrameRecord, detector: DetectorSettings) -> DetectorValues:
    """The one place where a header value, its setting and the night's measurement meet.

    Each of gain and read noise comes from the frame's header (``GAIN``, ``RDNOISE`` and
    their aliases, validated by the inventory) when it has one, else from the
    ``[detector]`` setting when one is given, else from what the night's frames measured
    (:mod:`astep_dask.masters.detector`, kept on the record: a measured read noise is in
    ADU, and is converted with the frame's gain); the saturation level from the header,
    else its setting. Each comes with its source.

    Raises
    ------
    CalibrationError
        When nothing gives the gain or the read noise (the line names the setting to
        give).
    """
    name = record.path.name
    if record.gain is not None:
        gain, gain_src = record.gain, "header"
    elif detector.gain is not None:
        gain, gain_src = detector.gain, "setting"
    elif record.gain_measured is not None:
        gain, gain_src = record.gain_measured, record.gain_method or "measured"
    else:
        raise CalibrationError(NO_GAIN.format(name=name))
    if record.read_noise is not None:
        rn, rn_src = record.read_noise, "header"
    elif detector.read_noise is not None:
        rn, rn_src = detector.read_noise, "setting"
    elif record.read_noise_adu_measured is not None:
        rn = record.read_noise_adu_measured * gain
        rn_src = record.read_noise_method or "measured"
    else:
        raise CalibrationError(NO_READ_NOISE.format(name=name))
    if record.saturation is not None:
        sat, sat_src = record.saturation, "header"
    else:
        sat, sat_src = detector.saturation_adu, "setting"
    return DetectorValues(float(gain), float(rn), float(sat),
                          (("gain", gain_src), ("read_noise", rn_src),
                           ("saturation", sat_src)))


@dataclass
class Inventory:
    """Every file of one night, usable or not."""

    night: str
    root: Path
    frames: list[FrameRecord] = field(default_factory=list)

    def select(
        self,
        kind: FrameType | None = None,
        exptime: float | None = None,
        filter: str | None = None,
        usable: bool = True,
    ) -> list[FrameRecord]:
        """Frames matching every given criterion, in time order then by path."""
        out = [
            f
            for f in self.frames
            if (not usable or f.usable)
            and (kind is None or f.kind == kind)
            and (exptime is None or np.isclose(f.exptime, exptime))
            and (filter is None or f.filter == filter)
        ]
        return sorted(out, key=lambda f: (f.mjd if f.mjd == f.mjd else math.inf, str(f.path)))

    @property
    def problems(self) -> list[FrameRecord]:
        """Frames that cannot be used, with their reasons."""
        return [f for f in self.frames if not f.usable]

    def exptimes(self, kind: FrameType) -> list[float]:
        """Distinct exposure times of usable frames of a type, sorted."""
        return sorted({round(f.exptime, 3) for f in self.select(kind)})

    def filters(self, kind: FrameType) -> list[str]:
        """Distinct filters of usable frames of a type, sorted."""
        return sorted({f.filter for f in self.select(kind)})

    def groups(self) -> list[dict]:
        """Counts of usable frames per folder × type × exposure × filter."""
        counts = Counter(
            (f.folder, str(f.kind), round(f.exptime, 3), f.filter) for f in self.frames if f.usable
        )
        return [
            {"folder": k[0], "type": k[1], "exptime": k[2], "filter": k[3], "count": n}
            for k, n in sorted(counts.items())
        ]

    def time_span(self) -> tuple[str, str] | None:
        """First and last DATE-OBS (UTC, ISO) of usable frames, if any have one."""
        mjds = [f.mjd for f in self.frames if f.usable and np.isfinite(f.mjd)]
        if not mjds:
            return None
        t = Time([min(mjds), max(mjds)], format="mjd", scale="utc")
        return t[0].isot, t[1].isot

    def to_dict(self) -> dict:
        """JSON-ready summary with every frame."""
        span = self.time_span()
        return {
            "night": self.night,
            "root": str(self.root),
            "n_files": len(self.frames),
            "n_usable": sum(f.usable for f in self.frames),
            "time_span": list(span) if span else None,
            "groups": self.groups(),
            "problems": [{"path": str(f.path), "reason": f.problem} for f in self.problems],
            "frames": [f.to_dict() for f in self.frames],
        }

    def to_json(self) -> str:
        """The inventory as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def _read_header(path: Path, size: int, gz_size: int | None = None
                 ) -> tuple[fits.Header, tuple[int, int], int, int] | str:
    """The image header of a file (the primary's cards merged under an extension's), its
    shape, BITPIX and HDU index; or why the file cannot be used.

    The image's data must lie within the file: its size for plain and tile-compressed
    (fpack) files; for gzip files ``gz_size``, the size of the complete decompressed
    stream (None when the stream ends early or is corrupt).
    """
    try:
        with warnings.catch_warnings():  # "may have been truncated": checked below
            warnings.simplefilter("ignore", AstropyUserWarning)
            hdul = fits.open(path, memmap=True, lazy_load_hdus=True, mode="readonly")
            with hdul:
                index = image_hdu_index(hdul)
                hdu = hdul[index]
                header = hdu.header
                compressed = isinstance(hdu, fits.CompImageHDU)
                info = hdul.fileinfo(index)
                needed = info["datLoc"] + info["datSpan"]
                if is_gzip(path):
                    if gz_size is None:
                        return "truncated: the gzip stream ends early or is corrupt"
                    if needed > gz_size:
                        return f"truncated: {gz_size} bytes decompressed, header needs {needed}"
                elif needed > size:
                    return f"truncated: {size} bytes, header needs {needed}"
                shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
                bitpix = int(header.get("BITPIX", 0)) if compressed else int(header["BITPIX"])
                primary = hdul[0].header if index else header
                merged = fits.Header(primary)
                if index:
                    skip = ("XTENSION", "PCOUNT", "GCOUNT")
                    merged.update((k, v) for k, v in header.items() if k not in skip)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = str(exc).split(". ")[0].split("\n")[0]
        return f"not a readable FITS image: {reason}"
    return merged, shape, bitpix, index


def _header_problem(rec: FrameRecord, exptime: float | None, mjd: float | None) -> str:
    """Why a record read from a readable header cannot be used ("" when it can)."""
    if exptime is None:
        return "no EXPTIME"
    if exptime < 0:
        return f"negative EXPTIME {exptime}"
    if rec.kind is FrameType.UNKNOWN:
        return "unknown frame type (no ACQTYPE/IMAGETYP, no name suffix)"
    if rec.kind is FrameType.SCIENCE and mjd is None:
        return "no DATE-OBS or MJD-OBS"
    if min(rec.shape) <= 0:
        return f"empty image shape {rec.shape}"
    return ""


# What read_record found in a file, keyed by what changes when the file is rewritten (its
# path and status, as the content cache of io.rawfiles): a file read once, in this process
# or (told by the night's index) in an earlier run, is not opened again while unchanged.
_RECORDS: dict[tuple, dict] = {}

# The version of the rules by which _read_record reads a header (which keywords name the
# filter, the time, the type...): a record found by other rules is read again. One number
# for all of them, io.times.READING_VERSION (which the night index and a frame's
# provenance name too). 2: the filter from FILTER_KEYS (was FILTER); the time of a
# date-only DATE-OBS; WCS cards as text.
READER_VERSION = READING_VERSION
_READER = "reader"  # the record's key that holds it


def known_record(path: Path, key: tuple[int, int, int, int, int]) -> dict | None:
    """What :func:`read_record` found in ``path`` while its status was ``key`` (device,
    inode, size, modification and inode-change times), as :meth:`FrameRecord.to_dict`
    without its content digest (and the :data:`READER_VERSION` it was read by); None when
    it was not read for that status, or was read by other rules."""
    record = _RECORDS.get((os.path.abspath(path), *key))
    return record if record is not None and record.get(_READER) == READER_VERSION else None


def remember_record(path: str | Path, key: tuple[int, int, int, int, int],
                    record: dict) -> None:
    """Take ``record`` (:meth:`FrameRecord.to_dict`) as what ``path``'s header says while its
    status is ``key``: the night's index knows it from an earlier run. A record without
    this version's :data:`READER_VERSION` is kept but never given back
    (:func:`known_record`): the file is read again."""
    if len(_RECORDS) > 100_000:
        _RECORDS.clear()
    _RECORDS[(os.path.abspath(path), *key)] = record


def read_record(path: Path, night: str = "", folder: str = "") -> FrameRecord:
    """:func:`_read_record`, or what it found when this file, unchanged, was read before
    (in this process, or in an earlier run whose index told it): then nothing is read
    but the file's status. The content digest comes from the content cache."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if (known := known_record(path, key)) is not None:
            content = known_content(path, st)
            rec = FrameRecord.from_dict({**known, "path": str(path), "night": night,
                                         "folder": folder})
            return replace(rec, digest=content.digest if content else "")
    rec = _read_record(path, night, folder)
    if st is not None and stat.S_ISREG(st.st_mode):
        remember_record(path, key, {**rec.to_dict(), "digest": "", _READER: READER_VERSION})
    return rec


def _read_record(path: Path, night: str = "", folder: str = "") -> FrameRecord:
    """Build the inventory record of one file from its header (no pixel data read).

    A file that cannot be used gets a record whose ``problem`` says why (not a regular
    file, empty, unreadable, truncated, not a FITS image, no or a bad exposure time, a bad
    GAIN, RDNOISE or SATURATE, unknown type, a science frame without a time, a time that is
    unreadable, implausible or in conflict (:func:`astep_dask.io.times.frame_start`), a
    bad section keyword); nothing is raised. The file's bytes are read once for its content digest
    (headers aside, no pixel data is decoded; a gzip file is decompressed to check it is
    whole). The filter is the first of :data:`~astep_dask.io.headers.FILTER_KEYS` that
    names one (:func:`~astep_dask.io.headers.frame_filter`); a flat or science frame
    whose header names none, or names it otherwise than by ``FILTER``, gets a note.
    """
    rec = FrameRecord(path=path, night=night, folder=folder)
    st, problem = entry_problem(path)
    if st is None:
        return replace(rec, problem=problem)
    size = st.st_size
    rec = replace(rec, size=size)
    if size == 0:
        return replace(rec, problem="empty file")
    if not os.access(path, os.R_OK):
        return replace(rec, problem="not readable (permissions)")
    # The content digest is known from the night's index when the file is unchanged; a
    # gzip file is read whole here (its stream must be complete); other files are hashed
    # below only if they are calibration frames (the masters' provenance names them):
    # a science frame is hashed by the worker that reads it for calibration.
    content = known_content(path, st)
    try:
        if content is None and is_gzip(path):
            content = read_content(path, st)
    except OSError as exc:
        return replace(rec, problem=f"cannot read: {exc.strerror or exc}")
    if content is not None:
        rec = replace(rec, digest=content.digest)
        if is_gzip(path) and content.gz_size is None:
            return replace(rec, problem="truncated: the gzip stream ends early or is corrupt")
    found = _read_header(path, size, content.gz_size if content else None)
    if isinstance(found, str):
        return replace(rec, problem=found)
    merged, shape, bitpix, index = found

    kind, note = classify(merged, path)
    if content is None and kind is not FrameType.SCIENCE:
        try:
            rec = replace(rec, digest=read_content(path, st).digest)
        except OSError as exc:
            return replace(rec, problem=f"cannot read: {exc.strerror or exc}")
    value_problem, value_notes = value_problems(merged, kind)
    note = "; ".join([n for n in (note, *value_notes) if n])
    exptime = exposure_time(merged)
    exptime = None if exptime != exptime else exptime
    date_obs = merged.get("DATE-OBS")
    start = frame_start(merged)  # the one reader of a frame's time (io.times)
    mjd = start.mjd if start.time is not None else None
    filt = frame_filter(merged)  # the first of FILTER_KEYS that names one
    note = "; ".join([n for n in (note, start.note, *filt.notes(kind)) if n])
    rec = replace(
        rec,
        kind=kind,
        exptime=exptime if exptime is not None else float("nan"),
        filter=filt.name,
        date_obs=str(date_obs).strip() if date_obs else "",
        mjd=mjd if mjd is not None else float("nan"),
        shape=shape,
        bitpix=bitpix,
        hdu=index,
        gain=header_float(merged, *GAIN_KEYS),
        read_noise=header_float(merged, *RDNOISE_KEYS),
        saturation=header_float(merged, *SATURATE_KEYS),
        note=note,
    )
    if value_problem:
        return replace(rec, problem=value_problem)
    if start.problem:  # a time there but unusable (unreadable, implausible, in conflict)
        return replace(rec, problem=start.problem)
    try:
        rec = replace(
            rec,
            trim=header_section(merged, "TRIMSEC", "DATASEC"),
            overscan=header_section(merged, "BIASSEC"),
        )
    except ValueError as exc:
        return replace(rec, problem=f"bad section keyword: {exc}")
    problem = _header_problem(rec, exptime, mjd)
    return replace(rec, problem=problem) if problem else rec


def _note_filterless(frames: list[FrameRecord]) -> list[FrameRecord]:
    """The frames, with a note on the usable flats and science frames whose header names
    no filter (:data:`~astep_dask.io.headers.FILTER_KEYS`) when the other kind's frames
    have one: a flat is used only for science frames of its own filter, never silently for
    another (a flat without one is not taken for a 'VR' frame), so such frames are left
    without a match."""
    def filters(kind: FrameType) -> set[str]:
        return {f.filter for f in frames if f.usable and f.kind is kind}

    flat_filters, science_filters = filters(FrameType.FLAT), filters(FrameType.SCIENCE)
    notes = {}
    if "" in flat_filters and (named := sorted(science_filters - {""})):
        notes[FrameType.FLAT] = (
            "flats with no filter keyword are not used for the science frames' filter"
            f"{'s' if len(named) > 1 else ''} {', '.join(map(filter_label, named))}")
    if "" in science_filters and flat_filters and "" not in flat_filters:
        notes[FrameType.SCIENCE] = (
            "science frames with no filter keyword have no flat (flats for: "
            f"{', '.join(map(filter_label, sorted(flat_filters)))})")
    return [replace(f, note="; ".join(n for n in (f.note, notes[f.kind]) if n))
            if f.usable and not f.filter and f.kind in notes else f for f in frames]


def _flag_odd_shapes(frames: list[FrameRecord]) -> list[FrameRecord]:
    shapes = Counter(f.shape for f in frames if f.usable)
    if not shapes:
        return frames
    majority = shapes.most_common(1)[0][0]
    return [
        f
        if not f.usable or f.shape == majority
        else replace(f, problem=f"shape {f.shape} differs from the night's majority {majority}")
        for f in frames
    ]


def _hash_twins(frames: list[FrameRecord]) -> list[FrameRecord]:
    """The frames, with the content digest taken of those that could be copies of one
    another (usable, same size and start time) and have none yet: only identical bytes
    make a duplicate, and only such frames can have them."""
    groups: dict[tuple, list[int]] = {}
    for i, f in enumerate(frames):
        if f.usable and not f.digest:
            groups.setdefault((f.size, f.date_obs, f.exptime), []).append(i)
    out = list(frames)
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            try:
                out[i] = replace(out[i], digest=content_digest(out[i].path))
            except OSError as exc:
                out[i] = replace(out[i], problem=f"cannot read: {exc.strerror or exc}")
    return out


def _flag_duplicates(frames: list[FrameRecord]) -> list[FrameRecord]:
    """Mark later copies of one file (identical bytes: the same content digest) as
    unusable, naming the file they duplicate. Frames that share a start time and size but
    differ in content are all kept."""
    first: dict[str, Path] = {}
    out = []
    for f in frames:
        if not f.usable or not f.digest:
            out.append(f)
            continue
        if f.digest in first:
            out.append(replace(f, problem=f"duplicate of {first[f.digest].name}"))
        else:
            first[f.digest] = f.path
            out.append(f)
    return out


def _suffix(path: Path) -> str:
    """The FITS suffix of a file name, lower-case ("" when none)."""
    low = path.name.lower()
    return next((s for s in sorted(FITS_SUFFIXES, key=len, reverse=True) if low.endswith(s)),
                "")


def _unique_outputs(frames: list[FrameRecord]) -> list[FrameRecord]:
    """Give every usable science frame an output stem no other one has.

    Inputs are taken uncompressed first (then by suffix as listed in ``FITS_SUFFIXES``,
    then by path); the first keeps its stem, a later one with the same stem (``X.fits``
    and ``X.fits.gz``) gets the stem with its suffix (``X_fits_gz``) and a note, unless that
    is another input's own stem or already given: then it is unusable, naming the input
    that has the name.
    """
    rank = {s: i for i, s in enumerate(FITS_SUFFIXES)}
    order = sorted(
        (i for i, f in enumerate(frames) if f.usable and f.kind is FrameType.SCIENCE),
        key=lambda i: (rank.get(_suffix(frames[i].path), len(rank)), str(frames[i].path)),
    )
    taken: dict[str, FrameRecord] = {}
    later = []
    for i in order:  # first every input that can keep its own stem
        base = stem(frames[i].path)
        if base in taken:
            later.append(i)
        else:
            taken[base] = frames[i]
    out = list(frames)
    for i in later:
        f = frames[i]
        base = stem(f.path)
        name = f"{base}_{_suffix(f.path).lstrip('.').replace('.', '_')}"
        if name in taken:
            other = taken[name].path
            out[i] = replace(f, problem=f"same output name as {other.parent.name}/{other.name}")
            continue
        taken[name] = f
        note = f"output named {name} ({taken[base].path.name} has {base})"
        out[i] = replace(f, out_stem=name, note="; ".join(n for n in (f.note, note) if n))
    return out


def night_folders(night_dir: Path) -> list[tuple[str, Path]]:
    """``(folder kind, path)`` of the raw folders of a night that exist."""
    name = night_dir.name
    out = []
    for kind in (SCIENCE_FOLDER, FLAT_FOLDER):
        sub = night_dir / f"{name}-{kind}"
        if sub.is_dir():
            out.append((kind, sub))
    return out


def is_night(path: Path) -> bool:
    """True when ``path`` is a night folder holding at least one raw folder."""
    return path.is_dir() and bool(night_folders(path))


def check_night(night_dir: str | Path) -> list[tuple[str, Path]]:
    """The raw folders of a night (:func:`night_folders`), checked at once (no file read).

    Raises
    ------
    ArchiveError
        When the folder does not exist or holds no raw folder.
    """
    night_dir = Path(night_dir)
    if not night_dir.is_dir():
        raise ArchiveError(f"{night_dir}: no such night folder")
    folders = night_folders(night_dir)
    if not folders:
        raise ArchiveError(
            f"{night_dir}: not an archive night (expected {night_dir.name}-{SCIENCE_FOLDER}/ "
            f"or {night_dir.name}-{FLAT_FOLDER}/ inside)"
        )
    return folders


def scan_night(night_dir: str | Path) -> Inventory:
    """Inventory of one night folder ``ROOT/YYYY-MM-DD/`` (headers only).

    Raises
    ------
    ArchiveError
        As :func:`check_night`.
    """
    night_dir = Path(night_dir)
    folders = check_night(night_dir)
    entries = [(p, kind) for kind, sub in folders for p in iter_fits(sub)]
    # Threads overlap the reads (headers, and the bytes of the files hashed here: file
    # reads and SHA-256 release the GIL). The outer catch_warnings restores the filters
    # that the threads' own change.
    with warnings.catch_warnings(), ThreadPoolExecutor(inventory_threads()) as pool:
        frames = list(pool.map(lambda e: read_record(e[0], night=night_dir.name,
                                                     folder=e[1]), entries))
    frames = _unique_outputs(_flag_duplicates(_hash_twins(_flag_odd_shapes(frames))))
    return Inventory(night=night_dir.name, root=night_dir, frames=_note_filterless(frames))


INVENTORY_THREADS = 8  # at most: beyond, one node's disk or file system is the limit


def inventory_threads() -> int:
    """Threads that read a night's files for the inventory: the cores this process may
    use, up to :data:`INVENTORY_THREADS`."""
    return max(1, min(INVENTORY_THREADS, machine_cores()))


def find_nights(path: str | Path) -> list[Path]:
    """Night folders at ``path``: the path itself if it is a night, else its child nights.

    Raises
    ------
    ArchiveError
        When the path does not exist or holds no night.
    """
    path = Path(path)
    if not path.exists():
        raise ArchiveError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise ArchiveError(f"{path}: not a folder (expected a night or a season root)")
    if is_night(path):
        return [path]
    nights = sorted(p for p in path.iterdir() if NIGHT_RE.match(p.name) and is_night(p))
    if not nights:
        raise ArchiveError(f"{path}: no archive night found (YYYY-MM-DD/YYYY-MM-DD-CAMS/)")
    return nights


def scan(path: str | Path) -> list[Inventory]:
    """Inventories of every night at ``path`` (a night folder or a season root)."""
    return [scan_night(n) for n in find_nights(path)]


def iter_fits(folder: Path) -> Iterator[Path]:
    """Entries with a FITS name directly inside a folder, sorted: files, and anything else
    so named (a FIFO, a folder, a broken link), which the inventory lists as unusable."""
    yield from sorted(p for p in folder.iterdir() if is_fits_name(p.name))


def format_table(rows: Iterable[dict], columns: list[str]) -> str:
    """Plain aligned text table of dict rows."""
    rows = list(rows)
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines.append("  ".join("-" * widths[c] for c in columns))
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)
