"""Every command on every way of getting workers, run as a user runs it.

The installed console script ``astep-dask`` runs as a subprocess, one command after the
other (``calibrate``, ``kbmod``, ``search``, ``report`` on one night; ``season`` on a root of
two nights), once per kind of cluster:

- ``threads``: the local default (no layout option: on up to 4 cores, threads of the
  command's own process); the reference run;
- ``processes``: ``--processes --workers 2 --threads 1`` (local worker processes, TLS);
- ``tls-scheduler``: ``--scheduler tls://... --security FILE``, a running scheduler and
  worker started here with credentials made for the run (``dask scheduler`` / ``dask
  worker`` command lines, as a user starts them);
- ``slurm``: ``--cluster slurm`` with ``DASK_CONFIG=deploy/jobqueue.yaml``, sized down to
  this machine through dask's own variables, as deploy/README.md says; needs a SLURM
  controller that answers (``deploy/ci/start-slurm.sh``).

Per command: exit code and wall time. Per kind: the products' fingerprint
(:func:`fingerprint`: the data of every FITS image HDU, the CSV files, and the JSON
reports without times and paths), which must equal the reference's::

    python benchmarks/command_matrix.py                 # every kind this machine can run
    python benchmarks/command_matrix.py --kinds threads,processes --out matrix.json

``tests/run/test_matrix.py`` runs the same matrix and asserts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KINDS = ("threads", "processes", "tls-scheduler", "slurm")
NIGHT_COMMANDS = ("calibrate", "kbmod", "search", "report")
DATE = "2026-06-15"
SEASON_DATES = ("2026-07-01", "2026-07-02")


def console_script() -> str:
    """The installed ``astep-dask`` beside this interpreter (the one users run)."""
    script = Path(sys.executable).with_name("astep-dask")
    if not script.exists():
        raise SystemExit(f"{script}: not installed (pip install -e .)")
    return str(script)


def make_data(root: Path) -> dict[str, Path]:
    """A 128² night of 6 science frames (stars enough for the KBMOD export and search),
    and a season root of two 64² nights of 3 frames."""
    from astep_dask.testing.simulate import SimConfig, simulate_night

    night = simulate_night(root / "archive", SimConfig(size=128, n_science=6, n_darks=3,
                                                       n_flats=3, seed=11))
    season = root / "season"
    for i, date in enumerate(SEASON_DATES):
        simulate_night(season, dataclasses.replace(SimConfig(), date=date, size=64,
                                                   n_science=3, n_darks=3, n_flats=3,
                                                   seed=20 + i))
    return {"night": night, "season": season}


@dataclasses.dataclass
class Kind:
    """How one kind of cluster is asked for: options and environment of every command."""

    name: str
    options: list[str]
    env: dict[str, str]


@contextmanager
def tls_scheduler(folder: Path, threads: int = 2) -> Iterator[tuple[str, Path]]:
    """A running dask scheduler and one worker of ``threads`` threads, both demanding TLS
    with a key and certificate made here; yields the scheduler's address and a security
    file (ca, cert, key) for ``astep-dask --security``. Both are stopped on exit."""
    from distributed.security import Security

    folder.mkdir(parents=True, exist_ok=True)
    sec = Security.temporary()
    for name, pem in (("ca.pem", sec.tls_ca_file), ("cert.pem", sec.tls_client_cert),
                      ("key.pem", sec.tls_client_key)):
        path = folder / name
        path.write_text(pem)
        path.chmod(0o600)
    security = folder / "tls.toml"
    security.write_text('ca = "ca.pem"\ncert = "cert.pem"\nkey = "key.pem"\n')
    tls = ["--tls-ca-file", str(folder / "ca.pem"), "--tls-cert", str(folder / "cert.pem"),
           "--tls-key", str(folder / "key.pem")]
    info = folder / "scheduler.json"
    logs = [(folder / f"{n}.log").open("w") for n in ("scheduler", "worker")]
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--protocol", "tls",
             "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(info), *tls], stdout=logs[0], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not info.exists():
            raise RuntimeError(f"the TLS scheduler did not start: {folder / 'scheduler.log'}")
        address = json.loads(info.read_text())["address"]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
             "--nthreads", str(threads), "--host", "127.0.0.1", "--dashboard-address",
             "127.0.0.1:0", "--local-directory", str(folder / "scratch"), *tls],
            stdout=logs[1], stderr=subprocess.STDOUT))
        _wait_for_worker(address, security)
        yield address, security
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()


def _wait_for_worker(address: str, security_file: Path, timeout: float = 60) -> None:
    from distributed import Client

    from astep_dask.run.cluster import load_security

    with Client(address, security=load_security(security_file), timeout=30) as client:
        client.wait_for_workers(1, timeout=timeout)


def slurm_env(folder: Path, name: str) -> dict[str, str]:
    """Environment of a ``--cluster slurm`` run: deploy/jobqueue.yaml, jobs sized down to
    1 core and 1 GiB through dask's variables, the loopback, this interpreter."""
    return {
        "DASK_CONFIG": str(REPO / "deploy" / "jobqueue.yaml"),
        "ASTEP_DASK_ENV": sys.prefix,
        "DASK_JOBQUEUE__SLURM__NAME": name,
        "DASK_JOBQUEUE__SLURM__CORES": "1",
        "DASK_JOBQUEUE__SLURM__PROCESSES": "1",
        "DASK_JOBQUEUE__SLURM__MEMORY": "1 GiB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "00:15:00",
        "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
        "DASK_JOBQUEUE__SLURM__PYTHON": sys.executable,
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(folder / "worker-logs"),
        "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": "['--lifetime', '12m', "
                                                   "'--lifetime-stagger', '30s']",
    }


