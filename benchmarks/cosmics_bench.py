"""Cosmic-ray detection alone: speed and quality of ``find_cosmics`` against the truth.

    python benchmarks/cosmics_bench.py --size 2048 --frames 4
    python benchmarks/cosmics_bench.py --night ROOT/2026-06-15 --calibrated CAL/2026-06-15

Simulates a night (or reuses ``--night``, a simulated night with its truth), calibrates
its science frames once with cosmic-ray detection off (or reuses ``--calibrated``, a folder
of such ``*_CAL.fits``), then runs :func:`astep_dask.core.cosmics.find_cosmics` on the same
frames with each compared setting, in this one process, and reports per setting:

- ``s/frame``: median wall time per frame, ``cpu/frame``: median CPU time (process time:
  all threads of this process) per frame. The machine may be shared: compare settings
  within one run, not across runs;
- ``recall``: fraction of the true cosmic-ray pixels that are flagged, or were unusable
  anyway (masked), or are too faint to matter (within 5 sigma of the noiseless model), as
  ``tests/run/test_night.py`` counts it; ``flagged`` is the plain flagged fraction;
- ``core``: star-core pixels (noiseless model 20 sky sigmas above the sky) flagged and not
  next to a true cosmic-ray pixel, as a fraction of all star-core pixels;
- ``false``: flagged pixels not within one pixel of a true cosmic-ray pixel, per frame;
- ``vs_full``: pixels flagged by both this setting and the first one (the whole frame at
  once by default), over the larger of the two counts.

With ``--threads 1,2`` the first setting also runs on every frame (``--repeat`` times)
from a pool of that many threads of this one process, as dask worker threads do: the
median wall time per frame against one thread shows how much the threads wait for each
other (for the GIL: the Python parts of the chain hold it, the compiled parts release it).

OpenMP threads of astroscrappy are limited to one (``OMP_NUM_THREADS``, unless set) before
anything is imported, so that times are single-threaded as on a one-thread dask worker.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from astep_dask.config import CosmicSettings, Settings
from astep_dask.core.bits import Bit
from astep_dask.core.cosmics import find_cosmics
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night

CR = np.int32(1 << Bit.CR)


def parse_settings(text: str) -> CosmicSettings:
    """``CosmicSettings`` from ``'default'`` or ``'field=value,field=value'``."""
    base = CosmicSettings()
    if text == "default":
        return base
    changes = {}
    for item in text.split(","):
        key, value = item.split("=")
        changes[key] = type(getattr(base, key))(value)
    return replace(base, **changes)


def calibrate_without_cosmics(night: Path, out: Path) -> Path:
    """Calibrate ``night`` with cosmic-ray detection off; return the folder of frames."""
    from distributed import Client, LocalCluster

    from astep_dask.io.products import output_dir
    from astep_dask.run.night import calibrate_night

    settings = Settings().replace(cluster={"dashboard_address": ":0"},
                                  cosmics={"enabled": False})
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        result = calibrate_night(night, client, settings, out=out)
    if result.status != "complete":
        raise SystemExit(f"calibration ended {result.status}: {result.counts}")
    return output_dir(night, out)


def load_frames(folder: Path, night: Path, n: int) -> list[dict]:
    """The first ``n`` calibrated frames of ``folder`` with their truth."""
    sky = load_truth(night).config.sky
    frames = []
    for path in sorted(folder.glob("*_SCIENCE_CAL.fits"))[:n]:
        with fits.open(path) as hdul:
            header = hdul[0].header
            frame = {
                "name": path.name,
                "sci": hdul["SCI"].data.astype(np.float32),
                "var": hdul["VAR"].data.astype(np.float32),
                "mask": hdul["MASK"].data.astype(np.int32) & ~CR,
                "read_noise": float(header["RDNOISE"]),
            }
        truth = load_frame_truth(night, header["RAWFILE"].removesuffix(".fits"))
        frame["cr"] = truth["cr"] > 0
        frame["model"] = truth["model"]
        frame["core"] = (truth["model"] - sky) > 20 * np.sqrt(sky)
        frames.append(frame)
    return frames


def score(frame: dict, flagged: np.ndarray) -> dict:
    """Pixel counts of one frame's detections against its truth (see the module doc)."""
    cr, sci, var, mask = frame["cr"], frame["sci"], frame["var"], frame["mask"]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (sci - frame["model"]) / np.sqrt(var)
    near_cr = ndimage.binary_dilation(cr, structure=np.ones((3, 3), bool))
    return {
        "n_cr": int(cr.sum()),
        "n_ok": int((cr & (flagged | (mask != 0) | (np.abs(z) < 5))).sum()),
        "n_flagged_cr": int((cr & flagged).sum()),
        "n_core": int(frame["core"].sum()),
        "n_core_flagged": int((flagged & frame["core"] & ~near_cr).sum()),
        "n_false": int((flagged & ~near_cr).sum()),
        "n_flagged": int(flagged.sum()),
    }


