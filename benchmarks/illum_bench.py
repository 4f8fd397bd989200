"""What the illumination correction adds to a night's calibration time (issue 18).

Simulates a night (once, kept under ``--root``) and calibrates it with ``[illum]`` on
and off, alternately, each time into an empty output folder, on one in-process dask
cluster (the default local layout), and prints the wall and CPU seconds of each run and
the correction's share::

    python benchmarks/illum_bench.py --size 2048 --science 60 --repeat 2

CPU seconds (of this process and its worker threads) are the steadier figure on a shared
machine; wall seconds are what a user waits. ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from distributed import Client, LocalCluster

from astep_dask.config import Settings
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, simulate_night


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def calibrate_once(night: Path, out: Path, client: Client, settings: Settings) -> dict:
    """Calibrate ``night`` into the empty ``out``; wall and CPU seconds."""
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = _cpu(), time.perf_counter()
    result = calibrate_night(night, client, settings, out=out)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    if result.status != "complete":
        raise SystemExit(f"calibration {result.status}: {result.error}")
    illum = result.details["masters"].get("illum", {})
    return {"wall_s": wall, "cpu_s": cpu, "illum": illum}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--science", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", type=Path, default=Path("/tmp/astep_illum_bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cfg = SimConfig(size=args.size, n_science=args.science, sky_gradient=0.005, seed=7)
    night = args.root / f"n{args.size}_s{args.science}" / cfg.date
    if not night.exists():
        t0 = time.perf_counter()
        simulate_night(night.parent, cfg)
        print(f"simulated {night} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    on = Settings()
    off = on.replace(illum={"enabled": False})
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    with LocalCluster(n_workers=1, threads_per_worker=args.threads, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        calibrate_once(night, args.root / "warm", client, off)  # imports, caches
        for i in range(args.repeat):
            for key, settings in (("off", off), ("on", on)):
                row = calibrate_once(night, args.root / f"out_{key}", client, settings)
                runs[key].append(row)
                print(f"run {i + 1} illum {key:>3}: wall {row['wall_s']:6.1f} s, "
                      f"cpu {row['cpu_s']:6.1f} s", file=sys.stderr)
    summary = {k: {"wall_s": statistics.median(r["wall_s"] for r in v),
                   "cpu_s": statistics.median(r["cpu_s"] for r in v)} for k, v in runs.items()}
    added_wall = summary["on"]["wall_s"] / summary["off"]["wall_s"] - 1
    added_cpu = summary["on"]["cpu_s"] / summary["off"]["cpu_s"] - 1
    print(f"{args.size}² night, {args.science} frames, {args.threads} threads, median of "
          f"{args.repeat}: without correction {summary['off']['wall_s']:.1f} s wall / "
          f"{summary['off']['cpu_s']:.1f} s CPU; with {summary['on']['wall_s']:.1f} s / "
          f"{summary['on']['cpu_s']:.1f} s: +{100 * added_wall:.1f} % wall, "
          f"+{100 * added_cpu:.1f} % CPU")
    print(f"correction: {runs['on'][-1]['illum']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "summary": summary,
                                         "added_wall": added_wall, "added_cpu": added_cpu},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
