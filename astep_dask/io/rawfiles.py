"""Raw files as bytes: their names, their content digest and, for gzip, whether the
stream is whole; and whether a directory entry is a regular file at all.

The inventory reads each raw file once (:func:`read_content`): the digest makes a file's
identity (a rewritten frame is a new input), and a gzip stream that ends early is found
before any pixel is read. Entries that are not regular files (FIFOs, folders, broken
links) are named, never opened.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FITS_SUFFIXES",
    "Content",
    "content_digest",
    "entry_problem",
    "is_fits_name",
    "is_gzip",
    "known_content",
    "read_content",
    "remember",
    "stem",
]

_CHUNK = 1 << 20


_GZ_CHUNK = 1 << 16  # compressed bytes per step: bounds what one step can inflate to


@dataclass(frozen=True)
class Content:
    """What reading a raw file's bytes told: its digest and, for gzip, its size inflated."""

    digest: str
    gz_size: int | None  # gzip: bytes of the complete decompressed stream; None: incomplete
    checked_ns: int = 0  # when the bytes were read (epoch ns): see io.index, racy entries


# Content of files already read in this process, keyed by what changes when a file is
# rewritten (the inode change time cannot be set back): the inventory and the night's
# provenance then read each file once per run.
_CONTENT: dict[tuple, Content] = {}


def _key(path: Path, st: os.stat_result) -> tuple:
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
            st.st_ctime_ns)


def known_content(path: Path, st: os.stat_result) -> Content | None:
    """The content of ``path`` when it was read (or remembered) in this process for this
    version of the file (its status ``st``), else None; nothing is read."""
    return _CONTENT.get(_key(path, st))


def remember(path: str | Path, key: tuple[int, int, int, int, int], content: Content) -> None:
    """Take ``content`` as what ``path`` holds while its status is ``key`` (device, inode,
    size, modification and inode-change times): the night's index
    (:class:`~astep_dask.io.index.FileIndex`) knows it from an earlier run."""
    if len(_CONTENT) > 100_000:
        _CONTENT.clear()
    _CONTENT[(os.path.abspath(path), *key)] = content


def is_gzip(path: Path) -> bool:
    """True for a gzip-compressed file name (``.gz``)."""
    return path.name.lower().endswith(".gz")


def read_content(path: Path, st: os.stat_result) -> Content:
    """Read a file once (per process and version of the file): its SHA-256 digest and, for
    gzip, the length of its whole decompressed stream (None when the stream ends early or
    is corrupt), without keeping the decompressed bytes."""
    key = _key(path, st)
    if (known := _CONTENT.get(key)) is not None:
        return known
    started = time.time_ns()
    h = hashlib.sha256()
    gz = is_gzip(path)
    inflate = zlib.decompressobj(wbits=31) if gz else None
    total, broken = 0, False
    with open(path, "rb") as fh:
        while block := fh.read(_GZ_CHUNK if gz else _CHUNK):
            h.update(block)
            data = block
            while inflate is not None and data and not broken:
                if inflate.eof:  # a gzip file may hold several members (or zero padding)
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                    inflate = zlib.decompressobj(wbits=31)
                try:
                    total += len(inflate.decompress(data))
                except zlib.error:
                    broken = True
                data = inflate.unused_data
    complete = inflate is not None and inflate.eof and not broken
    found = Content(h.hexdigest()[:16], total if complete else None, started)
    if len(_CONTENT) > 100_000:
        _CONTENT.clear()
    _CONTENT[key] = found
    return found


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (first 16 hex digits), read in 1 MB chunks.

    Computed once per file and process (again when the file is rewritten): the inventory's
    pass takes it, provenance reuses it.
    """
    path = Path(path)
    return read_content(path, path.stat()).digest


def entry_problem(path: Path) -> tuple[os.stat_result | None, str | None]:
    """The file's status, or why the entry is no file to open (nothing is opened)."""
    try:
        st = path.stat()
    except OSError as exc:
        if path.is_symlink():
            if exc.errno == errno.ELOOP:
                return None, "symbolic link loop"
            return None, f"dangling symbolic link (to {os.readlink(path)})"
        return None, f"cannot stat: {exc.strerror}"
    if stat.S_ISREG(st.st_mode):
        return st, None
    what = ("a folder" if stat.S_ISDIR(st.st_mode)
            else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a file")
    return None, f"not a regular file ({what})"


FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz", ".fz")


def is_fits_name(name: str) -> bool:
    """True for file names with a FITS suffix (plain, gzip or fpack)."""
    low = name.lower()
    return low.endswith(FITS_SUFFIXES)


def stem(path: Path) -> str:
    """File name without any FITS suffix (``a.fits.gz`` → ``a``)."""
    name = path.name
    low = name.lower()
    for suf in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)]
    return path.stem
