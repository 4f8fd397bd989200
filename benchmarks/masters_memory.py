"""Peak memory and wall time of building a night's masters, against the number of darks.

Masters are dask reductions over a stack opened in row strips whose height comes from
``CombineSettings.memory_budget_mb`` (:func:`astep_dask.io.stack.open_strips`), so the memory
of a build should be bounded by that budget and not grow with the number of frames. This
benchmark checks it: for each ``N`` in ``--frames`` it simulates a night of ``N`` darks per
exposure time (science darks of 90 s *and* flat darks of 10 s, so ``2 N`` dark files),
three sky flats and one science frame, then builds every master with::

    MasterBuilder(scan_night(night), out_dir, Settings()).build()

in a fresh subprocess per build (so the peak RSS belongs to that ``N`` alone), on

- ``threads``: dask's default threaded scheduler, no distributed client; here
  ``astep_dask.io.stack.read_section`` (and the names ``astep_dask.masters`` imported from it)
  is wrapped by a counter, giving the pixels read from each file divided by the pixels of
  a frame: 1.0 for a dark means every pixel read exactly once; flats read a central box
  once more to measure their level;
- ``distributed``: a ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)``
  started in the subprocess (reads are not counted there: they happen in the workers).

The parent measures each subprocess tree with :func:`bench_night.run_measured` (wall, CPU
of the tree, peak of the summed RSS of the tree sampled every 0.1 s); the subprocess adds
the kernel's exact peak RSS of itself and of its largest worker (``ru_maxrss``), its RSS
after imports (the baseline no build can avoid) and the time of each master step.

Results are printed as a table and written to ``WORKDIR/masters_memory.json``::

    python benchmarks/masters_memory.py --size 1024 --frames 12,50,200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_night import DATE, MB, become_subreaper, machine_info, run_measured

HERE = Path(__file__).resolve().parent
SCHEDULERS = ("threads", "distributed")
N_FLATS = 3


# --------------------------------------------------------------------------- subprocess


class ReadCounter:
    """Thread-safe tally of the pixels and calls of ``read_section`` per file."""

    def __init__(self) -> None:
        self.pixels: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """A ``read_section(path, hdu, rows, cols, out=None)`` that counts what ``func``
        returns.

        Parameters
        ----------
        func : callable
            The original ``read_section``.

        Returns
        -------
        callable
            Same signature and result as ``func``.
        """

        def counted(path: Path, hdu: int, rows: slice, cols: slice, out: Any = None) -> Any:
            out = func(path, hdu, rows, cols, out=out)
            with self._lock:
                self.pixels[str(path)] += int(out.size)
                self.calls[str(path)] += 1
            return out

        return counted


def install_counter() -> ReadCounter:
    """Wrap ``read_section`` in :mod:`astep_dask.io.stack` and wherever it was imported by name.

    Returns
    -------
    ReadCounter
        The tally the wrapped functions feed.
    """
    from astep_dask.io import stack
    from astep_dask.masters import builder, reduce

    counter = ReadCounter()
    original = stack.read_section
    wrapped = counter.wrap(original)
    stack.read_section = wrapped
    for module in (builder, reduce):
        if getattr(module, "read_section", None) is original:
            module.read_section = wrapped
    return counter


def _ratio_stats(values: Sequence[float]) -> dict[str, float]:
    return {"files": len(values), "min": min(values), "max": max(values),
            "mean": sum(values) / len(values)}


def read_summary(counter: ReadCounter, inventory: Any) -> dict[str, Any]:
    """Pixels read per file / pixels per frame, summarised per kind of frame.

    Parameters
    ----------
    counter : ReadCounter
        The tally of the build.
    inventory : astep_dask.io.layout.Inventory
        The night, for each file's kind, exposure time and raw shape.

    Returns
    -------
    dict
        Per group ``"<kind> <exptime>s"``: number of files, min, max and mean of the ratio
        (files never read count as 0), plus the total calls and pixels read.
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for rec in inventory.frames:
        if not rec.usable:
            continue
        frame_pixels = rec.shape[0] * rec.shape[1]
        ratio = counter.pixels.get(str(rec.path), 0) / frame_pixels
        groups[f"{rec.kind} {rec.exptime:g}s"].append(ratio)
    return {
        "per_kind": {k: _ratio_stats(v) for k, v in sorted(groups.items())},
        "calls": sum(counter.calls.values()),
        "pixels": sum(counter.pixels.values()),
    }