def slurm_ready() -> str:
    """Why the SLURM kind cannot run here, or "" when a controller answers."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (SLURM client not installed)"
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                             timeout=15).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"scontrol ping failed: {exc}"
    return "" if "UP" in out else f"no SLURM controller answers ({out.strip() or 'no output'})"


@contextmanager
def kind_setup(kind: str, folder: Path) -> Iterator[Kind]:
    """The options and environment of one kind (starting what it needs, see the module
    docstring), for commands whose output goes under ``folder``."""
    dashboard = ["--dashboard-address", "127.0.0.1:0"]
    if kind == "threads":
        yield Kind(kind, dashboard, {})
    elif kind == "processes":
        yield Kind(kind, [*dashboard, "--processes", "--workers", "2", "--threads", "1"], {})
    elif kind == "tls-scheduler":
        with tls_scheduler(folder / "tls") as (address, security):
            yield Kind(kind, ["--scheduler", address, "--security", str(security)], {})
    elif kind == "slurm":
        settings = folder / "slurm.toml"
        folder.mkdir(parents=True, exist_ok=True)
        settings.write_text("[cluster]\nmin_jobs = 0\nmax_jobs = 1\njob_start_timeout = 300\n")
        name = f"astep-matrix-{os.getpid()}"
        yield Kind(kind, [*dashboard, "--cluster", "slurm", "--config", str(settings)],
                   slurm_env(folder, name))
    else:
        raise ValueError(f"unknown kind {kind!r} ({', '.join(KINDS)})")


def run_kind(kind: Kind, data: dict[str, Path], out: Path, cwd: Path) -> list[dict]:
    """Run every command with ``kind``'s options; one row per command: its arguments,
    exit code, wall time, and the tail of what it printed."""
    env = {**os.environ, **kind.env}
    if kind.name != "slurm":
        env.pop("DASK_CONFIG", None)
    rows = []
    jobs = [(c, [c, str(data["night"]), "--out", str(out / "night")]) for c in NIGHT_COMMANDS]
    jobs.append(("season", ["season", str(data["season"]), "--out", str(out / "season")]))
    for command, argv in jobs:
        argv = [console_script(), *argv, *kind.options]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd,
                              timeout=600)
        rows.append({"kind": kind.name, "command": command, "rc": proc.returncode,
                     "seconds": round(time.perf_counter() - t0, 2), "argv": argv,
                     "stdout": proc.stdout[-3000:], "stderr": proc.stderr[-3000:]})
    return rows


# Keys of the JSON reports that are not the product: when and how long (any key holding
# one of _TIMING), where, by whom and as which files (_PLACE), and how the work was cut into tasks
# (_EXECUTION: the search's task count and the raw candidates and trajectories its tasks
# kept, which follow the number of worker threads; its candidates do not).
_TIMING = ("seconds", "generated", "started", "finished", "t_", "time")
_PLACE = {"worker", "worker_threads", "host", "pid", "versions", "cluster", "provenance",
          "provenance_registered",
          # the manifest's file index (inodes, times) and the products' file digests
          # (their headers hold the date they were written)
          "files", "product_digest"}
_EXECUTION = {"tasks", "n_raw", "tested"}


def _stable(value: Any, out: str, key: str = "") -> Any:
    """A JSON value without the keys that are not the product, and with the output
    folder ``out`` written as ``OUT``, recursively."""
    if isinstance(value, dict):
        return {k: _stable(v, out, k) for k, v in sorted(value.items())
                if k not in _PLACE | _EXECUTION and not any(w in k for w in _TIMING)}
    if isinstance(value, list):
        return [_stable(v, out, key) for v in value]
    if isinstance(value, str):
        return value.replace(out, "OUT")
    return value


def fingerprint(out: Path) -> dict[str, str]:
    """What must not depend on the cluster: a digest per FITS image HDU's data, per CSV
    file and per JSON report (:func:`_stable`), by path relative to ``out``."""
    from astropy.io import fits

    prints: dict[str, str] = {}
    for path in sorted(out.rglob("*")):
        rel = str(path.relative_to(out))
        if path.name.startswith(".") or not path.is_file() or "/." in rel:
            continue
        if path.suffix == ".fits":
            with fits.open(path) as hdul:
                for i, hdu in enumerate(hdul):
                    if hdu.is_image and hdu.data is not None:
                        digest = hashlib.sha256(hdu.data.tobytes()).hexdigest()[:16]
                        prints[f"{rel}[{hdu.name or i}]"] = digest
        elif path.suffix == ".csv":
            prints[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        elif path.suffix == ".json":
            text = json.dumps(_stable(json.loads(path.read_text()), str(out)), sort_keys=True)
            prints[rel] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def differences(reference: dict[str, str], other: dict[str, str]) -> list[str]:
    """Products missing from, added to, or different in ``other``."""
    return [f"{k}: {'missing' if k not in other else 'extra' if k not in reference else 'differs'}"
            for k in sorted(set(reference) | set(other)) if reference.get(k) != other.get(k)]


def main(argv: list[str] | None = None) -> int:
    """Run the matrix, print a table of wall times and whether products match."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated, of " +
                   ", ".join(KINDS))
    p.add_argument("--workdir", type=Path, help="where data and outputs go (default: temp)")
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="astep-matrix-"))
    data = make_data(work / "data")
    rows, prints = [], {}
    for kind in ["threads", *[k for k in kinds if k != "threads"]]:
        if kind == "slurm" and (why := slurm_ready()):
            print(f"{kind}: skipped: {why}")
            continue
        out = work / kind
        with kind_setup(kind, work / f"{kind}-setup") as setup:
            rows += run_kind(setup, data, out, cwd=work)
        prints[kind] = fingerprint(out)
    print(f"{'kind':<14} " + " ".join(f"{c:>10}" for c in (*NIGHT_COMMANDS, "season"))
          + "  products")
    for kind, fp in prints.items():
        mine = {r["command"]: r for r in rows if r["kind"] == kind}
        cells = " ".join(f"{mine[c]['seconds']:>7.1f} s" if mine[c]["rc"] == 0
                         else f"{'rc ' + str(mine[c]['rc']):>10}"
                         for c in (*NIGHT_COMMANDS, "season"))
        diff = differences(prints["threads"], fp)
        print(f"{kind:<14} {cells}  {'identical' if not diff else f'{len(diff)} differ'}"
              f" ({len(fp)} products)")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
