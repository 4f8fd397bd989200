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
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import dask
import distributed
import numpy as np
import xarray
from distributed import Client, KilledWorker

from astep_dask.config import Settings
from astep_dask.errors import CalibrationError
from astep_dask.io.fitsio import remove_stale_temps, write_json
from astep_dask.io.headers import FrameType
from astep_dask.io.index import FileIndex, Stamp
from astep_dask.io.layout import Inventory, scan_night
from astep_dask.io.products import (
    CAL_SUFFIX,
    MANIFEST,
    SHARED_MASTERS_FOLDER,
    check_writable,
    night_lock,
    output_dir,
    read_manifest,
    set_aside_corrupt_manifest,
    sibling_outputs,
)
from astep_dask.io.provenance import digest_of, frame_provenance, night_provenance
from astep_dask.io.rawfiles import stem
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.detector import night_detector
from astep_dask.masters.shared import make_shared_folder, remove_shared
from astep_dask.masters.store import MasterPaths, no_flat_reason
from astep_dask.run.frames import FrameJob, process_frame, share_masters
from astep_dask.run.plan import already_done, load_index, plan_night
from astep_dask.run.results import Progress, StageResult
from astep_dask.run.tasks import cluster_window, map_bounded, wait_idle
from astep_dask.version import __version__

__all__ = [
    "already_done",
    "calibrate_night",
    "current_result",
    "load_index",
    "night_is_current",
    "resume_rows",
    "run_frames",
    "settings_conflicts",
    "write_manifest",
]


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
    out_dir = output_dir(night_dir, out)
    previous = read_manifest(out_dir)  # what an earlier run did (empty: none)
    index = load_index(out_dir, previous)  # before the inventory: unchanged files not read
    inv = inventory or scan_night(night_dir)
    check_writable(out_dir)
    plan = plan_night(night_dir, settings, out, force, inv, manifest=previous, index=index)
    result = StageResult("calibrate", inv.night, out_dir, started=time.time())
    result.details["plan"] = plan.to_dict()
    result.unusable = [{"path": str(f.path), "reason": f.problem} for f in inv.problems]
    with night_lock(out_dir):
        remove_stale_temps(out_dir)
        corrupt = set_aside_corrupt_manifest(out_dir)
        try:
            # Gain and read noise measured from the night's frames (used where headers
            # and settings give none; a night where nothing gives them is refused here).
            inv, result.details["detector"] = night_detector(inv, settings,
                                                             previous.get("detector"))
            fallbacks = sibling_outputs(night_dir, out) if settings.masters.fallback else []
            before = (previous.get("masters") or {}).get("failed") or {}
            builder = MasterBuilder(inv, out_dir, settings,
                                    reuse_foreign=settings.masters.reuse_foreign,
                                    fallbacks=fallbacks, progress=progress, index=index,
                                    failed=before if not force else {})
            builder.report.notes.extend(result.details["detector"]["header_notes"])
            if corrupt:
                builder.report.notes.append(corrupt)
            masters = builder.build()
        except (CalibrationError, KilledWorker, OSError) as exc:
            result.error = f"masters: {_masters_failure(exc, out_dir, settings)}"
            result.finished = time.time()
            write_manifest(result, inv, settings, None, _remembered(index, inv, [], out_dir))
            return result
        result.details["masters"] = {
            "paths": {"bias": str(masters.bias) if masters.bias else None,
                      "darks": {f"{et:g}": str(p) for et, p in masters.darks},
                      "flats": {f: str(p) for f, p in masters.flats},
                      "mask": str(masters.mask),
                      "illums": {f: str(p) for f, p in masters.illums},
                      "warm": str(masters.warm) if masters.warm else None},
            "built": builder.report.built,
            "reused": builder.report.reused,
            "notes": builder.report.notes,
            "rejected": builder.report.rejected,
            "illum": builder.report.illum,
            "failed": builder.report.failed,
        }
        result.rejected = builder.report.rejected + _rejected_still(
            previous, inv, masters, builder.report.reused_files)
        result.details["masters"]["rejected"] = result.rejected
        planned = masters.digests(index)
        masters_digest = digest_of(sorted(planned.items()))
        # Every master read for a frame from here on is checked against these digests.
        masters = replace(masters, expect=tuple(sorted(planned.items())))
        science = inv.select(FrameType.SCIENCE)
        # A frame's provenance is known here when its raw digest is (the index knew the
        # file unchanged); otherwise the worker completes it as it reads the file.
        jobs = [
            FrameJob(rec, out_dir / f"{rec.out_stem or stem(rec.path)}{CAL_SUFFIX}", masters,
                     frame_provenance(rec, masters_digest, settings) if rec.digest else "",
                     settings, force, masters_digest=masters_digest)
            for rec in science
        ]
        # A filter with no flat fails its frames here, once, not in every frame's task.
        flat_filters = {f for f, _ in masters.flats}
        unfiltered = sum(1 for r in inv.select(FrameType.FLAT) if not r.filter)
        result.frames.extend(
            {**_row(j, no_flat_reason(masters, j.record.filter, unfiltered)), "no_flat": True}
            for j in jobs if j.record.filter not in flat_filters)
        jobs = [j for j in jobs if j.record.filter in flat_filters]
        done, jobs = already_done(jobs, previous, index)
        result.frames.extend(done)  # never sent to the cluster
        shared_dir = out_dir / SHARED_MASTERS_FOLDER
        try:
            make_shared_folder(shared_dir)  # afresh: a killed run's planes removed
            jobs = _with_shared(client, jobs, masters, shared_dir, masters_digest,
                                result.frames, builder.store.loaded)
            builder.store.loaded.clear()  # the planes are on disk: the driver keeps none
            run_frames(client, jobs, settings, progress, sink=result.frames)
        except BaseException as exc:  # interrupted (or a bug): record what was done, re-raise
            result.error = ("interrupted" if isinstance(exc, KeyboardInterrupt)
                            else f"{type(exc).__name__}: {exc}")
            result.frames[:] = resume_rows(result.frames, previous, jobs)
            result.finished = time.time()
            _manifest(result, inv, settings, masters, index)
            raise
        finally:
            # A worker killed while writing leaves its temporary file. A night stopped by
            # a write error cancelled its frames, but one already running still runs to
            # its end: wait for it; then the lock keeps other runs out, so no temporary
            # file is live.
            if any(r.get("not_attempted") for r in result.frames):
                wait_idle(client)
            remove_stale_temps(out_dir)
            remove_shared(shared_dir)
        result.frames[:] = resume_rows(result.frames, previous, jobs)
        result.finished = time.time()
        _manifest(result, inv, settings, masters, index)
    return result


