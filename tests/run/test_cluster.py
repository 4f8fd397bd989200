"""Where the work runs: the local worker layout and the client it yields."""

from __future__ import annotations

import os

from astep_dask.config import ClusterSettings
from astep_dask.run.cluster import connect, local_layout, machine_cores


def test_local_layout_defaults_and_overrides():
    cores = machine_cores()
    # Default: one in-process worker with a thread per core.
    assert local_layout(ClusterSettings()) == (1, cores)
    # Worker processes: one single-threaded process per core.
    assert local_layout(ClusterSettings(processes=True)) == (cores, 1)
    assert local_layout(ClusterSettings(processes=True, threads_per_worker=2)) == (
        max(1, cores // 2), 2)
    # Given workers share the cores; given threads are kept.
    assert local_layout(ClusterSettings(n_workers=2)) == (2, max(1, cores // 2))
    assert local_layout(ClusterSettings(n_workers=3, threads_per_worker=4)) == (3, 4)


def test_connect_in_process_by_default_and_processes_on_request():
    logged = []
    with connect(ClusterSettings(n_workers=2, threads_per_worker=1, dashboard_address=":0"),
                 log=logged.append) as client:
        info = client.scheduler_info()["workers"]
        assert len(info) == 2 and all(w["nthreads"] == 1 for w in info.values())
        # Threads of this process: the workers run in our own pid.
        assert set(client.run(os.getpid).values()) == {os.getpid()}
    assert any("dashboard" in m for m in logged)
    with connect(ClusterSettings(n_workers=1, threads_per_worker=1, processes=True,
                                 dashboard_address=":0"), log=lambda m: None) as client:
        assert set(client.run(os.getpid).values()) != {os.getpid()}
