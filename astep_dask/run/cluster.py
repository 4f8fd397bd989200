"""Where the work runs: a LocalCluster by default, any scheduler address, or an HPC batch
system through dask-jobqueue. Every path yields a ``distributed.Client``; the rest of the
pipeline does not know which one it got.

A dask scheduler runs whatever Python a connected client sends, so every cluster started
here that listens on a network port (worker processes, batch jobs) speaks TLS with mutual
authentication: a key and self-signed certificate made for this run (:func:`run_security`),
which only this run's scheduler, workers and client hold. The dashboard listens on the
loopback interface unless asked otherwise. Joining a ``--scheduler`` uses the credentials
of a security file (:func:`load_security`) or of the dask configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import socket
import ssl
import stat as stat_module
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dask
import yaml
from distributed import Client, LocalCluster
from distributed.comm import get_address_host_port, parse_address
from distributed.security import Security

from astep_dask.config import MIN_WORKER_MEMORY, ClusterSettings, machine_cores, parse_memory
from astep_dask.errors import RunError, SettingsError
from astep_dask.io.products import dead_holder, holder_record

WORKER_HTTP = "127.0.0.1:0"  # where a worker's own HTTP server listens (any free port)
# Imported by each worker process as it starts (local ones fork from a server process that
# has imported it, see _forked_workers; batch jobs' workers through dask's ``--preload``),
# not by its first task: the frame chain's imports (astropy, scipy, astroscrappy; ~2 s)
# then run while the command takes its inventory (2 local workers: the first task
# 2.1-2.4 s → 0.02 s, the start 1.0-1.6 s → 2.0-2.9 s; benchmarks/scaling.py measures
# the whole). The module also keeps a closing worker's last heartbeat off the console.
WORKER_PRELOAD = ("astep_dask.run.preload",)

__all__ = ["capacity", "check_frames_in_flight", "check_layout", "connect", "default_layout",
           "load_security", "local_cluster", "local_layout", "machine_cores", "machine_memory",
           "private_scratch", "probe_scheduler", "queue_state", "remove_stale_scratch",
           "run_security", "worker_threads"]


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


@contextmanager
def run_security(folder: str | Path | None = None) -> Iterator[Security]:
    """TLS credentials made for one run: a fresh RSA key and a self-signed certificate that
    is its own CA, for every role (scheduler, workers, nannies, client), encryption required.

    Without ``folder`` they live only in memory (a LocalCluster hands them to its worker
    processes through their pipes). With ``folder`` (for batch jobs that start on other
    nodes) they are also written there into a new private folder (0700, files 0600, the
    key never in a job script: the jobs get the paths) that is removed, with the files, on
    exit.
    """
    security = Security.temporary()
    if folder is None:
        yield security
        return
    parent = Path(os.path.expandvars(str(folder))).expanduser()
    try:
        private = Path(tempfile.mkdtemp(prefix=".astep-dask-tls-", dir=parent))  # 0700
    except OSError as exc:
        raise RunError(f"{parent}: cannot make the run's private TLS folder there: "
                       f"{exc.strerror or exc}") from None
    try:
        paths = {}
        for name, pem in (("ca.pem", security.tls_ca_file), ("cert.pem", security.tls_worker_cert),
                          ("key.pem", security.tls_worker_key)):
            # O_EXCL with mode 0600 in a fresh 0700 folder: readable by this user only, from
            # the first byte on (no atomic rename needed: nothing reads it before we return).
            fd = os.open(private / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(pem)
            paths[name] = str(private / name)
        cert, key = paths["cert.pem"], paths["key.pem"]
        yield Security(tls_ca_file=paths["ca.pem"], tls_client_cert=cert, tls_client_key=key,
                       tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert,
                       tls_worker_key=key, require_encryption=True)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def load_security(path: str | Path) -> Security:
    """Client credentials to join a TLS scheduler, from a TOML or YAML file::

        ca = "ca.pem"        # the CA that signed the scheduler's certificate
        cert = "me.pem"      # our certificate, signed by a CA the scheduler trusts
        key = "me.key"       # its private key (keep the file readable by you only)

    Relative paths are relative to the file. Raises :class:`RunError` (one line naming
    the file) when it cannot be read or lacks a key.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise RunError(f"{path}: cannot read the security file: "
                       f"{getattr(exc, 'strerror', None) or exc}".splitlines()[0]) from None
    if not isinstance(data, dict) or not all(data.get(k) for k in ("ca", "cert", "key")):
        raise RunError(f"{path}: a security file needs ca, cert and key (paths to PEM files)")
    files = {}
    for k in ("ca", "cert", "key"):
        file = (path.parent / os.path.expanduser(str(data[k])))
        if not file.is_file():
            raise RunError(f"{path}: {k} file {file} does not exist")
        files[k] = str(file)
    return Security(tls_ca_file=files["ca"], tls_client_cert=files["cert"],
                    tls_client_key=files["key"], require_encryption=True)


