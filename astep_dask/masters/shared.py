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
"""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from astep_dask.core.calibrate import FrameMasters
from astep_dask.io.fitsio import atomic_open
from astep_dask.io.provenance import digest_of
from astep_dask.masters.store import Master, MasterPaths, frame_masters

__all__ = ["PLANES", "SharedMasters", "load_shared", "remove_shared", "share_frame_masters"]

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
    for plane in PLANES:
        with atomic_open(shared.path(plane), sync=False) as fh:
            np.save(fh, np.ascontiguousarray(getattr(fm, plane)), allow_pickle=False)
    return shared


@functools.lru_cache(maxsize=4)
def _mapped(shared: SharedMasters) -> FrameMasters:
    return FrameMasters(**{plane: np.load(shared.path(plane), mmap_mode="r",
                                          allow_pickle=False)
                           for plane in PLANES})


def load_shared(shared: SharedMasters) -> tuple[FrameMasters, dict[str, tuple]]:
    """The planes of :func:`share_frame_masters`, memory-mapped read-only (once per
    process), and their header cards.

    Raises
    ------
    OSError, ValueError
        When a plane's file cannot be read from this worker (another node that does not
        see the folder, a folder removed): the caller makes the planes itself.
    """
    return _mapped(shared), dict(shared.cards)


def remove_shared(folder: Path) -> None:
    """Remove a run's shared planes (processes that still map them keep their pages until
    they unmap them; a folder that cannot be removed now, on a network file system, is
    removed by the next run)."""
    shutil.rmtree(folder, ignore_errors=True)
