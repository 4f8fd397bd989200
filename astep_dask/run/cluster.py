"""Where the work runs: a LocalCluster by default, any scheduler address, or an HPC batch
system through dask-jobqueue. Every path yields a ``distributed.Client``; the rest of the
pipeline does not know which one it got.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster

from astep_dask.config import ClusterSettings

__all__ = ["capacity", "connect", "default_layout", "local_layout", "machine_cores",
           "machine_memory", "worker_threads"]


def machine_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def local_layout(settings: ClusterSettings) -> tuple[int, int]:
    """Workers and threads per worker of a LocalCluster.

    As configured where set; otherwise one in-process worker with a thread per core, or
    (``processes``) one single-threaded process per core.
    """
    cores = machine_cores()
    workers = settings.n_workers or (
        max(1, cores // max(1, settings.threads_per_worker)) if settings.processes else 1)
    threads = settings.threads_per_worker or max(1, cores // workers)
    return workers, threads


# --- the default local layout (issue 16) ---------------------------------------------------
PROCESS_MEMORY = 2 * 1024**3  # bytes a worker process may need: ~1.9 GB measured at 4096²
MANY_CORES = 4  # above this many cores, worker processes of 2 threads


def machine_memory() -> int:
    """Physical memory of the machine in bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def default_layout(cores: int, memory: int) -> tuple[bool, int, int]:
    """The local layout when none is configured: ``(processes, workers, threads)``.

    Up to ``MANY_CORES`` cores, one in-process worker with a thread per core (no start-up,
    masters held once). Above, worker processes of 2 threads, as many as the cores and
    the memory (``PROCESS_MEMORY`` each) allow: measured on a 16-core node (2048², 64
    frames, issue 16) all cores as threads of one process took 43.6 s, 8 processes × 2
    threads 11.7 s, 16 × 1 thread 11.6 s with 1.5 times the memory. Where the memory
    holds fewer than 2 processes, threads of one process.
    """
    if cores > MANY_CORES:
        workers = min(cores // 2, memory // PROCESS_MEMORY)
        if workers >= 2:
            return True, workers, cores // workers
    return False, 1, cores


def _with_default_layout(settings: ClusterSettings) -> ClusterSettings:
    """``settings`` with the machine's default layout where none of ``processes``,
    ``n_workers``, ``threads_per_worker`` is set."""
    if settings.processes or settings.n_workers or settings.threads_per_worker:
        return settings
    processes, workers, threads = default_layout(machine_cores(), machine_memory())
    return dataclasses.replace(settings, processes=processes, n_workers=workers,
                               threads_per_worker=threads)


def _jobqueue_cluster(settings: ClusterSettings):
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            f"--cluster {settings.kind} needs dask-jobqueue: pip install dask-jobqueue"
        ) from exc
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[settings.kind]
    with dask.config.set({"distributed.scheduler.allowed-failures": settings.retries}):
        cluster = cls()  # configured by dask config (jobqueue.yaml), see deploy/
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)
    return cluster


@contextmanager
def connect(settings: ClusterSettings, log: Callable[[str], None] = print) -> Iterator[Client]:
    """A client for the configured cluster, closed (with any cluster it started) on exit.

    ``scheduler`` set: join that running scheduler. ``kind`` ``local``: start a
    LocalCluster sized to the machine (:func:`default_layout` where no layout is set, then
    :func:`local_layout`), its workers threads of this process unless ``processes``.
    ``slurm``/``pbs``: start a dask-jobqueue cluster from dask configuration, scaling adaptively.

    A cluster started here retries a task whose worker died ``retries`` times
    (the scheduler's ``allowed-failures``) before failing it; a joined scheduler keeps
    its own setting. Errors raised by a task are never retried: they would recur.
    """
    cluster = None
    if settings.scheduler:
        client = Client(settings.scheduler)
        log(f"joined scheduler {settings.scheduler}")
    elif settings.kind == "local":
        settings = _with_default_layout(settings)
        workers, threads = local_layout(settings)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=settings.processes,
            memory_limit=settings.memory_limit,
            dashboard_address=settings.dashboard_address,
            scheduler_kwargs={"allowed_failures": settings.retries},
        )
        client = Client(cluster)
    elif settings.kind in ("slurm", "pbs"):
        cluster = _jobqueue_cluster(settings)
        client = Client(cluster)
    else:
        raise ValueError(f"unknown cluster kind {settings.kind!r} (local, slurm, pbs)")
    try:
        log(f"dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def worker_threads(client: Client) -> int:
    """Total threads of the workers currently connected."""
    info = client.scheduler_info()
    return sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()) or 1


def capacity(client: Client, settings: ClusterSettings) -> int:
    """Threads the cluster can have: those connected or, for an adaptive batch cluster that
    may still be scaling up, ``max_jobs`` x the cores of one job (whichever is larger).

    Queueing work for this many threads is what lets adaptive scaling ask for jobs.
    """
    threads = worker_threads(client)
    if settings.kind in ("slurm", "pbs") and not settings.scheduler:
        cores = int(dask.config.get(f"jobqueue.{settings.kind}.cores", default=1) or 1)
        threads = max(threads, settings.max_jobs * cores)
    return threads
