"""Benchmark one simulated night: our dask pipeline against the survey's ccdproc recipe.

Simulates a night with ``astep-dask simulate`` and runs, each as a subprocess on the same
night, in the same invocation:

- ``ccdproc``: the serial survey recipe (``benchmarks/ccdproc_recipe.py``);
- ``ours``: ``astep-dask calibrate NIGHT --out OUT --workers W --threads T
  --dashboard-address :0`` for each ``--workers`` (T = ``--threads``, default 1; the
  default layout: workers are threads of the command's process), then for each of
  ``--layouts`` (e.g. ``p2x1``: two worker processes, ``--processes``), on a fresh output
  folder so
  every master and frame is computed (nothing is resumed); the per-frame step times
  (``t_read``, ``t_calibrate``, ``t_cosmics``, ``t_write``, ``t_total``) are taken from
  its ``OUT/DATE/manifest.json``;
- ``io_floor``: read every raw science frame with astropy and write a float32 copy
  (``benchmarks/io_floor.py``), the cost no pipeline can avoid;
- ``ours`` again on nights of ``--frames-scaling`` science frames, to see that peak memory
  stays flat as the night grows.

For each subprocess it measures the wall time, the CPU time (user + sys) of the whole
process tree, and the peak RSS of the tree (the RSS of the process and all its descendants,
summed, sampled every 0.1 s). CPU time comes from the kernel's accounting of reaped
children (``getrusage(RUSAGE_CHILDREN)``); on Linux this script makes itself a child
subreaper so that orphaned grandchildren (e.g. dask workers) are reaped, and counted, here.
The per-process CPU times seen while sampling are kept as a cross-check. A failed run is
reported as failed and the benchmark goes on.

Peak RSS of a tree counts pages shared between processes (libraries, page cache of
memory-mapped files) once per process, so it is an upper bound for multi-process runs.

Results are printed as a table and written to ``WORKDIR/bench.json``::

    python benchmarks/bench_night.py --size 2048 --science 12 --workers 1,2 --layouts p1x1,p2x1
    python benchmarks/bench_night.py --size 1024 --science 12 --workers 2 --skip-ccdproc \\
        --frames-scaling 12,50,200
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATE = "2026-06-15"
SAMPLE_INTERVAL_S = 0.1
LEFTOVER_GRACE_S = 30.0
PR_SET_CHILD_SUBREAPER = 36
EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3
MB = 1024.0**2


@dataclass
class Measurement:
    """What one measured subprocess cost, and whether it did its job.

    Attributes
    ----------
    name : str
        Run label, e.g. ``ccdproc`` or ``ours_w2``.
    command : list of str
        The command line.
    status : str
        ``ok``, ``partial`` (exit code 3), ``incomplete`` (exit 0 but fewer outputs than
        frames), ``failed`` or ``timeout``.
    returncode : int or None
        Exit code of the process.
    wall_s : float
        Wall time from start to the exit of the process.
    cpu_s : float
        User + sys time of the whole process tree: the larger of ``cpu_rusage_s`` and
        ``cpu_sampled_s``.
    cpu_rusage_s : float
        User + sys of all reaped descendants, from ``getrusage(RUSAGE_CHILDREN)``.
    cpu_sampled_s : float
        Sum over every process seen while sampling of its last user + sys time (a lower
        bound: misses the last interval and very short-lived processes).
    peak_rss_mb : float
        Largest sum of RSS over the process tree seen in one sample, in MiB. Pages shared
        between processes (libraries, memory-mapped files) count once per process.
    peak_pss_mb : float
        Largest sum of PSS (proportional set size: shared pages divided among the
        processes that share them) over the tree in one sample, in MiB: the physical
        memory the run holds. 0 where the kernel does not report it.
    samples : int
        Number of samples taken.
    outputs : int or None
        Output frames found after the run.
    expected_outputs : int or None
        Science frames in the night.
    stdout, stderr : str
        Paths of the captured output streams.
    error : str
        Last lines of stderr when the run did not succeed.
    details : dict
        Run-specific figures (worker count, frames, step times parsed from stdout).
    """

    name: str
    command: list[str]
    status: str
    returncode: int | None
    wall_s: float
    cpu_s: float
    cpu_rusage_s: float
    cpu_sampled_s: float
    peak_rss_mb: float
    samples: int
    peak_pss_mb: float = 0.0
    outputs: int | None = None
    expected_outputs: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """True when the run finished and its timings mean something."""
        return self.status in ("ok", "partial")


# --------------------------------------------------------------------------- process tree


def become_subreaper() -> bool:
    """Make this process adopt orphaned descendants (Linux), so their CPU time is counted.

    Returns
    -------
    bool
        True if the kernel accepted; False elsewhere or on failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sample_tree(me: psutil.Process, cpu_seen: dict[tuple[int, float], float]
                 ) -> tuple[int, int]:
    """Sum the RSS and the PSS of all descendants of ``me``; record each one's CPU time."""
    rss = pss = 0
    for proc in me.children(recursive=True):
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                cpu_seen[(proc.pid, proc.create_time())] = times.user + times.system
            pss += getattr(proc.memory_full_info(), "pss", 0)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, pss


