"""Scaling of ``astep-dask calibrate`` with the cores of one node.

Simulates one night (``--size``, ``--science``, ``--darks``, ``--flats``) once, then runs
``astep-dask calibrate`` on it restricted to 1, 2, 4, ... cores, up to all the cores this
process may use (``--cores`` to choose), each run on a fresh output folder. The restriction
is CPU affinity (``os.sched_setaffinity`` in the child before it starts), so the pipeline
sees, and sizes its cluster to, that many cores. Layouts (``--layouts``, comma-separated):

- ``default``: no layout option, what the command chooses from the machine (always run);
- ``threads``: one worker, a thread per core, in the command's process;
- ``procs1``, ``procs2``, ...: worker processes of 1, 2, ... threads filling the cores;
- ``pPxT`` / ``PxT``: P worker processes (threads of the process) of T threads, run only
  at P·T cores.

Per run: wall time, CPU time and peak RSS/PSS of the whole process tree (psutil, sampled
every 0.1 s, see ``bench_night.run_measured``), speed-up and efficiency against the same
layout on one core (else the default on one core), the frame phase (first frame started
to last frame finished, from ``manifest.json``) and its speed-up, frames per core-hour in
the frame phase, per-frame step medians, the stage before its first frame ("masters":
masters and shared planes) and the time outside the stage ("outside": start-up, imports,
cluster, shut-down). Printed as a table and written as JSON::

    python benchmarks/scaling.py --size 512 --science 8                # this machine
    python3 benchmarks/scaling.py --size 2048 --science 128 --out "$OUT/scaling.json"

Needs only the standard library, psutil and an installed ``astep_dask`` (the offline
node's recipe, ``offline-node-bench.md``). The runs start in this checkout, so they import
its ``astep_dask`` ahead of ``PYTHONPATH``: to compare with an earlier version, run that
version's own copy of this script. The report says which code ran (``code``: the package's
folder, its version, and the checkout's commit, ``+dirty`` with uncommitted changes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_night import (  # noqa: E402
    REPO,
    Measurement,
    become_subreaper,
    machine_info,
    manifest_summary,
    run_measured,
)

DATE = "2026-06-15"


def code_under_test() -> dict[str, str]:
    """Which ``astep_dask`` the runs import (asked of a child started as they are), and
    the commit of its checkout (``+dirty`` with uncommitted changes; "" without git)."""
    ask = "import astep_dask; print(astep_dask.__file__); print(astep_dask.__version__)"
    out = subprocess.run([sys.executable, "-c", ask], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    folder = str(Path(out[0]).parent)
    commit = ""
    try:
        git = ["git", "-C", folder]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        if subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True,
                          text=True, check=True).stdout.strip():
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"package": folder, "version": out[1], "commit": commit}


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_counts(total: int) -> list[int]:
    """1, 2, 4, ... below ``total``, and ``total``."""
    counts, n = [], 1
    while n < total:
        counts.append(n)
        n *= 2
    return [*counts, total]


def layout_options(layout: str, cores: int) -> list[str] | None:
    """The ``calibrate`` options of a layout on ``cores`` cores; None where it does not
    apply (e.g. ``p4x2`` on anything but 8 cores, ``procs2`` on one core)."""
    if layout == "default":
        return []
    if layout == "threads":
        return ["--workers", "1", "--threads", str(cores)]
    if layout.startswith("procs"):
        threads = int(layout.removeprefix("procs"))
        if cores < threads:
            return None
        return ["--processes", "--workers", str(cores // threads), "--threads", str(threads)]
    processes = layout.startswith("p")
    workers, threads = (int(v) for v in layout.removeprefix("p").split("x"))
    if workers * threads != cores:
        return None
    return ["--workers", str(workers), "--threads", str(threads),
            *(["--processes"] if processes else [])]


def simulate(workdir: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """Simulate the night under ``workdir`` (or reuse one simulated with the same options);
    return the night folder and the seconds it took."""
    spec = {"size": args.size, "science": args.science, "darks": args.darks,
            "flats": args.flats}
    root = workdir / "night_{size}_{science}_{darks}_{flats}".format(**spec)
    marker = root / "simulated.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root / DATE, 0.0
    shutil.rmtree(root, ignore_errors=True)
    command = [sys.executable, "-m", "astep_dask.cli", "simulate", str(root), "--date", DATE,
               *[f"--{k}={v}" for k, v in spec.items()]]
    print(f"simulating {root.name} ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=workdir)
    seconds = time.perf_counter() - t0
    marker.write_text(json.dumps(spec))
    return root / DATE, seconds


def pinned(cpus: list[int], command: list[str]) -> list[str]:
    """``command`` run by a Python that first restricts itself to ``cpus``."""
    code = (f"import os, sys; os.sched_setaffinity(0, {set(cpus)}); "
            "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", code, *command]


def frame_phase(manifest: Path) -> dict[str, Any]:
    """From a manifest: the frame phase (first frame started to last frame finished, s),
    the frames done, and the stage's own clock (``stage_s``: masters, frames and manifest;
    ``before_frames_s``: the stage until the first frame started, the masters mostly);
    ``{}`` when it cannot be read."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    rows = [r for r in data.get("frames", []) if r.get("status") == "done"
            and "started" in r and "finished" in r]
    if not rows:
        return {}
    phase = max(r["finished"] for r in rows) - min(r["started"] for r in rows)
    out = {"frame_phase_s": phase, "frames_done": len(rows)}
    if isinstance(data.get("wall_seconds"), int | float):
        out["stage_s"] = data["wall_seconds"]
        out["before_frames_s"] = max(data["wall_seconds"] - phase, 0.0)
    return out


