"""Where the work runs: a LocalCluster by default, any scheduler address, or an HPC batch
system through dask-jobqueue. Every path yields a ``distributed.Client``; the rest of the
pipeline does not know which one it got.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from .config import ClusterSettings


def local_workers(settings: ClusterSettings) -> int:
    """Worker processes for a LocalCluster: as configured, else cores / threads."""
    if settings.n_workers:
        return settings.n_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, settings.threads_per_worker))


def _jobqueue_cluster(settings: ClusterSettings):
    try:
        import dask_jobqueue
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            f"--cluster {settings.kind} needs dask-jobqueue: pip install dask-jobqueue"
        ) from exc
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[settings.kind]
    cluster = cls()  # configured by dask config (jobqueue.yaml), see deploy/
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)
    return cluster


@contextmanager
def connect(settings: ClusterSettings, log: Callable[[str], None] = print) -> Iterator[Client]:
    """A client for the configured cluster, closed (with any cluster it started) on exit.

    ``scheduler`` set: join that running scheduler. ``kind`` ``local``: start a
    LocalCluster of worker processes sized to the machine. ``slurm``/``pbs``: start a
    dask-jobqueue cluster from dask configuration, scaling adaptively.
    """
    cluster = None
    if settings.scheduler:
        client = Client(settings.scheduler)
        log(f"joined scheduler {settings.scheduler}")
    elif settings.kind == "local":
        cluster = LocalCluster(
            n_workers=local_workers(settings),
            threads_per_worker=settings.threads_per_worker,
            processes=True,
            memory_limit=settings.memory_limit,
            dashboard_address=settings.dashboard_address,
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
        import dask

        cores = int(dask.config.get(f"jobqueue.{settings.kind}.cores", default=1) or 1)
        threads = max(threads, settings.max_jobs * cores)
    return threads