def _speaks_tls(address: str, timeout: float = 5.0) -> bool:
    """Whether the server at a ``tcp://`` address answers a TLS handshake (as a scheduler
    started with TLS does)."""
    try:
        host, port = get_address_host_port(address)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw) as tls:
            return tls.version() is not None
    except (OSError, ValueError):
        return False


def _tls_problem(exc: ssl.SSLError, address: str, credentials: str) -> str:
    """One line for a failed TLS handshake with the server at ``address``."""
    reason = (exc.reason or str(exc)).upper()
    if any(w in reason for w in ("WRONG_VERSION", "RECORD_LAYER", "PACKET_LENGTH",
                                 "UNEXPECTED_EOF", "HTTP_REQUEST")):
        return (f"scheduler {address} does not speak TLS (a tcp:// scheduler? then give "
                "tcp://)")
    if "CERTIFICATE_VERIFY_FAILED" in reason:
        return (f"scheduler {address} does not match our TLS credentials ({credentials}): "
                "its certificate is not signed by their CA (another cluster's scheduler, or "
                "the wrong CA file)")
    return f"scheduler {address} refused our TLS credentials ({credentials}): {exc.reason or exc}"


def _read_some(sock: socket.socket, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes from ``sock`` within ``timeout`` seconds: fewer when the peer
    closes; ``TimeoutError`` when it sends nothing at all by then."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            if data:
                return data
            raise
        if not chunk:
            return data
        data += chunk
    return data


GREETING_MAX = 64 * 1024**2  # bytes: a dask server's first message is far smaller


def probe_scheduler(address: str, security: Security, timeout: float,
                    credentials: str = "dask config") -> None:
    """Check, within ``timeout`` seconds, that a dask scheduler answers at ``address``.

    A dask server speaks first: right after the connection (and, for ``tls://``, the TLS
    handshake) it sends its handshake message, framed by an 8-byte length. The probe
    connects, reads those 8 bytes and closes. Whatever else happens is reported in one
    line naming the address: a refused connection, an unknown host, no answer (unroutable
    or filtered), an HTTP server (it waits for a request: asked once half the time has
    passed), a server that says nothing, a greeting that is not dask's, a scheduler that
    demands TLS, a TLS handshake that fails (not TLS, another CA, our credentials refused).
    Schemes other than ``tcp://`` and ``tls://`` are left to dask.

    Raises
    ------
    RunError
        What was wrong, with the address and the timeout where it matters.
    """
    scheme, _ = parse_address(address)
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = get_address_host_port(address)
    except ValueError as exc:
        raise RunError(f"scheduler {address}: not an address host:port ({exc})") from None
    setting = f"within {timeout:g} s ([cluster] connect_timeout)"
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.01, deadline - time.monotonic())

    try:
        raw = socket.create_connection((host, port), timeout=left())
    except socket.gaierror:
        raise RunError(f"scheduler {address}: unknown host {host!r}") from None
    except ConnectionRefusedError:
        raise RunError(f"scheduler {address} refused the connection: nothing listens on "
                       f"port {port} of {host}") from None
    except TimeoutError:
        raise RunError(f"scheduler {address}: no answer to a connection {setting}: "
                       "unroutable, or a firewall drops it") from None
    except OSError as exc:
        raise RunError(f"scheduler {address}: cannot connect: "
                       f"{exc.strerror or exc}") from None
    with raw:
        sock: socket.socket = raw
        try:
            if scheme == "tls":
                ctx = security.get_connection_args("client")["ssl_context"]
                raw.settimeout(left())
                sock = ctx.wrap_socket(raw)
            greeting = _read_some(sock, 8, (deadline - time.monotonic()) / 2)
        except ssl.SSLError as exc:
            raise RunError(_tls_problem(exc, address, credentials)) from None
        except TimeoutError:
            greeting = None
        except OSError as exc:
            raise RunError(f"scheduler {address}: the connection failed: "
                           f"{exc.strerror or exc}") from None
        if greeting is None:  # silent: an HTTP server waits for a request, ask it one
            try:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                answer = _read_some(sock, 8, left())
            except (TimeoutError, OSError):
                answer = b""
            if answer.startswith(b"HTTP/"):
                raise RunError(f"scheduler {address} is an HTTP server, not a dask "
                               "scheduler (a dashboard's port? schedulers listen on 8786 "
                               "by default)")
            if scheme == "tcp" and _speaks_tls(address, timeout=left()):
                raise RunError(f"scheduler {address} demands TLS credentials: give a "
                               "tls:// address and --security FILE (ca, cert, key)")
            raise RunError(f"scheduler {address} accepted the connection but did not "
                           f"greet as a dask scheduler {setting}")
    if len(greeting) < 8:
        raise RunError(f"scheduler {address} closed the connection without a dask "
                       "greeting: not a dask scheduler, or it refused us")
    if greeting.startswith(b"HTTP/"):
        raise RunError(f"scheduler {address} is an HTTP server, not a dask scheduler")
    (size,) = struct.unpack("<Q", greeting)
    if not 0 < size <= GREETING_MAX:
        shown = greeting.decode("ascii", "replace")
        raise RunError(f"scheduler {address} answered, but not as a dask scheduler "
                       f"(its first bytes: {shown!r})")


