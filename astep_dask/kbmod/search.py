"""First-look moving-object search on a night's KBMOD export (issue 11): shift-and-stack
over a grid of velocities, on the dask cluster, without a CUDA build of KBMOD.

**Likelihood.** KBMOD's matched filter (Whidden et al. 2019, AJ 157, 119, "Fast Algorithms
for Slow Moving Asteroids"; Smotherman et al. 2021, arXiv:2109.03296, "Sifting Through the
Static: Moving Object Detection in Difference Images"), written here from that description:
per frame, ``psi = (sci / var) ⋆ PSF`` and
``phi = (1 / var) ⋆ PSF²`` (masked pixels contribute nothing); along a trajectory
``x(t) = x0 + vx (t − t0)``, ``y(t) = y0 + vy (t − t0)``, ``PSI = Σ psi_i(x(t_i), y(t_i))``
and ``PHI = Σ phi_i(...)``, so that ``flux = PSI / PHI`` (the maximum-likelihood flux of a
point source, electrons) and ``SNR = PSI / √PHI``. The PSF is each frame's Gaussian σ
(``PSFSIGMA``, as KBMOD takes it), pixel-integrated; positions are rounded to the nearest
pixel, as a first look allows. ``var`` is the frame's VAR times its ``FILTVARF`` (1 when
absent): VAR is in the "area" convention, right for sums over areas much wider than the
resampling and PSF-matching kernels that correlate the noise, and FILTVARF
(:func:`filter_variance_factor`, about 0.89 after registration and PSF matching) makes
it right for a PSF-sized filter, so that the SNR of pure noise has unit variance.

**Grid.** Velocities in px/day on the reference grid, ``vx`` and ``vy`` from their bounds
in steps of ``v_step`` (by default ``step_psf × σ / T``, T the night's time span: a grid
error of half a step then displaces the end of a trajectory by at most σ/2). Start
positions are every pixel of the grid at the first frame's time ``t0``.

**Work.** The frame is cut into tiles of start positions, each read with a margin of the
largest displacement; per (frame, tile) one task makes psi and phi; per (tile, block of
the velocity grid) one task stacks. A stacking task first bounds ``PHI`` from below for its
whole block (per frame, the minimum of ``phi`` over the positions that block's velocities
reach), so that for each velocity only ``PSI`` is summed over the tile and ``PHI`` is
computed exactly only where ``PSI`` beats ``threshold × √(bound)``: the same results as
summing both everywhere, for half the work.

**Filtering.** As KBMOD's sigma-G filter (Whidden et al. 2019) rejects single-frame
outliers along a trajectory, each candidate's per-frame fluxes ``psi_i / phi_i`` are
compared to their median and a frame is dropped when it is further than
``outlier_sigma`` times its own error (``1 / √phi_i``, with ``outlier_fraction`` of the
flux added in quadrature for a mover's real variations); a cosmic-ray remnant or a star
residual in one frame then no longer makes a detection. A trajectory above ``threshold``
both before and after the filter, with at least ``min_frames`` frames left, is a
candidate (so the filter only removes, as KBMOD applies it to the results of its search);
candidates are refined (sub-pixel start, sub-step velocity) and clustered: trajectories
that come within ``cluster_radius`` px of each other during the night are one object, the
highest SNR kept.

Products, in ``<export>/search/``: ``DATE_CANDIDATES.csv`` (x, y at t0, vx, vy in px/day,
flux, snr, n_frames, then flux error, end position and stamp file), ``stamps/`` (PNG
postage stamps of the best candidates: the coadd along the trajectory and every frame) and
``search.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from astep_dask.config import SearchSettings, Settings
from astep_dask.errors import RunError
from astep_dask.io.fitsio import TMP_PREFIX
from astep_dask.io.products import check_writable, output_dir
from astep_dask.kbmod.candidates import stamp_png, write_candidates
from astep_dask.kbmod.kernels import psf_1d
from astep_dask.kbmod.products import MANIFEST, SUFFIX
from astep_dask.version import __version__

CANDIDATE_DTYPE = np.dtype([
    ("x", "f8"), ("y", "f8"), ("vx", "f8"), ("vy", "f8"), ("psi", "f8"), ("phi", "f8"),
    ("flux", "f8"), ("snr", "f8"), ("n_frames", "i4"),
])


def psi_phi(sci: np.ndarray, var: np.ndarray, mask: np.ndarray, sigma: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """KBMOD's psi and phi images of one frame (float32); masked pixels give nothing."""
    with np.errstate(invalid="ignore", divide="ignore"):
        usable = (mask == 0) & np.isfinite(sci) & np.isfinite(var) & (var > 0)
        inv = np.where(usable, 1.0 / np.where(usable, var, 1.0), 0.0)
        a = np.where(usable, sci, 0.0) * inv
    p = psf_1d(sigma)
    p2 = p * p
    psi = ndimage.correlate1d(ndimage.correlate1d(a, p, axis=0, mode="constant"), p, axis=1,
                              mode="constant")
    phi = ndimage.correlate1d(ndimage.correlate1d(inv, p2, axis=0, mode="constant"), p2,
                              axis=1, mode="constant")
    return psi.astype(np.float32), phi.astype(np.float32)


