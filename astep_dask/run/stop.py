"""A stop requested by a signal, seen by every loop that puts tasks on a cluster.

The command line turns SIGINT and SIGTERM into ``KeyboardInterrupt``; but Python drops an
exception raised while it runs a finaliser (a dask future's ``__del__`` runs in the main
thread too), and a season's nights run in threads that never see it. So the signal handler
also records the stop here, and :func:`astep_dask.run.tasks.map_bounded` raises
``KeyboardInterrupt`` at its next finished task. Only the standard library is imported, so
that the command line can use it without importing dask.
"""

from __future__ import annotations

import threading

__all__ = ["clear_stop", "request_stop", "stop_requested"]

_STOP = threading.Event()


def request_stop() -> None:
    """Ask every running task loop, in any thread, to stop at its next finished task."""
    _STOP.set()


def clear_stop() -> None:
    """Forget an earlier :func:`request_stop` (a new command starts)."""
    _STOP.clear()


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called since the last :func:`clear_stop`."""
    return _STOP.is_set()
