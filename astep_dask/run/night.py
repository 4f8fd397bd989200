"""Night orchestration: inventory → masters → one calibration task per science frame →
manifest. Runs on whatever ``distributed.Client`` it is given.

Each science frame is one task (``pure=False``: it writes a file). The worker reads the
raw file, loads the masters by path (once per worker process), calibrates, writes its
output atomically and returns a small summary row, never the image. At most
``frames_in_flight`` tasks are queued at once, so memory does not grow with the night.
A frame whose output already exists with the same provenance hash is skipped, so a
re-run resumes where a killed run stopped.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import dask
import distributed
import numpy as np
import xarray
from distributed import Client

from astep_dask.config import Settings
from astep_dask.errors import CalibrationError
from astep_dask.io.fitsio import remove_stale_temps, write_json
from astep_dask.io.layout import FrameType, Inventory, scan_night, stem
from astep_dask.io.products import (
    CAL_SUFFIX,
    MANIFEST,
    check_writable,
    night_lock,
    output_dir,
    sibling_outputs,
)
from astep_dask.io.provenance import digest_of, frame_provenance, night_provenance
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.store import MasterPaths
from astep_dask.run.frames import FrameJob, process_frame
from astep_dask.run.results import Progress, StageResult
from astep_dask.run.tasks import cluster_window, map_bounded
from astep_dask.version import __version__

__all__ = [
    "calibrate_night",
    "night_is_current",
    "print_progress",
    "run_frames",
    "write_manifest",
]




def print_progress(done: int, total: int, row: dict, start: list[float] | None = None) -> None:
    """Default progress line on stderr: frames done / total, rate, last frame."""
    elapsed = time.perf_counter() - (start or [0.0])[0]
    rate = done / elapsed if elapsed > 0 else 0.0
    extra = f" ({row.get('reason')})" if row.get("status") == "failed" else ""
    print(f"  [{done:>5}/{total}] {rate:5.2f} frames/s  {row['status']:<7} {row['file']}{extra}",
          file=sys.stderr, flush=True)


def calibrate_night(
    night_dir: str | Path,
    client: Client,
    settings: Settings | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    inventory: Inventory | None = None,
) -> StageResult:
    """Calibrate one night on the given dask client and write its manifest.

    Builds (or reuses) the night's masters, then calibrates every science frame as one
    task on the cluster (frames already done with the same provenance are skipped unless
    ``force``), and writes ``manifest.json``.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/``.
    client
        A ``distributed.Client``.
    settings
        The run's settings (defaults when None).
    out
        Output root (``OUT/YYYY-MM-DD/``); None: beside the raw night.
    force
        Recalibrate frames already done.
    progress
        ``progress(done, total, row)`` as each frame finishes.
    inventory
        The night's inventory, when the caller already has it.

    Returns
    -------
    StageResult
        Stage ``calibrate``: a row per science frame; ``details["masters"]`` the masters'
        paths and what was built, reused, noted and rejected.

    Raises
    ------
    RunError
        Before any work when the night is missing or the output cannot be written or is
        locked by another run.
    """
    settings = settings or Settings()
    night_dir = Path(night_dir).absolute()  # the manifest names files wherever it is read
    out = out.absolute() if out is not None else None
    inv = inventory or scan_night(night_dir)
    out_dir = output_dir(night_dir, out)
    check_writable(out_dir)
    result = StageResult("calibrate", inv.night, out_dir, started=time.time())
    result.unusable = [{"path": str(f.path), "reason": f.problem} for f in inv.problems]
    with night_lock(out_dir):
        remove_stale_temps(out_dir)
        try:
            fallbacks = sibling_outputs(night_dir, out) if settings.masters.fallback else []
            builder = MasterBuilder(inv, out_dir, settings,
                                    reuse_foreign=settings.masters.reuse_foreign,
                                    fallbacks=fallbacks)
            masters = builder.build()
        except CalibrationError as exc:
            result.error = f"masters: {exc}"
            result.finished = time.time()
            write_manifest(result, inv, settings, None)
            return result
        result.details["masters"] = {
            "paths": {"bias": str(masters.bias) if masters.bias else None,
                      "darks": {f"{et:g}": str(p) for et, p in masters.darks},
                      "flats": {f: str(p) for f, p in masters.flats},
                      "mask": str(masters.mask)},
            "built": builder.report.built,
            "reused": builder.report.reused,
            "notes": builder.report.notes,
            "rejected": builder.report.rejected,
        }
        result.rejected = builder.report.rejected
        masters_digest = digest_of(sorted(masters.digests().items()))
        science = inv.select(FrameType.SCIENCE)
        jobs = [
            FrameJob(rec, out_dir / f"{rec.out_stem or stem(rec.path)}{CAL_SUFFIX}", masters,
                     frame_provenance(rec, masters_digest, settings), settings, force)
            for rec in science
        ]
        try:
            run_frames(client, jobs, settings, progress, sink=result.frames)
        except OSError as exc:  # a write failed (disk full, permissions): stop cleanly
            result.error = str(exc)
        finally:
            # A worker killed while writing leaves its temporary file; every task of this
            # run is over now and the lock keeps other runs out, so none of them is live.
            remove_stale_temps(out_dir)
        result.finished = time.time()
        try:
            write_manifest(result, inv, settings, masters)
        except OSError as exc:
            result.error = f"{result.error or ''}; manifest not written: {exc}".lstrip("; ")
    return result


def write_manifest(result: StageResult, inv: Inventory, settings: Settings,
                   masters: MasterPaths | None) -> Path:
    """Write ``manifest.json`` of a night atomically."""
    data = {
        "night": result.night,
        "status": result.status,
        "provenance": night_provenance(inv.root, settings),
        "error": result.error,
        "counts": result.counts,
        "started": _iso(result.started),
        "finished": _iso(result.finished),
        "wall_seconds": result.finished - result.started,
        "raw": str(inv.root),
        "output": str(result.out_dir),
        "versions": {
            "astep-dask": __version__, "dask": dask.__version__,
            "distributed": distributed.__version__, "xarray": xarray.__version__,
            "numpy": np.__version__, "astropy": version("astropy"),
            "astroscrappy": version("astroscrappy"), "python": sys.version.split()[0],
        },
        "settings": settings.to_dict(),
        "masters": result.details.get("masters", {}),
        "unusable": result.unusable,
        "frames": result.frames,
        "inventory": inv.groups(),
    }
    path = result.out_dir / MANIFEST
    write_json(path, data)
    return path


def night_is_current(night_dir: Path, out: Path | None, settings: Settings) -> bool:
    """True when the night's manifest says complete for the same raw files and settings."""
    path = output_dir(night_dir, out) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (data.get("status") == "complete"
            and data.get("provenance") == night_provenance(night_dir, settings))


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


def run_frames(client: Client, jobs: list[FrameJob], settings: Settings,
               progress: Progress | None = None, sink: list[dict] | None = None) -> list[dict]:
    """Map :func:`process_frame` over the jobs on the cluster, a bounded number at once
    (:func:`~astep_dask.run.tasks.map_bounded`).

    Rows are appended to ``sink`` (and returned) as frames finish. A write error stops
    the night: queued frames are cancelled and the error propagates, ``sink`` keeping
    the rows of the frames that finished.
    """
    rows = [] if sink is None else sink

    def done(job: FrameJob, row: dict) -> None:
        rows.append(row)
        if progress:
            progress(len(rows), len(jobs), row)

    map_bounded(client, process_frame, jobs, done,
                window=cluster_window(client, settings.cluster),
                retries=settings.cluster.retries,
                key=lambda _, job: f"calibrate-{job.output.stem}-{job.provenance}")
    rows.sort(key=lambda r: (r["mjd"], r["file"]))
    return rows