def _remembered(index: FileIndex, inv: Inventory, rows: list[dict], out_dir: Path
                ) -> FileIndex:
    """``index`` updated with what this run learnt: the digests of the raw files this
    process read (calibration frames, copies), those the workers took as they read the
    science frames, and those of the products they wrote; the rows keep the digests,
    not the status."""
    for rec in inv.frames:
        index.record_read(rec.path)
    paths = {rec.path.name: rec.path for rec in inv.select(FrameType.SCIENCE)}
    for row in rows:
        raw, stamp = paths.get(row.get("file")), row.pop("raw_stamp", None)
        checked, gz_size = row.pop("raw_checked_ns", None), row.pop("raw_gz_size", None)
        if raw is not None and stamp and row.get("raw_digest"):
            index.record(raw, Stamp.from_list(stamp), row["raw_digest"], checked_ns=checked,
                         gz_size=gz_size)
        product = row.pop("product_stamp", None)
        if product and row.get("product_digest"):
            index.record(out_dir / row["output"], Stamp.from_list(product),
                         row["product_digest"], written=True)
    index.keep_records()  # a re-run's inventory opens no unchanged file
    index.seed(racy=True)  # this run's night_provenance reads none of them again
    return index


def _with_shared(client: Client, jobs: list[FrameJob], masters: MasterPaths, folder: Path,
                 masters_digest: str, sink: list[dict], loaded: dict) -> list[FrameJob]:
    """The jobs, each with the planes shared for its exposure time and filter
    (:func:`~astep_dask.run.frames.share_masters`). The frames whose planes cannot be made
    (no way to make their dark) fail here, once, with the reason, and are not sent."""
    if not jobs:
        return jobs
    shared, reasons = share_masters(client, masters, jobs, folder, masters_digest, loaded)

    def combo(job: FrameJob) -> tuple[float, str]:
        return job.record.exptime, job.record.filter

    sink.extend(_row(j, reasons[combo(j)]) for j in jobs if combo(j) in reasons)
    return [replace(j, shared=shared.get(combo(j))) for j in jobs if combo(j) not in reasons]


def _manifest(result: StageResult, inv: Inventory, settings: Settings,
              masters: MasterPaths | None, index: FileIndex) -> None:
    """:func:`write_manifest`; a write error (disk full) is the result's error, one line."""
    try:
        write_manifest(result, inv, settings, masters,
                       _remembered(index, inv, result.frames, result.out_dir))
    except OSError as exc:
        done = result.counts["done"]
        result.error = "; ".join(filter(None, [
            result.error,
            f"manifest not written: cannot write {result.out_dir / MANIFEST}: "
            f"{exc.strerror or exc} ({done} frames calibrated and kept; re-run to write it)",
        ]))


