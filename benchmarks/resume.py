"""What a run reads, and what a re-run with nothing to do costs.

Three figures (issue: "one night plan ... archive-scale resume from metadata"):

1. **First run**: bytes read by the whole process tree of ``astep-dask calibrate`` on a new
   night, against the night's raw bytes (each raw byte should be read about once).
2. **No-op re-run**: the same command again on the complete night: bytes read against the
   raw + product bytes (it should read headers and metadata, not data).
3. **No-op re-run of a long night**: wall time of ``calibrate`` on a complete night of many
   small frames (per-frame overhead of deciding that a frame is done).

Bytes read are the kernel's ``rchar`` of the process tree: this script's own
``/proc/self/io`` before and after the command, which counts every descendant the
kernel reaped into it (this process becomes a subreaper, so orphans are reaped here too).
``rchar`` counts every ``read()``, from the page cache too, so it measures work, not disk
traffic. A run also reads its Python modules: the same command's start-up (``astep-dask
calibrate --help`` would not import the pipeline, so ``python -c 'import ...'`` of the
modules a run imports) is measured and reported beside, not subtracted silently::

    python benchmarks/resume.py --size 2048 --science 12
    python benchmarks/resume.py --long 2000 --skip-big        # figure 3 only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_night import become_subreaper  # noqa: E402

IMPORTS = ("import astep_dask.run.night, astep_dask.run.frames, astep_dask.cli.commands, "
           "distributed, astroscrappy, astropy.io.fits, scipy.ndimage")


def rchar() -> int:
    """Bytes read (``rchar``) by this process and the descendants it has reaped."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def measured(argv: list[str], log: Path) -> dict:
    """Run ``argv`` to its end; its wall time, exit code and bytes read (tree)."""
    before = rchar()
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    try:  # orphans adopted by this subreaper: reap them so their reads are counted
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    return {"rc": rc, "seconds": round(wall, 2), "rchar": rchar() - before,
            "log": str(log)}


def tree_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the regular files under ``folder`` matching ``pattern``."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def calibrate(night: Path, out: Path, log: Path, *extra: str) -> dict:
    script = str(Path(sys.executable).with_name("astep-dask"))
    return measured([script, "calibrate", str(night), "--out", str(out), "-q",
                     "--dashboard-address", "127.0.0.1:0", *extra], log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="side of the big night's frames")
    p.add_argument("--science", type=int, default=12, help="science frames of the big night")
    p.add_argument("--long", type=int, default=2000, help="frames of the long night")
    p.add_argument("--long-size", type=int, default=32, help="side of its frames")
    p.add_argument("--skip-big", action="store_true", help="figure 3 only")
    p.add_argument("--skip-long", action="store_true", help="figures 1 and 2 only")
    p.add_argument("--workdir", type=Path, help="data and outputs (default: a temp folder)")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)

    from astep_dask.testing.simulate import SimConfig, simulate_night
    from astep_dask.version import __version__

    become_subreaper()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="astep-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"astep_dask": __version__, "commit": _commit()}
    start = measured([sys.executable, "-c", IMPORTS], work / "imports.log")
    report["imports_rchar"] = start["rchar"]
    print(f"start-up imports alone read {start['rchar'] / 1e6:.1f} MB")

    if not args.skip_big:
        night = work / "big" / "2026-06-15"
        if not night.exists():
            simulate_night(work / "big", SimConfig(size=args.size, n_science=args.science,
                                                   n_darks=8, n_flats=9, seed=1))
        out = work / "big-out"
        raw = tree_bytes(night, "*.fits")
        first = calibrate(night, out, work / "first.log")
        products = tree_bytes(out / night.name)
        again = calibrate(night, out, work / "again.log")
        report["big"] = {"raw_bytes": raw, "product_bytes": products, "first": first,
                         "again": again,
                         "first_read_per_raw": first["rchar"] / raw,
                         "again_read_per_raw_and_products": again["rchar"] / (raw + products)}
        print(f"{args.size}² night, {args.science} science frames: raw {raw / 1e6:.0f} MB, "
              f"products {products / 1e6:.0f} MB")
        print(f"  first run:  {first['seconds']:.1f} s, read {first['rchar'] / 1e6:.0f} MB = "
              f"{first['rchar'] / raw:.2f} x raw (rc {first['rc']})")
        print(f"  no-op re-run: {again['seconds']:.1f} s, read {again['rchar'] / 1e6:.0f} MB = "
              f"{again['rchar'] / (raw + products):.3f} x (raw + products) (rc {again['rc']})")

    if not args.skip_long:
        night = work / "long" / "2026-06-15"
        if not night.exists():
            cfg = dataclasses.replace(SimConfig(), size=args.long_size, n_science=args.long,
                                      n_darks=3, n_flats=3, movers=(), seed=2)
            simulate_night(work / "long", cfg)
        out = work / "long-out"
        first = calibrate(night, out, work / "long-first.log", "--no-cosmics")
        again = calibrate(night, out, work / "long-again.log", "--no-cosmics")
        report["long"] = {"frames": args.long, "first": first, "again": again}
        print(f"{args.long} frames of {args.long_size}²: first run {first['seconds']:.1f} s "
              f"(rc {first['rc']}), no-op re-run {again['seconds']:.1f} s (rc {again['rc']}), "
              f"read {again['rchar'] / 1e6:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
