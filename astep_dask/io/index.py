"""What a night's files were, by their file-system status: a re-run knows a file is
unchanged without reading it. The index is the ``files`` table of the night's
``manifest.json``, written with it.

The way git's index and rsync's quick check do it: when a file's content digest is taken
(an input read, a product written), its status is recorded beside it (device, inode,
size, modification and inode-change times in nanoseconds). A later run compares the
status only; a file whose status is the same is the same file with the same bytes, and
only a file whose status changed is read and hashed again (an archive copied to another
disk gets new inodes and times: its files are re-hashed, and found unchanged, not
recalibrated). The inode-change time cannot be set back by a user (``os.utime`` sets it
to now), so a rewrite that restores the modification time is still seen.

**Racy entries.** A time stamp has a granularity (from a few milliseconds to a second or
two, depending on the file system): a file modified within that time after its digest
was taken can keep the same status. So an input whose modification time is within
:data:`RACY_NS` of the moment its digest was taken is not trusted by its status: it is
hashed again next time (once: the new entry is no longer racy). Files written by the
pipeline itself (``written``) are exempt: their bytes are hashed as they are written, to a
private temporary file renamed into place, and any later change moves their inode-change
time past the rename's.

Silent corruption that leaves the status untouched (a disk's bit rot) is what
``astep-dask verify`` looks for: it hashes every file again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from astep_dask.io.layout import known_record, remember_record
from astep_dask.io.products import read_manifest
from astep_dask.io.rawfiles import Content, known_content, remember
from astep_dask.io.times import READING_VERSION
from astep_dask.version import __version__

__all__ = ["RACY_NS", "FileIndex", "Stamp", "stamp_of"]

RACY_NS = 2_000_000_000  # ns: the coarsest time-stamp granularity we allow for (2 s)
_VERSION = 1
# Who read the cached header facts: the package version and the version of the header
# reading rules (io.times.READING_VERSION, raised with every change that can read a header
# otherwise; the package version alone does not change with the code)
_READER = f"{__version__}/r{READING_VERSION}"


@dataclass(frozen=True)
class Stamp:
    """A file's status: what changes when its bytes change."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    def to_list(self) -> list[int]:
        return [self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns]

    def key(self) -> tuple[int, int, int, int, int]:
        """The status as the in-process caches of io.rawfiles and io.layout key it."""
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)

    @classmethod
    def from_list(cls, values: list[int]) -> Stamp:
        return cls(*(int(v) for v in values))


def stamp_of(st: os.stat_result) -> Stamp:
    """The :class:`Stamp` of a ``stat`` result."""
    return Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Entry:
    """One file's digest and the status it had when the digest was taken."""

    stamp: Stamp
    digest: str
    checked_ns: int  # when the digest was taken (epoch ns)
    written: bool = False  # a product written by the pipeline (exempt from the racy rule)
    gz_size: int | None = None  # gzip inputs: the inflated size (None: unknown or broken)
    record: dict | None = None  # an input: what the inventory found in its header

    @property
    def racy(self) -> bool:
        """Whether the file may have changed within the time-stamp granularity of the
        moment its digest was taken (then its status cannot vouch for its bytes)."""
        return not self.written and self.stamp.mtime_ns > self.checked_ns - RACY_NS


