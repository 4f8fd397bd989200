"""What TLS costs a calibration run with worker processes.

Runs ``astep-dask calibrate NIGHT --processes`` on one simulated night, alternately with
the run's TLS (the default) and without it (``[cluster] tls = false``, for this
measurement only), ``--repeat`` times each, every run into a fresh output folder, and
prints the median wall time of the command and of the pipeline (manifest
``wall_seconds``: masters and frames, without the cluster's start-up), and the CPU
seconds of the command's process tree (workers included; less sensitive than wall time
to other load on a shared machine)::

    python benchmarks/tls_bench.py --size 1024 --science 12 --workers 2 --repeat 3

TLS encrypts the control messages and the masters and frames moving between processes;
the frames themselves are read and written by the workers, so the difference is
expected to be within the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from astep_dask.testing.simulate import SimConfig, simulate_night


def run_once(night: Path, out: Path, workers: int, config: Path | None) -> dict[str, float]:
    """One ``astep-dask calibrate`` run; its command and pipeline wall times (s)."""
    command = [sys.executable, "-m", "astep_dask.cli", "calibrate", str(night), "--out", str(out),
               "--processes", "--workers", str(workers), "--threads", "1",
               "--dashboard-address", "127.0.0.1:0"]
    if config is not None:
        command += ["--config", str(config)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"calibrate failed ({done.returncode}): {done.stderr[-2000:]}")
    manifest = json.loads((out / night.name / "manifest.json").read_text())
    return {"command_s": wall, "pipeline_s": float(manifest["wall_seconds"]), "cpu_s": cpu}


def main(argv: Sequence[str] | None = None) -> int:
    """Simulate, run both ways ``--repeat`` times (interleaved), print the medians."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="frame side in pixels")
    p.add_argument("--science", type=int, default=12, help="science frames")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--repeat", type=int, default=3, help="runs of each kind")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="tls-bench-"))
    try:
        cfg = dataclasses.replace(SimConfig(), size=args.size, n_science=args.science,
                                  n_darks=5, n_flats=5, seed=7)
        night = simulate_night(work / "archive", cfg)
        plain = work / "notls.toml"
        plain.write_text("[cluster]\ntls = false\n")
        times: dict[str, list[dict[str, float]]] = {"tls": [], "plain": []}
        for i in range(args.repeat):
            for kind, config in (("tls", None), ("plain", plain)):
                times[kind].append(run_once(night, work / f"out-{kind}-{i}", args.workers,
                                            config))
        print(f"night {args.size}² x {args.science} frames, {args.workers} worker processes, "
              f"{args.repeat} runs each (median, min-max):")
        for kind, runs in times.items():
            line = [f"  {kind:<6}"]
            for key in ("command_s", "pipeline_s", "cpu_s"):
                values = [r[key] for r in runs]
                line.append(f"{key} {statistics.median(values):6.2f} "
                            f"({min(values):.2f}-{max(values):.2f})")
            print("  ".join(line))
        print(json.dumps(times))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
