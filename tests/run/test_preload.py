"""The worker preload: a worker whose last heartbeat is cut short by its own close does not
log it as an error (seen once in CI, a traceback after a complete season); a running worker
that cannot reach its scheduler still does."""

from __future__ import annotations

import asyncio
import logging
import sys
from types import SimpleNamespace

import pytest
from distributed import Scheduler, Worker
from distributed.comm.core import CommClosedError
from distributed.core import Status

from astep_dask.run.preload import ClosingHeartbeat, dask_setup

WORKER_LOG = logging.getLogger("distributed.worker")


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept():
    """The worker logger's warnings and errors, and its filters restored afterwards."""
    handler, filters = _Kept(), list(WORKER_LOG.filters)
    WORKER_LOG.addHandler(handler)
    yield handler.records
    WORKER_LOG.removeHandler(handler)
    WORKER_LOG.filters[:] = filters


async def _heartbeat_cut_by_close(preloaded: bool) -> None:
    """A real worker whose heartbeat is in flight (the scheduler answers it slowly) when
    the worker closes, as at the end of a run."""
    async with Scheduler(dashboard_address="127.0.0.1:0", host="127.0.0.1") as scheduler:
        async def slow_heartbeat(**kwargs):
            await asyncio.sleep(5)
            return {}

        scheduler.handlers["heartbeat_worker"] = slow_heartbeat
        async with Worker(scheduler.address, dashboard_address="127.0.0.1:0") as worker:
            if preloaded:
                dask_setup(worker)
            beat = asyncio.ensure_future(worker.heartbeat())
            await asyncio.sleep(0.3)
            await worker.close()
            await beat


def _heartbeat_errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "heartbeat" in r.getMessage()]


def test_a_closing_workers_cut_heartbeat_is_not_logged(kept):
    # Without the preload, distributed logs it as an error with a traceback: this is the
    # race of the CI run, made certain.
    asyncio.run(_heartbeat_cut_by_close(preloaded=False))
    assert _heartbeat_errors(kept) == ["Failed to communicate with scheduler during heartbeat."]
    assert any(r.exc_info for r in kept)
    kept.clear()
    asyncio.run(_heartbeat_cut_by_close(preloaded=True))
    assert _heartbeat_errors(kept) == []


@pytest.mark.parametrize("status,shown", [(Status.running, True), (Status.paused, True),
                                          (Status.closing_gracefully, True),
                                          (Status.closing, False), (Status.closed, False)])
def test_only_a_closing_workers_heartbeat_failure_is_dropped(status, shown):
    quiet = ClosingHeartbeat(SimpleNamespace(status=status))

    def record(message: str, exc: BaseException | None) -> logging.LogRecord:
        try:
            if exc is not None:
                raise exc
        except BaseException:
            info = sys.exc_info()
        else:
            info = None
        return WORKER_LOG.makeRecord(WORKER_LOG.name, logging.ERROR, __file__, 1, message,
                                     (), info)

    failed = "Failed to communicate with scheduler during heartbeat."
    assert quiet.filter(record(failed, CommClosedError("ConnectionPool closing."))) is shown
    # Other records, and other errors, are never dropped.
    assert quiet.filter(record(failed, ValueError("not a connection"))) is True
    assert quiet.filter(record("Heartbeat to scheduler failed", OSError())) is True
    assert quiet.filter(record("Stopping worker", None)) is True
