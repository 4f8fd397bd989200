"""The HPC path on a real batch system: dask-jobqueue workers started through SLURM.

Needs ``sbatch`` on PATH and a SLURM controller that answers. When none answers and we are
root, ``deploy/ci/start-slurm.sh`` starts a single-node SLURM on localhost (what
``.ci/run`` does); when that cannot be done the SLURM tests are skipped with the reason.
The cluster is configured from ``deploy/jobqueue.yaml`` itself, only sized down (1 core and
1 GiB per job, short walltime and lifetime), so the deployed configuration is what runs.

The job-script tests need only dask-jobqueue and run everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow  # whole nights end to end

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
JOBQUEUE_YAML = DEPLOY / "jobqueue.yaml"
START_SLURM = DEPLOY / "ci" / "start-slurm.sh"
SLURM_DIR = Path(os.environ.get("ASTEP_SLURM_DIR", "/tmp/astep-slurm"))

dask_jobqueue = pytest.importorskip("dask_jobqueue", reason="dask-jobqueue not installed")

needs_sbatch = pytest.mark.skipif(
    shutil.which("sbatch") is None, reason="no sbatch on PATH (SLURM client not installed)"
)


# --- configuration -------------------------------------------------------------------------


def deployed(kind: str) -> dict:
    """The ``jobqueue.<kind>`` section of deploy/jobqueue.yaml."""
    return yaml.safe_load(JOBQUEUE_YAML.read_text())["jobqueue"][kind]


def small(kind: str, name: str, log_dir: Path) -> dict:
    """deploy/jobqueue.yaml sized for this 2-core machine: 1 worker of 1 core per job."""
    cfg = deployed(kind)
    args = list(cfg["worker-extra-args"])
    args[args.index("--lifetime") + 1] = "8m"  # walltime 10 min: retire before it
    args[args.index("--lifetime-stagger") + 1] = "30s"
    cfg.update(
        {
            "name": name,
            "cores": 1,
            "processes": 1,
            "memory": "1 GiB",
            "walltime": "00:10:00",
            "python": sys.executable,
            "interface": "lo",  # scheduler and workers on the loopback only
            "log-directory": str(log_dir),
            "worker-extra-args": args,
            "scheduler-options": {**cfg["scheduler-options"], "dashboard_address": ":0"},
        }
    )
    return cfg


def dask_settings(kind: str, cfg: dict) -> dict:
    """Flat keys for dask.config.set: setting a whole section would drop the defaults."""
    return {f"jobqueue.{kind}.{key}": value for key, value in cfg.items()}


def test_deployed_config_is_complete():
    """Both sections carry the settings the deployment relies on."""
    for kind in ("slurm", "pbs"):
        cfg = deployed(kind)
        for key in ("cores", "processes", "memory", "walltime", "local-directory",
                    "job-script-prologue", "worker-extra-args", "log-directory"):
            assert cfg.get(key) is not None, f"jobqueue.{kind}.{key} missing"
        args = cfg["worker-extra-args"]
        assert "--lifetime" in args and "--lifetime-stagger" in args
        assert "--lifetime-restart" not in args
        assert any("ASTEP_DASK_ENV" in line for line in cfg["job-script-prologue"])


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_job_scripts_from_deployed_config(kind, monkeypatch, tmp_path):
    """The job script built from deploy/jobqueue.yaml: resources, prologue, lifetime."""
    import dask

    monkeypatch.chdir(tmp_path)  # log-directory is created relative to the cwd
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
    cfg = deployed(kind)
    overrides = {"interface": "lo", "scheduler-options": {"dashboard_address": ":0"}}
    with dask.config.set(dask_settings(kind, {**cfg, **overrides})):
        cluster = cls()
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    if kind == "slurm":
        assert "#SBATCH --cpus-per-task=8" in script
        assert "#SBATCH --mem=32G" in script
        assert "#SBATCH -t 02:00:00" in script
    else:
        assert "#PBS -l select=1:ncpus=8:mem=32GB" in script
        assert "#PBS -l walltime=02:00:00" in script
        assert "#PBS -V" in script
    # processes of 2 threads, the local default above 4 cores (issue 16)
    assert "--nworkers 4" in script and "--nthreads 2" in script
    assert "--memory-limit 8.00GiB" in script
    assert "--lifetime 105m --lifetime-stagger 5m" in script
    assert "--local-directory $ASTEP_SCRATCH" in script
    prologue = script.index('. "$ASTEP_DASK_ENV/bin/activate"')
    assert prologue < script.index("distributed.cli.dask_worker")
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_job_workers_import_the_frame_chain_as_they_start(kind, monkeypatch, tmp_path):
    """The clusters we start put the worker preload on the job's command line, before
    the deployed worker arguments (issue 16)."""
    import dask

    from astep_dask.config import ClusterSettings
    from astep_dask.run.cluster import _jobqueue_cluster

    monkeypatch.chdir(tmp_path)
    overrides = {"interface": "lo", "scheduler-options": {"dashboard_address": ":0"}}
    with dask.config.set(dask_settings(kind, {**deployed(kind), **overrides})):
        cluster = _jobqueue_cluster(ClusterSettings(kind=kind, dashboard_address=":0",
                                                    min_jobs=0, max_jobs=1), None)
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
    assert "--preload astep_dask.run.preload" in script
    assert script.index("--preload") < script.index("--lifetime")


# --- the localhost SLURM ---------------------------------------------------------------------


def _controller_up() -> bool:
    try:
        out = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=15
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "UP" in out


def _squeue(name: str) -> dict[str, str]:
    """job id -> state of our jobs (by job name)."""
    out = subprocess.run(
        ["squeue", "-h", "-n", name, "-o", "%i %T"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def _wait_gone(name: str, timeout: float = 60.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    left = _squeue(name)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _squeue(name)
    return left


@pytest.fixture(scope="module")
def slurm():
    """A SLURM controller that answers, started on localhost when needed and possible."""
    with pytest.MonkeyPatch.context() as mp:
        why = ""
        if not _controller_up() and (SLURM_DIR / "slurm.conf").exists():
            mp.setenv("SLURM_CONF", str(SLURM_DIR / "slurm.conf"))
        if not _controller_up():
            if os.geteuid() != 0:
                why = "not root, cannot start a localhost SLURM"
            else:
                run = subprocess.run(
                    ["bash", str(START_SLURM)], capture_output=True, text=True, timeout=180
                )
                why = run.stderr.strip()[-600:]
                if run.returncode == 0 and (SLURM_DIR / "slurm.conf").exists():
                    mp.setenv("SLURM_CONF", str(SLURM_DIR / "slurm.conf"))
        if not _controller_up():
            pytest.skip(f"no SLURM controller answers: {why or 'scontrol ping failed'}")
        idle = subprocess.run(
            ["sinfo", "-h", "-o", "%C"], capture_output=True, text=True, timeout=30
        ).stdout.split()
        free = sum(int(line.split("/")[1]) for line in idle) if idle else 0
        if free < 2:
            pytest.skip(f"SLURM has {free} idle CPUs, the test needs 2 (sinfo %C: {idle})")
        yield


@needs_sbatch
def test_slurm_cluster_runs_dask_work(slurm, tmp_path, monkeypatch):
    """SLURMCluster from deploy/jobqueue.yaml: 2 jobs start, compute, and leave squeue."""
    import dask
    import dask.array as da
    from distributed import Client

    monkeypatch.setenv("ASTEP_DASK_ENV", sys.prefix)  # what the prologue activates
    name = f"astep-test-{uuid.uuid4().hex[:6]}"
    cfg = small("slurm", name, tmp_path / "logs")
    with dask.config.set(dask_settings("slurm", cfg)):
        cluster = dask_jobqueue.SLURMCluster()
        try:
            script = cluster.job_script()
            assert f"{sys.executable} -m distributed.cli.dask_worker" in script
            assert "--lifetime 8m --lifetime-stagger 30s" in script
            cluster.scale(jobs=2)
            with Client(cluster) as client:
                client.wait_for_workers(2, timeout=120)
                jobs = _squeue(name)
                assert len(jobs) == 2, jobs
                assert set(jobs.values()) == {"RUNNING"}, jobs
                assert set(jobs) == {job.job_id for job in cluster.workers.values()}

                assert client.submit(lambda x: x + 1, 1).result() == 2
                total = da.ones((200, 200), chunks=50).sum().compute(scheduler=client)
                assert total == 40_000

                # the workers live in those SLURM jobs, in the activated environment
                env = client.run(
                    lambda: {
                        k: os.environ.get(k)
                        for k in ("SLURM_JOB_ID", "VIRTUAL_ENV", "OMP_NUM_THREADS")
                    }
                )
                assert {e["SLURM_JOB_ID"] for e in env.values()} == set(jobs)
                assert {e["OMP_NUM_THREADS"] for e in env.values()} == {"1"}
                if (Path(sys.prefix) / "bin" / "activate").exists():
                    assert {e["VIRTUAL_ENV"] for e in env.values()} == {sys.prefix}
        finally:
            cluster.close()
    left = _wait_gone(name)
    assert not left, f"jobs still queued after close: {left}"


def _tiny_season(root: Path, dates: tuple[str, ...] = ("2026-07-01", "2026-07-02")) -> Path:
    from astep_dask.testing.simulate import SimConfig, simulate_night

    for i, date in enumerate(dates):
        simulate_night(root, dataclasses.replace(SimConfig(), date=date, size=64, n_science=3,
                                                 n_darks=3, n_flats=3, seed=30 + i))
    return root


@needs_sbatch
def test_season_batch_script_runs_driver_and_workers(slurm, tmp_path):
    """deploy/season.sbatch as a user submits it: the job runs the installed
    ``astep-dask season ROOT --cluster slurm`` (the driver, with the scheduler inside the
    allocation), which submits its worker job from there; every night is calibrated and
    nothing is left in the queue."""
    name = f"astep-test-{uuid.uuid4().hex[:6]}"
    root = _tiny_season(tmp_path / "season")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "ASTEP_DASK_ENV": sys.prefix,  # what the script and the worker jobs activate
        # deploy/jobqueue.yaml, found beside the script, sized down by dask's env overrides
        "DASK_JOBQUEUE__SLURM__NAME": name,
        "DASK_JOBQUEUE__SLURM__CORES": "1",
        "DASK_JOBQUEUE__SLURM__PROCESSES": "1",
        "DASK_JOBQUEUE__SLURM__MEMORY": "1GiB",
        "DASK_JOBQUEUE__SLURM__WALLTIME": "00:10:00",
        "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
        "DASK_JOBQUEUE__SLURM__PYTHON": sys.executable,
        "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": "['--lifetime', '8m', "
                                                   "'--lifetime-stagger', '30s']",
    }
    env.pop("DASK_CONFIG", None)
    env.pop("ASTEP_DASK_CMD", None)  # the real command, from the activated environment
    settings = tmp_path / "settings.toml"
    settings.write_text("[cluster]\nmin_jobs = 0\nmax_jobs = 1\n")
    submit = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}-driver", "--cpus-per-task=1",
         "--mem=2G", "--time=00:10:00", "--output=season-%j.out",
         str(DEPLOY / "season.sbatch"), str(root), "--nights", "2", "--out", str(out),
         "--config", str(settings), "--no-cosmics", "--dashboard-address", "127.0.0.1:0"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    log = tmp_path / f"season-{job}.out"
    left = _wait_gone(f"{name}-driver", timeout=300)
    text = log.read_text() if log.exists() else "(no log)"
    if left:
        subprocess.run(["scancel", "-n", f"{name}-driver"], timeout=30)
        subprocess.run(["scancel", "-n", name], timeout=30)
    assert not left, f"driver job still queued: {left}\n{text}"
    assert f"config {JOBQUEUE_YAML}" in text, text
    assert "driver exited with status 0" in text, text
    assert "Traceback" not in text, text
    report = json.loads((out / "season.json").read_text())
    assert {n["night"]: n["status"] for n in report["nights"]} == {
        "2026-07-01": "complete", "2026-07-02": "complete"}
    for date in ("2026-07-01", "2026-07-02"):
        rows = json.loads((out / date / "manifest.json").read_text())["frames"]
        assert [r["status"] for r in rows] == ["done"] * 3
    assert list((tmp_path / "dask-worker-logs").glob(f"{name}-*.err")), "no worker job ran"
    assert not _wait_gone(name, timeout=30)


def _calibrate_slurm(night: Path, tmp_path: Path, name: str, settings: str,
                     **jobqueue: str) -> subprocess.CompletedProcess:
    """The installed ``astep-dask calibrate --cluster slurm`` with deploy/jobqueue.yaml,
    sized down through dask's variables (and ``jobqueue`` overrides)."""
    file = tmp_path / "settings.toml"
    file.write_text(settings)
    env = {**os.environ, "DASK_CONFIG": str(JOBQUEUE_YAML), "ASTEP_DASK_ENV": sys.prefix,
           "DASK_JOBQUEUE__SLURM__NAME": name, "DASK_JOBQUEUE__SLURM__CORES": "1",
           "DASK_JOBQUEUE__SLURM__PROCESSES": "1", "DASK_JOBQUEUE__SLURM__MEMORY": "1 GiB",
           "DASK_JOBQUEUE__SLURM__WALLTIME": "00:10:00",
           "DASK_JOBQUEUE__SLURM__INTERFACE": "lo",
           "DASK_JOBQUEUE__SLURM__PYTHON": sys.executable,
           "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(tmp_path / "logs"),
           **{f"DASK_JOBQUEUE__SLURM__{k.upper()}": v for k, v in jobqueue.items()}}
    return subprocess.run(
        [str(Path(sys.executable).with_name("astep-dask")), "calibrate", str(night),
         "--out", str(tmp_path / "out"), "--cluster", "slurm", "--config", str(file),
         "--no-cosmics", "--dashboard-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@needs_sbatch
def test_a_refused_or_never_started_batch_job_is_one_line(slurm, tmp_path):
    """A batch system that refuses the worker job (no such partition) is reported with
    its own words; one that queues it and never starts it (a start time an hour away),
    after ``job_start_timeout`` with what squeue says; exit 1, no traceback, nothing left
    queued."""
    night = _tiny_season(tmp_path / "archive", ("2026-07-01",)) / "2026-07-01"
    name = f"astep-refused-{uuid.uuid4().hex[:6]}"
    run = _calibrate_slurm(night, tmp_path, name, "[cluster]\nmax_jobs = 1\n",
                           queue="nosuchpartition")
    lines = [ln for ln in run.stderr.splitlines() if "error" in ln]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and "the batch system refused the worker job" in lines[0]
    assert "invalid partition" in lines[0].lower(), lines[0]

    name = f"astep-pending-{uuid.uuid4().hex[:6]}"
    run = _calibrate_slurm(night, tmp_path, name,
                           "[cluster]\nmax_jobs = 1\njob_start_timeout = 6\n",
                           job_extra_directives="['--begin=now+1hour']")
    lines = [ln for ln in run.stderr.splitlines() if "error" in ln]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1, run.stderr
    assert "no worker job started in" in lines[0] and "job_start_timeout" in lines[0]
    assert "squeue: job" in lines[0] and "PENDING (BeginTime)" in lines[0], lines[0]
    assert not _wait_gone(name, timeout=60), "the pending job was not cancelled"
    assert not list((tmp_path / "out").rglob("*_CAL.fits"))


@needs_sbatch
def test_season_through_slurm(slurm, tmp_path, monkeypatch, capsys):
    """`astep-dask season --cluster slurm`: workers are SLURM jobs; the two good nights
    complete, the night without darks is reported, the exit code says partial."""
    import dataclasses
    import json

    import dask

    from astep_dask.cli import EXIT_PARTIAL, main
    from astep_dask.testing.simulate import SimConfig, simulate_night

    root = tmp_path / "season"
    for i, date in enumerate(("2026-07-01", "2026-07-02", "2026-07-03")):
        cfg = dataclasses.replace(SimConfig(), date=date, size=96, n_science=3, n_darks=3,
                                  n_flats=3, seed=40 + i)
        night = simulate_night(root, cfg)
        if date == "2026-07-02":
            for p in night.rglob("*_DARK.fits"):
                p.unlink()
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text("[cluster]\nmin_jobs = 1\nmax_jobs = 2\n")
    monkeypatch.setenv("ASTEP_DASK_ENV", sys.prefix)
    name = f"astep-season-{uuid.uuid4().hex[:6]}"
    cfg = small("slurm", name, tmp_path / "logs")
    out = tmp_path / "out"
    with dask.config.set(dask_settings("slurm", cfg)):
        code = main(["season", str(root), "--cluster", "slurm", "--out", str(out),
                     "--config", str(settings_file), "--no-cosmics"])
    text = capsys.readouterr().out
    assert code == EXIT_PARTIAL, text
    report = json.loads((out / "season.json").read_text())
    status = {n["night"]: n["status"] for n in report["nights"]}
    assert status == {"2026-07-01": "complete", "2026-07-02": "failed",
                      "2026-07-03": "complete"}
    workers = {r["worker"] for d in ("2026-07-01", "2026-07-03")
               for r in json.loads((out / d / "manifest.json").read_text())["frames"]}
    assert workers  # frames were calibrated by the SLURM job workers
    assert not _wait_gone(name), "jobs still queued after the season"


@needs_sbatch
def test_calibrate_through_slurm_refuses_strangers(slurm, tmp_path, monkeypatch):
    """`astep-dask calibrate --cluster slurm`: scheduler, workers and nannies talk TLS with
    credentials made for the run. While it runs, a stranger tries every port the run
    listens on (driver and worker jobs) with a plain dask Client and a raw TCP connection:
    none gets a session or runs code. The credentials live in a private folder on the
    shared file system, the job script names only their paths, and they are gone after
    the run; nothing the run leaves holds the key."""
    import dask

    from astep_dask.cli import EXIT_OK, main
    from astep_dask.io.products import output_dir
    from astep_dask.testing.simulate import SimConfig, simulate_night
    from tests.run.intruder import probe_while_running

    sim = dataclasses.replace(SimConfig(), size=64, n_science=3, n_darks=3, n_flats=3,
                              seed=12)
    night = simulate_night(tmp_path / "archive", sim)
    settings_file = tmp_path / "settings.toml"
    settings_file.write_text("[cluster]\nmin_jobs = 1\nmax_jobs = 1\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv("ASTEP_DASK_ENV", sys.prefix)
    monkeypatch.chdir(tmp_path)
    name = f"astep-tls-{uuid.uuid4().hex[:6]}"
    cfg = {**small("slurm", name, tmp_path / "logs"), "shared-temp-directory": str(shared)}
    marker = tmp_path / "intruder.txt"
    found = probe_while_running(monkeypatch, marker)
    seen: dict = {}

    import astep_dask.run.cluster as cluster_module

    probing = cluster_module.connect

    @contextmanager
    def connect(settings, log=print):
        with probing(settings, log) as client:
            sec = client.security
            seen["script"] = client.cluster.job_script()
            seen["files"] = {p: stat.S_IMODE(os.stat(p).st_mode) for p in
                             (sec.tls_ca_file, sec.tls_worker_cert, sec.tls_worker_key)}
            seen["folder"] = Path(sec.tls_worker_key).parent
            seen["folder_mode"] = stat.S_IMODE(seen["folder"].stat().st_mode)
            seen["key"] = Path(sec.tls_worker_key).read_text().splitlines()[1]
            seen["address"] = client.scheduler_info()["address"]
            yield client

    monkeypatch.setattr(cluster_module, "connect", connect)
    out = tmp_path / "out"
    with dask.config.set(dask_settings("slurm", cfg)):
        code = main(["calibrate", str(night), "--cluster", "slurm", "--out", str(out),
                     "--config", str(settings_file), "--no-cosmics"])
    assert code == EXIT_OK
    assert seen["address"].startswith("tls://")
    assert len(found["comm_ports"]) >= 3, found  # scheduler, worker, nanny
    assert found["problems"] == [], found["problems"]
    assert not marker.exists()
    # the credentials: private, on the shared folder, named (never included) in the script
    assert seen["folder"].parent == shared and seen["folder_mode"] == 0o700
    assert set(seen["files"].values()) == {0o600}
    script = seen["script"]
    assert f"--tls-key {seen['folder']}" in script and "--protocol tls://" in script
    assert "PRIVATE KEY" not in script and seen["key"] not in script
    assert "--dashboard-address 127.0.0.1:0" in script
    # after the run: credentials gone, nothing left behind holds the key
    assert list(shared.iterdir()) == []
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data and seen["key"].encode() not in data, path
    rows = json.loads((output_dir(night, out) / "manifest.json").read_text())["frames"]
    assert len(rows) == sim.n_science and {r["status"] for r in rows} == {"done"}
    driver = f"{socket.gethostname()}:{os.getpid()}"
    assert all(r["worker"] != driver for r in rows)  # calibrated in the SLURM job
    assert not _wait_gone(name), "jobs still queued after the run"
