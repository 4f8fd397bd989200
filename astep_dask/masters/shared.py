"""The planes a science frame needs, made once per run and shared read-only by every worker
process of a node through memory-mapped files.

A frame is calibrated with six planes (:class:`~astep_dask.core.calibrate.FrameMasters`):
the dark, its variance and its dark current for the frame's exposure time, the flat
(illumination-corrected) and its variance for its filter, and the bad-pixel mask. Made in
each worker process (:func:`~astep_dask.masters.store.frame_masters`), they cost every
process its own copy of them and of the master files they come from: 250 MB at 2048²
(1 GB at 4096²), more than the process's imports and one frame's working set together,
which is what kept a 16-core node from running 16 worker processes in its memory.

Here one task per exposure time and filter makes them (:func:`share_frame_masters`) and
writes each plane as a ``.npy`` file in the night's output folder
(:data:`~astep_dask.io.products.SHARED_MASTERS_FOLDER`); each worker maps them read-only
(:func:`load_shared`, ``numpy.load(mmap_mode="r")``), and the operating system keeps one
copy per node in its page cache, for all the processes that map them. The files are a
run's scratch (written without fsync, removed when the frames are done,
:func:`remove_shared`); a frame's provenance names the master files, not them.

A plane is trusted only as written: :class:`SharedMasters` carries each plane's size and
SHA-256, a worker checks both before it maps the file (a truncated plane would kill it
with SIGBUS when read past its end; a replaced one would calibrate frames wrongly under
valid checksums), and before each frame checks that the file it mapped has not been
replaced or rewritten since (:func:`load_shared` raises :class:`PlaneChanged`; the frame is
then made from the master files, whose digests are checked in turn). The folder is made
by the run (mode 0700); a symbolic link in its place is removed, never followed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from astep_dask.core.calibrate import FrameMasters
from astep_dask.io.fitsio import atomic_open
from astep_dask.io.provenance import digest_of
from astep_dask.masters.store import Master, MasterPaths, frame_masters

__all__ = ["PLANES", "PlaneChanged", "SharedMasters", "load_shared", "make_shared_folder",
           "remove_shared", "share_frame_masters"]

PLANES: tuple[str, ...] = tuple(f.name for f in fields(FrameMasters))


@dataclass(frozen=True)
class SharedMasters:
    """Where the planes of one exposure time and filter are, and the header cards that
    name the masters they were made from (small and picklable: a frame task carries it).

    ``key`` identifies the planes: a digest of the masters' digests, the exposure time and
    the filter, so that planes of other masters are never mistaken for these.
    """

    folder: Path
    key: str
    exptime: float
    filter: str
    cards: tuple[tuple[str, tuple], ...]
    # Per plane (in PLANES order): the file's size in bytes and SHA-256, as written.
    sizes: tuple[int, ...] = ()
    digests: tuple[str, ...] = ()

    def path(self, plane: str) -> Path:
        """The file of one plane (one of :data:`PLANES`)."""
        return self.folder / f"{self.key}-{plane}.npy"


def share_frame_masters(paths: MasterPaths, exptime: float, filter: str, folder: Path,
                        masters_digest: str, loaded: dict[str, Master] | None = None
                        ) -> SharedMasters:
    """Make the planes of frames of this exposure time and filter from the masters
    (:func:`~astep_dask.masters.store.frame_masters`: those in ``loaded``, else their
    files) and write them into ``folder``, each plane atomically (one task on a worker, or
    in the driver from the masters it holds).

    Raises
    ------
    CalibrationError
        As :func:`~astep_dask.masters.store.frame_masters`: no flat for the filter, or no
        way to make the dark.
    OSError
        When a file cannot be written.
    """
    fm, cards = frame_masters(paths, exptime, filter, cache=False,  # not kept: mapped now
                              loaded=loaded)
    shared = SharedMasters(Path(folder), digest_of([masters_digest, float(exptime), filter]),
                           float(exptime), filter, tuple(cards.items()))
    sizes, digests = [], []
    for plane in PLANES:
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(getattr(fm, plane)), allow_pickle=False)
        data = buffer.getbuffer()
        sizes.append(len(data))
        digests.append(hashlib.sha256(data).hexdigest())
        with atomic_open(shared.path(plane), sync=False) as fh:
            fh.write(data)
    return replace(shared, sizes=tuple(sizes), digests=tuple(digests))


class PlaneChanged(ValueError):
    """A shared plane's file is not the one written for the run (truncated, replaced or
    rewritten): it is not mapped, or no longer used."""


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _checked_map(shared: SharedMasters, plane: str, size: int, digest: str
                 ) -> tuple[np.ndarray, tuple]:
    """One plane, mapped read-only after its size and digest are checked (on the file
    descriptor that is mapped, so a file swapped in between is not the one mapped)."""
    path = shared.path(plane)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_size != size:
            raise PlaneChanged(f"shared plane {path.name} has {st.st_size} bytes, "
                               f"{size} were written")
        h = hashlib.sha256()
        while block := fh.read(1 << 22):
            h.update(block)
        if h.hexdigest() != digest:
            raise PlaneChanged(f"shared plane {path.name} changed since it was written "
                               f"(SHA-256 {h.hexdigest()[:16]}, written {digest[:16]})")
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        if dtype.hasobject:
            raise PlaneChanged(f"shared plane {path.name} holds objects")
        array = np.memmap(fh, dtype=dtype, mode="r", shape=shape, offset=fh.tell(),
                          order="F" if fortran else "C")
    return array, _stamp(st)


@functools.lru_cache(maxsize=4)
def _mapped(shared: SharedMasters) -> tuple[FrameMasters, tuple]:
    if len(shared.digests) != len(PLANES):
        raise PlaneChanged("shared planes without their digests")
    mapped = [_checked_map(shared, plane, size, digest)
              for plane, size, digest in zip(PLANES, shared.sizes, shared.digests, strict=True)]
    planes = FrameMasters(**{plane: array for plane, (array, _) in zip(PLANES, mapped,
                                                                         strict=True)})
    return planes, tuple(stamp for _, stamp in mapped)


def load_shared(shared: SharedMasters) -> tuple[FrameMasters, dict[str, tuple]]:
    """The planes of :func:`share_frame_masters`, memory-mapped read-only (once per
    process, after their sizes and digests are checked), and their header cards.

    Raises
    ------
    PlaneChanged
        When a plane is not the file that was written (checked when it is mapped), or its
        file has been replaced or rewritten since (checked at every call, by its status):
        the caller makes the planes from the master files.
    OSError, ValueError
        When a plane's file cannot be read from this worker (another node that does not
        see the folder, a folder removed): the caller makes the planes itself.
    """
    if (why := _refused.get(shared)) is not None:
        raise PlaneChanged(why)
    try:
        planes, stamps = _mapped(shared)
        now = tuple(_stamp(os.stat(shared.path(plane), follow_symlinks=False))
                    for plane in PLANES)
        if now != stamps:
            _mapped.cache_clear()  # unmapped
            changed = [p for p, a, b in zip(PLANES, now, stamps, strict=True) if a != b]
            raise PlaneChanged(f"shared plane {shared.key}-{changed[0]}.npy was replaced or "
                               "rewritten during the run")
    except PlaneChanged as exc:
        # refused for the rest of the run in this process: later frames go straight to the
        # master files instead of hashing the planes again, frame after frame
        _refused[shared] = str(exc)
        raise
    return planes, dict(shared.cards)


# Planes this process refused (PlaneChanged), with the reason: a run's planes never come
# back once changed (a new run writes new ones, under a new key).
_refused: dict[SharedMasters, str] = {}


def make_shared_folder(folder: Path) -> Path:
    """The run's folder for shared planes, made afresh (mode 0700): what a killed run
    left there is removed first, and a symbolic link in its place is removed, not
    followed (:func:`remove_shared`)."""
    remove_shared(folder)
    folder.mkdir(mode=0o700)
    return folder


def remove_shared(folder: Path) -> None:
    """Remove a run's shared planes (processes that still map them keep their pages until
    they unmap them; a folder that cannot be removed now, on a network file system, is
    removed by the next run). A symbolic link in its place is removed, its target left
    alone."""
    if folder.is_symlink():
        folder.unlink()
        return
    shutil.rmtree(folder, ignore_errors=True)
