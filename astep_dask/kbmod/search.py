"""First-look moving-object search on a night's KBMOD export: shift-and-stack over a grid
of velocities, on the dask cluster, without a CUDA build of KBMOD.

The method (KBMOD's likelihood, the velocity grid, the outlier filter, refinement and
clustering) is in :mod:`astep_dask.kbmod.shiftstack`; this module runs it on a night.

**Work.** The frame is cut into tiles of start positions, each read with a margin of the
largest displacement; per (frame, tile) one task makes psi and phi (:func:`tile_task`);
per (tile, block of the velocity grid) one task stacks, clusters and refines
(:func:`block_task`). The candidates of all tasks are clustered again, the best kept, and
their postage stamps cut (:func:`stamp_task`, per frame) and drawn (per candidate).
:func:`plan_search` decides the grid, tiles and blocks and refuses a search whose tasks
would hold more than ``memory_mb``.

Products, in ``<export>/search/``: ``DATE_CANDIDATES.csv`` (x, y at t0, vx, vy in px/day,
flux, snr, n_frames, then flux error, end position and stamp file), ``stamps/`` (PNG
postage stamps of the best candidates: the coadd along the trajectory and every frame) and
``search.json`` (grid, counts, timings, settings); see :mod:`astep_dask.kbmod.candidates`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from distributed import as_completed

from astep_dask.config import SearchSettings, Settings
from astep_dask.errors import RunError
from astep_dask.io.fitsio import atomic_write_text
from astep_dask.io.products import KBMOD_MANIFEST, KBMOD_SUFFIX, check_writable, output_dir
from astep_dask.kbmod.candidates import sky_positions, stamp_png, write_candidates
from astep_dask.kbmod.products import reference_wcs
from astep_dask.kbmod.shiftstack import (
    CANDIDATE_DTYPE,
    cluster,
    margin_for,
    psi_phi,
    refine,
    search_block,
    velocity_blocks,
    velocity_grid,
)
from astep_dask.run.results import Progress, StageResult
from astep_dask.version import __version__

__all__ = [
    "BlockJob",
    "SearchFrame",
    "SearchPlan",
    "Tile",
    "block_task",
    "night_frames",
    "plan_search",
    "search_night",
    "stamp_task",
    "tile_task",
    "tiles_for",
]

# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class SearchFrame:
    """A KBMOD file of the night (from its header)."""

    path: Path
    mjd: float
    sigma: float
    shape: tuple[int, int]
    var_factor: float = 1.0  # FILTVARF: VAR × this is the matched filter's variance


@dataclass(frozen=True)
class Tile:
    """Start positions ``[y0, y1) × [x0, x1)``, read with ``margin`` px around."""

    y0: int
    y1: int
    x0: int
    x1: int
    margin: int


def tile_task(frame: SearchFrame, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
    """Worker task: psi and phi of one frame over a tile and its margin (zeros beyond the
    frame)."""
    m = tile.margin
    h = int(np.ceil(4 * frame.sigma))
    ny, nx = frame.shape
    ya, yb = tile.y0 - m - h, tile.y1 + m + h
    xa, xb = tile.x0 - m - h, tile.x1 + m + h
    sci = np.zeros((yb - ya, xb - xa), np.float32)
    var = np.ones_like(sci)
    mask = np.ones(sci.shape, np.int32)
    ra, rb, ca, cb = max(ya, 0), min(yb, ny), max(xa, 0), min(xb, nx)
    with fits.open(frame.path, memmap=True) as hdul:
        sci[ra - ya: rb - ya, ca - xa: cb - xa] = hdul[1].data[ra:rb, ca:cb]
        mask[ra - ya: rb - ya, ca - xa: cb - xa] = hdul[2].data[ra:rb, ca:cb]
        var[ra - ya: rb - ya, ca - xa: cb - xa] = hdul[3].data[ra:rb, ca:cb]
    psi, phi = psi_phi(sci, var * np.float32(frame.var_factor), mask, frame.sigma)
    inner = (slice(h, psi.shape[0] - h), slice(h, psi.shape[1] - h))
    return np.ascontiguousarray(psi[inner]), np.ascontiguousarray(phi[inner])


@dataclass(frozen=True)
class BlockJob:
    """One tile and one block of the velocity grid."""

    tile: Tile
    velocities: np.ndarray
    dt: np.ndarray
    settings: SearchSettings
    min_frames: int
    radius: float
    span: float
    step: float = 0.0  # grid step (px/day), for the refinement; 0: none


def block_task(job: BlockJob, planes: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Worker task: stack one tile over one velocity block; clustered candidates."""
    t0 = time.perf_counter()
    psi = [p for p, _ in planes]
    phi = [f for _, f in planes]
    found, tested = search_block(psi, phi, job.dt, job.velocities, job.tile.margin,
                                 job.settings, job.min_frames, (job.tile.y0, job.tile.x0))
    found = cluster(found, job.span, job.radius)
    if job.step > 0:
        found = refine(psi, phi, job.dt, found, job.tile.margin, (job.tile.y0, job.tile.x0),
                       job.step, job.settings, job.min_frames)
    return {"candidates": found, "tested": tested, "n_velocities": len(job.velocities),
            "seconds": time.perf_counter() - t0}


