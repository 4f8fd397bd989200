"""Refused before anything starts, and wrong schedulers in one line.

- Every count and size setting has a range (``config._RANGES``) and is checked against the
  machine or the batch job (``run.cluster.check_layout``): out of range, the command prints
  one line naming the setting and exits 2, and starts nothing (no cluster, no output).
- A ``--scheduler`` address that is wrong in any way (refused, unknown host, no answer,
  an HTTP server, a silent server, a server that is not dask, TLS demanded, not TLS,
  another cluster's CA) is one line naming the address and what was wrong, within
  ``[cluster] connect_timeout``, exit 1: the installed console script, as users run it.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from astep_dask.cli import EXIT_FAILED, EXIT_USAGE, main
from astep_dask.testing.simulate import SimConfig, simulate_night

SCRIPT = str(Path(sys.executable).with_name("astep-dask"))


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    return simulate_night(tmp_path_factory.mktemp("bounds"),
                          SimConfig(size=48, n_science=2, n_darks=3, n_flats=3, seed=2))


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------- bounds
BOUNDS = [
    # (options, settings file text, words of the one line)
    (["--workers", "100000"], "", ["n_workers = 100000", "between 1 and 4096"]),
    ([], "[cluster]\nn_workers = 100000\n", ["n_workers = 100000", "between 1 and 4096"]),
    (["--workers", "4000", "--threads", "1"], "", ["threads, more than 8 per core"]),
    (["--threads", "5000"], "", ["threads_per_worker = 5000", "between 0 and 1024"]),
    ([], "[cluster]\nframes_in_flight = 9223372036854775807\n",
     ["frames_in_flight = 9223372036854775807", "between 0 and 100000"]),
    (["--workers", "1", "--threads", "1"], "[cluster]\nframes_in_flight = 50\n",
     ["frames_in_flight = 50", "at most 8 per worker thread"]),
    ([], "[cluster]\nmemory_limit = \"lots\"\n", ["memory_limit = 'lots'", "not a memory size"]),
    ([], "[cluster]\nmemory_limit = \"1 MiB\"\n", ["memory_limit = '1 MiB'", "at least 256 MiB"]),
    (["--processes", "--workers", "2"], "[cluster]\nmemory_limit = \"100 TiB\"\n",
     ["memory_limit = '100 TiB'", "more than this machine"]),
    (["--retries", "1000"], "", ["retries = 1000", "between 0 and 100"]),
    ([], "[cluster]\nconnect_timeout = 0.0\n", ["connect_timeout = 0.0", "> 0"]),
    ([], "[cluster]\nconnect_timeout = 1e6\n", ["connect_timeout = 1000000.0", "600"]),
    ([], "[cluster]\nmin_jobs = 5\nmax_jobs = 2\n", ["min_jobs = 5", "<= max_jobs"]),
    ([], "[cluster]\nmax_jobs = 100000\n", ["max_jobs = 100000", "between 1 and 10000"]),
    ([], "[combine]\niterations = 100000\n", ["iterations = 100000", "between 1 and 100"]),
]


@pytest.mark.parametrize("options, text, words", BOUNDS,
                         ids=[" ".join(b[2][:1]) for b in BOUNDS])
def test_a_bound_is_refused_in_one_line_before_anything_starts(
        night, tmp_path, capsys, monkeypatch, options, text, words):
    import astep_dask.run.cluster as cluster

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(cluster, "connect", no_cluster)
    monkeypatch.setattr(cluster, "local_cluster", no_cluster)
    argv = ["calibrate", str(night), "--out", str(tmp_path / "out"), *options]
    if text:
        (tmp_path / "s.toml").write_text(text)
        argv += ["--config", str(tmp_path / "s.toml")]
    assert main(argv) == EXIT_USAGE
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("astep-dask: error:") and all(w in line for w in words), line
    assert not (tmp_path / "out").exists()


def test_a_batch_job_that_cannot_hold_its_workers_is_refused(night, tmp_path, capsys,
                                                             monkeypatch):
    """The job size of the dask configuration (deploy/jobqueue.yaml) is checked too."""
    import dask

    for key, value, words in (("memory", "lots", "not a memory size"),
                              ("memory", "100 MiB", "at least 256 MiB each"),
                              ("processes", 16, "between 1 and cores (8)")):
        with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.processes": 4,
                              "jobqueue.slurm.memory": "32 GiB", f"jobqueue.slurm.{key}": value}):
            code = main(["calibrate", str(night), "--out", str(tmp_path / "out"),
                         "--cluster", "slurm"])
        assert code == EXIT_USAGE
        line = _one_line(capsys.readouterr().err)
        assert f"jobqueue.slurm.{key}" in line and words in line, line
    assert not (tmp_path / "out").exists()


def test_a_huge_window_does_not_spin(monkeypatch):
    """map_bounded submits no more often than it has items, whatever the window says."""
    from astep_dask.run import tasks

    submitted = []

    class FakeFuture:
        def __init__(self, key, value):
            self.key, self.value = key, value

        def result(self):
            return self.value

        def cancel(self):
            pass

    class FakeClient:
        def submit(self, fn, item, pure, retries, key):
            submitted.append(item)
            return FakeFuture(key, fn(item))

    class Completed:
        def __init__(self):
            self.futures = []

        def add(self, fut):
            self.futures.append(fut)

        def count(self):
            return len(self.futures)

        def __iter__(self):
            while self.futures:
                yield self.futures.pop(0)

    monkeypatch.setattr(tasks, "as_completed", Completed)
    seen = []
    tasks.map_bounded(FakeClient(), lambda x: 2 * x, [1, 2, 3],
                      lambda item, res: seen.append(res), window=lambda: 2**63,
                      key=lambda i, item: f"t{i}")
    assert submitted == [1, 2, 3] and sorted(seen) == [2, 4, 6]


# ------------------------------------------------------------------- wrong schedulers
TIMEOUT = 3.0  # [cluster] connect_timeout of these runs


@contextmanager
def _server(handler) -> Iterator[int]:
    """A TCP server on the loopback whose connections ``handler(conn)`` serves."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    conns = []

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conns.append(conn)
            handler(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
        for c in conns:
            c.close()


@contextmanager
def _http() -> Iterator[int]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), Quiet) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            yield httpd.server_address[1]
        finally:
            httpd.shutdown()


