"""What a stage did to a night: the one result type of every stage's entry point.

:func:`~astep_dask.run.night.calibrate_night`, :func:`~astep_dask.kbmod.stage.export_night`,
:func:`~astep_dask.kbmod.search.search_night` and
:func:`~astep_dask.report.night.night_report` all return a :class:`StageResult`: one row
per frame with its status (and the reason of a failure), the inputs that could not be used
and why, the error that stopped the stage if one did, and what only that stage has in
``details``. Its :attr:`~StageResult.status` is the command's exit status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Progress", "StageResult"]

# progress(done, total, row): called in the driver as each frame (or task) finishes.
Progress = Callable[[int, int, dict], None]


@dataclass
class StageResult:
    """The outcome of one stage on one night.

    Attributes
    ----------
    stage
        The stage's name in :data:`~astep_dask.run.stages.STAGES`.
    night
        The night (``YYYY-MM-DD``).
    out_dir
        Where the stage wrote its products.
    frames
        One row per frame, with ``status`` (``done``, ``skipped``, ``failed``, or the
        stage's own word for done) and, for a failure, ``reason``.
    unusable
        Inputs that could not be used, each ``{"path": ..., "reason": ...}``.
    rejected
        Inputs that were readable but left out by a check (a flat too dim, ...), each
        with its reason: the stage is then partial.
    error
        Why the stage stopped before its end (it then failed), or None.
    started, finished
        Wall-clock times (``time.time()``).
    details
        What only this stage has (masters, template, reference, candidate files, ...).
    """

    stage: str
    night: str
    out_dir: Path
    frames: list[dict] = field(default_factory=list)
    unusable: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    error: str | None = None
    started: float = 0.0
    finished: float = 0.0
    details: dict = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        """Frames per status (done, skipped, failed, and any other), plus unusable inputs."""
        out: dict[str, int] = {"done": 0, "skipped": 0, "failed": 0}
        for row in self.frames:
            out[row["status"]] = out.get(row["status"], 0) + 1
        out["unusable"] = len(self.unusable)
        return out

    @property
    def status(self) -> str:
        """``failed`` (an error, or no frame done or already done), ``partial`` (some
        frame failed, some input unusable or rejected) or ``complete``."""
        c = self.counts
        if self.error or sum(v for k, v in c.items() if k not in ("failed", "unusable")) == 0:
            return "failed"
        if c["failed"] or c["unusable"] or self.rejected:
            return "partial"
        return "complete"

    @property
    def failures(self) -> list[dict]:
        """Every failed frame and unusable or rejected input, each with its reason."""
        failed = [{"file": r.get("file", ""), "reason": r.get("reason", "")}
                  for r in self.frames if r["status"] == "failed"]
        return failed + [{"file": Path(str(u.get("path", u.get("file", "")))).name,
                          "reason": u.get("reason", "")}
                         for u in (*self.unusable, *self.rejected)]

    @property
    def wall_seconds(self) -> float:
        """Seconds from start to finish."""
        return self.finished - self.started