def stamp_task(frame: SearchFrame, centres: np.ndarray, size: int) -> np.ndarray:
    """Worker task: ``(candidate, 3, size, size)`` stamps (sci, var, mask; NaN and
    NO_DATA beyond the frame) of one frame at integer ``centres`` (x, y)."""
    half = size // 2
    out = np.full((len(centres), 3, size, size), np.nan, np.float32)
    out[:, 2] = 1 << 8
    ny, nx = frame.shape
    with fits.open(frame.path, memmap=True) as hdul:
        planes = (hdul[1].data, hdul[3].data, hdul[2].data)
        for k, (x, y) in enumerate(np.asarray(centres, int)):
            ya, yb, xa, xb = y - half, y + half + 1, x - half, x + half + 1
            ra, rb, ca, cb = max(ya, 0), min(yb, ny), max(xa, 0), min(xb, nx)
            if rb <= ra or cb <= ca:
                continue
            for j, plane in enumerate(planes):
                out[k, j, ra - ya: rb - ya, ca - xa: cb - xa] = plane[ra:rb, ca:cb]
    return out


# --------------------------------------------------------------------------- night


def night_frames(kdir: Path) -> list[SearchFrame]:
    """The KBMOD files of an export, time order (those the manifest lists as written, or
    every ``*_KBMOD.fits`` without a manifest)."""
    names = None
    manifest = kdir / KBMOD_MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        names = {r["output"] for r in data.get("frames", [])
                 if r.get("status") in ("done", "skipped") and r.get("output")}
    frames = []
    for path in sorted(kdir.glob(f"*{KBMOD_SUFFIX}")):
        if names is not None and path.name not in names:
            continue
        with fits.open(path, memmap=True) as hdul:
            h = hdul[0].header
            ny, nx = hdul[1].data.shape
            shape = (int(ny), int(nx))
            factor = float(h.get("FILTVARF", 1.0))
            frames.append(SearchFrame(path=path, mjd=float(h["MJD"]),
                                      sigma=float(h.get("PSFSIGMA", 1.4)), shape=shape,
                                      var_factor=factor if 0 < factor < 10 else 1.0))
    frames.sort(key=lambda f: f.mjd)
    return frames


def tiles_for(shape: tuple[int, int], size: int, margin: int) -> list[Tile]:
    """Tiles of start positions covering the frame."""
    ny, nx = shape
    return [Tile(y0=y, y1=min(y + size, ny), x0=x, x1=min(x + size, nx), margin=margin)
            for y in range(0, ny, size) for x in range(0, nx, size)]


@dataclass(frozen=True)
class SearchPlan:
    """What the search of a night does: frame times, velocity grid, tiles, blocks."""

    mjd: np.ndarray  # mid-exposure MJD of each frame
    dt: np.ndarray  # days since the first frame
    span: float  # days from the first frame to the last
    sigma: float  # median PSF σ of the frames (px)
    vx: np.ndarray  # grid of vx (px/day)
    vy: np.ndarray  # grid of vy (px/day)
    step: float  # grid step (px/day)
    margin: int  # px read around each tile
    min_frames: int
    radius: float  # cluster radius (px)
    tiles: list[Tile]
    blocks: list[np.ndarray]  # (n, 2) velocities per stacking task