@contextmanager
def _full_backlog() -> Iterator[int]:
    """A port whose connections get no answer: a listener that accepts nothing, its
    queue filled, so that the kernel drops further connection requests (as a firewall
    or an unroutable address does)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)
    port = sock.getsockname()[1]
    fillers = []
    for _ in range(8):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    time.sleep(0.2)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        sock.close()


@contextmanager
def _free_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def _greets(text: bytes):
    return lambda conn: conn.sendall(text)


@contextmanager
def _address(kind: str) -> Iterator[str]:
    servers = {
        "refused": _free_port(),
        "no answer": _full_backlog(),
        "http": _http(),
        "silent": _server(lambda conn: None),
        "not dask": _server(_greets(b"SSH-2.0-OpenSSH_9.2\r\n")),
    }
    if kind == "unknown host":
        yield "tcp://nosuchhost.invalid:8786"
        return
    with servers[kind] as port:
        yield f"tcp://127.0.0.1:{port}"


def _calibrate(night: Path, tmp_path: Path, *options: str) -> tuple[int, str, float]:
    settings = tmp_path / "timeout.toml"
    settings.write_text(f"[cluster]\nconnect_timeout = {TIMEOUT}\n")
    t0 = time.monotonic()
    r = subprocess.run([SCRIPT, "calibrate", str(night), "--out", str(tmp_path / "out"),
                        "--config", str(settings), *options], capture_output=True, text=True,
                       timeout=120)
    return r.returncode, r.stderr, time.monotonic() - t0


@pytest.mark.parametrize("kind, words", [
    ("refused", "refused the connection: nothing listens"),
    ("unknown host", "unknown host 'nosuchhost.invalid'"),
    ("no answer", f"no answer to a connection within {TIMEOUT:g} s"),
    ("http", "is an HTTP server, not a dask scheduler"),
    ("silent", f"did not greet as a dask scheduler within {TIMEOUT:g} s"),
    ("not dask", "answered, but not as a dask scheduler (its first bytes: 'SSH-2.0-"),
])
def test_a_wrong_scheduler_is_one_line(night, tmp_path, kind, words):
    with _address(kind) as address:
        code, err, took = _calibrate(night, tmp_path, "--scheduler", address)
    assert code == EXIT_FAILED
    line = _one_line(err)
    assert address in line and words in line, line
    # It does not hang: the probe is bounded by connect_timeout; the rest is the
    # command's start-up (imports), whatever the machine's speed within this margin.
    assert took < TIMEOUT + 30, took
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.fits"))


def test_tls_mismatches_are_one_line(night, tmp_path):
    """A tls:// address of a plain scheduler, a tcp:// address of a TLS one, and a TLS
    scheduler of another run (another CA)."""
    from distributed import LocalCluster
    from distributed.security import Security

    def security_file(sec: Security, name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file, pem in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert),
                          ("key.pem", sec.tls_client_key)):
            (folder / file).write_text(pem)
        (folder / "tls.toml").write_text('ca = "ca.pem"\ncert = "cert.pem"\nkey = "key.pem"\n')
        return folder / "tls.toml"

    ours, theirs = Security.temporary(), Security.temporary()
    ours_file = security_file(ours, "ours")
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                      protocol="tcp://") as plain, \
            LocalCluster(n_workers=0, processes=False, dashboard_address=":0",
                         security=theirs, protocol="tls://") as tls:
        cases = [
            (plain.scheduler_address.replace("tcp://", "tls://"), ["--security", ours_file],
             "does not speak TLS"),
            (tls.scheduler_address.replace("tls://", "tcp://"), [],
             "demands TLS credentials"),
            (tls.scheduler_address, ["--security", ours_file],
             "does not match our TLS credentials"),
        ]
        for address, extra, words in cases:
            code, err, took = _calibrate(night, tmp_path, "--scheduler", address,
                                         *map(str, extra))
            assert code == EXIT_FAILED, err
            line = _one_line(err)
            assert address in line and words in line, line
            assert took < TIMEOUT + 30, took
