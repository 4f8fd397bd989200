"""The ``astep-dask`` command line.

Exit codes (the same for every subcommand):

  0  complete: everything asked for was done (also when a reader closed our output pipe,
     as ``inspect --json | head`` does)
  1  failed: a missing or unreadable night, an unwritable output, an unreachable or wrong
     scheduler, a batch job that does not start, or nothing could be calibrated; one line
     on stderr says why
  2  usage: an option, argument or setting was refused (one line names it): a bad date,
     a count out of its range, more workers than the machine can hold
  3  partial: some frames or nights could not be used (each is named, with the reason)
  130 interrupted (SIGINT/SIGTERM): finished frames are kept; re-run to resume
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence

from astep_dask.cli.commands import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
)
from astep_dask.cli.parser import build_parser
from astep_dask.errors import ArchiveError, RunError, SettingsError
from astep_dask.run.stop import clear_stop, request_stop, stop_requested

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_USAGE",
           "build_parser", "main"]


def _interrupt(signum: int, frame: object) -> None:
    """First SIGTERM/SIGINT: stop (the cluster is closed on the way out); later ones are
    ignored so that they cannot cut that cleanup short.

    Python drops an exception raised in a finaliser (a dask future's ``__del__`` runs in
    the main thread too), so the stop is also recorded: the frame loops stop at their next
    finished task, and :func:`main` reports the interrupt even if the exception was lost.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request_stop()
    raise KeyboardInterrupt


# Libraries whose log records reach the console during a run (the dashboard's port,
# a worker's memory, a closed comm): with --quiet only their errors do.
_CHATTY = ("distributed", "dask", "tornado", "bokeh", "dask_jobqueue", "asyncio")


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    """With ``--quiet``, no library warning and no log record below ERROR on the console
    while the command runs (``Port 8787 is already in use`` and the like); the command's
    own error lines are printed by :func:`main`."""
    if not on:
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``astep-dask`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # scancel and batch walltimes send SIGTERM: treat it as Ctrl-C.
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    else:  # pragma: no cover - called from a thread (signals only work in the main one)
        previous = {}
    clear_stop()
    try:
        with _quiet(getattr(args, "quiet", False)):
            code = args.func(args)
        if stop_requested():  # the KeyboardInterrupt was raised where Python dropped it
            raise KeyboardInterrupt
        return code
    except BrokenPipeError:
        # The reader of our output has gone (``| head``): stop quietly, and make sure the
        # interpreter's own final flush of stdout cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except SettingsError as exc:  # a refused option or setting: usage, as argparse's
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ArchiveError, RunError, OSError, ValueError, RuntimeError) as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("astep-dask: interrupted; finished frames are kept, re-run to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        clear_stop()  # an in-process caller's next run starts afresh
        for sig, handler in previous.items():
            signal.signal(sig, handler)