def timed(func: Callable[..., Any], store: dict[str, float], name: str) -> Callable[..., Any]:
    """``func`` that adds its wall time to ``store[name]`` (also used by masters_bench.py)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - t0

    return run


def _maxrss_mb(who: int) -> float:
    """``ru_maxrss`` in MiB (Linux reports KiB, macOS bytes)."""
    value = resource.getrusage(who).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024.0


def child(night: Path, out_dir: Path, scheduler: str, result_path: Path,
          budget_mb: float | None) -> int:
    """Build every master of ``night`` into ``out_dir`` and write what it cost as JSON.

    Parameters
    ----------
    night : Path
        Night folder ``ROOT/DATE``.
    out_dir : Path
        Where the masters go (should be empty, so every master is built).
    scheduler : str
        ``threads`` (dask's default threaded scheduler, reads counted) or
        ``distributed`` (a two-process LocalCluster).
    result_path : Path
        JSON file written on success.
    budget_mb : float, optional
        Override of ``CombineSettings.memory_budget_mb``.

    Returns
    -------
    int
        0 on success.
    """
    import dask
    import psutil

    from astep_dask.config import Settings
    from astep_dask.io.headers import FrameType
    from astep_dask.io.layout import scan_night
    from astep_dask.io.stack import strip_rows
    from astep_dask.masters.builder import MasterBuilder

    settings = Settings()
    if budget_mb is not None:
        settings = settings.replace(combine={"memory_budget_mb": budget_mb})
    baseline_mb = psutil.Process().memory_info().rss / MB
    counter = install_counter() if scheduler == "threads" else None
    t0 = time.perf_counter()
    inventory = scan_night(night)
    t_scan = time.perf_counter() - t0
    darks = inventory.select(FrameType.DARK)
    shape = darks[0].shape
    per_exptime = {f"{et:g}": len(inventory.select(FrameType.DARK, exptime=et))
                   for et in inventory.exptimes(FrameType.DARK)}
    rows = {et: strip_rows(n, shape, settings.combine.memory_budget_mb)
            for et, n in per_exptime.items()}

    steps: dict[str, float] = {}
    builder = MasterBuilder(inventory, out_dir, settings)
    for name in ("bias", "darks", "flats", "mask"):
        setattr(builder, name, timed(getattr(builder, name), steps, name))

    cluster_s = 0.0
    if scheduler == "threads":
        with dask.config.set(scheduler="threads"):
            t1 = time.perf_counter()
            builder.build()
            build_s = time.perf_counter() - t1
    elif scheduler == "distributed":
        from distributed import Client, LocalCluster

        t1 = time.perf_counter()
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster):
            cluster_s = time.perf_counter() - t1
            t2 = time.perf_counter()
            builder.build()
            build_s = time.perf_counter() - t2
    else:
        raise ValueError(f"unknown scheduler {scheduler!r}")

    result = {
        "scheduler": scheduler,
        "frames": len(inventory.frames),
        "darks_per_exptime": per_exptime,
        "shape": list(shape),
        "memory_budget_mb": settings.combine.memory_budget_mb,
        "strip_rows": rows,
        "strip_mb": {et: per_exptime[et] * rows[et] * shape[1] * 4 / MB for et in rows},
        "baseline_rss_mb": baseline_mb,
        "maxrss_self_mb": _maxrss_mb(resource.RUSAGE_SELF),
        "maxrss_children_mb": _maxrss_mb(resource.RUSAGE_CHILDREN),
        "scan_s": t_scan,
        "cluster_start_s": cluster_s,
        "build_s": build_s,
        "steps_s": steps,
        "built": builder.report.built,
        "notes": builder.report.notes,
        "rejected": builder.report.rejected,
        "reads": read_summary(counter, inventory) if counter is not None else None,
    }
    result_path.write_text(json.dumps(result, indent=2))
    return 0


# --------------------------------------------------------------------------- parent


def simulate(workdir: Path, size: int, n_darks: int, seed: int) -> Path:
    """Simulate (or reuse) a night of ``n_darks`` darks per exposure time.

    Parameters
    ----------
    workdir : Path
        Benchmark work folder; nights go to ``WORKDIR/nights/``.
    size : int
        Frame side in pixels.
    n_darks : int
        Darks per exposure time.
    seed : int
        Random seed of the simulation.

    Returns
    -------
    Path
        The night folder ``ROOT/DATE``.
    """
    from astep_dask.testing.simulate import SimConfig, simulate_night

    cfg = SimConfig(date=DATE, size=size, n_science=1, n_darks=n_darks, n_flats=N_FLATS,
                    seed=seed)
    root = workdir / "nights" / f"n{size}_d{n_darks}"
    marker = root / "simulated.json"
    wanted = json.loads(json.dumps(asdict(cfg)))
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return root / DATE
    shutil.rmtree(root, ignore_errors=True)
    print(f"simulating {root.name} ...", flush=True)
    t0 = time.perf_counter()
    night = simulate_night(root, cfg)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    marker.write_text(json.dumps(wanted))
    return night


def measure(night: Path, n_darks: int, scheduler: str, args: argparse.Namespace,
            repeat: int) -> dict[str, Any]:
    """Run one build in a subprocess and merge the parent's and the child's figures.

    Parameters
    ----------
    night : Path
        Night folder.
    n_darks : int
        Darks per exposure time (label only).
    scheduler : str
        ``threads`` or ``distributed``.
    args : argparse.Namespace
        Parsed arguments (work folder, budget, timeout).
    repeat : int
        Index of the repetition (label only).

    Returns
    -------
    dict
        ``n_darks``, ``scheduler``, the :class:`bench_night.Measurement` fields and the
        child's JSON under ``child`` (``{}`` when it failed).
    """
    name = f"masters_d{n_darks}_{scheduler}" + (f"_r{repeat}" if repeat else "")
    out_dir = args.workdir / "runs" / name
    result_path = args.workdir / "runs" / f"{name}.json"
    shutil.rmtree(out_dir, ignore_errors=True)
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(night),
               "--child-out", str(out_dir), "--child-scheduler", scheduler,
               "--child-result", str(result_path)]
    if args.budget_mb is not None:
        command += ["--budget-mb", str(args.budget_mb)]
    print(f"running {name}", flush=True)
    m = run_measured(name, command, args.workdir / "logs", args.timeout)
    info = json.loads(result_path.read_text()) if result_path.exists() else {}
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"  -> {m.status}, {m.wall_s:.1f} s wall, {m.peak_rss_mb:.0f} MiB tree peak"
          + (f": {m.error}" if m.error else ""), flush=True)
    return {"n_darks": n_darks, "scheduler": scheduler, "repeat": repeat, **asdict(m),
            "child": info}


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table: one line per build.

    Parameters
    ----------
    rows : sequence of dict
        Results of :func:`measure`.

    Returns
    -------
    str
        Columns: darks per exposure time, scheduler, status, wall (subprocess), build
        (``MasterBuilder.build`` alone), CPU of the tree, strip rows and strip MiB, baseline
        RSS after imports, kernel peak RSS of the main process and its largest child, the
        sampled peak of the tree, and the pixels-read ratio of the darks (min-max).
    """
    header = (f"{'N':>5s} {'sched':<11s} {'status':<7s} {'wall s':>7s} {'build s':>7s} "
              f"{'CPU s':>7s} {'rows':>9s} {'stripMiB':>8s} {'base MiB':>8s} "
              f"{'maxrss':>7s} {'worker':>7s} {'tree pk':>7s} {'dark px/frame':>14s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        c = r["child"]
        rows_txt = "/".join(str(v) for v in c.get("strip_rows", {}).values()) or "-"
        strip = max(c.get("strip_mb", {}).values(), default=None)
        reads = c.get("reads") or {}
        dark = [v for k, v in reads.get("per_kind", {}).items() if k.startswith("dark")]
        ratio = (f"{min(d['min'] for d in dark):.3f}-{max(d['max'] for d in dark):.3f}"
                 if dark else "-")
        worker = c.get("maxrss_children_mb") if r["scheduler"] == "distributed" else None
        lines.append(
            f"{r['n_darks']:>5d} {r['scheduler']:<11s} {r['status']:<7s} "
            f"{_fmt(r['wall_s']):>7s} {_fmt(c.get('build_s')):>7s} {_fmt(r['cpu_s']):>7s} "
            f"{rows_txt:>9s} {_fmt(strip, '.0f'):>8s} "
            f"{_fmt(c.get('baseline_rss_mb'), '.0f'):>8s} "
            f"{_fmt(c.get('maxrss_self_mb'), '.0f'):>7s} {_fmt(worker, '.0f'):>7s} "
            f"{_fmt(r['peak_rss_mb'], '.0f'):>7s} {ratio:>14s}"
        )
    return "\n".join(lines)


def format_reads(rows: Sequence[dict[str, Any]]) -> str:
    """Per-kind pixels-read ratios of the counted (threaded) builds."""
    lines = []
    for r in rows:
        reads = (r["child"] or {}).get("reads")
        if not reads:
            continue
        kinds = ", ".join(
            f"{k}: {v['files']} files, {v['min']:.3f}-{v['max']:.3f}"
            for k, v in reads["per_kind"].items()
        )
        lines.append(f"  N={r['n_darks']}: {kinds}; {reads['calls']} read calls")
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text}")
    return values


def _schedulers(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in SCHEDULERS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"schedulers are {', '.join(SCHEDULERS)}: {text}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser (the ``--child*`` options are internal)."""
    p = argparse.ArgumentParser(
        description="Peak RSS and wall time of building master darks/flats against the "
        "number of darks, each build in a fresh subprocess.")
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels")
    p.add_argument("--frames", type=_int_list, default=[12, 50, 200],
                   help="comma-separated darks per exposure time (default 12,50,200)")
    p.add_argument("--schedulers", type=_schedulers, default=list(SCHEDULERS),
                   help="comma-separated: threads, distributed (default both)")
    p.add_argument("--repeat", type=int, default=1, help="builds per N and scheduler")
    p.add_argument("--budget-mb", type=float, default=None,
                   help="override CombineSettings.memory_budget_mb (default: the setting's)")
    p.add_argument("--seed", type=int, default=1, help="simulation seed")
    p.add_argument("--workdir", type=Path,
                   default=Path(tempfile.gettempdir()) / "astep-bench-masters",
                   help="work folder: nights, logs, masters_memory.json")
    p.add_argument("--timeout", type=float, default=None, help="seconds per build")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-scheduler", choices=SCHEDULERS, help=argparse.SUPPRESS)
    p.add_argument("--child-result", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--child``, one build).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 when every build succeeded, 3 when some did not.
    """
    args = build_parser().parse_args(argv)
    if args.child is not None:
        return child(args.child, args.child_out, args.child_scheduler, args.child_result,
                     args.budget_mb)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    subreaper = become_subreaper()
    nights = {n: simulate(args.workdir, args.size, n, args.seed) for n in args.frames}
    rows = [
        measure(nights[n], n, sched, args, rep)
        for n in args.frames
        for sched in args.schedulers
        for rep in range(args.repeat)
    ]
    report = {
        "config": {"size": args.size, "frames": args.frames, "schedulers": args.schedulers,
                   "flats": N_FLATS, "repeat": args.repeat, "budget_mb": args.budget_mb,
                   "subreaper": subreaper, "pid": os.getpid()},
        "machine": machine_info(),
        "runs": rows,
    }
    out = args.workdir / "masters_memory.json"
    out.write_text(json.dumps(report, indent=2))
    print()
    print(f"masters of a {args.size}x{args.size} night: N darks per exposure time (x2 "
          f"exposure times), {N_FLATS} flats; {report['machine']['cpus']} CPUs")
    print("wall: subprocess; build: MasterBuilder.build(); maxrss: kernel peak RSS of the "
          "main process; worker: largest worker's; tree pk: sampled sum over the tree "
          "(MiB)")
    print(format_table(rows))
    reads = format_reads(rows)
    if reads:
        print("\npixels read per file / pixels per frame (threaded builds):")
        print(reads)
    print(f"\nresults written to {out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