def _live_descendants(me: psutil.Process) -> list[psutil.Process]:
    live = []
    for proc in me.children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                live.append(proc)
        except psutil.NoSuchProcess:
            continue
    return live


def _kill(procs: Sequence[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue


def _reap_children(me: psutil.Process) -> None:
    """Wait for every (dead or killed) direct child so the kernel accounts its CPU time."""
    for proc in me.children():
        try:
            proc.wait(timeout=10)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired, ChildProcessError):
            continue


def run_measured(
    name: str,
    command: Sequence[str],
    log_dir: Path,
    timeout_s: float | None = None,
) -> Measurement:
    """Run ``command`` and measure its wall time, tree CPU time and tree peak RSS.

    Parameters
    ----------
    name : str
        Run label; stdout and stderr go to ``log_dir/name.out`` and ``log_dir/name.err``.
    command : sequence of str
        The command line (no shell).
    log_dir : Path
        Folder of the captured streams.
    timeout_s : float, optional
        Kill the process tree after this many seconds (status ``timeout``).

    Returns
    -------
    Measurement
        Status from the exit code (0 ok, 3 partial, else failed); outputs not yet counted.
    """
    me = psutil.Process()
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    _reap_children(me)  # earlier orphans must not leak into this run's CPU time
    cpu_before = _children_cpu_s()
    cpu_seen: dict[tuple[int, float], float] = {}
    peak = peak_pss = samples = 0
    timed_out = False
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(command), stdout=out, stderr=err, cwd=REPO)
        while True:
            rss, pss = _sample_tree(me, cpu_seen)
            peak, peak_pss = max(peak, rss), max(peak_pss, pss)
            samples += 1
            try:
                proc.wait(timeout=SAMPLE_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
                    timed_out = True
                    _kill([*_live_descendants(me)])
                    proc.wait()
                    break
        wall = time.perf_counter() - t0
    # Descendants still alive (orphans adopted by us): keep sampling, then end them.
    grace_end = time.perf_counter() + LEFTOVER_GRACE_S
    while leftovers := _live_descendants(me):
        if time.perf_counter() > grace_end:
            _kill(leftovers)
            break
        rss, pss = _sample_tree(me, cpu_seen)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        samples += 1
        time.sleep(SAMPLE_INTERVAL_S)
    _reap_children(me)
    cpu_rusage = _children_cpu_s() - cpu_before
    cpu_sampled = sum(cpu_seen.values())
    rc = proc.returncode
    if timed_out:
        status = "timeout"
    elif rc == EXIT_OK:
        status = "ok"
    elif rc == EXIT_PARTIAL:
        status = "partial"
    else:
        status = "failed"
    error = ""
    if status not in ("ok",):
        lines = err_path.read_text(errors="replace").strip().splitlines()
        error = " | ".join(lines[-3:])
    return Measurement(
        name=name,
        command=list(command),
        status=status,
        returncode=rc,
        wall_s=wall,
        cpu_s=max(cpu_rusage, cpu_sampled),
        cpu_rusage_s=cpu_rusage,
        cpu_sampled_s=cpu_sampled,
        peak_rss_mb=float(peak) / MB,
        peak_pss_mb=float(peak_pss) / MB,
        samples=samples,
        stdout=str(out_path),
        stderr=str(err_path),
        error=error,
    )


def last_json_line(path: str | Path) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a file, or ``{}``."""
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    if not lines:
        return {}
    try:
        value = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class NightSpec:
    """A simulated night: frame side and frame counts."""

    size: int
    science: int
    darks: int
    flats: int

    @property
    def label(self) -> str:
        """Folder name of the night's archive root."""
        return f"n{self.size}_s{self.science}_d{self.darks}_f{self.flats}"


def bin_path(name: str) -> str:
    """Path of an executable of this virtualenv (beside the running Python), or on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found beside {sys.executable} or on PATH")
    return found


def simulate(workdir: Path, spec: NightSpec) -> tuple[Path, float]:
    """Simulate a night under ``WORKDIR/nights/``, or reuse one made with the same spec.

    Parameters
    ----------
    workdir : Path
        Benchmark work folder.
    spec : NightSpec
        What to simulate.

    Returns
    -------
    tuple
        The night folder ``ROOT/DATE`` and the seconds the simulation took (0 if reused).

    Raises
    ------
    subprocess.CalledProcessError
        If ``astep-dask simulate`` fails.
    """
    root = workdir / "nights" / spec.label
    marker = root / "simulated.json"
    night = root / DATE
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return night, 0.0
    shutil.rmtree(root, ignore_errors=True)
    command = [
        bin_path("astep-dask"), "simulate", str(root), "--date", DATE,
        "--size", str(spec.size), "--science", str(spec.science),
        "--darks", str(spec.darks), "--flats", str(spec.flats),
    ]
    print(f"simulating {spec.label} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps(asdict(spec)))
    return night, seconds


STEP_KEYS = ("t_read", "t_calibrate", "t_cosmics", "t_write", "t_total")


def manifest_summary(path: Path) -> dict[str, Any]:
    """Per-frame step times and counts from one of our ``manifest.json`` files.

    Parameters
    ----------
    path : Path
        The manifest (``OUT/DATE/manifest.json``).

    Returns
    -------
    dict
        ``status``, ``counts``, ``wall_seconds`` (the pipeline's own clock, masters
        included), ``frames_timed``, and for each step key present in the frame rows its
        ``sum`` and ``median`` over frames (seconds); ``{}`` when the file is missing or
        unreadable.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    rows = [r for r in data.get("frames", []) if r.get("status") == "done"]
    steps: dict[str, dict[str, float]] = {}
    for key in STEP_KEYS:
        values = sorted(float(r[key]) for r in rows if isinstance(r.get(key), int | float))
        if values:
            mid = len(values) // 2
            median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
            steps[key] = {"sum": sum(values), "median": median}
    return {
        "status": data.get("status"),
        "counts": data.get("counts"),
        "wall_seconds": data.get("wall_seconds"),
        "frames_timed": len(rows),
        "workers": len({r.get("worker") for r in rows if r.get("worker")}),
        "steps": steps,
    }


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.rglob(pattern)) if folder.exists() else 0


