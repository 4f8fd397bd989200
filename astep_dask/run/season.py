"""Season orchestration: many nights through one dask cluster, several in flight at once.

Each night runs :func:`astep_dask.run.night.calibrate_night` in its own driver thread, all
threads sharing one ``distributed.Client``: while night A's science frames are being
calibrated, night B's masters are being reduced on the same workers, so the cluster never
idles between nights. A night whose manifest already says complete for the same raw files
and settings is skipped without being opened; a night that fails is recorded with its reason
and the season goes on.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Client

from astep_dask.config import Settings
from astep_dask.errors import ArchiveError, RunError
from astep_dask.io.fitsio import atomic_write_text
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import NIGHT_RE, find_nights, is_night, scan_night
from astep_dask.io.products import output_dir, read_manifest
from astep_dask.run.night import calibrate_night, night_is_current
from astep_dask.run.results import StageResult

__all__ = [
    "NightOutcome",
    "SeasonResult",
    "calibrate_season",
    "dry_run",
    "season_table",
    "select_nights",
    "write_season_report",
]

SEASON_MANIFEST = "season.json"


def select_nights(root: Path, start: str | None = None, end: str | None = None) -> list[Path]:
    """Night folders under ``root`` whose date lies in ``[start, end]`` (ISO dates).

    In a season root, a dated folder with no raw folder in it (a night not transferred, a
    misnamed folder) is selected too: its run fails with that reason, so that the season's
    table names it instead of leaving it out.
    """
    nights = find_nights(root)
    if not is_night(Path(root)):
        nights = sorted({*nights, *(p for p in Path(root).iterdir()
                                    if NIGHT_RE.match(p.name) and p.is_dir())})
    return [n for n in nights if (start is None or n.name >= start)
            and (end is None or n.name <= end)]


@dataclass
class NightOutcome:
    """One night's line in the season report.

    The frame counts are those of the night's ``manifest.json``: ``done`` the frames
    calibrated by this run, ``skipped`` those already calibrated (a night skipped as
    current counts all its calibrated frames here), ``failed`` the frames that failed,
    ``unusable`` the raw files that could not be used.
    """

    night: str
    status: str  # complete, partial, failed, skipped
    frames: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    reason: str = ""
    output: str = ""
    started: float | None = None  # epoch seconds: the night's driver started and finished
    finished: float | None = None
    first_task: float | None = None  # epoch seconds: first frame task started, last finished
    last_task: float | None = None
    skipped: int = 0
    unusable: int = 0


@dataclass
class SeasonResult:
    """The whole season: per-night outcomes and timing."""

    root: Path
    nights: list[NightOutcome] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def status(self) -> str:
        """``complete`` when every night is complete or skipped, ``failed`` when none is,
        else ``partial``."""
        ok = [n for n in self.nights if n.status in ("complete", "skipped")]
        if len(ok) == len(self.nights):
            return "complete"
        if not ok and not any(n.status == "partial" for n in self.nights):
            return "failed"
        return "partial"

    @property
    def totals(self) -> dict[str, float]:
        """Frames done, skipped and failed, unusable files and seconds, summed over the
        nights (the TOTAL row of :func:`season_table`)."""
        return {key: sum(getattr(n, key) for n in self.nights)
                for key in ("done", "skipped", "failed", "unusable", "seconds")}

    def to_dict(self) -> dict:
        """JSON-ready report."""
        counts: dict[str, int] = {}
        for n in self.nights:
            counts[n.status] = counts.get(n.status, 0) + 1
        return {
            "root": str(self.root),
            "status": self.status,
            "counts": counts,
            "totals": self.totals,
            "frames_calibrated": sum(n.done for n in self.nights),
            "wall_seconds": self.finished - self.started,
            "sum_night_seconds": sum(n.seconds for n in self.nights),
            "nights": [n.__dict__ for n in self.nights],
        }


def _outcome(result: StageResult) -> NightOutcome:
    rows = result.frames
    starts = [r["started"] for r in rows if "started" in r and r["status"] == "done"]
    ends = [r["finished"] for r in rows if "finished" in r]
    c = result.counts
    reasons = [result.error] if result.error else []
    reasons += [f"{r['file']}: {r['reason']}" for r in rows if r["status"] == "failed"][:3]
    # result.counts is what write_manifest records as the manifest's counts.
    return NightOutcome(
        night=result.night, status=result.status, frames=len(rows), done=c["done"],
        skipped=c["skipped"], failed=c["failed"], unusable=c["unusable"],
        seconds=result.finished - result.started,
        reason="; ".join(reasons), output=str(result.out_dir),
        started=result.started, finished=result.finished,
        first_task=min(starts) if starts else None, last_task=max(ends) if ends else None,
    )


def _manifest_counts(out_dir: Path, since: float | None = None) -> dict[str, int]:
    """Frames per status and unusable files of the night's manifest (zeros without one).

    ``since``: only a manifest written at or after that time (epoch seconds) counts, so
    that a night whose run stopped before writing its manifest does not show an earlier
    run's figures as this run's.
    """
    counts = {"frames": 0, "done": 0, "skipped": 0, "failed": 0, "unusable": 0}
    try:
        if since is not None and (out_dir / "manifest.json").stat().st_mtime < since:
            return counts
    except OSError:
        return counts
    manifest = read_manifest(out_dir)
    frames = [r for r in manifest.get("frames") or [] if isinstance(r, dict)]
    recorded = manifest.get("counts") or {}
    counts["frames"] = len(frames)
    for key in ("done", "skipped", "failed"):
        counts[key] = int(recorded.get(key, sum(r.get("status") == key for r in frames)))
    counts["unusable"] = int(recorded.get("unusable", len(manifest.get("unusable") or [])))
    return counts


def _skipped(night: Path, out: Path | None) -> NightOutcome:
    """A night skipped as current: its frames, all calibrated by an earlier run, count as
    skipped, as a re-run of that night would count them."""
    folder = output_dir(night, out)
    c = _manifest_counts(folder)
    return NightOutcome(night=night.name, status="skipped", frames=c["frames"],
                        skipped=c["done"] + c["skipped"], failed=c["failed"],
                        unusable=c["unusable"], output=str(folder))


def _failed(night: Path, out: Path | None, reason: str, t0: float) -> NightOutcome:
    """A night whose run raised: the counts of the manifest it wrote before stopping
    (an interrupted run writes one), else none."""
    folder = output_dir(night, out)
    c = _manifest_counts(folder, since=t0)
    return NightOutcome(night=night.name, status="failed", frames=c["frames"], done=c["done"],
                        skipped=c["skipped"], failed=c["failed"], unusable=c["unusable"],
                        reason=reason, seconds=time.time() - t0,
                        output=str(folder) if c["frames"] or c["unusable"] else "")


def season_table(result: SeasonResult, reason_width: int = 60) -> list[dict]:
    """The season's summary table: a row per night, then a ``TOTAL`` row.

    Parameters
    ----------
    result
        What :func:`calibrate_season` returned.
    reason_width
        Characters of a night's reason shown (longer ones are cut, with ``...``).

    Returns
    -------
    list of dict
        Keys, in column order: ``night``, ``status``, ``done`` (frames calibrated by this
        run), ``skipped`` (already calibrated), ``failed`` (frames), ``unusable`` (raw
        files), ``seconds`` (this run's time on the night) and ``reason``. The counts are
        those of each night's manifest; the ``TOTAL`` row holds their sums and the
        season's status.
    """
    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= reason_width else text[:reason_width - 3] + "..."

    rows = [{"night": n.night, "status": n.status, "done": n.done, "skipped": n.skipped,
             "failed": n.failed, "unusable": n.unusable, "seconds": round(n.seconds, 1),
             "reason": short(n.reason)} for n in result.nights]
    totals = result.totals
    rows.append({"night": "TOTAL", "status": result.status,
                 **{k: int(totals[k]) for k in ("done", "skipped", "failed", "unusable")},
                 "seconds": round(totals["seconds"], 1), "reason": ""})
    return rows


def dry_run(nights: list[Path], settings: Settings, out: Path | None) -> list[dict]:
    """What a season run would do, night by night, without doing it."""
    plan = []
    for night in nights:
        if night_is_current(night, out, settings):
            plan.append({"night": night.name, "action": "skip (complete)"})
            continue
        try:
            inv = scan_night(night)
        except ArchiveError as exc:
            plan.append({"night": night.name, "action": f"fail: {exc}"})
            continue
        plan.append({
            "night": night.name,
            "action": "calibrate",
            "science": len(inv.select(FrameType.SCIENCE)),
            "darks": len(inv.select(FrameType.DARK)),
            "flats": len(inv.select(FrameType.FLAT)),
            "unusable": len(inv.problems),
            "output": str(output_dir(night, out)),
        })
    return plan


def calibrate_season(
    nights: list[Path],
    client: Client,
    settings: Settings,
    out: Path | None = None,
    in_flight: int = 2,
    log: Callable[[str], None] | None = None,
) -> SeasonResult:
    """Calibrate every night, ``in_flight`` nights at a time on one cluster.

    Returns a :class:`SeasonResult`; never raises for a single night's failure.
    """
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    result = SeasonResult(root=nights[0].parent if nights else Path("."), started=time.time())
    lock = threading.Lock()
    totals = {"frames": 0, "nights_done": 0}

    def progress(night: str):
        def report(done: int, total: int, row: dict) -> None:
            if row.get("stage") == "masters":
                return  # the master builder's steps (same callback): not frames
            with lock:
                totals["frames"] += 1
                if done == total or done % 10 == 0:
                    log(f"  [{night}] {done}/{total} frames; season: {totals['frames']} frames, "
                        f"{totals['nights_done']}/{len(nights)} nights")
        return report

    def one(night: Path) -> NightOutcome:
        if night_is_current(night, out, settings):
            return _skipped(night, out)
        t0 = time.time()
        log(f"[{night.name}] start")
        try:
            res = calibrate_night(night, client, settings, out=out, progress=progress(night.name))
        except (RunError, ArchiveError, OSError) as exc:
            return _failed(night, out, str(exc), t0)
        except Exception as exc:  # one broken night must not stop the season
            return _failed(night, out, f"{type(exc).__name__}: {exc}", t0)
        return _outcome(res)

    with ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="night") as pool:
        futures = {pool.submit(one, n): n for n in nights}
        for fut in as_completed(futures):
            outcome = fut.result()
            with lock:
                totals["nights_done"] += 1
            result.nights.append(outcome)
            extra = f" ({outcome.reason})" if outcome.reason else ""
            log(f"[{outcome.night}] {outcome.status}: {outcome.done} frames calibrated, "
                f"{outcome.skipped} already done, in {outcome.seconds:.1f} s{extra}")
    if settings.masters.fallback:
        # Nights that failed may have lacked a master their neighbours now provide.
        retry = [n for n in result.nights if n.status == "failed"]
        for outcome in retry:
            night = next(p for p in nights if p.name == outcome.night)
            log(f"[{night.name}] retry with the other nights' masters")
            result.nights[result.nights.index(outcome)] = one(night)
    result.nights.sort(key=lambda n: n.night)
    result.finished = time.time()
    return result


def write_season_report(result: SeasonResult, folder: Path) -> Path:
    """Write ``season.json`` atomically in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / SEASON_MANIFEST
    atomic_write_text(path, json.dumps(result.to_dict(), indent=1))
    return path