def _join(settings: ClusterSettings) -> Client:
    """A client of the running scheduler ``settings.scheduler``; :class:`RunError` (one
    line) when it cannot be joined (:func:`probe_scheduler`, within
    ``settings.connect_timeout``), saying so when it demands credentials we lack."""
    address = settings.scheduler
    scheme, _ = parse_address(address)
    if settings.security:
        security = load_security(settings.security)
    else:
        security = Security()  # from dask config: distributed.comm.tls.*
        if scheme == "tls" and not security.tls_client_cert:
            raise RunError(f"scheduler {address} demands TLS credentials and we have none: "
                           "give --security FILE (ca, cert, key), or set "
                           "distributed.comm.tls.* in the dask configuration")
    credentials = str(settings.security or "dask config")
    probe_scheduler(address, security, settings.connect_timeout, credentials)
    try:
        return Client(address, security=security, timeout=settings.connect_timeout)
    except (OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if scheme == "tls":
            raise RunError(f"scheduler {address} refused our TLS credentials "
                           f"({credentials}): {reason}") from None
        raise RunError(f"cannot join scheduler {address}: {reason}") from None


# --- the default local layout (when none is configured) -------------------------------
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
    frames) all cores as threads of one process took 43.6 s, 8 processes × 2
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


def _import_jobqueue(kind: str):
    """``dask_jobqueue``, imported without letting it take over Ctrl-C.

    Importing it runs ``signal.signal(SIGINT, lambda *_: sys.exit())`` (its
    ``runner`` module, dask-jobqueue 0.9). In any thread but the main one that raises
    ``ValueError: signal only works in main thread``; in the main one it replaces the
    command's handler, so that Ctrl-C exits with status 0 and skips the cleanup. So it is
    imported here, in the main thread, and the handler that was there is put back.
    """
    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    if threading.current_thread() is not threading.main_thread():
        raise RunError(f"--cluster {kind}: the batch cluster must be started from the main "
                       "thread (dask-jobqueue sets a signal handler as it is imported)")
    before = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:  # pragma: no cover - depends on the installation
        raise RunError(f"--cluster {kind} needs dask-jobqueue: pip install "
                       "'astep-dask[hpc]' (or dask-jobqueue)") from None
    finally:
        if before is not None:  # None: a handler not set from Python, cannot be restored
            signal.signal(signal.SIGINT, before)
    return dask_jobqueue


# Bounds of a layout against the machine (local) or the batch job (slurm, pbs), checked
# before anything starts. Oversubscribing the cores a little is allowed (benchmarks compare
# layouts on small machines), a typo is not.
THREADS_PER_CORE = 8  # worker threads (all workers) per core of the machine, at most
FRAMES_PER_THREAD = 8  # frames in flight per worker thread, at most
WORKER_FLOOR = MIN_WORKER_MEMORY  # bytes each local worker process needs at least


