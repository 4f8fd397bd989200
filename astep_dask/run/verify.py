"""A full scrub: every input and product of a night hashed again, across the cluster.

A re-run trusts a file whose status (device, inode, size, times) is the one recorded when
its digest was taken (:mod:`astep_dask.io.index`): that is what makes a re-run read
nothing. Corruption that leaves the status alone (a disk's bit rot, a controller that
writes the wrong block, a restore that sets the times back) is not seen that way. This is
where it is: :func:`verify_night` reads every file the night's manifest names, on the
workers, and compares its digest with the recorded one.

With ``repair``, damaged products are moved aside (``<name>.damaged``, kept for a look)
and the night is calibrated again, which remakes exactly them (and, for a damaged master,
the frames made from it); a damaged raw file cannot be repaired here and is only named.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

from astep_dask.config import Settings
from astep_dask.io.index import FileIndex, stamp_of
from astep_dask.io.products import output_dir, read_manifest
from astep_dask.io.provenance import file_digest
from astep_dask.run.night import calibrate_night
from astep_dask.run.results import Progress
from astep_dask.run.tasks import cluster_window, map_bounded

__all__ = ["Damage", "NightCheck", "check_file", "verify_night"]

DAMAGED_SUFFIX = ".damaged"


@dataclass(frozen=True)
class Damage:
    """One file that is not what the night's manifest recorded."""

    path: str
    kind: str  # "input" or "product"
    reason: str


@dataclass
class NightCheck:
    """What a scrub of one night found (and repaired)."""

    night: str
    out_dir: Path
    checked: int = 0
    bytes_read: int = 0
    damaged: list[Damage] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def status(self) -> str:
        """``complete`` when every file is as recorded (or was repaired), ``failed`` when
        the night could not be checked, else ``partial``."""
        if self.error:
            return "failed"
        left = [d for d in self.damaged if d.path not in self.repaired]
        return "partial" if left else "complete"


def check_file(path: str, digest: str, written: bool) -> dict:
    """Hash ``path`` again (runs on a worker) and compare with ``digest``.

    Returns the row ``{"path", "size", "problem"}``: ``problem`` is "" when the bytes hash
    to ``digest``, else says what is wrong (missing, unreadable, other bytes, and whether
    the file's status changed too: with the status unchanged, the damage is silent)."""
    p = Path(path)
    try:
        st = os.stat(p)
        found = file_digest(p)  # read now, whatever a cache of this process knows
    except FileNotFoundError:
        return {"path": path, "size": 0, "problem": "missing"}
    except OSError as exc:
        return {"path": path, "size": 0, "problem": f"unreadable: {exc.strerror or exc}"}
    if found == digest:
        return {"path": path, "size": st.st_size, "problem": ""}
    return {"path": path, "size": st.st_size, "written": written,
            "problem": f"its bytes hash to {found}, recorded {digest}"}


def verify_night(night_dir: str | Path, client: Client, settings: Settings | None = None,
                 out: Path | None = None, repair: bool = False,
                 progress: Progress | None = None) -> NightCheck:
    """Hash every file the night's manifest records (its ``files`` table: raw inputs,
    masters, calibrated frames) on the cluster, and report those whose bytes differ.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/``.
    client
        A ``distributed.Client``.
    settings
        The run's settings (used by a repair).
    out
        Output root (None: beside the raw night).
    repair
        Move damaged products aside and calibrate the night again.
    progress
        ``progress(done, total, row)`` as each file is checked.

    Returns
    -------
    NightCheck
    """
    settings = settings or Settings()
    night_dir = Path(night_dir).absolute()
    out_dir = output_dir(night_dir, out.absolute() if out is not None else None)
    result = NightCheck(night_dir.name, out_dir)
    t0 = time.perf_counter()
    index = FileIndex.from_manifest(read_manifest(out_dir))
    if not index.entries:
        result.error = (f"{out_dir}: no manifest with recorded digests (never calibrated "
                        "by this version): nothing to verify against")
        return result
    items = sorted((name, e.digest, e.written) for name, e in index.entries.items())

    def done(item: tuple, row: dict) -> None:
        result.checked += 1
        result.bytes_read += row["size"]
        if row["problem"]:
            name, _, written = item
            status = _status_note(index, name)
            result.damaged.append(Damage(name, "product" if written else "input",
                                         f"{row['problem']}{status}"))
        if progress:
            progress(result.checked, len(items),
                     {"file": Path(item[0]).name, "stage": "verify",
                      "status": "damaged" if row["problem"] else "done"})

    map_bounded(client, _check, items, done, window=cluster_window(client, settings.cluster),
                key=lambda i, item: f"verify-{Path(item[0]).name}")
    if repair:
        _repair(result, night_dir, client, settings, out)
    result.seconds = time.perf_counter() - t0
    return result


def _check(item: tuple[str, str, bool]) -> dict:
    return check_file(*item)


def _status_note(index: FileIndex, name: str) -> str:
    """Whether the damaged file's status is still the recorded one (silent damage)."""
    entry = index.recorded(name)
    try:
        same = entry is not None and stamp_of(os.stat(name)) == entry.stamp
    except OSError:
        return ""
    return ("; its status is unchanged: silent damage (media, or a copy that kept the "
            "times)" if same else "; its status changed too: modified since it was recorded")


def _repair(result: NightCheck, night_dir: Path, client: Client, settings: Settings,
            out: Path | None) -> None:
    """Move the damaged products aside and calibrate the night again (which remakes
    them); damaged inputs are left as they are (raw data is never modified)."""
    products = [d for d in result.damaged if d.kind == "product"]
    if not products:
        return
    for d in products:
        path = Path(d.path)
        if path.exists():
            os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
    redo = calibrate_night(night_dir, client, settings, out=out)
    result.repaired = [d.path for d in products if Path(d.path).exists()]
    if redo.error:
        result.error = f"repair: {redo.error}"


def verify_many(nights: list[Path], client: Client, settings: Settings, out: Path | None,
                repair: bool, progress: Progress | None = None,
                log: Callable[[str], None] | None = None) -> list[NightCheck]:
    """:func:`verify_night` of each night, in turn."""
    checks = []
    for night in nights:
        if log:
            log(f"[{night.name}] verify")
        checks.append(verify_night(night, client, settings, out, repair, progress))
    return checks
