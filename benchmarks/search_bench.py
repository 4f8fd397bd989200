"""Benchmark of the first-look search (issue 11), and the slow mover's self-subtraction.

``search``: simulate one night (default 1024², 12 frames, the simulator's movers and a
realistic cosmic-ray rate), calibrate it and write its KBMOD export with difference frames,
then time ``search_night`` alone on a LocalCluster (default 2 workers × 1 thread) over a
``--grid`` × ``--grid`` velocity grid (±1200 px/day). Prints the wall time, the work per
velocity, and the candidates against the truth: each mover's match (start, velocity, SNR
against the ideal matched-filter SNR from the truth) and the false candidates above 7 σ.

``self-subtraction``: the same night (default 256², 12 frames) plus ``--nights`` other
nights of the same field (same stars, other drifts, the movers elsewhere), exported with a
template from the night itself and from the other nights; prints, for every mover, the
flux kept and the SNR along its true path in the difference frames (KBMOD's psi/phi at the
true positions), and what the search finds.

``night-length``: the same field and movers on nights of ``--lengths`` frames (default 12,
24, 48; the drift per frame scaled so the whole night drifts as a 12-frame one), each
exported with a template from the night itself (leave-one-out; ``--grow`` overrides the
template's grow) and searched over ±``--vmax`` px/day: per fast mover, the SNR the search
finds and the SNR along its true path against the ideal, and the star residuals (share of
unmasked difference pixels beyond 5 σ).

    python benchmarks/search_bench.py search --size 1024 --frames 12 --grid 60 --workers 2
    python benchmarks/search_bench.py self-subtraction --size 256 --nights 2
    python benchmarks/search_bench.py night-length --size 256 --lengths 12,24,48 --vmax 800
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits
from distributed import Client, LocalCluster

from astep_dask.config import SearchSettings, Settings, TemplateSettings
from astep_dask.kbmod.candidates import read_candidates
from astep_dask.kbmod.search import (
    BlockJob,
    block_task,
    night_frames,
    search_night,
    tile_task,
    tiles_for,
)
from astep_dask.kbmod.shiftstack import margin_for, psi_phi, velocity_blocks, velocity_grid
from astep_dask.kbmod.stage import export_night
from astep_dask.run.night import calibrate_night
from astep_dask.run.results import StageResult
from astep_dask.testing.simulate import SimConfig, mover_tracks, simulate_night


def tracks(night: Path, export: StageResult) -> list[dict]:
    """Each mover on the export's reference grid
    (:func:`astep_dask.testing.simulate.mover_tracks`): start, velocity (px/day), positions,
    flux and the ideal matched-filter SNR."""
    headers = [fits.getheader(export.out_dir / r["output"]) for r in export.frames]
    stems = [h["CALFILE"].removesuffix("_CAL.fits") for h in headers]
    return mover_tracks(night, stems, headers[0]["REFFRAME"])


def along_path(export: StageResult, track: dict) -> tuple[float, float]:
    """(flux kept / true flux, SNR) of KBMOD's psi/phi summed at the true positions (VAR
    times FILTVARF, as the search takes it)."""
    psi = phi = 0.0
    for r, (x, y) in zip(export.frames, track["positions"], strict=True):
        with fits.open(export.out_dir / r["output"]) as hdul:
            var = hdul[3].data.astype(np.float32) * hdul[0].header.get("FILTVARF", 1.0)
            a, b = psi_phi(hdul[1].data.astype(np.float32), var, hdul[2].data,
                           hdul[0].header["PSFSIGMA"])
        psi += a[round(y), round(x)]
        phi += b[round(y), round(x)]
    return psi / phi / track["flux"], psi / np.sqrt(phi)


def judge(csv: Path, trs: list[dict]) -> dict:
    """Match candidates to the movers; count the others above 7 σ."""
    rows = read_candidates(csv)
    summ = json.loads((csv.parent / "search.json").read_text())
    span, step = summ["span_days"], summ["grid"]["step"]
    t = np.linspace(0, span, 50)
    found, false = {}, []
    for r in rows:
        cx, cy = r["x"] + r["vx"] * t, r["y"] + r["vy"] * t
        hit = None
        for tr in trs:
            tx, ty = tr["start"][0] + tr["v"][0] * t, tr["start"][1] + tr["v"][1] * t
            if np.min(np.hypot(cx - tx, cy - ty)) <= 3.0:
                hit = tr["k"]
                break
        if hit is None:
            if r["snr"] >= 7:
                false.append(r)
        elif hit not in found:
            found[hit] = r
    return {"rows": rows, "found": found, "false": false, "summary": summ, "step": step}


def report(label: str, res: dict, trs: list[dict]) -> None:
    s = res["summary"]
    print(f"{label}: {len(res['rows'])} candidates, {len(res['false'])} false above 7 sigma; "
          f"grid {s['grid']['vx'][2]}x{s['grid']['vy'][2]} (step {res['step']:.1f} px/day)")
    for tr in trs:
        r = res["found"].get(tr["k"])
        if r is None:
            print(f"  mover {tr['k']} ({tr['per_frame']:.2f} px/frame): not found")
            continue
        d = np.hypot(r["x"] - tr["start"][0], r["y"] - tr["start"][1])
        dv = np.abs(np.array([r["vx"], r["vy"]]) - tr["v"])
        print(f"  mover {tr['k']} ({tr['per_frame']:.2f} px/frame): start {d:.2f} px off, "
              f"v off ({dv[0]:.0f}, {dv[1]:.0f}) px/day, SNR {r['snr']:.1f} / ideal "
              f"{tr['ideal']:.1f} = {r['snr'] / tr['ideal']:.2f}")


def run_search(args: argparse.Namespace, root: Path) -> None:
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    cfg = SimConfig(size=args.size, n_science=args.frames, seed=args.seed)
    night = simulate_night(root, cfg)
    step = 2 * args.vmax / args.grid
    lo, hi = -(args.grid // 2) * step, (args.grid - 1 - args.grid // 2) * step
    ss = SearchSettings(vx_min=lo, vx_max=hi, vy_min=lo, vy_max=hi, v_step=step)
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        cal = calibrate_night(night, client, settings, out=root / "out")
        t1 = time.perf_counter()
        exp = export_night(night, client, settings, out=root / "out")
        t2 = time.perf_counter()
        print(f"simulated {args.size}² x {args.frames}; calibrate {t1 - t0:.1f} s "
              f"({cal.status}), export with template {t2 - t1:.1f} s ({exp.status}, "
              f"template {exp.details['template']['seconds']:.1f} s)")
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            csv = search_night(night, client, settings, out=root / "out",
                               search_settings=ss).details["candidates"]
            times.append(time.perf_counter() - t)
    res = judge(csv, tracks(night, exp))
    cpu_ms = cpu_per_velocity(exp.out_dir, ss)
    s = res["summary"]
    n_v = s["grid"]["n_searched"]
    print(f"search: {min(times):.1f} s wall (runs: {', '.join(f'{t:.1f}' for t in times)}) on "
          f"{args.workers} worker(s) x {args.threads} thread(s); stacking {s['search_seconds']:.1f}"
          f" s, stamps {s['stamp_seconds']:.1f} s; {s['task_seconds']:.1f} s of task time = "
          f"{1e3 * s['task_seconds'] / n_v:.1f} ms per velocity for {args.frames} frames of "
          f"{args.size}²; {s['tasks']} tasks; PHI computed for {s['tested']} (pixel, velocity) "
          f"pairs of {n_v * args.size**2:.2e}")
    n_cores = args.workers * args.threads
    print(f"CPU time in one process (not the wall time of a shared machine): {cpu_ms:.1f} ms "
          f"per velocity, so {n_v * cpu_ms / 1e3 / n_cores:.1f} s of stacking on {n_cores} "
          f"core(s) for {n_v} velocities")
    report("candidates", res, tracks(night, exp))


def cpu_per_velocity(kdir: Path, ss: SearchSettings, n: int = 100) -> float:
    """CPU milliseconds per velocity of one stacking task (``time.process_time`` in this
    process, on the first tile, ``n`` velocities of the grid's middle)."""
    frames = night_frames(kdir)
    mjd = np.array([f.mjd for f in frames])
    dt = mjd - mjd[0]
    sigma = float(np.median([f.sigma for f in frames]))
    vx, vy, step = velocity_grid(ss, sigma, float(dt[-1]))
    margin = margin_for(vx, vy, float(dt[-1]))
    tile = tiles_for(frames[0].shape, ss.tile, margin)[0]
    planes = [tile_task(f, tile) for f in frames]
    blocks = velocity_blocks(vx, vy, n, 0.0)
    block = blocks[len(blocks) // 2]
    job = BlockJob(tile=tile, velocities=block, dt=dt, settings=ss,
                   min_frames=(len(frames) + 1) // 2, radius=2 * 2.3548 * sigma,
                   span=float(dt[-1]), step=step)
    t = time.process_time()
    block_task(job, planes)
    return 1e3 * (time.process_time() - t) / len(block)


def run_self_subtraction(args: argparse.Namespace, root: Path) -> None:
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    cfg = SimConfig(size=args.size, n_science=args.frames, seed=args.seed, drift=(1.35, -0.8))
    night = simulate_night(root, cfg)
    drifts = [(-0.9, 1.1), (0.6, 1.3), (-0.4, -1.0), (1.0, 0.7)]
    others = []
    for i in range(args.nights):
        day = int(cfg.date[-2:]) + (-(i // 2) - 1 if i % 2 == 0 else i // 2 + 1)
        date = f"{cfg.date[:-2]}{day:02d}"
        others.append(simulate_night(root, SimConfig(**{
            **cfg.__dict__, "date": date, "drift": drifts[i % 4], "movers": ()})))
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for n in [night, *others]:
            calibrate_night(n, client, settings, out=root / "out")
        runs = {}
        for label, folder, ts in (("this night", "kbmod", TemplateSettings()),
                                  (f"{args.nights} other nights", "kbmod_nights",
                                   TemplateSettings(nights=args.nights))):
            s = settings.replace(kbmod={"folder": folder})
            exp = export_night(night, client, s, out=root / "out", template=ts)
            csv = search_night(night, client, s, out=root / "out").details["candidates"]
            runs[label] = (exp, csv)
    for label, (exp, csv) in runs.items():
        trs = tracks(night, exp)
        print(f"template from {label} ({exp.details['template']['frames']} frames, PSF sigma "
              f"{exp.details['template']['psf_sigma']:.3f} px):")
        for tr in trs:
            kept, snr = along_path(exp, tr)
            print(f"  mover {tr['k']} ({tr['per_frame']:.2f} px/frame): {kept:.1%} of its flux "
                  f"kept along its path, SNR {snr:.1f} of ideal {tr['ideal']:.1f} "
                  f"({snr / tr['ideal']:.2f})")
        report("  search", judge(csv, trs), trs)


def beyond_5_sigma(export: StageResult) -> float:
    """Share of the unmasked pixels of the difference frames beyond 5 σ (either sign)."""
    n = bad = 0
    for r in export.frames:
        with fits.open(export.out_dir / r["output"]) as hdul:
            sci, mask, var = hdul[1].data, hdul[2].data, hdul[3].data
        ok = (mask == 0) & np.isfinite(sci) & (var > 0)
        n += int(ok.sum())
        bad += int(np.sum(np.abs(sci[ok]) > 5 * np.sqrt(var[ok])))
    return bad / max(n, 1)


def run_night_length(args: argparse.Namespace, root: Path) -> None:
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    ts = TemplateSettings() if args.grow is None else TemplateSettings(grow=args.grow)
    ss = SearchSettings(vx_min=-args.vmax, vx_max=args.vmax, vy_min=-args.vmax,
                        vy_max=args.vmax, stamps=0)
    lines = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for n in (int(v) for v in args.lengths.split(",")):
            scale = 11 / max(n - 1, 1)
            cfg = SimConfig(size=args.size, n_science=n, seed=args.seed,
                            drift=(1.35 * scale, -0.8 * scale))
            night = simulate_night(root / f"n{n}", cfg)
            out = root / f"n{n}" / "out"
            calibrate_night(night, client, settings, out=out)
            exp = export_night(night, client, settings, out=out, template=ts)
            t = time.perf_counter()
            csv = search_night(night, client, settings, out=out,
                               search_settings=ss).details["candidates"]
            t = time.perf_counter() - t
            trs = tracks(night, exp)
            res = judge(csv, trs)
            resid = beyond_5_sigma(exp)
            for tr in trs:
                if tr["per_frame"] <= 0.3:
                    continue
                kept, snr = along_path(exp, tr)
                r = res["found"].get(tr["k"])
                found = (f"search SNR/ideal {r['snr'] / tr['ideal']:.3f}, flux "
                         f"{r['flux'] / tr['flux']:.3f}" if r else "not found")
                lines.append(f"{n:4d} frames, mover {tr['k']} ({tr['per_frame']:.2f} px/frame): "
                             f"{found}; along its path SNR/ideal {snr / tr['ideal']:.3f}, "
                             f"flux {kept:.3f} (ideal SNR {tr['ideal']:.1f})")
            lines.append(f"{n:4d} frames: {len(res['false'])} false above 7 sigma, "
                         f"{resid:.2e} of unmasked difference pixels beyond 5 sigma; search "
                         f"{t:.0f} s ({res['summary']['grid']['n_searched']} velocities)")
            print(lines[-1], flush=True)
    print(f"template from the night itself, grow {ts.grow} x PSF sigma:")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["search", "self-subtraction", "night-length"])
    ap.add_argument("--size", type=int, default=None, help="1024 (search), 256 (self-sub.)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--grid", type=int, default=60, help="velocities per axis (search)")
    ap.add_argument("--vmax", type=float, default=1200.0, help="px/day, grid half-width")
    ap.add_argument("--nights", type=int, default=2, help="other nights (self-subtraction)")
    ap.add_argument("--lengths", default="12,24,48", help="frames per night (night-length)")
    ap.add_argument("--grow", type=float, default=None,
                    help="template grow, x PSF sigma (night-length; default: the setting's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="search runs (the fastest counts)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--root", type=Path, default=None, help="work folder (default: temporary)")
    args = ap.parse_args()
    args.size = args.size or (1024 if args.what == "search" else 256)
    root = args.root or Path(tempfile.mkdtemp(prefix="search_bench_"))
    try:
        run = {"search": run_search, "self-subtraction": run_self_subtraction,
               "night-length": run_night_length}[args.what]
        run(args, root)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