def velocity_grid(ss: SearchSettings, sigma: float, span: float
                  ) -> tuple[np.ndarray, np.ndarray, float]:
    """Grid of vx and vy (px/day): the multiples of the step within the bounds."""
    step = ss.v_step
    if step <= 0:
        step = ss.step_psf * sigma / max(span, 1e-9)

    def axis(lo: float, hi: float) -> np.ndarray:
        # multiples of the step within the bounds: symmetric, and 0 when it is inside
        k = np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
        return step * k if k.size else np.array([0.5 * (lo + hi)])

    return axis(ss.vx_min, ss.vx_max), axis(ss.vy_min, ss.vy_max), float(step)


def margin_for(vx: np.ndarray, vy: np.ndarray, span: float) -> int:
    """Largest displacement (px) of any grid velocity over the night, plus one."""
    vmax = max(np.max(np.abs(vx)), np.max(np.abs(vy)))
    return int(np.ceil(vmax * span)) + 1


def _sliding_min(a: np.ndarray, size: int, axis: int, n_out: int) -> np.ndarray:
    """``out[k] = min(a[k : k + size])`` along ``axis`` for ``k < n_out``."""
    take = [slice(None)] * a.ndim
    take[axis] = slice(0, n_out)
    out = a[tuple(take)].copy()
    for j in range(1, size):
        take[axis] = slice(j, j + n_out)
        np.minimum(out, a[tuple(take)], out=out)
    return out


def phi_bound(phi: list[np.ndarray], sx: np.ndarray, sy: np.ndarray, margin: int,
              shape: tuple[int, int]) -> np.ndarray:
    """For every start pixel of a tile, a lower bound of PHI over the velocities whose
    shifts are ``sx, sy`` (velocity, frame): per frame the minimum of phi over the shifts
    reached, summed over frames."""
    ty, tx = shape
    m = margin
    bound = np.zeros(shape, np.float64)
    for i, img in enumerate(phi):
        x0, x1 = int(sx[:, i].min()), int(sx[:, i].max())
        y0, y1 = int(sy[:, i].min()), int(sy[:, i].max())
        region = img[m + y0: m + y1 + ty, m + x0: m + x1 + tx]
        low = _sliding_min(region, y1 - y0 + 1, 0, ty)
        bound += _sliding_min(low, x1 - x0 + 1, 1, tx)
    return bound