def _job_layout(kind: str) -> tuple[int, int, int]:
    """``(cores, processes, memory bytes)`` of one batch job, from the dask configuration
    (``jobqueue.<kind>``, e.g. deploy/jobqueue.yaml).

    Raises
    ------
    SettingsError
        When a value is missing, does not parse, or cannot hold a worker.
    """
    where = f"jobqueue.{kind}"
    try:
        cores = int(dask.config.get(f"{where}.cores"))
        processes = int(dask.config.get(f"{where}.processes", default=1) or 1)
        memory_text = dask.config.get(f"{where}.memory")
    except (KeyError, TypeError, ValueError) as exc:
        raise SettingsError(f"{where}: cores, processes and memory must be set in the dask "
                            f"configuration (deploy/jobqueue.yaml): {exc}") from None
    try:
        memory = parse_memory(str(memory_text)) or 0
    except ValueError as exc:
        raise SettingsError(f"{where}.memory: {exc}") from None
    if not 1 <= cores <= 4096:
        raise SettingsError(f"{where}.cores = {cores}: must be between 1 and 4096")
    if not 1 <= processes <= cores:
        raise SettingsError(f"{where}.processes = {processes}: must be between 1 and "
                            f"cores ({cores})")
    if memory < processes * WORKER_FLOOR:
        raise SettingsError(f"{where}.memory = {memory_text!r}: {processes} worker "
                            f"process(es) need at least {WORKER_FLOOR // 1024**2} MiB each")
    return cores, processes, memory


def check_layout(settings: ClusterSettings) -> None:
    """Refuse, before anything starts, a layout this machine or batch job cannot hold.

    The ranges of the values themselves are checked when settings are made
    (:mod:`astep_dask.config`); here they are checked against each other and the machine:

    - local workers: all their threads at most ``THREADS_PER_CORE`` per core; worker
      processes at least ``WORKER_FLOOR`` of memory each (``memory_limit`` too), and
      ``memory_limit`` × workers at most the machine's memory;
    - batch clusters: the job (``jobqueue.<kind>``: cores, processes, memory) parses and
      holds its workers;
    - ``frames_in_flight`` at most ``FRAMES_PER_THREAD`` per worker thread the cluster can
      have (for a joined ``--scheduler``, checked when its workers are known).

    Raises
    ------
    SettingsError
        One line naming the setting, its value and the bound.
    """
    if settings.scheduler:
        return
    if settings.kind in ("slurm", "pbs"):
        cores, _, _ = _job_layout(settings.kind)
        threads = cores * settings.max_jobs
    else:
        cores, memory = machine_cores(), machine_memory()
        layout = _with_default_layout(settings)
        workers, per_worker = local_layout(layout)
        threads = workers * per_worker
        if threads > THREADS_PER_CORE * cores:
            raise SettingsError(
                f"[cluster] n_workers = {workers} x threads_per_worker = {per_worker}: "
                f"{threads} threads, more than {THREADS_PER_CORE} per core of this "
                f"machine ({cores} cores; --workers, --threads)")
        limit = parse_memory(settings.memory_limit)
        if layout.processes and memory and workers * WORKER_FLOOR > memory:
            raise SettingsError(
                f"[cluster] n_workers = {workers}: worker processes need at least "
                f"{WORKER_FLOOR // 1024**2} MiB each, this machine has "
                f"{memory / 1024**3:.1f} GiB (--workers)")
        if limit and memory and workers * limit > memory:
            raise SettingsError(
                f"[cluster] memory_limit = {settings.memory_limit!r} x {workers} workers: "
                f"more than this machine's {memory / 1024**3:.1f} GiB")
    check_frames_in_flight(settings, threads)


def check_frames_in_flight(settings: ClusterSettings, threads: int) -> None:
    """Refuse ``frames_in_flight`` above ``FRAMES_PER_THREAD`` per worker thread of a
    cluster that has (or can have) ``threads`` threads (:class:`SettingsError`)."""
    most = FRAMES_PER_THREAD * max(1, threads)
    if settings.frames_in_flight > most:
        raise SettingsError(
            f"[cluster] frames_in_flight = {settings.frames_in_flight}: at most "
            f"{FRAMES_PER_THREAD} per worker thread, {most} for this cluster's {threads} "
            "threads (each frame in flight holds its memory)")


