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

import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from distributed import Client, as_completed

from . import __version__
from .calibrate import Detector, calibrate_frame
from .cluster import capacity
from .config import Settings
from .fitsio import atomic_write, calibrated_hdul, read_provenance, remove_stale_temps
from .layout import OUTPUT_FOLDER, FrameRecord, FrameType, Inventory, scan_night, stem
from .masters import CalibrationError, MasterBuilder, MasterPaths, digest_of, frame_masters
from .stack import read_section

MANIFEST = "manifest.json"
LOCK = ".astep-dask.lock"


class RunError(Exception):
    """The run cannot start or must stop; the message says why (one line)."""


def output_dir(night_dir: Path, out: Path | None) -> Path:
    """Where a night's products go: ``OUT/DATE/`` or, by default, ``ROOT/DATE/DATE-CAMS_CAL/``."""
    night = night_dir.name
    return (out / night) if out is not None else night_dir / f"{night}-{OUTPUT_FOLDER}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or raise RunError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"{folder}: output location not writable ({exc.strerror})") from exc


@contextmanager
def night_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder; a second run on it fails at once."""
    path = folder / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale_lock(path):
                path.unlink(missing_ok=True)
                continue
            raise RunError(
                f"{folder}: another astep-dask run holds the lock ({path}: "
                f"{path.read_text().strip()}); wait for it or remove the lock if it is dead"
            ) from None
    else:  # pragma: no cover - lost a race twice
        raise RunError(f"{folder}: could not take the lock {path}")
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _stale_lock(path: Path) -> bool:
    """True when the lock was left by a dead process on this host."""
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass(frozen=True)
class FrameJob:
    """Everything a worker needs to calibrate one frame (small, picklable)."""

    record: FrameRecord
    output: Path
    masters: MasterPaths
    provenance: str
    settings: Settings
    force: bool = False


def frame_provenance(record: FrameRecord, masters_digest: str, settings: Settings) -> str:
    """Hash of a frame's input, its masters and the settings that shape its output."""
    identity = f"{record.path.name}|{record.path.stat().st_size}|{record.date_obs}"
    return digest_of(identity, masters_digest,
                     settings.digest("cosmics", "detector", "combine", "flat", "mask",
                                     "output"),
                     __version__)


@functools.lru_cache(maxsize=4)
def _frame_masters(paths: MasterPaths, exptime: float, filter: str, stamps: tuple
                   ) -> tuple:
    return frame_masters(paths, exptime, filter)


def cached_frame_masters(paths: MasterPaths, exptime: float, filter: str) -> tuple:
    """:func:`masters.frame_masters`, made once per worker process for each exposure time
    and filter (and again if a master file changes): the dark solution costs as much as
    the rest of a frame's arithmetic. The arrays are shared between frames, read only."""
    files = [paths.bias, *(p for _, p in paths.darks), *(p for _, p in paths.flats),
             paths.mask]
    stamps = tuple(p.stat().st_mtime_ns for p in files if p is not None)
    fm, cards = _frame_masters(paths, exptime, filter, stamps)
    return fm, dict(cards)