def plan_search(frames: list[SearchFrame], ss: SearchSettings, threads: int) -> SearchPlan:
    """The plan of the search of ``frames`` (time order) with ``threads`` worker threads:
    enough velocity blocks per tile for four tasks a thread.

    Raises
    ------
    RunError
        When a task would hold more than ``ss.memory_mb`` (tiles of every frame with the
        margin of the fastest velocity).
    """
    mjd = np.array([f.mjd for f in frames])
    dt = mjd - mjd[0]
    span = float(dt[-1])
    sigma = float(np.median([f.sigma for f in frames]))
    vx, vy, step = velocity_grid(ss, sigma, span)
    margin = margin_for(vx, vy, span)
    min_frames = ss.min_frames or int(np.ceil(len(frames) / 2))
    radius = ss.cluster_radius or 2 * 2.354820045 * sigma
    tiles = tiles_for(frames[0].shape, ss.tile, margin)
    side = min(ss.tile, max(frames[0].shape)) + 2 * margin
    need_mb = 8 * len(frames) * side * side / 1e6
    if need_mb > ss.memory_mb:
        raise RunError(
            f"the search would hold {need_mb:.0f} MB per task ({len(frames)} frames of tiles "
            f"{side} px wide, margin {margin} px for {max(abs(vx).max(), abs(vy).max()):.0f} "
            f"px/day over {span * 24:.1f} h; limit {ss.memory_mb:.0f} MB): search a part of "
            f"the night (frame_start, frame_count), smaller tiles or narrower velocities")
    blocks_per_tile = int(np.ceil(4 * threads / len(tiles)))
    per_task = ss.velocities_per_task or max(16, int(np.ceil(vx.size * vy.size
                                                             / blocks_per_tile)))
    blocks = velocity_blocks(vx, vy, per_task, ss.min_speed)
    return SearchPlan(mjd=mjd, dt=dt, span=span, sigma=sigma, vx=vx, vy=vy, step=step,
                      margin=margin, min_frames=min_frames, radius=radius, tiles=tiles,
                      blocks=blocks)


def search_night(night_dir: str | Path, client, settings: Settings | None = None,
                 out: Path | None = None, force: bool = False,
                 progress: Progress | None = None, *,
                 search_settings: SearchSettings | None = None) -> StageResult:
    """First-look shift-and-stack search of a night's KBMOD export on a dask client.

    Parameters
    ----------
    night_dir
        The raw night folder (``ROOT/DATE``), as given to ``calibrate`` and ``kbmod``.
    client
        A ``distributed.Client``.
    settings
        The run's :class:`~astep_dask.config.Settings` (export folder, ``search`` group).
    out
        The ``--out`` of the calibration (None: beside the raw night).
    force
        Accepted for the same call as every stage and ignored: a search always runs anew
        and rewrites its products.
    progress
        Called as ``progress(done, total, row)`` after every stacking task.
    search_settings
        Overrides ``settings.search``.

    Returns
    -------
    StageResult
        Stage ``search``, ``out_dir`` the search folder; ``frames`` a row per KBMOD file
        searched (``file``, ``mjd``, ``status`` ``done``), so a search that ran is
        complete, with or without candidates. ``details``: ``candidates`` (the CSV,
        ``DATE_CANDIDATES.csv``), ``n_candidates``, ``manifest`` (``search.json``) and
        ``summary`` (its content: grid, counts, timings, settings, notes).

    Raises
    ------
    RunError
        When the night has no export or fewer than two frames, or when a task would hold
        more than the search's ``memory_mb``.
    """
    started, wall_start = time.perf_counter(), time.time()
    settings = settings or Settings()
    ss = search_settings or settings.search
    night_dir = Path(night_dir)
    night = night_dir.name
    kdir = output_dir(night_dir, Path(out) if out is not None else None) / settings.kbmod.folder
    frames = night_frames(kdir) if kdir.is_dir() else []
    stop = ss.frame_start + ss.frame_count if ss.frame_count > 0 else None
    frames = frames[ss.frame_start:stop]
    if len(frames) < 2:
        raise RunError(f"{kdir}: {len(frames)} KBMOD frame(s); the search needs at least 2 "
                       f"(run astep-dask kbmod first)")
    sdir = kdir / ss.folder
    check_writable(sdir)
    threads = max(sum(getattr(client, "nthreads", dict)().values()), 1)
    plan = plan_search(frames, ss, threads)
    notes = []
    with fits.open(frames[0].path, memmap=True) as hdul:
        grid_wcs = reference_wcs(hdul[1].header)
        if hdul[0].header.get("KBPLANE") != "difference":
            notes.append("the KBMOD frames are not difference frames: stars will dominate")
    t_submit = time.perf_counter()
    results = _stack(client, frames, plan, ss, progress)
    t_search = time.perf_counter() - t_submit
    found = [r["candidates"] for r in results if r["candidates"].size]
    raw = np.concatenate(found) if found else np.zeros(0, CANDIDATE_DTYPE)
    rows = _candidate_rows(cluster(raw, plan.span, plan.radius)[: ss.max_candidates],
                           plan.span)
    t_stamps = time.perf_counter()
    notes += _stamps(client, frames, rows, plan.dt, sdir, night, ss)
    t_stamps = time.perf_counter() - t_stamps
    rows = sky_positions(rows, grid_wcs)
    csv = write_candidates(sdir / f"{night}_CANDIDATES.csv", rows)
    summary = {
        "night": night, "kbmod_dir": str(kdir), "candidates": str(csv),
        "n_candidates": len(rows), "n_raw": int(raw.size), "sky": grid_wcs is not None,
        "n_frames": len(frames), "frames": [f.path.name for f in frames],
        "mjd0": float(plan.mjd[0]), "span_days": plan.span, "psf_sigma": plan.sigma,
        "grid": {"vx": [float(plan.vx[0]), float(plan.vx[-1]), int(plan.vx.size)],
                 "vy": [float(plan.vy[0]), float(plan.vy[-1]), int(plan.vy.size)],
                 "step": plan.step, "n_searched": int(sum(len(b) for b in plan.blocks))},
        "margin": plan.margin, "min_frames": plan.min_frames, "cluster_radius": plan.radius,
        "tiles": len(plan.tiles), "tasks": len(plan.tiles) * len(plan.blocks),
        "tested": int(sum(r["tested"] for r in results)),
        "task_seconds": float(sum(r["seconds"] for r in results)),
        "search_seconds": t_search, "stamp_seconds": t_stamps,
        "wall_seconds": time.perf_counter() - started, "worker_threads": threads,
        "notes": notes, "settings": dataclasses.asdict(ss), "version": __version__,
    }
    manifest = sdir / "search.json"
    atomic_write_text(manifest, json.dumps(summary, indent=1))
    return StageResult("search", night, sdir,
                       frames=[{"file": f.path.name, "mjd": f.mjd, "status": "done"}
                               for f in frames],
                       started=wall_start, finished=time.time(),
                       details={"candidates": csv, "n_candidates": len(rows),
                                "manifest": manifest, "summary": summary})


