"""Where the work runs: the local worker layout and the client it yields."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

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
    with connect(ClusterSettings(n_workers=2, threads_per_worker=1, processes=True,
                                 dashboard_address=":0"), log=lambda m: None) as client:
        assert os.getpid() not in set(client.run(os.getpid).values())
        # Each worker ran the preload's setup: its closing heartbeat is kept quiet.
        assert all(client.run(_heartbeat_quieted).values())
        # Worker processes import the frame chain as they start, not in their first task.
        assert all(client.run(_frame_chain_imported).values())
        # They are forked from one server process that imported it once (their imported
        # pages shared, not one copy each), not each started afresh by its nanny.
        parents = set(client.run(os.getppid).values())
        assert len(parents) == 1
        server = parents.pop()
        assert "forkserver" in " ".join(psutil.Process(server).cmdline())
        assert "astroscrappy" in Path(f"/proc/{server}/maps").read_text()


def _heartbeat_quieted() -> bool:
    import logging

    from astep_dask.run.preload import ClosingHeartbeat

    return any(isinstance(f, ClosingHeartbeat)
               for f in logging.getLogger("distributed.worker").filters)


def _frame_chain_imported() -> bool:
    import sys

    return "astroscrappy" in sys.modules and "astep_dask.run.frames" in sys.modules


def test_default_layout_from_cores_and_memory():
    from astep_dask.run.cluster import PROCESS_MEMORY, default_layout

    big = 128 * 1024**3
    # Few cores: threads of one process (this 2-core machine's default is unchanged).
    assert default_layout(1, big) == (False, 1, 1)
    assert default_layout(2, big) == (False, 1, 2)
    assert default_layout(4, big) == (False, 1, 4)
    # Many cores: processes of 2 threads, as many as the memory holds.
    assert default_layout(16, big) == (True, 8, 2)
    assert default_layout(6, big) == (True, 3, 2)
    assert default_layout(16, 4 * PROCESS_MEMORY) == (True, 4, 4)
    # Memory for fewer than 2 processes (or unknown): threads of one process.
    assert default_layout(16, PROCESS_MEMORY) == (False, 1, 16)
    assert default_layout(16, 0) == (False, 1, 16)


def test_connect_uses_the_default_layout_only_when_none_is_set(monkeypatch):
    from astep_dask.run import cluster

    monkeypatch.setattr(cluster, "machine_cores", lambda: 6)
    monkeypatch.setattr(cluster, "machine_memory", lambda: 64 * 1024**3)
    chosen = cluster._with_default_layout(ClusterSettings())
    assert (chosen.processes, chosen.n_workers, chosen.threads_per_worker) == (True, 3, 2)
    given = ClusterSettings(n_workers=1, threads_per_worker=6)
    assert cluster._with_default_layout(given) == given
    assert cluster._with_default_layout(ClusterSettings(processes=True)).n_workers is None


def test_closing_a_cluster_shows_no_traceback_of_what_it_cancels(caplog):
    # distributed logs a worker's stream read cancelled by the scheduler's close with a
    # traceback (seen at the end of a successful `report --cluster slurm`): not shown;
    # any other error still is
    import asyncio
    import logging
    import sys

    from astep_dask.run.cluster import _close_quietly

    class Cluster:
        def close(self) -> None:
            log = logging.getLogger("distributed.scheduler")
            try:
                raise asyncio.CancelledError()
            except BaseException:
                log.error("", exc_info=sys.exc_info())
            log.error("a real problem")
            # a closing worker's abandoned last heartbeat (seen once in CI, after a season)
            logging.getLogger("distributed.comm.tcp").warning(
                "Listener on 'tls://127.0.0.1:34913': TLS handshake failed with remote "
                "'tls://127.0.0.1:53160': [SSL: UNEXPECTED_EOF_WHILE_READING] EOF")

    with caplog.at_level(logging.WARNING, logger="distributed"):
        _close_quietly(Cluster())
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]
    for name in ("distributed.scheduler", "distributed.comm.tcp"):
        assert not logging.getLogger(name).filters  # removed after close


def test_scratch_folders_of_killed_runs_are_removed_and_nothing_else(tmp_path):
    # A run killed with SIGKILL cannot remove its scratch folder; the next run does, and
    # only that: not a live run's, another machine's, one without an owner record, a
    # link, nor a file.
    import socket
    import subprocess

    import dask

    from astep_dask.run.cluster import SCRATCH_OWNER, SCRATCH_PREFIX, private_scratch

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()

    def folder(name: str, owner: str | None) -> Path:
        path = tmp_path / f"{SCRATCH_PREFIX}{name}"
        (path / "dask-scratch-space").mkdir(parents=True)
        if owner is not None:
            (path / SCRATCH_OWNER).write_text(owner)
        return path

    killed = folder("killed", f"{host} {dead.pid}\n")
    kept = [folder("live", f"{host} {os.getpid()}\n"),
            folder("elsewhere", f"another-node {dead.pid}\n"),
            folder("unrecorded", None), folder("garbled", "not a record")]
    target = tmp_path / "not-ours"
    (target / "data").mkdir(parents=True)
    (target / SCRATCH_OWNER).write_text(f"{host} {dead.pid}\n")
    (tmp_path / f"{SCRATCH_PREFIX}link").symlink_to(target)
    (tmp_path / f"{SCRATCH_PREFIX}file").write_text("x")
    said: list[str] = []
    with dask.config.set({"temporary-directory": str(tmp_path)}), \
            private_scratch(said.append) as mine:
        assert not killed.exists()
        assert all(p.is_dir() for p in kept) and (target / "data").is_dir()
        assert (tmp_path / f"{SCRATCH_PREFIX}file").is_file()
        assert (mine / SCRATCH_OWNER).read_text() == f"{host} {os.getpid()}\n"
    assert not mine.exists()
    assert said == [f"removed 1 scratch folder(s) in {tmp_path} left by killed runs"]