def process_frame(job: FrameJob) -> dict:
    """Calibrate one frame and write its file (runs on a worker). Returns a summary row.

    Calibration problems (no flat for the filter, no dark) give a ``failed`` row with the
    reason; write errors (disk full, permissions) raise, naming the output.
    """
    rec = job.record
    row: dict = {"file": rec.path.name, "output": job.output.name, "mjd": rec.mjd,
                 "exptime": rec.exptime, "filter": rec.filter, "started": time.time()}
    if not job.force and read_provenance(job.output) == job.provenance:
        return {**row, "status": "skipped"}
    t0 = time.perf_counter()
    try:
        fm, cards = cached_frame_masters(job.masters, rec.exptime, rec.filter)
        raw = read_section(rec.path, rec.hdu, slice(None), slice(None))
        if problem := raw_problem(raw):
            return {**row, "status": "failed", "reason": problem}
        with fits.open(rec.path, memmap=False, lazy_load_hdus=True) as hdul:
            raw_header = hdul[0].header.copy()
            if rec.hdu:
                raw_header.update(hdul[rec.hdu].header)
    except CalibrationError as exc:
        return {**row, "status": "failed", "reason": str(exc)}
    except (OSError, ValueError) as exc:
        return {**row, "status": "failed", "reason": f"cannot read raw frame: {exc}"}
    det_s = job.settings.detector
    detector = Detector(
        gain=rec.gain or det_s.gain,
        read_noise=rec.read_noise or det_s.read_noise,
        saturation=rec.saturation or det_s.saturation_adu,
    )
    overscan = rec.overscan if det_s.overscan == "auto" else None
    trim = rec.trim if det_s.overscan == "auto" else None
    t1 = time.perf_counter()
    sci, var, mask, summary = calibrate_frame(raw, fm, detector, job.settings.cosmics,
                                              overscan, trim)
    cs = job.settings.cosmics
    cards.update({
        "ADPROV": (job.provenance, "hash of input, masters and settings"),
        "RAWFILE": (rec.path.name, "raw frame"),
        "GAIN": (detector.gain, "[e-/ADU] gain applied"),
        "RDNOISE": (detector.read_noise, "[e-] read noise used for VAR"),
        "SATURATE": (detector.saturation, "[adu] raw level flagged SAT"),
        "OVERSCAN": (overscan.to_fits() if overscan else "none", "overscan subtracted"),
        "FLATNORM": ("median of unmasked pixels = 1", "flat normalisation"),
        "CRMETH": ("astroscrappy" if cs.enabled else "none", "cosmic-ray detection"),
        "CRSIGCLP": (cs.sigclip, "astroscrappy sigclip"),
        "CROBJLIM": (cs.objlim, "astroscrappy objlim"),
        "CRCLEAN": (cs.replace, "T: CR pixels replaced in SCI"),
        "NCRPIX": (summary["n_cr"], "pixels flagged CR"),
        "SKYLEVEL": (summary["sky"], "[e-] median of unmasked SCI"),
    })
    if trim is not None:
        cards["TRIMSEC"] = (trim.to_fits(), "raw section kept")
    t2 = time.perf_counter()
    try:
        out_s = job.settings.output
        quantize = out_s.quantize_level if out_s.compress else None
        atomic_write(calibrated_hdul(raw_header, sci, var, mask, cards, quantize), job.output)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {job.output}: {exc.strerror}") from exc
    t3 = time.perf_counter()
    return {**row, "status": "done", **summary, "t_read": t1 - t0, "t_write": t3 - t2,
            "t_total": t3 - t0, "finished": time.time(),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def raw_problem(raw: np.ndarray) -> str | None:
    """Why a raw frame's pixels make no sense (all NaN, constant), else None."""
    finite = np.isfinite(raw)
    if not finite.any():
        return "no finite pixel (all NaN)"
    values = raw[finite]
    if values.min() == values.max():
        return f"every pixel has the same value ({values.min():g}): no signal"
    return None


@dataclass
class NightResult:
    """The outcome of one night: rows per frame, masters, problems; what goes in the
    manifest."""

    night: str
    out_dir: Path
    frames: list[dict] = field(default_factory=list)
    masters: dict = field(default_factory=dict)
    unusable: list[dict] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    error: str | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Frames per status (done, skipped, failed), plus unusable files."""
        out: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0}
        for row in self.frames:
            out[row["status"]] = out.get(row["status"], 0) + 1
        out["unusable"] = len(self.unusable)
        return out

    @property
    def status(self) -> str:
        """``complete``, ``partial`` or ``failed``."""
        c = self.counts
        if self.error or (c["done"] + c["skipped"] == 0):
            return "failed"
        if c["failed"] or c["unusable"] or self.masters.get("rejected"):
            return "partial"
        return "complete"


Progress = Callable[[int, int, dict], None]


def print_progress(done: int, total: int, row: dict, start: list[float] | None = None) -> None:
    """Default progress line on stderr: frames done / total, rate, last frame."""
    elapsed = time.perf_counter() - (start or [0.0])[0]
    rate = done / elapsed if elapsed > 0 else 0.0
    extra = f" ({row.get('reason')})" if row.get("status") == "failed" else ""
    print(f"  [{done:>5}/{total}] {rate:5.2f} frames/s  {row['status']:<7} {row['file']}{extra}",
          file=sys.stderr, flush=True)


def sibling_outputs(night_dir: Path, out: Path | None) -> list[Path]:
    """Output folders of the other nights of the same season (for master fallbacks)."""
    root = night_dir.parent
    folders = []
    for other in sorted(root.iterdir()):
        if other == night_dir or not other.is_dir():
            continue
        folder = output_dir(other, out)
        if folder.is_dir():
            folders.append(folder)
    return folders


def calibrate_night(
    night_dir: str | Path,
    client: Client,
    settings: Settings | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    inventory: Inventory | None = None,
) -> NightResult:
    """Calibrate one night on the given dask client and write its manifest.

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
    result = NightResult(night=inv.night, out_dir=out_dir, started=time.time())
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
        result.masters = {
            "paths": {"bias": str(masters.bias) if masters.bias else None,
                      "darks": {f"{et:g}": str(p) for et, p in masters.darks},
                      "flats": {f: str(p) for f, p in masters.flats},
                      "mask": str(masters.mask)},
            "built": builder.report.built,
            "reused": builder.report.reused,
            "notes": builder.report.notes,
            "rejected": builder.report.rejected,
        }
        masters_digest = digest_of(sorted(masters.digests().items()))
        science = inv.select(FrameType.SCIENCE)
        jobs = [
            FrameJob(rec, out_dir / f"{stem(rec.path)}_CAL.fits", masters,
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


def run_frames(client: Client, jobs: list[FrameJob], settings: Settings,
               progress: Progress | None = None, sink: list[dict] | None = None) -> list[dict]:
    """Map :func:`process_frame` over the jobs on the cluster, a bounded number at once.

    Rows are appended to ``sink`` (and returned) as frames finish. A write error stops
    the night: queued frames are cancelled and the error propagates, ``sink`` keeping
    the rows of the frames that finished.
    """
    rows = [] if sink is None else sink
    if not jobs:
        return rows
    def window() -> int:  # recomputed as workers come and go (adaptive clusters)
        return settings.cluster.frames_in_flight or 2 * capacity(client, settings.cluster)

    pending = iter(jobs)
    seq = as_completed()

    def submit_next() -> None:
        job = next(pending, None)
        if job is not None:
            seq.add(client.submit(
                process_frame, job, pure=False, retries=settings.cluster.retries,
                key=f"calibrate-{job.output.stem}-{job.provenance}-{time.time_ns()}",
            ))

    for _ in range(window()):
        submit_next()
    try:
        for fut in seq:
            row = fut.result()
            rows.append(row)
            if progress:
                progress(len(rows), len(jobs), row)
            for _ in range(max(1, window() - seq.count())):
                submit_next()
    except BaseException:
        for f in list(seq.futures):
            f.cancel()
        raise
    rows.sort(key=lambda r: (r["mjd"], r["file"]))
    return rows


def write_manifest(result: NightResult, inv: Inventory, settings: Settings,
                   masters: MasterPaths | None) -> Path:
    """Write ``manifest.json`` of a night atomically."""
    import dask
    import distributed
    import xarray

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
            "numpy": np.__version__, "astropy": _version("astropy"),
            "astroscrappy": _version("astroscrappy"), "python": sys.version.split()[0],
        },
        "settings": settings.to_dict(),
        "masters": result.masters,
        "unusable": result.unusable,
        "frames": result.frames,
        "inventory": inv.groups(),
    }
    path = result.out_dir / MANIFEST
    tmp = path.with_name(f".tmp-{MANIFEST}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)
    return path


def night_provenance(night_dir: Path, settings: Settings) -> str:
    """Cheap identity of a night's raw files (names, sizes, modification times) and of the
    settings: a season re-run skips a night whose complete manifest records the same."""
    from .layout import iter_fits, night_folders

    files = [
        (kind, p.name, st.st_size, st.st_mtime_ns)
        for kind, folder in night_folders(night_dir)
        for p in iter_fits(folder)
        for st in [p.stat()]
    ]
    return digest_of(files, settings.digest("combine", "flat", "mask", "cosmics", "detector",
                                            "output"),
                     __version__)


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


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


