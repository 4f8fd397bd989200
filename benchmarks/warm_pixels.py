"""Warm pixels (issue 29 item 8): what the warm-pixel sample finds and what it costs.

A simulated night with ``--warm`` warm pixels that only the science frames show is
calibrated twice on one local cluster: once without the sample (``[cosmics] warm_frames =
0``, the behaviour before) and once with the defaults. Printed: the cosmic-ray flags that
land on the truth's warm pixels in each run, the warm pixels found against the truth, the
real cosmic-ray pixels flagged (recall over the truth's > 5 sigma ones) and each run's
wall time (the difference is the sample's cost; the run without is made again last, so
that neither run pays alone for a cold start)::

    python benchmarks/warm_pixels.py --size 256 --science 100 --warm 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster
from scipy import ndimage

from astep_dask.config import Settings
from astep_dask.core.bits import Bit, flag
from astep_dask.io.fitsio import read_calibrated
from astep_dask.io.products import output_dir
from astep_dask.masters.store import read_master
from astep_dask.masters.warm import warm_name
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night

CR, WARM = flag(Bit.CR), flag(Bit.WARM)


def _figures(night: Path, out: Path, warm: np.ndarray) -> dict:
    """CR flags on warm pixels, WARM-flagged warm pixels, and CR recall, over the frames."""
    on_warm = warm_flagged = n_cr = n_ok = 0
    frames = sorted(output_dir(night, out).glob("*_CAL.fits"))
    for f in frames:
        header, sci, var, mask = read_calibrated(f)
        ft = load_frame_truth(night, header["RAWFILE"].removesuffix(".fits"))
        on_warm += int(((mask[warm] & CR) != 0).sum())
        warm_flagged += int(((mask[warm] & WARM) != 0).sum())
        must = (ft["cr"] > 0) & (np.abs((sci - ft["model"]) / np.sqrt(var)) > 5)
        must &= (mask & ~CR) == 0
        n_cr += int(must.sum())
        n_ok += int((must & ((mask & CR) != 0)).sum())
    return {"frames": len(frames), "cr_on_warm": on_warm, "warm_flagged": warm_flagged,
            "cr_recall": n_ok / max(n_cr, 1), "cr_pixels": n_cr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--science", type=int, default=100)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    cfg = SimConfig(size=args.size, n_science=args.science, n_darks=5, n_flats=5,
                    n_warm=args.warm, cr_per_mpix=100.0, seed=29)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        night = simulate_night(Path(tmp) / "archive", cfg)
        print(f"simulated {args.science} frames of {args.size}² with {args.warm} warm "
              f"pixels in {time.perf_counter() - t0:.1f} s")
        warm = load_truth(night).warm > 0
        base = Settings().replace(cluster={"dashboard_address": ":0"},
                                  illum={"enabled": False})
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            off = base.replace(cosmics={"warm_frames": 0})
            # Three runs, the first again last: its wall time without a cold start.
            for i, (label, settings) in enumerate((("without sample", off),
                                                   ("with sample", base),
                                                   ("without sample, again", off))):
                out = Path(tmp) / f"run{i}"
                t0 = time.perf_counter()
                result = calibrate_night(night, client, settings, out=out)
                wall = time.perf_counter() - t0
                fig = _figures(night, out, warm)
                path = output_dir(night, out) / warm_name(cfg.date)
                found = ""
                if path.exists():
                    m = (read_master(path).data & WARM) != 0
                    near = ndimage.binary_dilation(warm, structure=np.ones((3, 3), bool))
                    found = (f"; warm map: {int((m & warm).sum())} of {int(warm.sum())} "
                             f"truth warm pixels, {int((m & ~warm).sum())} others "
                             f"({int((m & ~near).sum())} not next to one)")
                print(f"{label}: {result.status} in {wall:.1f} s; CR flags on warm pixels "
                      f"{fig['cr_on_warm']} (of {fig['frames'] * int(warm.sum())} pixel-frames), "
                      f"WARM-flagged {fig['warm_flagged']}; CR recall "
                      f"{fig['cr_recall']:.4f} of {fig['cr_pixels']}{found}")


if __name__ == "__main__":
    main()
