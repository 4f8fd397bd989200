"""Progress of a command, sized for a night of thousands of frames.

Every stage calls ``progress(done, total, row)`` (:data:`~astep_dask.run.results.Progress`)
as its tasks finish. :class:`PhaseProgress` turns those calls into one labelled, updating
bar per phase (tqdm) on a terminal, or, when stderr is a file or a pipe (a batch job's log),
a plain line each tenth of a phase; ``--quiet`` shows nothing. The rows' own words decide
the phase (``row["stage"]`` when a stage has several, such as the KBMOD export's template
rows), and skipped and failed items are counted, not listed: the summary names each
failure with its reason.
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO

from tqdm import tqdm

__all__ = ["PhaseProgress"]


class PhaseProgress:
    """Progress display of one command.

    Parameters
    ----------
    label
        The phase of rows that name none (``frames``, ``tiles``, ...).
    quiet
        Show nothing.
    stream
        Where to write (stderr by default).
    bar
        Draw bars (True), log lines (False), or decide from whether ``stream`` is a
        terminal (None).
    steps
        Log lines per phase when not drawing bars (one every ``total / steps`` items, and
        the last).
    """

    def __init__(self, label: str = "frames", *, quiet: bool = False,
                 stream: IO[str] | None = None, bar: bool | None = None, steps: int = 10):
        self.label = label
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.bar = _is_tty(self.stream) if bar is None else bar
        self.steps = steps
        self._phases: dict[str, _Phase] = {}
        # A phase's clock starts when the one before it ended (or when this display was
        # made): its items report only as they finish, so the first one would otherwise
        # start the clock, and its duration would leave out the wait for it.
        self.clock = time.perf_counter()

    def __call__(self, done: int, total: int, row: dict) -> None:
        if self.quiet:
            return
        name = str(row.get("stage") or self.label)
        phase = self._phases.get(name)
        if phase is None or phase.total != total or done < phase.done:
            if phase is not None:
                phase.close()
            phase = self._phases[name] = _Phase(name, total, self)
        phase.update(done, row)

    def close(self) -> None:
        """End every bar (a log line for a phase that did not log its last item)."""
        for phase in self._phases.values():
            phase.close()
        self._phases.clear()


class _Phase:
    """One phase's counts and its bar or log lines."""

    def __init__(self, name: str, total: int, owner: PhaseProgress):
        self.name, self.total, self.owner = name, total, owner
        self.done = 0
        self.counts: dict[str, int] = {}
        self.start = self.end = owner.clock
        self.every = max(1, math.ceil(total / max(1, owner.steps)))
        self.logged = -1
        self.tqdm = (tqdm(total=total, desc=f"  {name}", file=owner.stream, unit="",
                          dynamic_ncols=True, leave=True) if owner.bar else None)
        if self.tqdm is not None:  # the bar's elapsed time is the phase's (tqdm's clock)
            self.tqdm.start_t = self.tqdm._time() - (time.perf_counter() - self.start)

    def update(self, done: int, row: dict) -> None:
        self.end = time.perf_counter()
        status = str(row.get("status") or "done")
        self.counts[status] = self.counts.get(status, 0) + max(1, done - self.done)
        step, self.done = done - self.done, done
        if self.tqdm is not None:
            self.tqdm.set_postfix_str(self._extra(), refresh=False)
            self.tqdm.update(step)
        elif done >= self.total or done // self.every > self.logged // self.every:
            self._log()
        if done >= self.total:
            self.close()

    def _extra(self) -> str:
        return ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()) if s != "done")

    def _log(self) -> None:
        self.logged = self.done
        elapsed = self.end - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        eta = f", {_duration(left)} left" if self.done < self.total and rate > 0 else ""
        extra = f" ({self._extra()})" if self._extra() else ""
        pct = 100 * self.done / self.total if self.total else 100.0
        print(f"  {self.name}: {self.done}/{self.total} ({pct:.0f} %) in "
              f"{_duration(elapsed)}{eta}{extra}", file=self.owner.stream, flush=True)

    def close(self) -> None:
        """End the phase once: the bar's last state, or the log line of its last item
        (never both, and never again when the display is closed)."""
        if self.tqdm is not None:
            self.tqdm.close()
            self.tqdm = None
            self.logged = self.done
        elif self.logged != self.done and self.done:
            self._log()
        if self.done >= self.total:
            self.owner.clock = max(self.owner.clock, self.end)


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