def measure_run(
    name: str,
    command: Sequence[str],
    out_dir: Path,
    pattern: str,
    expected: int,
    workdir: Path,
    timeout_s: float | None,
    keep_outputs: bool,
    manifest: Path | None = None,
) -> Measurement:
    """Run one command on a clean output folder and count the frames it wrote.

    Parameters
    ----------
    name : str
        Run label.
    command : sequence of str
        The command line; it writes into ``out_dir``.
    out_dir : Path
        Output folder, emptied before the run (and removed after unless ``keep_outputs``).
    pattern : str
        Glob of one output frame, searched recursively in ``out_dir``.
    expected : int
        Number of science frames in the night.
    workdir : Path
        Benchmark work folder (logs go to ``WORKDIR/logs``).
    timeout_s : float, optional
        Per-run time limit.
    keep_outputs : bool
        Keep ``out_dir`` after counting.
    manifest : Path, optional
        Our ``manifest.json`` inside ``out_dir``: its step times go to
        ``details["manifest"]`` (read before the folder is removed).

    Returns
    -------
    Measurement
        With ``outputs`` counted and the stdout JSON summary (if any) in ``details``.
    """
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"running {name}: {' '.join(command)}", flush=True)
    m = run_measured(name, command, workdir / "logs", timeout_s)
    m.outputs = _count(out_dir, pattern)
    m.expected_outputs = expected
    if m.status == "ok" and m.outputs < expected:
        m.status = "incomplete"
    summary = last_json_line(m.stdout)
    if summary:
        m.details["summary"] = summary
    if manifest is not None:
        m.details["manifest"] = manifest_summary(manifest)
    if not keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"  -> {m.status}, {m.wall_s:.1f} s wall, {m.peak_rss_mb:.0f} MiB peak RSS, "
          f"{m.peak_pss_mb:.0f} MiB peak PSS", flush=True)
    return m