LOCAL_DASHBOARD = "127.0.0.1:8787"  # "auto" for a local cluster


def dashboard_of(settings: ClusterSettings) -> tuple[str, bool]:
    """Where a cluster we start listens for HTTP and whether it serves the dashboard there:
    ``dashboard_address`` "auto" is the loopback's port 8787 for a local cluster and no
    dashboard for a batch one (the scheduler's HTTP server, health and metrics only, then
    on a free loopback port); "off" is no dashboard anywhere."""
    address = settings.dashboard_address.strip()
    if address.lower() == "auto":
        address = "off" if settings.kind in ("slurm", "pbs") else LOCAL_DASHBOARD
    if address.lower() in ("off", "none", ""):
        return "127.0.0.1:0", False
    return address, True


def _jobqueue_cluster(settings: ClusterSettings, security: Security | None):
    dask_jobqueue = _import_jobqueue(settings.kind)
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[settings.kind]
    options = dict(dask.config.get(f"jobqueue.{settings.kind}.scheduler-options", {}) or {})
    options["dashboard_address"], options["dashboard"] = dashboard_of(settings)
    kwargs = {"security": security, "protocol": "tls://"} if security is not None else {}
    # Each worker's own HTTP server (metrics, its dashboard) on its node's loopback unless
    # worker-extra-args says otherwise (a later --dashboard-address wins).
    extra = dask.config.get(f"jobqueue.{settings.kind}.worker-extra-args", []) or []
    preload = [arg for module in WORKER_PRELOAD for arg in ("--preload", module)]
    kwargs["worker_extra_args"] = ["--dashboard-address", WORKER_HTTP, *preload, *extra]
    with dask.config.set({"distributed.scheduler.allowed-failures": settings.retries}):
        # the rest configured by dask config (jobqueue.yaml), see deploy/
        return cls(scheduler_options=options, **kwargs)


@contextmanager
def _closed_after(cluster):
    """A cluster we started, closed quietly (:func:`_close_quietly`) when the block ends.
    When the block ends with an error (a refused or never-started worker job), a failure
    to close is not allowed to replace it: dask-jobqueue's close asserts on a job still in
    its ``created`` state, and that assertion, not the batch system's words, would reach
    the user."""
    try:
        yield cluster
    except BaseException:
        try:
            _close_quietly(cluster)
        except Exception as exc:  # the error in flight is the one to report
            logging.getLogger(__name__).debug("closing the cluster after an error: %r", exc)
        raise
    _close_quietly(cluster)


