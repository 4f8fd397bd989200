"""Wall and CPU time of building one night's masters, step by step.

The master stage (bias, darks, flats, bad-pixel mask) runs partly on dask workers (the
strip combinations) and partly in the calling process (flat levels' screening, the mask,
the FITS writes). On a shared machine the wall time says little on its own, so this
benchmark reports, within one run, the CPU seconds of the calling process and of each
worker process next to the wall time::

    python benchmarks/masters_bench.py /tmp/b2048/nights/n2048_s12_d8_f9/2026-06-15 \\
        --workers 2 --repeat 3

``--scheduler sync`` runs everything in this process on dask's synchronous scheduler
(CPU = wall on an idle core), the simplest figure to compare implementations with;
``--profile FILE`` then writes a cProfile of the build.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from masters_memory import timed  # this folder: the scripts share the timing wrapper


def _cpu_seconds() -> float:
    """CPU (user + system) of this process so far."""
    t = os.times()
    return t.user + t.system


def build_once(night: Path, out_dir: Path, client: Any | None,
               profile: Path | None = None) -> dict[str, Any]:
    """Build every master of ``night`` into the empty ``out_dir``; time it.

    Parameters
    ----------
    night : Path
        Night folder ``ROOT/DATE``.
    out_dir : Path
        Output folder (emptied first, so every master is built).
    client : distributed.Client or None
        Workers whose CPU time is measured; None for the synchronous scheduler.
    profile : Path, optional
        Write a cProfile of the build (of this process only) there.

    Returns
    -------
    dict
        ``wall_s``, ``cpu_main_s``, ``cpu_workers_s`` (per worker), ``steps_s``.
    """
    from astep_dask.config import Settings
    from astep_dask.io.layout import scan_night
    from astep_dask.masters.builder import MasterBuilder

    shutil.rmtree(out_dir, ignore_errors=True)
    inventory = scan_night(night)
    builder = MasterBuilder(inventory, out_dir, Settings())
    steps: dict[str, float] = {}
    for name in ("bias", "darks", "flats", "mask"):
        setattr(builder, name, timed(getattr(builder, name), steps, name))
    workers0 = client.run(_cpu_seconds) if client is not None else {}
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    builder.build()
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    wall = time.perf_counter() - t0
    cpu_main = _cpu_seconds() - cpu0
    workers1 = client.run(_cpu_seconds) if client is not None else {}
    per_worker = {w: workers1[w] - workers0[w] for w in workers1}
    return {"wall_s": wall, "cpu_main_s": cpu_main, "cpu_workers_s": per_worker,
            "cpu_total_s": cpu_main + sum(per_worker.values()), "steps_s": steps,
            "built": builder.report.built}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print one line per build and write ``--json`` if asked."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("night", type=Path, help="night folder ROOT/DATE")
    p.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    p.add_argument("--scheduler", choices=("distributed", "sync"), default="distributed")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "masters_bench")
    p.add_argument("--profile", type=Path, help="cProfile of the last build (this process)")
    p.add_argument("--json", type=Path, help="write the results there")
    args = p.parse_args(argv)

    import dask

    runs = []
    if args.scheduler == "sync":
        with dask.config.set(scheduler="synchronous"):
            for i in range(args.repeat):
                last = i == args.repeat - 1
                runs.append(build_once(args.night, args.out, None,
                                       args.profile if last else None))
                _print(runs[-1])
    else:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            for i in range(args.repeat):
                last = i == args.repeat - 1
                runs.append(build_once(args.night, args.out, client,
                                       args.profile if last else None))
                _print(runs[-1])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")
    shutil.rmtree(args.out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"scheduler": args.scheduler, "runs": runs,
                                         "maxrss_main_mb": peak}, indent=2))
    return 0


def _print(run: dict[str, Any]) -> None:
    workers = " + ".join(f"{v:.2f}" for v in run["cpu_workers_s"].values()) or "-"
    steps = ", ".join(f"{k} {v:.2f}" for k, v in run["steps_s"].items())
    print(f"wall {run['wall_s']:.2f} s; CPU main {run['cpu_main_s']:.2f} s, workers "
          f"{workers} s, total {run['cpu_total_s']:.2f} s; steps (wall): {steps}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