def run(frames: list[dict], settings: dict[str, CosmicSettings]) -> dict:
    """Time and score every setting on every frame; settings alternate frame by frame so
    that a change in the machine's load affects them alike."""
    results: dict[str, dict] = {k: {"wall": [], "cpu": [], "scores": [], "masks": []}
                                for k in settings}
    for frame in frames:
        for name, cs in settings.items():
            w0, c0 = time.perf_counter(), time.process_time()
            flagged, _ = find_cosmics(frame["sci"], frame["var"], frame["mask"], cs,
                                      frame["read_noise"])
            r = results[name]
            r["wall"].append(time.perf_counter() - w0)
            r["cpu"].append(time.process_time() - c0)
            r["scores"].append(score(frame, flagged))
            r["masks"].append(flagged)
    reference = next(iter(results.values()))["masks"]
    report = {}
    for name, r in results.items():
        tot = {k: sum(s[k] for s in r["scores"]) for k in r["scores"][0]}
        common = sum(int((a & b).sum()) for a, b in zip(r["masks"], reference, strict=True))
        larger = max(tot["n_flagged"], sum(int(m.sum()) for m in reference), 1)
        report[name] = {
            "s_per_frame": float(np.median(r["wall"])),
            "cpu_per_frame": float(np.median(r["cpu"])),
            "recall": tot["n_ok"] / max(tot["n_cr"], 1),
            "flagged_fraction": tot["n_flagged_cr"] / max(tot["n_cr"], 1),
            "core_fraction": tot["n_core_flagged"] / max(tot["n_core"], 1),
            "false_per_frame": tot["n_false"] / len(frames),
            "vs_full": common / larger,
            **tot,
        }
    return report


def run_threads(frames: list[dict], cs: CosmicSettings, counts: list[int],
                repeat: int) -> dict[int, dict]:
    """Per-frame wall time and throughput of ``find_cosmics`` run from a pool of each
    count of threads, every frame ``repeat`` times; counts alternate ``repeat`` times
    so that a change in the machine's load affects them alike."""
    from concurrent.futures import ThreadPoolExecutor

    def one(frame: dict) -> float:
        t0 = time.perf_counter()
        find_cosmics(frame["sci"], frame["var"], frame["mask"], cs, frame["read_noise"])
        return time.perf_counter() - t0

    times: dict[int, list[float]] = {n: [] for n in counts}
    walls: dict[int, float] = dict.fromkeys(counts, 0.0)
    cpus: dict[int, float] = dict.fromkeys(counts, 0.0)
    for _ in range(repeat):
        for n in counts:
            with ThreadPoolExecutor(n) as pool:
                w0, c0 = time.perf_counter(), time.process_time()
                times[n] += list(pool.map(one, frames * n))
                walls[n] += time.perf_counter() - w0
                cpus[n] += time.process_time() - c0
    return {n: {"s_per_frame": float(np.median(times[n])),
                "frames_per_s": len(times[n]) / walls[n], "cpu_per_wall": cpus[n] / walls[n]}
            for n in counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="simulated frame size (px)")
    parser.add_argument("--frames", type=int, default=4, help="frames timed per setting")
    parser.add_argument("--cr-per-mpix", type=float, default=30.0)
    parser.add_argument("--night", type=Path, help="reuse this simulated night")
    parser.add_argument("--calibrated", type=Path, help="reuse these calibrated frames")
    parser.add_argument("--workdir", type=Path, help="where to simulate and calibrate")
    parser.add_argument("settings", nargs="*", default=["tile=0", "default"],
                        help="settings to compare, each 'default' or comma-separated "
                             "CosmicSettings fields, e.g. tile=0 (the whole frame) or "
                             "tile=64,margin=16 (default: tile=0 default)")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--threads", help="comma-separated thread counts: run the first "
                        "setting from a pool of each many threads (e.g. 1,2)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of --threads")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cosmics_bench_"))
    night = args.night
    if night is None:
        cfg = SimConfig(size=args.size, n_science=args.frames, n_darks=5, n_flats=5,
                        cr_per_mpix=args.cr_per_mpix)
        night = simulate_night(work / "raw", cfg)
    folder = args.calibrated or calibrate_without_cosmics(night, work / "cal")
    frames = load_frames(folder, night, args.frames)
    settings = {text: parse_settings(text) for text in args.settings}
    shape = frames[0]["sci"].shape
    print(f"{len(frames)} frames of {shape[1]}x{shape[0]} from {folder}, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    report = run(frames, settings)
    print(f"{'setting':>30} {'s/frame':>8} {'cpu/frame':>9} {'recall':>7} {'flagged':>7} "
          f"{'core':>8} {'false':>6} {'vs_full':>7}")
    for name, r in report.items():
        print(f"{name:>30} {r['s_per_frame']:8.3f} {r['cpu_per_frame']:9.3f} "
              f"{r['recall']:7.4f} {r['flagged_fraction']:7.4f} {r['core_fraction']:8.5f} "
              f"{r['false_per_frame']:6.1f} {r['vs_full']:7.4f}")
    if args.threads:
        counts = [int(n) for n in args.threads.split(",")]
        first = next(iter(settings))
        threads = run_threads(frames, settings[first], counts, args.repeat)
        print(f"\n{first} from a pool of threads (each frame {args.repeat}x per thread):")
        print(f"{'threads':>7} {'s/frame':>8} {'vs 1':>6} {'frames/s':>8} {'cpu/wall':>8}")
        for n, r in threads.items():
            print(f"{n:>7} {r['s_per_frame']:8.3f} "
                  f"{r['s_per_frame'] / threads[counts[0]]['s_per_frame']:6.2f} "
                  f"{r['frames_per_s']:8.2f} {r['cpu_per_wall']:8.2f}")
        report["threads"] = threads
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