class _CancelledAtClose(logging.Filter):
    """Drops the records of connections cut short while the cluster closes, which
    distributed logs although nothing went wrong: a coroutine cancelled in the scheduler
    (a worker's stream read in ``add_worker``, as a batch worker leaves during the
    shutdown; with a traceback), and a TLS handshake that a closing worker abandoned (its
    last heartbeat, cancelled; the worker's own record of it is dropped by
    :mod:`astep_dask.run.preload`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.CancelledError)
                    or "TLS handshake failed" in record.getMessage())


def _close_quietly(cluster) -> None:
    """``cluster.close()``, without distributed's records of the connections it cuts."""
    quiet = _CancelledAtClose()
    loggers = [logging.getLogger(n) for n in ("distributed.scheduler", "distributed.core",
                                              "distributed.utils", "distributed.comm.tcp")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        cluster.close()
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _dashboard_link(client: Client, settings: ClusterSettings, ours: bool) -> str:
    """The dashboard's link as it is bound: dask names the scheduler's host, but a cluster
    we start binds the dashboard to ``dashboard_address`` (the loopback by default), which
    other machines reach through an SSH tunnel to this one."""
    address, shown = dashboard_of(settings)
    if ours and not shown:
        return ("off (a batch run's by default; --dashboard-address 127.0.0.1:8787 to have "
                "it)" if settings.kind in ("slurm", "pbs") else "off")
    link = client.dashboard_link
    host = address.rpartition(":")[0].strip("[]")
    if not (ours and link and host):
        return link
    parts = urlsplit(link)
    link = urlunsplit(parts._replace(netloc=f"{host}:{parts.port}"))
    if host in ("127.0.0.1", "localhost", "::1"):
        node = socket.gethostname()
        link += f" (this machine only; from yours: ssh -N -L {parts.port}:localhost:" \
                f"{parts.port} {node}, see deploy/README.md)"
    return link


def credentials_folder(kind: str) -> Path:
    """Where a batch cluster's worker jobs find this run's credentials: dask-jobqueue's
    ``jobqueue.<kind>.shared-temp-directory`` or, unset, the current directory (as for
    its ``log-directory``). Must be on a file system that the worker nodes see."""
    folder = dask.config.get(f"jobqueue.{kind}.shared-temp-directory", default=None)
    return Path(os.path.expandvars(str(folder))).expanduser() if folder else Path.cwd()


@contextmanager
def _forked_workers() -> Iterator[None]:
    """Start local worker processes by forking them from one server process that has
    imported the frame chain (``forkserver``, preloaded with ``WORKER_PRELOAD``), rather than
    each as a fresh interpreter that imports it again (dask's default, ``spawn``).

    The imports then run once per node, not once per worker, and their pages stay shared
    between the workers until written. Measured on this 2-core machine, 2048², 24 frames,
    two interleaved runs each (``benchmarks/scaling.py`` of each version; ``run_one``):
    8 processes × 2 threads, peak PSS 3.16-3.20 → 2.59-2.64 GB, time outside the stage
    18.5-21.1 → 7.4-8.8 s; 16 × 1, peak PSS 4.09-4.14 → 2.87-2.95 GB. The forkserver is
    single-threaded when it forks, so forking it is safe. A worker that a nanny restarts
    later (after its process died) is spawned afresh, and imports the chain through dask's
    worker preload.
    """
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(["distributed", *WORKER_PRELOAD])
        yield


def _memory_limit(text: str) -> str | int | None:
    """``memory_limit`` as LocalCluster takes it: ``"auto"``, bytes, or None (no limit)."""
    size = parse_memory(text)
    return "auto" if size == 0 else size


def local_cluster(settings: ClusterSettings) -> LocalCluster:
    """A LocalCluster as ``astep-dask calibrate`` starts one (the notebooks start theirs
    with it too).

    Parameters
    ----------
    settings
        Its layout (the machine's :func:`default_layout` where none of ``processes``,
        ``n_workers``, ``threads_per_worker`` is set, then :func:`local_layout`), memory
        limit, dashboard address, worker-death ``retries`` and ``tls``.

    Returns
    -------
    LocalCluster
        Threads of this process, or worker processes forked from a server process that has
        imported the frame chain (:func:`_forked_workers`), talking TLS with credentials
        made for this cluster (:func:`run_security`) unless ``tls`` is false. The caller
        closes it.
    """
    settings = _with_default_layout(settings)
    workers, threads = local_layout(settings)
    tls = {}
    if settings.processes and settings.tls:
        with run_security() as security:  # in memory only: nothing to remove afterwards
            tls = {"security": security, "protocol": "tls://"}
    dashboard_address, shown = dashboard_of(settings)
    with _forked_workers() if settings.processes else nullcontext():
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=settings.processes,
            memory_limit=_memory_limit(settings.memory_limit),
            dashboard_address=dashboard_address,
            scheduler_kwargs={"allowed_failures": settings.retries, "dashboard": shown},
            # in-process workers' HTTP servers would listen on every interface
            worker_dashboard_address=None if settings.processes else WORKER_HTTP,
            preload=list(WORKER_PRELOAD) if settings.processes else [],
            **tls,
        )


SCRATCH_PREFIX = "astep-dask-"  # a run's scratch folder: this, then mkdtemp's random part
SCRATCH_OWNER = ".owner"  # in it: the run's holder record ("host pid", io.products)


