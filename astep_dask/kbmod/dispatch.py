"""How the KBMOD export submits its tasks (:class:`Dispatch`): shared by the export's
driver (:mod:`astep_dask.kbmod.stage`) and its template and difference steps
(:mod:`astep_dask.kbmod.subtract`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from astep_dask.run.results import Progress
from astep_dask.run.tasks import map_bounded

__all__ = ["Dispatch"]


@dataclass(frozen=True)
class Dispatch:
    """How the stage submits its tasks: the client, the night (in task names), the window
    of tasks in flight, retries, and the progress callback."""

    client: Any
    night: str
    window: Callable[[], int]
    retries: int
    progress: Progress | None = None

    def map(self, kind: str, fn: Callable, jobs: Sequence,
            on_result: Callable[[Any, Any], None]) -> None:
        """Run ``fn`` on every job (:func:`~astep_dask.run.tasks.map_bounded`), tasks named
        ``kbmod-<kind>-<night>-<i>``."""
        map_bounded(self.client, fn, jobs, on_result, window=self.window,
                    retries=self.retries, key=lambda i, _: f"kbmod-{kind}-{self.night}-{i}")

    def report(self, done: int, total: int, row: dict) -> None:
        """Tell the progress callback, when there is one."""
        if self.progress:
            self.progress(done, total, row)