class FileIndex:
    """The digests of a night's inputs and products, with their status: the ``files``
    table of the night's manifest (:meth:`from_manifest`, :meth:`to_manifest`). Missing
    or unreadable: empty (everything is hashed again).
    """

    def __init__(self, entries: dict[str, Entry] | None = None):
        self.entries: dict[str, Entry] = dict(entries or {})

    @classmethod
    def from_manifest(cls, manifest: dict) -> FileIndex:
        """The index a manifest holds (empty when it holds none, or one of another form)."""
        entries = {}
        try:
            table = manifest.get("files") or {}
            # Header facts are read by this version's rules only (a new version may
            # classify or check a header otherwise); digests hold whatever the version.
            same = table.get("pipeline") == _READER
            if table.get("version") == _VERSION:
                for name, e in table["entries"].items():
                    entries[name] = Entry(Stamp.from_list(e["stamp"]), str(e["digest"]),
                                          int(e["checked_ns"]), bool(e.get("written")),
                                          e.get("gz_size"), e.get("record") if same else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            entries = {}
        return cls(entries)

    @classmethod
    def load(cls, out_dir: str | Path) -> FileIndex:
        """The index of the night whose output folder is ``out_dir``."""
        return cls.from_manifest(read_manifest(Path(out_dir)))

    def to_manifest(self) -> dict:
        """The ``files`` table (entries of files that no longer exist left out)."""
        return {"version": _VERSION, "pipeline": _READER, "racy_ns": RACY_NS,
                "entries": {
                    name: {"stamp": e.stamp.to_list(), "digest": e.digest,
                           "checked_ns": e.checked_ns, "written": e.written,
                           "gz_size": e.gz_size, "record": e.record}
                    for name, e in sorted(self.entries.items()) if os.path.lexists(name)}}

    def known(self, path: str | Path, st: os.stat_result | None = None) -> Entry | None:
        """The entry of ``path`` when its status is the recorded one and the entry is not
        racy (the file is then known unchanged without reading it); else None."""
        entry = self.entries.get(str(Path(path).absolute()))
        if entry is None or entry.racy:
            return None
        try:
            st = st or os.stat(path)
        except OSError:
            return None
        return entry if stamp_of(st) == entry.stamp else None

    def recorded(self, path: str | Path) -> Entry | None:
        """The entry of ``path`` whatever its status now (to compare a re-hash with)."""
        return self.entries.get(str(Path(path).absolute()))

    def record(self, path: str | Path, st: os.stat_result | Stamp, digest: str, *,
               checked_ns: int | None = None, written: bool = False,
               gz_size: int | None = None) -> None:
        """Remember ``path``'s digest and the status ``st`` it had when it was taken."""
        stamp = st if isinstance(st, Stamp) else stamp_of(st)
        self.entries[str(Path(path).absolute())] = Entry(
            stamp, digest, checked_ns if checked_ns is not None else time.time_ns(),
            written, gz_size)

    def seed(self, racy: bool = False) -> int:
        """Tell this process's raw-file reader (:mod:`astep_dask.io.rawfiles`) the digests
        of the inputs this index knows, so that the inventory and the provenance of an
        unchanged file read nothing. Products are left out, and racy entries unless
        ``racy`` (within one run: a digest just taken is good for the status it was taken
        with). Returns how many were told."""
        told = 0
        for name, e in self.entries.items():  # names are absolute paths already
            if e.written or not (racy or not e.racy):
                continue
            if e.gz_size is None and name.lower().endswith(".gz"):
                continue  # the inventory checks such a stream again: it may be broken
            key = e.stamp.key()
            remember(name, key, Content(e.digest, e.gz_size, e.checked_ns))
            if e.record is not None:
                remember_record(name, key, e.record)
            told += 1
        return told

    def keep_records(self) -> None:
        """Attach to each input's entry what the inventory of this process found in its
        header for the recorded status (:func:`~astep_dask.io.layout.known_record`)."""
        for name, e in list(self.entries.items()):
            if not e.written and (record := known_record(Path(name), e.stamp.key())):
                self.entries[name] = dataclasses.replace(e, record=record)

    def record_read(self, path: str | Path) -> bool:
        """Record ``path``'s digest if this process read it (or was told it) for its
        current status; False when it did not."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        content = known_content(Path(path), st)
        if content is None:
            return False
        self.record(path, st, content.digest, checked_ns=content.checked_ns,
                    gz_size=content.gz_size)
        return True

    def forget(self, path: str | Path) -> None:
        self.entries.pop(str(Path(path).absolute()), None)