def remove_stale_scratch(parent: Path) -> list[Path]:
    """Remove the scratch folders that runs on this machine left in ``parent`` when they
    were killed (SIGKILL, the out-of-memory killer, a batch system's time limit: no
    clean-up of theirs ran), and return them.

    Only folders named like ours (``SCRATCH_PREFIX``), owned by this user, not links, whose
    :data:`SCRATCH_OWNER` record names a dead process of this machine
    (:func:`~astep_dask.io.products.dead_holder`, as for an output folder's lock); a folder
    without one (made before it was written, or by anything else) is never touched.
    """
    gone: list[Path] = []
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith(SCRATCH_PREFIX)]
    except OSError:
        return gone
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat_module.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
                    or not dead_holder((Path(entry.path) / SCRATCH_OWNER).read_text()):
                continue
        except (OSError, UnicodeDecodeError):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        gone.append(Path(entry.path))
    return gone


@contextmanager
def private_scratch(log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """A scratch folder of this run's own (``mkdtemp``: mode 0700, a random name), made
    in dask's ``temporary-directory`` (else the system's temporary folder) and removed
    with everything in it on exit.

    Every dask server (scheduler, worker, nanny) puts its scratch folder on ``sys.path``;
    dask's default, ``$TMPDIR/dask-scratch-space``, may have been made by another user of
    a shared machine, world-writable, with modules planted in it that our processes would
    then import. So the run's servers get this folder instead. It records the run's host
    and process (:data:`SCRATCH_OWNER`), so that the next run removes it if this one is
    killed before it can (:func:`remove_stale_scratch`; ``log`` says so).

    Raises
    ------
    RunError
        When a configured ``temporary-directory`` is not ours, or others may write in it
        (group or world-writable without the sticky bit), or a folder cannot be made.
    """
    configured = dask.config.get("temporary-directory", default=None)
    parent = Path(os.path.expandvars(str(configured))).expanduser() if configured \
        else Path(tempfile.gettempdir())
    if configured:
        try:
            st = parent.stat()
        except OSError as exc:
            raise RunError(f"temporary-directory {parent}: {exc.strerror or exc}") from None
        others = st.st_mode & 0o022 and not st.st_mode & stat_module.S_ISVTX
        if st.st_uid != os.getuid() or others:
            raise RunError(f"temporary-directory {parent}: refused: "
                           + ("not yours" if st.st_uid != os.getuid()
                              else "others may write in it")
                           + " (a scratch folder's modules are importable by the workers)")
    stale = remove_stale_scratch(parent)
    if stale and log is not None:
        log(f"removed {len(stale)} scratch folder(s) in {parent} left by killed runs")
    try:
        folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=parent))
    except OSError as exc:
        raise RunError(f"{parent}: cannot make the run's scratch folder there: "
                       f"{exc.strerror or exc}") from None
    try:
        (folder / SCRATCH_OWNER).write_text(holder_record())
        with dask.config.set({"temporary-directory": str(folder)}):
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def connect(settings: ClusterSettings, log: Callable[[str], None] = print) -> Iterator[Client]:
    """A client for the configured cluster, closed (with any cluster it started) on exit.

    ``scheduler`` set: join that running scheduler. ``kind`` ``local``: start a
    LocalCluster sized to the machine (:func:`local_cluster`), its workers threads of this
    process unless ``processes``.
    ``slurm``/``pbs``: start a dask-jobqueue cluster from dask configuration, scaling adaptively.

    A cluster started here retries a task whose worker died ``retries`` times
    (the scheduler's ``allowed-failures``) before failing it; a joined scheduler keeps
    its own setting. Errors raised by a task are never retried: they would recur.

    Worker processes and batch jobs talk TLS with credentials made for this run
    (:func:`run_security`; ``tls = false`` turns it off, for measurements only); a batch
    cluster's credential files are removed after it closes. In-process workers need none.
    The dashboard listens where :func:`dashboard_of` says (a local cluster's on the
    loopback by default, a batch cluster's off).
    """
    with ExitStack() as stack:
        cluster = None
        stack.enter_context(private_scratch(log))  # before any dask server is made
        if settings.scheduler:
            client = stack.enter_context(_join(settings))
            log(f"joined scheduler {settings.scheduler}")
            threads = sum(w.get("nthreads", 1) for w in
                          client.scheduler_info().get("workers", {}).values())
            if threads:
                check_frames_in_flight(settings, threads)
        elif settings.kind == "local":
            cluster = stack.enter_context(_closed_after(local_cluster(settings)))
            client = stack.enter_context(Client(cluster, security=cluster.security))
        elif settings.kind in ("slurm", "pbs"):
            security = (stack.enter_context(run_security(credentials_folder(settings.kind)))
                        if settings.tls else None)
            cluster = stack.enter_context(_closed_after(_jobqueue_cluster(settings,
                                                                          security)))
            client = stack.enter_context(Client(cluster, security=cluster.security))
            log(f"dask dashboard: {_dashboard_link(client, settings, True)}")
            _await_first_job(client, cluster, settings, log)
            yield client
            return
        else:
            raise ValueError(f"unknown cluster kind {settings.kind!r} (local, slurm, pbs)")
        log(f"dask dashboard: {_dashboard_link(client, settings, cluster is not None)}")
        yield client