def _rejected_still(previous: dict, inv: Inventory, masters: MasterPaths,
                    reused: list[str]) -> list[dict]:
    """The flats an earlier run rejected whose master flat this run reused (so it did not
    screen them again): still rejected, still reported. ``reused``: file names."""
    filters = {f for f, p in masters.flats if p.name in set(reused)}
    flats = {str(r.path): r.filter for r in inv.select(FrameType.FLAT)}
    return [r for r in (previous.get("masters") or {}).get("rejected") or []
            if flats.get(str(r.get("path"))) in filters]


def resume_rows(rows: list[dict], previous: dict, jobs: list[FrameJob]) -> list[dict]:
    """This run's frame rows, completed from the night's earlier manifest: a frame skipped
    (already calibrated) keeps its earlier figures (median, MAD sigma, mask counts,
    timings), and a frame this run did not reach (interrupted) keeps its earlier row, so
    that the manifest never loses what an earlier run measured."""
    earlier = {r.get("file"): r for r in previous.get("frames") or []
               if isinstance(r, dict) and r.get("status") in ("done", "skipped")}
    out = []
    for row in rows:
        before = earlier.get(row["file"])
        if row["status"] == "skipped" and before and before.get("output") == row["output"]:
            row = {**before, **row, "calibrated": before.get("calibrated")
                   or before.get("finished")}
        out.append(row)
    seen = {r["file"] for r in out}
    for job in jobs:
        before = earlier.get(job.record.path.name)
        if job.record.path.name not in seen and before and job.output.exists():
            out.append({**before, "status": "skipped", "note": "not reached by this run"})
    out.sort(key=lambda r: (r["mjd"], r["file"]))
    return out


def write_manifest(result: StageResult, inv: Inventory, settings: Settings,
                   masters: MasterPaths | None, index: FileIndex | None = None) -> Path:
    """Write ``manifest.json`` of a night atomically, with ``index`` as its ``files``
    table (the digests and status of its inputs and products)."""
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
        "plan": result.details.get("plan"),
        "detector": result.details.get("detector"),
        "files": (index or FileIndex()).to_manifest(),
    }
    path = result.out_dir / MANIFEST
    write_json(path, data, compact=len(result.frames) > COMPACT_ROWS)
    return path


COMPACT_ROWS = 200  # a manifest of more frames is written on one line (write_json)


def night_is_current(night_dir: Path, out: Path | None, settings: Settings) -> bool:
    """True when the night's manifest says complete for the same raw files and settings,
    and every product it names is unchanged (:func:`current_result`)."""
    return current_result(night_dir, out, settings) is not None


def current_result(night_dir: str | Path, out: Path | None, settings: Settings
                   ) -> StageResult | None:
    """What :func:`calibrate_night` would find with nothing to do, from metadata alone:
    the night's manifest says complete, its raw files are the same (names, sizes,
    modification times, digests: :func:`~astep_dask.io.provenance.night_provenance`, which
    hashes only the files whose status changed) with the same settings, and each product
    it names (frames and masters) has the status recorded when it was written. Then a
    result whose frames are all ``skipped`` (with their earlier figures); else None.
    Nothing is written and no cluster is needed."""
    night_dir = Path(night_dir).absolute()
    out_dir = output_dir(night_dir, out.absolute() if out is not None else None)
    try:
        data = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if data.get("status") != "complete":
        return None
    index = FileIndex.from_manifest(data)
    index.seed()  # unchanged raw files are not read
    if data.get("provenance") != night_provenance(night_dir, settings):
        return None
    rows = [r for r in data.get("frames") or [] if isinstance(r, dict)]
    paths = (data.get("masters") or {}).get("paths") or {}
    masters = [paths.get("bias"), paths.get("mask"), *(paths.get("darks") or {}).values(),
               *(paths.get("flats") or {}).values(), *(paths.get("illums") or {}).values(),
               paths.get("warm")]
    products = [out_dir / r["output"] for r in rows] + [Path(m) for m in masters if m]
    if any(index.known(p) is None for p in products):
        return None
    now = time.time()
    result = StageResult("calibrate", str(data.get("night") or night_dir.name), out_dir,
                         frames=[{**r, "status": "skipped", "note": ""} for r in rows],
                         unusable=data.get("unusable") or [], started=now, finished=now)
    result.details["masters"] = {**(data.get("masters") or {}), "built": []}
    return result


# The settings groups that shape a night's products: those night_provenance hashes (the
# frames' and the masters' hashes take subsets of them). Another value in one of them
# makes a run remake the products.
_PRODUCT_GROUPS = ("combine", "flat", "mask", "cosmics", "detector", "illum", "output")


