"""Bounded task submission: the one way our stages put many tasks on a cluster.

A stage never submits all its tasks at once: a night of thousands of frames would put
thousands of futures (and their arguments) in the scheduler's memory, and a failure would
leave them all to cancel. :func:`map_bounded` keeps a window of tasks in flight, sized from
what the cluster *can* have (:func:`cluster_window`: for an adaptive batch cluster that is
still scaling up, ``max_jobs`` × cores, so that queued work makes it ask for jobs), and
submits the next as each finishes.

Each loop also stops at its next finished task once a signal has asked for it
(:mod:`astep_dask.run.stop`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from distributed import Client, as_completed

from astep_dask.config import ClusterSettings
from astep_dask.run.cluster import capacity
from astep_dask.run.stop import stop_requested

__all__ = ["cluster_window", "map_bounded", "wait_idle"]

T = TypeVar("T")
R = TypeVar("R")


def cluster_window(client: Client, settings: ClusterSettings) -> Callable[[], int]:
    """How many tasks to keep in flight, re-read as workers come and go: the configured
    ``frames_in_flight``, or two per thread the cluster can have (:func:`capacity`).

    The scheduler is asked at most once every :data:`REFRESH_S` seconds, not once per
    task submitted (a round trip per frame: 2,000 frames spent seconds on it). An
    adaptive cluster's workers arrive over seconds to minutes, so a window a second old
    loses nothing. (Subscribing to the scheduler's worker events would avoid even that,
    but a subscribed client makes the scheduler log a CRITICAL error when it closes.)"""
    if settings.frames_in_flight:
        return lambda: settings.frames_in_flight
    last = {"at": -math.inf, "value": 1}

    def window() -> int:
        now = time.monotonic()
        if now - last["at"] > REFRESH_S:
            last["at"], last["value"] = now, 2 * capacity(client, settings)
        return last["value"]

    return window


REFRESH_S = 1.0  # s: how old the cluster's thread count may be when sizing the window


def _running(dask_worker) -> int:
    """Tasks occupying a thread of this worker, cancelled ones included."""
    return len(dask_worker.state.all_running_tasks)


def wait_idle(client: Client, timeout: float = 30.0) -> bool:
    """Wait until no worker runs a task: a task cancelled while it runs (a night stopped
    by a full disk) still runs to its end in its thread, and may still be writing. True
    once idle; False after ``timeout`` seconds or when the workers cannot be asked."""
    end = time.monotonic() + timeout
    while True:
        try:
            busy = sum(client.run(_running).values())
        except Exception:  # a worker gone, a closed client: do not wait
            return False
        if not busy:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.1)


def map_bounded(
    client: Client,
    fn: Callable[[T], R],
    items: Sequence[T],
    on_result: Callable[[T, R], None],
    *,
    window: Callable[[], int],
    retries: int = 0,
    key: Callable[[int, T], str],
) -> None:
    """Run ``fn(item)`` on the cluster for every item, at most ``window()`` at once.

    ``on_result(item, result)`` is called in this process as each task finishes (in the
    order they finish); the window is re-read after each, so an adaptive cluster that
    grows gets more work. ``key(i, item)`` names each task (a unique suffix is added), as
    the dashboard shows it.

    Raises
    ------
    BaseException
        The first task error (after ``retries`` extra attempts), or an interrupt
        (``KeyboardInterrupt``, also once a stop is requested): the tasks still queued
        are cancelled first.
    """
    if not items:
        return
    if stop_requested():
        raise KeyboardInterrupt
    pending = enumerate(items)
    seq = as_completed()
    owner: dict[str, T] = {}

    def submit_next() -> None:
        i, item = next(pending, (None, None))
        if i is not None:
            fut = client.submit(fn, item, pure=False, retries=retries,
                                key=f"{key(i, item)}-{time.time_ns()}")
            owner[fut.key] = item
            seq.add(fut)

    left = len(items)  # never loop more often than there are items (a huge window)

    def fill(n: int) -> None:
        nonlocal left
        for _ in range(min(n, left)):
            submit_next()
            left -= 1

    fill(max(window(), 1))
    try:
        for fut in seq:
            on_result(owner.pop(fut.key), fut.result())
            if stop_requested():
                raise KeyboardInterrupt
            fill(max(1, window() - seq.count()))
    except BaseException:
        for f in list(seq.futures):
            f.cancel()
        raise