# Messages of dask-jobqueue when the batch system refuses a job: logged (with a traceback)
# by the event loop that ran the submission, never raised to us.
_REFUSED = "Command exited with non-zero exit code"


class _JobErrors(logging.Filter):
    """A logging filter that keeps the batch system's refusals that dask-jobqueue logs
    while a cluster starts, and keeps their tracebacks off the console: the run reports
    them in one line."""

    def __init__(self) -> None:
        super().__init__()
        self.refusals: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = str(exc) if exc is not None else record.getMessage()
        if _REFUSED in text:
            self.refusals.append(text)
            return False
        return True


def _refusal_line(text: str) -> str:
    """The batch system's own words from dask-jobqueue's message (its stderr part)."""
    err = text.split("stderr:", 1)[-1].strip().splitlines()
    return "; ".join(line.strip() for line in err if line.strip())[:300] or text.splitlines()[0]


def queue_state(kind: str, job_ids: list[str]) -> str:
    """What ``squeue`` (SLURM) or ``qstat`` (PBS) says of these jobs, in one line."""
    if not job_ids:
        return "no job was submitted"
    cmd = (["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"] if kind == "slurm"
           else ["qstat", *job_ids])
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]} did not answer ({exc})"
    lines = [ln.strip() for ln in (run.stdout or run.stderr).splitlines() if ln.strip()]
    if kind == "pbs":
        lines = lines[2:] or lines  # qstat's two header lines
    elif run.stdout:
        lines = [f"job {i} {st} ({why.strip()})" for i, st, why in
                 ([*ln.split(None, 2), "", ""][:3] for ln in lines)]
    return f"{cmd[0]}: " + ("; ".join(lines[:5]) if lines else "the jobs are not queued "
                            "(ended or cancelled)")


def _await_first_job(client: Client, cluster, settings: ClusterSettings,
                     log: Callable[[str], None]) -> None:
    """Wait until the batch cluster's first worker has joined, so that a batch system that
    refuses the job or never starts it is reported instead of waited on for ever.

    The cluster asks for at least one job while it waits (adaptive scaling asks for none
    before there is work), then scales as configured. Every minute a line says what the
    queue says of the jobs.

    Raises
    ------
    RunError
        One line: the batch system's refusal, or how long we waited
        (``job_start_timeout``) and what ``squeue``/``qstat`` said.
    """
    kind, timeout = settings.kind, settings.job_start_timeout
    catcher = _JobErrors()
    loggers = [logging.getLogger(n) for n in ("tornado.application", "distributed",
                                              "dask_jobqueue")]
    for logger in loggers:
        logger.addFilter(catcher)
    cluster.adapt(minimum_jobs=max(1, settings.min_jobs), maximum_jobs=settings.max_jobs)
    t0 = time.monotonic()
    note = t0 + 60
    try:
        while not client.scheduler_info().get("workers"):
            waited = time.monotonic() - t0
            if catcher.refusals:
                raise RunError(f"--cluster {kind}: the batch system refused the worker job: "
                               f"{_refusal_line(catcher.refusals[0])}")
            ids = [str(j.job_id) for j in cluster.workers.values()
                   if getattr(j, "job_id", None)]
            if timeout and waited > timeout:
                raise RunError(f"--cluster {kind}: no worker job started in {waited:.0f} s "
                               f"([cluster] job_start_timeout); {queue_state(kind, ids)}")
            if time.monotonic() > note:
                log(f"waiting for the first worker job ({waited:.0f} s): "
                    f"{queue_state(kind, ids)}")
                note += 60
            time.sleep(0.5)
    finally:
        for logger in loggers:
            logger.removeFilter(catcher)
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)


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