def run_ccdproc(night: Path, spec: NightSpec, args: argparse.Namespace) -> Measurement:
    """Measure the serial ccdproc recipe on ``night``."""
    out = args.workdir / "runs" / f"ccdproc_{spec.label}"
    command = [sys.executable, str(HERE / "ccdproc_recipe.py"), str(night), "--out", str(out)]
    m = measure_run("ccdproc", command, out, "*_CAL.fits", spec.science, args.workdir,
                    args.timeout, args.keep_outputs)
    m.details.update(frames=spec.science, size=spec.size)
    return m


def run_ours(night: Path, spec: NightSpec, workers: int, args: argparse.Namespace,
             name: str | None = None, threads: int | None = None,
             processes: bool = False) -> Measurement:
    """Measure ``astep-dask calibrate`` with ``workers`` workers of ``threads`` threads
    (default ``--threads``, else 1) on ``night``: threads of the command's own process (the
    default layout) or, with ``processes``, worker processes (``--processes``)."""
    threads = threads or args.threads or 1
    name = name or f"ours_w{workers}"
    out = args.workdir / "runs" / f"{name}_{spec.label}"
    try:
        command = [bin_path("astep-dask"), "calibrate", str(night), "--out", str(out),
                   "--workers", str(workers), "--threads", str(threads),
                   "--dashboard-address", ":0"]
    except FileNotFoundError as exc:
        return Measurement(name, [], "failed", None, 0.0, 0.0, 0.0, 0.0, 0.0, 0,
                           error=str(exc), details={"workers": workers})
    if processes:
        command.append("--processes")
    m = measure_run(name, command, out, "*_CAL.fits", spec.science, args.workdir,
                    args.timeout, args.keep_outputs, manifest=out / night.name / "manifest.json")
    m.details.update(workers=workers, threads=threads, frames=spec.science,
                     size=spec.size, processes=processes)
    return m


def parse_layout(text: str) -> tuple[int, int, bool]:
    """``pPxT`` (P worker processes of T threads) or ``PxT`` (P in-process workers of T
    threads) as (workers, threads, processes)."""
    processes = text.startswith("p")
    p, t = text.removeprefix("p").split("x")
    return int(p), int(t), processes


def run_io_floor(night: Path, spec: NightSpec, args: argparse.Namespace) -> Measurement:
    """Measure reading every raw science frame and writing a float32 copy."""
    out = args.workdir / "runs" / f"io_floor_{spec.label}"
    command = [sys.executable, str(HERE / "io_floor.py"), str(night), "--out", str(out)]
    m = measure_run("io_floor", command, out, "*_F32.fits", spec.science, args.workdir,
                    args.timeout, args.keep_outputs)
    m.details.update(frames=spec.science, size=spec.size)
    return m


# --------------------------------------------------------------------------- report


def _ratio(num: Measurement | None, den: Measurement | None) -> float | None:
    if num is None or den is None or not (num.succeeded and den.succeeded) or den.wall_s <= 0:
        return None
    return num.wall_s / den.wall_s