def run_one(night: Path, layout: str, cpus: list[int], options: list[str],
            args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate ``night`` on ``cpus`` in one layout; the measured figures."""
    name = f"{layout}_c{len(cpus)}"
    out = args.workdir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "astep_dask.cli", "calibrate", str(night), "--out",
               str(out), "--dashboard-address", ":0", *options]
    print(f"running {name}: {' '.join(command[1:])}", flush=True)
    m: Measurement = run_measured(name, pinned(cpus, command), args.workdir / "logs",
                                  args.timeout)
    manifest = out / night.name / "manifest.json"
    row: dict[str, Any] = {
        "layout": layout, "cores": len(cpus), "options": options, "status": m.status,
        "wall_s": m.wall_s, "cpu_s": m.cpu_s,
        "cpu_per_wall": m.cpu_s / m.wall_s if m.wall_s > 0 else None,
        "peak_pss_mb": m.peak_pss_mb, "peak_rss_mb": m.peak_rss_mb, "error": m.error,
        **frame_phase(manifest),
    }
    if row.get("stage_s") is not None:
        # Outside the stage: start-up (imports, inventory, cluster) and shut-down.
        row["outside_stage_s"] = max(m.wall_s - row["stage_s"], 0.0)
    summary = manifest_summary(manifest)
    row["workers"] = summary.get("workers")
    row["steps_median_s"] = {k: v["median"] for k, v in summary.get("steps", {}).items()}
    if row.get("frame_phase_s"):
        row["frames_per_core_hour"] = (row["frames_done"] * 3600.0
                                       / (row["frame_phase_s"] * len(cpus)))
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    print(f"  -> {m.status}, {m.wall_s:.1f} s wall, {row['cpu_per_wall'] or 0:.2f} CPU/wall,"
          f" {m.peak_pss_mb:.0f} MiB peak PSS", flush=True)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-up and efficiency of each run against one core (same layout, else default)."""
    ok = [r for r in rows if r["status"] in ("ok", "partial")]
    one = {r["layout"]: r for r in ok if r["cores"] == 1}
    for r in ok:
        base = one.get(r["layout"]) or one.get("default")
        if base is None:
            continue
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["efficiency"] = r["speedup"] / r["cores"]
        if base.get("frame_phase_s") and r.get("frame_phase_s"):
            r["frame_speedup"] = base["frame_phase_s"] / r["frame_phase_s"]
            r["frame_efficiency"] = r["frame_speedup"] / r["cores"]


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per run."""
    head = (f"{'layout':<10s} {'cores':>5s} {'workers':>7s} {'status':<8s} {'wall s':>7s} "
            f"{'speedup':>7s} {'eff':>5s} {'frames s':>8s} {'fr.spd':>6s} {'CPU/wall':>8s} "
            f"{'PSS MiB':>8s} {'fr/core-h':>9s} {'cosmics':>7s} {'total':>6s} "
            f"{'masters':>7s} {'outside':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        steps = r.get("steps_median_s", {})
        lines.append(
            f"{r['layout']:<10s} {r['cores']:>5d} {_f(r.get('workers'), 'd'):>7s} "
            f"{r['status']:<8s} {r['wall_s']:7.1f} {_f(r.get('speedup'), '.2f'):>7s} "
            f"{_f(r.get('efficiency'), '.2f'):>5s} {_f(r.get('frame_phase_s'), '.1f'):>8s} "
            f"{_f(r.get('frame_speedup'), '.2f'):>6s} {_f(r.get('cpu_per_wall'), '.2f'):>8s} "
            f"{r['peak_pss_mb']:8.0f} {_f(r.get('frames_per_core_hour'), '.0f'):>9s} "
            f"{_f(steps.get('t_cosmics'), '.2f'):>7s} {_f(steps.get('t_total'), '.2f'):>6s} "
            f"{_f(r.get('before_frames_s'), '.1f'):>7s} {_f(r.get('outside_stage_s'), '.1f'):>7s}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="frame side (px)")
    p.add_argument("--science", type=int, default=128, help="science frames")
    p.add_argument("--darks", type=int, default=8, help="darks per exposure time")
    p.add_argument("--flats", type=int, default=9, help="sky flats")
    p.add_argument("--cores", help="comma-separated core counts (default 1, 2, 4, ... all)")
    p.add_argument("--layouts", default="", help="extra layouts, comma-separated: threads, "
                   "procsT, pPxT, PxT (the default layout is always run)")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "astep-scaling",
                   help="where the night and the outputs go")
    p.add_argument("--out", type=Path, help="JSON report (default WORKDIR/scaling.json)")
    p.add_argument("--timeout", type=float, help="seconds after which a run is killed")
    p.add_argument("--keep-outputs", action="store_true", help="keep each run's products")
    return p


def main(argv: list[str] | None = None) -> int:
    """Simulate, run every core count and layout, report. 0 when every run succeeded."""
    args = build_parser().parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cpus = allowed_cpus()
    counts = ([int(c) for c in args.cores.split(",")] if args.cores
              else core_counts(len(cpus)))
    if max(counts) > len(cpus) or min(counts) < 1:
        print(f"scaling: error: --cores {args.cores}: this process may use {len(cpus)} "
              "cores", file=sys.stderr)
        return 1
    layouts = ["default", *[x for x in args.layouts.split(",") if x and x != "default"]]
    subreaper = become_subreaper()
    code = code_under_test()
    print(f"astep_dask {code['version']} from {code['package']} {code['commit']}".rstrip(),
          flush=True)
    night, sim_s = simulate(args.workdir, args)
    rows = []
    for layout in layouts:
        for n in counts:
            options = layout_options(layout, n)
            if options is not None:
                rows.append(run_one(night, layout, cpus[:n], options, args))
    add_ratios(rows)
    report = {
        "config": {"size": args.size, "science": args.science, "darks": args.darks,
                   "flats": args.flats, "cores": counts, "layouts": layouts,
                   "night": str(night), "subreaper": subreaper},
        "machine": machine_info(),
        "code": code,
        "simulate_seconds": sim_s,
        "runs": rows,
    }
    out = args.out or args.workdir / "scaling.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print()
    print(f"night {args.size}x{args.size}: {args.science} science, {args.darks} darks per "
          f"exposure time, {args.flats} flats; {len(cpus)} cores allowed")
    print(format_table(rows))
    print(f"\nresults written to {out}")
    return 0 if all(r["status"] in ("ok", "partial") for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
