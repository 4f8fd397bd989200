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

import dataclasses
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
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

from astep_dask.config import ClusterSettings, machine_cores
from astep_dask.errors import RunError

WORKER_HTTP = "127.0.0.1:0"  # where a worker's own HTTP server listens (any free port)
# Imported by each worker process as it starts (local ones fork from a server process that
# has imported it, see _forked_workers; batch jobs' workers through dask's ``--preload``),
# not by its first task: the frame chain's imports (astropy, scipy, astroscrappy; ~2 s)
# then run while the command takes its inventory (2 local workers: the first task
# 2.1-2.4 s → 0.02 s, the start 1.0-1.6 s → 2.0-2.9 s; benchmarks/scaling.py measures
# the whole).
WORKER_PRELOAD = ("astep_dask.run.frames",)

__all__ = ["capacity", "connect", "default_layout", "load_security", "local_cluster",
           "local_layout", "machine_cores", "machine_memory", "run_security", "worker_threads"]


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


JOIN_TIMEOUT = 10  # s: a scheduler that does not answer by then is reported as unreachable


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


def _join(settings: ClusterSettings) -> Client:
    """A client of the running scheduler ``settings.scheduler``; :class:`RunError` (one
    line) when it cannot be joined, saying so when it demands credentials we lack."""
    address = settings.scheduler
    scheme, _ = parse_address(address)
    hint = ("give a tls:// address and --security FILE (ca, cert, key), or set "
            "distributed.comm.tls.* in the dask configuration")
    if settings.security:
        security = load_security(settings.security)
    else:
        security = Security()  # from dask config: distributed.comm.tls.*
        if scheme == "tls" and not security.tls_client_cert:
            raise RunError(f"scheduler {address} demands TLS credentials and we have none: "
                           "give --security FILE (ca, cert, key), or set "
                           "distributed.comm.tls.* in the dask configuration")
    try:
        return Client(address, security=security, timeout=JOIN_TIMEOUT)
    except (OSError, ValueError, TypeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if scheme == "tcp" and _speaks_tls(address):
            raise RunError(f"scheduler {address} demands TLS credentials: {hint}") from None
        if scheme == "tls":
            raise RunError(f"scheduler {address} refused our TLS credentials "
                           f"({settings.security or 'dask config'}): {reason}") from None
        raise RunError(f"cannot join scheduler {address}: {reason}") from None


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


def _jobqueue_cluster(settings: ClusterSettings, security: Security | None):
    dask_jobqueue = _import_jobqueue(settings.kind)
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[settings.kind]
    options = dict(dask.config.get(f"jobqueue.{settings.kind}.scheduler-options", {}) or {})
    options["dashboard_address"] = settings.dashboard_address
    kwargs = {"security": security, "protocol": "tls://"} if security is not None else {}
    # Each worker's own HTTP server (metrics, its dashboard) on its node's loopback unless
    # worker-extra-args says otherwise (a later --dashboard-address wins).
    extra = dask.config.get(f"jobqueue.{settings.kind}.worker-extra-args", []) or []
    preload = [arg for module in WORKER_PRELOAD for arg in ("--preload", module)]
    kwargs["worker_extra_args"] = ["--dashboard-address", WORKER_HTTP, *preload, *extra]
    with dask.config.set({"distributed.scheduler.allowed-failures": settings.retries}):
        # the rest configured by dask config (jobqueue.yaml), see deploy/
        cluster = cls(scheduler_options=options, **kwargs)
    cluster.adapt(minimum_jobs=settings.min_jobs, maximum_jobs=settings.max_jobs)
    return cluster


def _dashboard_link(client: Client, settings: ClusterSettings, ours: bool) -> str:
    """The dashboard's link as it is bound: dask names the scheduler's host, but a cluster
    we start binds the dashboard to ``dashboard_address`` (the loopback by default), which
    other machines reach through an SSH tunnel to this one."""
    link = client.dashboard_link
    host = settings.dashboard_address.rpartition(":")[0].strip("[]")
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
    with _forked_workers() if settings.processes else nullcontext():
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=settings.processes,
            memory_limit=settings.memory_limit,
            dashboard_address=settings.dashboard_address,
            scheduler_kwargs={"allowed_failures": settings.retries},
            # in-process workers' HTTP servers would listen on every interface
            worker_dashboard_address=None if settings.processes else WORKER_HTTP,
            preload=list(WORKER_PRELOAD) if settings.processes else [],
            **tls,
        )


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
    The dashboard listens on ``dashboard_address`` (loopback by default).
    """
    with ExitStack() as stack:
        cluster = None
        if settings.scheduler:
            client = _join(settings)
            log(f"joined scheduler {settings.scheduler}")
        elif settings.kind == "local":
            cluster = local_cluster(settings)
            client = Client(cluster, security=cluster.security)
        elif settings.kind in ("slurm", "pbs"):
            security = (stack.enter_context(run_security(credentials_folder(settings.kind)))
                        if settings.tls else None)
            cluster = _jobqueue_cluster(settings, security)
            client = Client(cluster, security=cluster.security)
        else:
            raise ValueError(f"unknown cluster kind {settings.kind!r} (local, slurm, pbs)")
        try:
            log(f"dask dashboard: {_dashboard_link(client, settings, cluster is not None)}")
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