def compute_ratios(runs: Sequence[Measurement]) -> dict[str, float | None]:
    """Wall-time ratios: ccdproc / ours, ours / I/O floor, and worker speed-ups.

    Parameters
    ----------
    runs : sequence of Measurement
        The runs on the main night.

    Returns
    -------
    dict
        ``ccdproc_over_<ours run>``, ``<ours run>_over_io_floor`` and, for each ours run
        with more workers than the fewest, ``speedup_<fewest>_to_<run>`` (wall of the
        fewest-worker run / wall of this run); None where a run is missing or did not
        succeed.
    """
    by_name = {m.name: m for m in runs}
    ccd, floor = by_name.get("ccdproc"), by_name.get("io_floor")
    ratios: dict[str, float | None] = {}
    for m in runs:
        if m.name.startswith("ours"):
            if ccd is not None:
                ratios[f"ccdproc_over_{m.name}"] = _ratio(ccd, m)
            ratios[f"{m.name}_over_io_floor"] = _ratio(m, floor)
    ours = sorted((m for m in runs if m.name.startswith("ours")),
                  key=lambda m: m.details.get("workers", 0))
    for m in ours[1:]:
        ratios[f"speedup_{ours[0].name}_to_{m.name}"] = _ratio(ours[0], m)
    return ratios


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(runs: Sequence[Measurement]) -> str:
    """A fixed-width table of runs: status, wall, CPU, CPU/wall, peak RSS and PSS of the
    process tree, outputs."""
    header = (f"{'run':<22s} {'status':<10s} {'wall s':>8s} {'CPU s':>8s} {'CPU/wall':>8s} "
              f"{'peak RSS MiB':>12s} {'peak PSS MiB':>12s} {'outputs':>9s}")
    lines = [header, "-" * len(header)]
    for m in runs:
        ran = m.samples > 0
        load = m.cpu_s / m.wall_s if ran and m.wall_s > 0 else None
        outputs = f"{m.outputs}/{m.expected_outputs}" if m.outputs is not None else "-"
        lines.append(
            f"{m.name:<22s} {m.status:<10s} {_fmt(m.wall_s if ran else None):>8s} "
            f"{_fmt(m.cpu_s if ran else None):>8s} {_fmt(load, '.2f'):>8s} "
            f"{_fmt(m.peak_rss_mb if ran else None, '.0f'):>12s} "
            f"{_fmt(m.peak_pss_mb if ran and m.peak_pss_mb else None, '.0f'):>12s} "
            f"{outputs:>9s}"
        )
        if m.error:
            lines.append(f"{'':<22s} error: {m.error[:200]}")
    return "\n".join(lines)


def format_steps(runs: Sequence[Measurement]) -> str:
    """A table of our per-frame step times (median and sum over frames) per run.

    Parameters
    ----------
    runs : sequence of Measurement
        Runs whose ``details["manifest"]`` holds a :func:`manifest_summary`.

    Returns
    -------
    str
        One line per run; ``manifest wall`` is the pipeline's own wall time (masters,
        frames and manifest, without interpreter and cluster start-up).
    """
    header = f"{'run':<22s} {'manifest wall':>13s} " + " ".join(
        f"{k:>15s}" for k in STEP_KEYS)
    lines = [header, "-" * len(header)]
    for m in runs:
        info = m.details["manifest"]
        cells = []
        for key in STEP_KEYS:
            step = info.get("steps", {}).get(key)
            cells.append(f"{step['median']:6.2f}; {step['sum']:6.1f}" if step else "-")
        lines.append(f"{m.name:<22s} {_fmt(info.get('wall_seconds')):>13s} "
                     + " ".join(f"{c:>15s}" for c in cells))
    return "\n".join(lines)