def _stack(client, frames: list[SearchFrame], plan: SearchPlan, ss: SearchSettings,
           progress: Progress | None) -> list[dict]:
    """Run the stacking, tile after tile: per tile, one psi/phi task per frame and one
    stacking task per velocity block. The results of the stacking tasks."""
    results: list[dict] = []
    total = len(plan.tiles) * len(plan.blocks)
    for tile in plan.tiles:
        planes = [client.submit(tile_task, f, tile, pure=False) for f in frames]
        futs = [client.submit(block_task, BlockJob(tile=tile, velocities=v, dt=plan.dt,
                                                   settings=ss, min_frames=plan.min_frames,
                                                   radius=plan.radius, span=plan.span,
                                                   step=plan.step),
                              planes, pure=False) for v in plan.blocks]
        for fut in as_completed(futs):
            results.append(fut.result())
            if progress:
                progress(len(results), total, {"file": f"tile {tile.y0},{tile.x0}",
                                               "status": "searched", "stage": "search"})
        del planes, futs
    return results


def _candidate_rows(cands: np.ndarray, span: float) -> list[dict]:
    """Rows of the candidates table (rank from 1, no stamp yet)."""
    rows = []
    for i, c in enumerate(cands):
        rows.append({
            "rank": i + 1, "x": float(c["x"]), "y": float(c["y"]), "vx": float(c["vx"]),
            "vy": float(c["vy"]), "flux": float(c["flux"]), "snr": float(c["snr"]),
            "n_frames": int(c["n_frames"]), "flux_err": float(1 / np.sqrt(c["phi"])),
            "x_end": float(c["x"] + c["vx"] * span), "y_end": float(c["y"] + c["vy"] * span),
            "stamp": "",
        })
    return rows


def _stamps(client, frames: list[SearchFrame], rows: list[dict], dt: np.ndarray, sdir: Path,
            night: str, ss: SearchSettings) -> list[str]:
    """Postage stamps of the best ``ss.stamps`` candidates in ``sdir/stamps/`` (older ones
    removed), their names set in the rows' ``stamp``; returns notes for the summary."""
    n_stamps = min(ss.stamps, len(rows))
    if not n_stamps:
        return []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["matplotlib is not installed: no postage stamps"]
    stamp_dir = sdir / "stamps"
    stamp_dir.mkdir(exist_ok=True)
    for old in stamp_dir.glob("*.png"):
        old.unlink()
    centres = np.array([[[r["x"] + r["vx"] * t, r["y"] + r["vy"] * t]
                         for r in rows[:n_stamps]] for t in dt])
    futs = [client.submit(stamp_task, f, np.rint(centres[i]).astype(int),
                          ss.stamp_size, pure=False) for i, f in enumerate(frames)]
    per_frame = client.gather(futs)
    stack = np.stack(per_frame, axis=1)  # candidate, frame, plane, y, x
    names = [f"{night}_cand{k + 1:04d}.png" for k in range(n_stamps)]
    client.gather([client.submit(stamp_png, stamp_dir / names[k], stack[k], rows[k],
                                 dt, pure=False) for k in range(n_stamps)])
    for k in range(n_stamps):
        rows[k]["stamp"] = f"stamps/{names[k]}"
    return []
