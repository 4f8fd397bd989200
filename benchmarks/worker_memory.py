"""Memory each dask worker process holds once a night's frames are calibrated.

    python benchmarks/worker_memory.py --size 2048 --science 24 --workers 2

Simulates a night (or takes ``--night``), calibrates it on a ``LocalCluster`` of
``--workers`` single-threaded worker processes started as ``astep-dask calibrate`` starts
them (``astep_dask.run.cluster.local_cluster``: forked from a server process that has
imported the pipeline), then asks each worker for its resident (RSS), proportional (PSS:
shared pages divided among the processes that map them) and unique (USS) memory, and how
many masters it keeps loaded. Since issue 16 the planes a frame needs are memory-mapped
from one file per run (``astep_dask.masters.shared``) instead of made and kept by every
worker: they count in RSS whole, in PSS divided among the workers, and in USS not at all.
Compare with an earlier version by running that version's copy of this script with
``PYTHONPATH`` set to its checkout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def worker_memory() -> dict:
    """This worker process's memory (MiB) and what it keeps of the masters."""
    import psutil

    from astep_dask.masters import store

    mem = psutil.Process().memory_full_info()
    return {"rss_mib": mem.rss / 2**20, "pss_mib": mem.pss / 2**20,
            "uss_mib": mem.uss / 2**20, "masters_loaded": store._load.cache_info().currsize}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="frame side (px)")
    parser.add_argument("--science", type=int, default=24, help="science frames")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--night", type=Path, help="calibrate this night (no simulation)")
    parser.add_argument("--workdir", type=Path, help="where the night and outputs go")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from distributed import Client

    from astep_dask.config import ClusterSettings, Settings
    from astep_dask.run.cluster import local_cluster
    from astep_dask.run.night import calibrate_night
    from astep_dask.testing.simulate import SimConfig, simulate_night

    work = args.workdir or Path(tempfile.mkdtemp(prefix="worker-memory-"))
    night = args.night or simulate_night(
        work / "archive", SimConfig(size=args.size, n_science=args.science, n_darks=8,
                                    n_flats=9))
    layout = ClusterSettings(n_workers=args.workers, threads_per_worker=1, processes=True,
                             dashboard_address=":0")
    with local_cluster(layout) as cluster, Client(cluster) as client:
        result = calibrate_night(night, client, Settings(), out=work / "out", force=True)
        rows = sorted(client.run(worker_memory).values(), key=lambda r: r["pss_mib"])
    report = {"night": str(night), "status": result.status, "counts": result.counts,
              "workers": rows}
    print(f"{night}: {result.status} {result.counts}")
    for r in rows:
        print(f"  worker: RSS {r['rss_mib']:.0f} MiB, PSS {r['pss_mib']:.0f} MiB, "
              f"USS {r['uss_mib']:.0f} MiB, masters kept loaded {r['masters_loaded']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if result.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