def format_report(report: dict[str, Any], runs: Sequence[Measurement],
                  scaling: Sequence[Measurement]) -> str:
    """Human-readable summary: the table, recipe step times, ratios, memory scaling."""
    cfg = report["config"]
    parts = [
        f"night {cfg['size']}x{cfg['size']}: {cfg['science']} science, {cfg['darks']} darks "
        f"per exposure time, {cfg['flats']} flats; {report['machine']['cpus']} CPUs",
        "",
        format_table(runs),
    ]
    ccd = next((m for m in runs if m.name == "ccdproc"), None)
    steps = (ccd.details.get("summary") or {}).get("steps") if ccd else None
    if steps:
        parts += ["", "ccdproc recipe steps (s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in steps.items())]
    split = format_steps([m for m in [*runs, *scaling] if m.details.get("manifest")])
    if split:
        parts += ["", "ours, per-frame step times from manifest.json (s, median per frame; "
                  "sum over frames):", split]
    parts += ["", "wall-time ratios:"]
    for key, value in report["ratios"].items():
        parts.append(f"  {key:<36s} {_fmt(value, '.2f')}")
    if scaling:
        parts += ["", "peak memory against night size (ours):", format_table(scaling)]
        flat = report.get("frames_scaling_peak_ratio")
        parts.append(f"  peak RSS, largest night / smallest night: {_fmt(flat, '.2f')}")
        pss = report.get("frames_scaling_pss_ratio")
        parts.append(f"  peak PSS, largest night / smallest night: {_fmt(pss, '.2f')}")
    return "\n".join(parts)


def machine_info() -> dict[str, Any]:
    """CPU count, memory, Python and package versions, git commit of the repository."""
    versions = {}
    for pkg in ("astep-dask", "ccdproc", "astropy", "astroscrappy", "numpy", "dask",
                "distributed", "psutil"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "cpus": os.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / 1024**3,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
    }


# --------------------------------------------------------------------------- entry point


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    p = argparse.ArgumentParser(
        description="Compare astep-dask calibrate with the serial ccdproc recipe and an I/O "
        "floor on one simulated night.")
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels")
    p.add_argument("--science", type=int, default=12, help="science frames")
    p.add_argument("--darks", type=int, default=8, help="darks per exposure time")
    p.add_argument("--flats", type=int, default=9, help="sky flats")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "astep-bench",
                   help="work folder: nights, outputs, logs, bench.json")
    p.add_argument("--skip-ccdproc", action="store_true", help="do not run the ccdproc recipe")
    p.add_argument("--workers", type=_int_list, default=[1, 2],
                   help="comma-separated worker counts for our pipeline")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per worker of the --workers runs (default 1)")
    p.add_argument("--layouts", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="extra runs of ours with other worker layouts, comma-separated: "
                   "PxT (P in-process workers of T threads) or pPxT (P worker processes "
                   "of T threads, --processes)")
    p.add_argument("--frames-scaling", type=_int_list, default=[],
                   help="comma-separated science-frame counts: run ours (with the largest "
                   "worker count) on a night of each size and report peak memory")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which a run is killed (default: none)")
    p.add_argument("--keep-outputs", action="store_true",
                   help="keep each run's output folder (default: removed after counting)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns 0 if every run succeeded, 3 if some did not.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 all runs succeeded, 1 the night could not be simulated, 3 some runs failed.
    """
    args = build_parser().parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    subreaper = become_subreaper()
    spec = NightSpec(args.size, args.science, args.darks, args.flats)
    try:
        night, sim_s = simulate(args.workdir, spec)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        print(f"bench_night: error: simulation failed: {exc}", file=sys.stderr)
        return EXIT_FAILED

    runs: list[Measurement] = []
    if not args.skip_ccdproc:
        runs.append(run_ccdproc(night, spec, args))
    runs += [run_ours(night, spec, w, args) for w in args.workers]
    for layout in args.layouts:
        w, t, processes = parse_layout(layout)
        runs.append(run_ours(night, spec, w, args, name=f"ours_{layout}", threads=t,
                             processes=processes))
    runs.append(run_io_floor(night, spec, args))

    scaling: list[Measurement] = []
    simulated = {spec.label: sim_s}
    for n in args.frames_scaling:
        spec_n = NightSpec(args.size, n, args.darks, args.flats)
        try:
            night_n, simulated[spec_n.label] = simulate(args.workdir, spec_n)
        except subprocess.CalledProcessError as exc:
            print(f"bench_night: simulation of {spec_n.label} failed: {exc}", file=sys.stderr)
            continue
        scaling.append(run_ours(night_n, spec_n, max(args.workers), args,
                                name=f"ours_w{max(args.workers)}_s{n}"))

    peaks = sorted((m.details["frames"], m.peak_rss_mb, m.peak_pss_mb)
                   for m in scaling if m.succeeded)
    peak_ratio = pss_ratio = None
    if len(peaks) >= 2:
        peak_ratio = peaks[-1][1] / peaks[0][1]
        pss_ratio = peaks[-1][2] / peaks[0][2] if peaks[0][2] else None
    report: dict[str, Any] = {
        "config": {**asdict(spec), "workers": args.workers, "threads": args.threads,
                   "frames_scaling": args.frames_scaling, "night": str(night),
                   "sample_interval_s": SAMPLE_INTERVAL_S, "subreaper": subreaper},
        "machine": machine_info(),
        "simulate_seconds": simulated,
        "runs": [asdict(m) for m in runs],
        "ratios": compute_ratios(runs),
        "frames_scaling": [asdict(m) for m in scaling],
        "frames_scaling_peak_ratio": peak_ratio,
        "frames_scaling_pss_ratio": pss_ratio,
    }
    out = args.workdir / "bench.json"
    out.write_text(json.dumps(report, indent=2))
    print()
    print(format_report(report, runs, scaling))
    print(f"\nresults written to {out}")
    return EXIT_OK if all(m.succeeded for m in [*runs, *scaling]) else EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
