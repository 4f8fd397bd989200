"""Provenance: the identities and hashes that say what a product was made from.

A product's provenance hash (``ADPROV`` on a calibrated frame, ``ADHASH`` on a master)
covers its inputs, the masters it used, the settings that shape it and the package
version; a re-run redoes exactly the products whose hash changed. A raw input is known by
its name, size, start time and content digest (taken in the inventory's pass), so a file
rewritten with other pixels under the same header invalidates what was made from it.
:func:`stamp` writes the package's name, version and the date into a header.
"""

from __future__ import annotations

import hashlib
import json
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from astep_dask.config import Settings
from astep_dask.io.layout import FrameRecord, iter_fits, night_folders
from astep_dask.io.rawfiles import content_digest
from astep_dask.io.times import READING_VERSION
from astep_dask.version import __version__

__all__ = [
    "digest_of",
    "file_digest",
    "frame_provenance",
    "input_identity",
    "night_provenance",
    "read_provenance",
    "stamp",
]


def _digest(record: FrameRecord) -> str:
    """The record's content digest (taken now when the record has none)."""
    return record.digest or content_digest(record.path)


def input_identity(records: Sequence[FrameRecord], content: bool = True) -> list[str]:
    """Stable identities of input files: name, size, start time, exposure and content.

    ``content=False``: the modification time instead of the content digest, for a product
    made from a sample of many files' pixels (the illumination correction reads a few rows
    of up to hundreds of science frames): their digests are taken only as the frames are
    calibrated, later, and hashing them all first would read every science frame twice.
    A file rewritten with its modification time set back is then not seen there (its
    frame still is, by its digest)."""
    out = []
    for r in records:
        st = r.path.stat()
        what = _digest(r) if content else f"mtime {st.st_mtime_ns}"
        out.append(f"{r.path.name}|{st.st_size}|{r.date_obs}|{r.exptime:g}|{what}")
    return sorted(out)


def digest_of(*parts: object) -> str:
    """Short hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits): names a master unambiguously."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def stamp(header: fits.Header, **cards: object) -> fits.Header:
    """Add the package version and the given provenance cards (``KEY=(value, comment)``)."""
    header["PIPENAME"] = ("astep-dask", "software that made this file")
    header["PIPEVERS"] = (__version__, "astep-dask version")
    header["DATE"] = (np.datetime64("now", "s").astype(str), "UTC date this file was written")
    for key, value in cards.items():
        header[key.replace("_", "-")] = value
    return header


def read_provenance(path: str | Path, key: str = "ADPROV") -> str | None:
    """The provenance hash recorded in a product's primary header, or None when the file
    is missing, unreadable, incomplete or has none (then it must be remade)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)  # "may have been truncated"
            with fits.open(path, memmap=False) as hdul:
                if len(hdul) < 4:
                    return None
                value = hdul[0].header.get(key)
                return str(value) if value is not None else None
    except (OSError, ValueError, TypeError):
        return None


def frame_provenance(record: FrameRecord, masters_digest: str, settings: Settings,
                     digest: str = "") -> str:
    """Hash of a frame's input (name, size, start time, content), its masters and the
    settings that shape its output. ``digest``: the raw file's content digest when the
    caller has it (the worker that read the file); else the record's, else it is read."""
    identity = (f"{record.path.name}|{record.path.stat().st_size}|{record.date_obs}"
                f"|{digest or _digest(record)}")
    return digest_of(identity, masters_digest,
                     settings.digest("cosmics", "detector", "combine", "flat", "mask",
                                     "output", "site"),  # site: BJD_TDB, AIRMASS cards
                     __version__, f"r{READING_VERSION}")  # how its header was read


def _file_identity(kind: str, path: Path) -> tuple:
    """``(folder kind, name, size, mtime, content digest)`` of a raw file; an entry that is
    not a readable regular file (never opened) is known by its name and what it is."""
    try:
        st = path.stat()
    except OSError as exc:
        return (kind, path.name, "unreadable", exc.errno)
    if not stat.S_ISREG(st.st_mode):
        return (kind, path.name, "not a file", stat.S_IFMT(st.st_mode))
    try:
        digest = content_digest(path) if st.st_size else ""
    except OSError as exc:
        digest = f"unreadable {exc.errno}"
    return (kind, path.name, st.st_size, st.st_mtime_ns, digest)


def night_provenance(night_dir: Path, settings: Settings) -> str:
    """Identity of a night's raw files (names, sizes, modification times, content digests)
    and of the settings: a season re-run skips a night whose complete manifest records the
    same. The digests are those the inventory took in this process (a file not seen yet
    is read once)."""
    files = [
        _file_identity(kind, p)
        for kind, folder in night_folders(night_dir)
        for p in iter_fits(folder)
    ]
    return digest_of(files, settings.digest("combine", "flat", "mask", "cosmics", "detector",
                                            "illum", "output"),
                     __version__)