def settings_conflicts(night_dir: str | Path, out: Path | None,
                       settings: Settings) -> list[str]:
    """What differs between the settings a night's products were made with and ``settings``.

    A run with ``settings`` would remake (replace) those products; a caller that must not
    replace them silently (a notebook) refuses when this is not empty.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/``.
    out
        Output root as given to :func:`calibrate_night` (None: beside the raw night).
    settings
        The settings of the run about to be made.

    Returns
    -------
    list of str
        One line per difference, e.g. ``"cosmics.enabled: True in the products, False
        here"``, over the settings that shape the products (``combine``, ``flat``,
        ``mask``, ``cosmics``, ``detector``, ``illum``, ``output``) and the astep-dask
        version (also part of every product's provenance hash). Empty when the night has
        no manifest (no products) or the same settings.
    """
    manifest = read_manifest(output_dir(Path(night_dir), out))
    made = manifest.get("settings")
    if not isinstance(made, dict):
        return []
    # Compared as the manifest holds them (JSON: tuples are lists).
    here = json.loads(json.dumps(settings.to_dict(), default=str))
    lines = []
    for group in _PRODUCT_GROUPS:
        theirs = made.get(group) if isinstance(made.get(group), dict) else {}
        for key, value in here[group].items():
            if key not in theirs:
                lines.append(f"{group}.{key}: not recorded in the products, {value!r} here")
            elif theirs[key] != value:
                lines.append(f"{group}.{key}: {theirs[key]!r} in the products, {value!r} here")
    version = (manifest.get("versions") or {}).get("astep-dask")
    if version and version != __version__:
        lines.append(f"astep-dask version: {version} in the products, {__version__} here")
    return lines


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""


class _WriteFailed(Exception):
    """A frame could not be written (disk full, permissions): the night stops."""


def run_frames(client: Client, jobs: list[FrameJob], settings: Settings,
               progress: Progress | None = None, sink: list[dict] | None = None) -> list[dict]:
    """Map :func:`process_frame` over the jobs on the cluster, a bounded number at once
    (:func:`~astep_dask.run.tasks.map_bounded`).

    Rows are appended to ``sink`` (and returned) as frames finish. A frame's own error is
    its ``failed`` row (never retried: it would recur); a frame whose worker died more
    than ``[cluster] retries`` times is failed and the others go on. A write error (disk
    full) stops the night: queued frames are cancelled and get a ``failed`` row marked
    ``not_attempted``, so that every frame is accounted for.
    """
    rows = [] if sink is None else sink
    before = len(rows)

    def done(job: FrameJob, row: dict) -> None:
        rows.append(row)
        if progress:
            progress(len(rows) - before, len(jobs), row)
        if row.get("write_error"):
            raise _WriteFailed(row["reason"])

    def key(job: FrameJob) -> str:
        return f"calibrate-{job.output.stem}-{job.provenance}"

    todo = list(jobs)
    stopped = None
    while todo:
        try:
            map_bounded(client, process_frame, todo, done,
                        window=cluster_window(client, settings.cluster),
                        retries=0,  # worker deaths: the cluster's allowed-failures
                        key=lambda _, job: key(job))
        except _WriteFailed as exc:
            stopped = str(exc)
        except KilledWorker as exc:
            dead = next((j for j in todo if str(exc.task).startswith(key(j) + "-")), None)
            if dead is None:
                raise
            done(dead, _row(dead, f"its worker died {exc.allowed_failures + 1} times while "
                                  "calibrating it (--retries)"))
        finished = {r["file"] for r in rows}
        todo = [j for j in todo if j.record.path.name not in finished]
        if stopped:
            for job in todo:
                rows.append({**_row(job, f"not calibrated: the night stopped ({stopped})"),
                             "not_attempted": True})
            break
    rows.sort(key=lambda r: (r["mjd"], r["file"]))
    return rows


def _masters_failure(exc: BaseException, out_dir: Path, settings: Settings) -> str:
    """Why the masters could not be made, in one line that names the file or the setting
    to look at (a full disk, a worker killed for its memory)."""
    if isinstance(exc, KilledWorker):
        return (f"a worker died {exc.allowed_failures + 1} times while making them (task "
                f"{exc.task}); if it ran out of memory, give workers more ([cluster] "
                f"memory_limit = {settings.cluster.memory_limit!r}) or fewer threads each "
                "(--threads), or raise --retries")
    if isinstance(exc, OSError):
        where = exc.filename or out_dir
        return f"cannot write {where}: {exc.strerror or exc}"
    return str(exc)


def _row(job: FrameJob, reason: str) -> dict:
    """A ``failed`` row for a frame that returned none."""
    rec = job.record
    return {"file": rec.path.name, "output": job.output.name, "mjd": rec.mjd,
            "exptime": rec.exptime, "filter": rec.filter, "status": "failed",
            "reason": reason}
