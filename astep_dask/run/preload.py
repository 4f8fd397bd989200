"""What every worker process we start loads as it starts (dask's worker ``--preload``):
the frame chain, imported before the first task needs it, and a logging filter that keeps
a closing worker's last heartbeat off the console.

A worker's heartbeat to the scheduler may be on its way when the worker closes at the end
of a run; closing cancels it ("ConnectionPool closing"), and distributed logs that as
an error with a traceback ("Failed to communicate with scheduler during heartbeat"),
although the run succeeded and nothing was lost. It is rare (seen once, in CI, after a
complete season on 2 local worker processes; not in 45 runs of the same command here)
but it reads as a crash. So a worker that is closing drops that record; a running worker
that cannot reach its scheduler still logs it.
"""

from __future__ import annotations

import logging

import astep_dask.run.frames  # noqa: F401  (the frame chain: imported here, not in a task)

__all__ = ["ClosingHeartbeat", "dask_setup"]

HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"
# distributed's Status names of a worker whose close has begun (not closing_gracefully:
# a worker that retires may still talk to its scheduler for a long while)
CLOSING = ("closing", "closed")


class ClosingHeartbeat(logging.Filter):
    """Drops the heartbeat failure that distributed logs for a worker that is closing.

    Parameters
    ----------
    worker
        The worker (anything with a ``status`` whose ``name`` is distributed's).
    """

    def __init__(self, worker) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(getattr(self.worker, "status", None), "name", "")
        exc = record.exc_info[1] if record.exc_info else None
        return not (status in CLOSING and isinstance(exc, OSError)
                    and record.getMessage().startswith(HEARTBEAT_FAILED))


def dask_setup(worker) -> None:
    """dask's preload hook, called once per worker as it starts: attach
    :class:`ClosingHeartbeat` to distributed's worker logger."""
    logging.getLogger("distributed.worker").addFilter(ClosingHeartbeat(worker))