def robust_sums(p: np.ndarray, f: np.ndarray, ss: SearchSettings
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSI, PHI and frame count of trajectories from their per-frame psi and phi
    ``(trajectory, frame)``, frames whose flux is an outlier left out (see module doc)."""
    valid = f > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = np.where(valid, p / np.where(valid, f, 1.0), np.nan)
        med = row_median(flux)
        err2 = np.where(valid, 1.0 / np.where(valid, f, 1.0), np.inf)
        tol = ss.outlier_sigma * np.sqrt(err2 + (ss.outlier_fraction * med[:, None]) ** 2)
        keep = valid & (np.abs(flux - med[:, None]) <= tol)
    return (np.where(keep, p, 0).sum(axis=1), np.where(keep, f, 0).sum(axis=1),
            keep.sum(axis=1))


def row_median(a: np.ndarray) -> np.ndarray:
    """Median of the finite values of each row (NaN for a row without any)."""
    s = np.sort(np.where(np.isfinite(a), a, np.inf), axis=1)
    k = np.isfinite(a).sum(axis=1)
    lo = np.take_along_axis(s, np.maximum((k - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(s, np.minimum(k // 2, a.shape[1] - 1)[:, None], axis=1)[:, 0]
    with np.errstate(invalid="ignore"):
        return np.where(k > 0, 0.5 * (lo + hi), np.nan)


def trajectory_values(images: list[np.ndarray], ys: np.ndarray, xs: np.ndarray,
                      sy: np.ndarray, sx: np.ndarray, margin: int) -> np.ndarray:
    """Values ``(trajectory, frame)`` of per-frame images along trajectories starting at
    tile pixels ``(ys, xs)`` with integer shifts ``(sy, sx)`` per frame."""
    out = np.empty((ys.size, len(images)), np.float64)
    for i, img in enumerate(images):
        width = img.shape[1]
        flat = (margin + sy[i]) * width + (margin + sx[i]) + ys * width + xs
        out[:, i] = img.ravel()[flat]
    return out


def search_block(psi: list[np.ndarray], phi: list[np.ndarray], dt: np.ndarray,
                 velocities: np.ndarray, margin: int, ss: SearchSettings, min_frames: int,
                 origin: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, int]:
    """Shift-and-stack of one tile over a block of velocities.

    Parameters
    ----------
    psi, phi
        Per frame, the tile's psi and phi images with ``margin`` px on every side.
    dt
        Frame times minus t0 (days).
    velocities
        ``(n, 2)`` grid velocities (vx, vy) in px/day.
    origin
        (y, x) of the tile's first start pixel in the frame.

    Returns
    -------
    (ndarray of CANDIDATE_DTYPE, int)
        Candidates (before clustering): trajectories above threshold both as summed and
        after outlier rejection (so, as KBMOD filters the results of its search, the
        filter only removes), with the filtered figures; and the number of (pixel,
        velocity) pairs whose PHI had to be computed.
    """
    ty = psi[0].shape[0] - 2 * margin
    tx = psi[0].shape[1] - 2 * margin
    sx = np.rint(velocities[:, 0:1] * dt[None, :]).astype(np.int64)
    sy = np.rint(velocities[:, 1:2] * dt[None, :]).astype(np.int64)
    thr = (ss.threshold * np.sqrt(phi_bound(phi, sx, sy, margin, (ty, tx)))).astype(np.float32)
    acc = np.empty((ty, tx), np.float32)
    found: list[np.ndarray] = []
    tested = 0
    m = margin
    for k in range(velocities.shape[0]):
        np.copyto(acc, psi[0][m + sy[k, 0]: m + sy[k, 0] + ty, m + sx[k, 0]: m + sx[k, 0] + tx])
        for i in range(1, len(psi)):
            np.add(acc, psi[i][m + sy[k, i]: m + sy[k, i] + ty, m + sx[k, i]: m + sx[k, i] + tx],
                   out=acc)
        hit = np.flatnonzero(acc > thr)
        if hit.size == 0:
            continue
        tested += hit.size
        ys, xs = np.divmod(hit, tx)
        p = trajectory_values(psi, ys, xs, sy[k], sx[k], m)
        f = trajectory_values(phi, ys, xs, sy[k], sx[k], m)
        raw = p.sum(axis=1) >= ss.threshold * np.sqrt(f.sum(axis=1))
        big_psi, big_phi, n = robust_sums(p, f, ss)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = np.where(big_phi > 0, big_psi / np.sqrt(np.maximum(big_phi, 1e-300)), 0.0)
        ok = raw & (snr >= ss.threshold) & (n >= min_frames) & (big_psi > 0)
        if not ok.any():
            continue
        c = np.zeros(int(ok.sum()), CANDIDATE_DTYPE)
        c["x"], c["y"] = xs[ok] + origin[1], ys[ok] + origin[0]
        c["vx"], c["vy"] = velocities[k, 0], velocities[k, 1]
        c["psi"], c["phi"], c["n_frames"] = big_psi[ok], big_phi[ok], n[ok]
        c["flux"], c["snr"] = big_psi[ok] / big_phi[ok], snr[ok]
        found.append(c)
    out = np.concatenate(found) if found else np.zeros(0, CANDIDATE_DTYPE)
    return out, tested


def bilinear(img: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``img`` at float positions (clipped to the image)."""
    ny, nx = img.shape
    x = np.clip(x, 0, nx - 1.000001)
    y = np.clip(y, 0, ny - 1.000001)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    flat = img.ravel()
    i = y0 * nx + x0
    return ((1 - fy) * ((1 - fx) * flat[i] + fx * flat[i + 1])
            + fy * ((1 - fx) * flat[i + nx] + fx * flat[i + nx + 1]))


def refine(psi: list[np.ndarray], phi: list[np.ndarray], dt: np.ndarray, c: np.ndarray,
           margin: int, origin: tuple[int, int], step: float, ss: SearchSettings,
           min_frames: int) -> np.ndarray:
    """Sub-pixel start and sub-step velocity of candidates: the best SNR (bilinear psi and
    phi, outliers rejected) on a 5⁴ local grid of ±½ px and ±½ step, then again on a grid
    half as wide around the best. Recovers most of what rounding positions to pixels and
    velocities to the grid lose."""
    if c.size == 0:
        return c
    out = c.copy()
    base = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
    g = np.stack(np.meshgrid(base, base, base, base, indexing="ij"), -1).reshape(-1, 4)
    for k in range(c.size):
        best = np.array([c["x"][k], c["y"][k], c["vx"][k], c["vy"][k]], np.float64)
        best_row = None
        for scale in (1.0, 0.5):
            trial = best + g * np.array([scale, scale, scale * step, scale * step])
            xs = trial[:, 0:1] - origin[1] + margin + trial[:, 2:3] * dt[None, :]
            ys = trial[:, 1:2] - origin[0] + margin + trial[:, 3:4] * dt[None, :]
            p = np.column_stack([bilinear(psi[i], ys[:, i], xs[:, i])
                                 for i in range(len(psi))])
            f = np.column_stack([bilinear(phi[i], ys[:, i], xs[:, i])
                                 for i in range(len(phi))])
            big_psi, big_phi, n = robust_sums(p, f, ss)
            with np.errstate(invalid="ignore", divide="ignore"):
                snr = np.where((big_phi > 0) & (n >= min_frames),
                               big_psi / np.sqrt(np.maximum(big_phi, 1e-300)), -np.inf)
            j = int(np.argmax(snr))
            if best_row is None or snr[j] > best_row[2] / np.sqrt(best_row[3]):
                best = trial[j]
                best_row = (best, n[j], big_psi[j], big_phi[j])
        if best_row is not None and best_row[3] > 0 and best_row[2] > 0:
            (x, y, vx, vy), n, bp, bf = best_row
            if bp / np.sqrt(bf) >= c["snr"][k]:
                out[k] = (x, y, vx, vy, bp, bf, bp / bf, bp / np.sqrt(bf), n)
    return out


def cluster(c: np.ndarray, span: float, radius: float) -> np.ndarray:
    """Highest-SNR representative of every group of trajectories that come within
    ``radius`` px of each other between t0 and t0 + ``span`` (greedy, SNR order)."""
    if c.size == 0:
        return c
    c = c[np.argsort(-c["snr"], kind="stable")]
    alive = np.ones(c.size, bool)
    keep = []
    x, y = c["x"].astype(np.float64), c["y"].astype(np.float64)
    for i in range(c.size):
        if not alive[i]:
            continue
        keep.append(i)
        idx = np.nonzero(alive)[0]
        dx, dy = x[idx] - x[i], y[idx] - y[i]
        dvx, dvy = c["vx"][idx] - c["vx"][i], c["vy"][idx] - c["vy"][i]
        dv2 = dvx * dvx + dvy * dvy
        with np.errstate(invalid="ignore", divide="ignore"):
            t = np.clip(np.where(dv2 > 0, -(dx * dvx + dy * dvy) / dv2, 0.0), 0.0, span)
        d = np.hypot(dx + dvx * t, dy + dvy * t)
        alive[idx[d <= radius]] = False
    return c[np.array(keep, dtype=np.int64)]


def velocity_blocks(vx: np.ndarray, vy: np.ndarray, per_task: int, min_speed: float
                    ) -> list[np.ndarray]:
    """The grid cut into compact rectangular blocks of about ``per_task`` velocities
    (each an ``(n, 2)`` array; grid points slower than ``min_speed`` left out)."""
    side = max(1, round(float(np.sqrt(max(per_task, 1)))))
    blocks = []
    for a in range(0, vy.size, side):
        for b in range(0, vx.size, side):
            gx, gy = np.meshgrid(vx[b:b + side], vy[a:a + side])
            v = np.column_stack([gx.ravel(), gy.ravel()])
            v = v[np.hypot(v[:, 0], v[:, 1]) >= min_speed]
            if v.size:
                blocks.append(v)
    return blocks


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


# --------------------------------------------------------------------------- orchestration


def night_frames(kdir: Path) -> list[SearchFrame]:
    """The KBMOD files of an export, time order (those the manifest lists as written, or
    every ``*_KBMOD.fits`` without a manifest)."""
    names = None
    manifest = kdir / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        names = {r["output"] for r in data.get("frames", [])
                 if r.get("status") in ("done", "skipped") and r.get("output")}
    frames = []
    for path in sorted(kdir.glob(f"*{SUFFIX}")):
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


def search_night(night_dir: str | Path, client, settings=None, out: Path | None = None,
                 search_settings: SearchSettings | None = None, progress=None) -> Path:
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
    search_settings
        Overrides ``settings.search``.
    progress
        Called as ``progress(done, total, row)`` after every stacking task.

    Returns
    -------
    Path
        The candidates CSV (``<export>/search/DATE_CANDIDATES.csv``); ``search.json``
        beside it holds the grid, counts, timings and settings.

    Raises
    ------
    pipeline.RunError
        When the night has no export or fewer than two frames.
    """
    started = time.perf_counter()
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
    threads = max(sum(getattr(client, "nthreads", dict)().values()), 1)
    blocks_per_tile = int(np.ceil(4 * threads / len(tiles)))
    per_task = ss.velocities_per_task or max(16, int(np.ceil(vx.size * vy.size
                                                             / blocks_per_tile)))
    blocks = velocity_blocks(vx, vy, per_task, ss.min_speed)
    notes = []
    with fits.open(frames[0].path, memmap=True) as hdul:
        if hdul[0].header.get("KBPLANE") != "difference":
            notes.append("the KBMOD frames are not difference frames: stars will dominate")

    t_submit = time.perf_counter()
    results: list[dict] = []
    from distributed import as_completed

    for tile in tiles:
        planes = [client.submit(tile_task, f, tile, pure=False) for f in frames]
        futs = [client.submit(block_task, BlockJob(tile=tile, velocities=v, dt=dt,
                                                   settings=ss, min_frames=min_frames,
                                                   radius=radius, span=span, step=step),
                              planes, pure=False) for v in blocks]
        for fut in as_completed(futs):
            res = fut.result()
            results.append(res)
            if progress:
                progress(len(results), len(tiles) * len(blocks),
                         {"file": f"tile {tile.y0},{tile.x0}", "status": "searched",
                          "stage": "search"})
        del planes, futs
    t_search = time.perf_counter() - t_submit
    found = [r["candidates"] for r in results if r["candidates"].size]
    raw = np.concatenate(found) if found else np.zeros(0, CANDIDATE_DTYPE)
    cands = cluster(raw, span, radius)[: ss.max_candidates]
    rows = []
    for i, c in enumerate(cands):
        rows.append({
            "rank": i + 1, "x": float(c["x"]), "y": float(c["y"]), "vx": float(c["vx"]),
            "vy": float(c["vy"]), "flux": float(c["flux"]), "snr": float(c["snr"]),
            "n_frames": int(c["n_frames"]), "flux_err": float(1 / np.sqrt(c["phi"])),
            "x_end": float(c["x"] + c["vx"] * span), "y_end": float(c["y"] + c["vy"] * span),
            "stamp": "",
        })
    t_stamps = time.perf_counter()
    n_stamps = min(ss.stamps, len(rows))
    if n_stamps:
        try:
            import matplotlib  # noqa: F401

            have_mpl = True
        except ImportError:
            have_mpl = False
            notes.append("matplotlib is not installed: no postage stamps")
        if have_mpl:
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
    t_stamps = time.perf_counter() - t_stamps
    csv = write_candidates(sdir / f"{night}_CANDIDATES.csv", rows)
    summary = {
        "night": night, "kbmod_dir": str(kdir), "candidates": str(csv),
        "n_candidates": len(rows), "n_raw": int(raw.size),
        "n_frames": len(frames), "frames": [f.path.name for f in frames],
        "mjd0": float(mjd[0]), "span_days": span, "psf_sigma": sigma,
        "grid": {"vx": [float(vx[0]), float(vx[-1]), int(vx.size)],
                 "vy": [float(vy[0]), float(vy[-1]), int(vy.size)], "step": step,
                 "n_searched": int(sum(len(b) for b in blocks))},
        "margin": margin, "min_frames": min_frames, "cluster_radius": radius,
        "tiles": len(tiles), "tasks": len(tiles) * len(blocks),
        "tested": int(sum(r["tested"] for r in results)),
        "task_seconds": float(sum(r["seconds"] for r in results)),
        "search_seconds": t_search, "stamp_seconds": t_stamps,
        "wall_seconds": time.perf_counter() - started, "worker_threads": threads,
        "notes": notes, "settings": dataclasses.asdict(ss), "version": __version__,
    }
    tmp = sdir / f"{TMP_PREFIX}search.json.{os.getpid()}"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, sdir / "search.json")
    return csv
