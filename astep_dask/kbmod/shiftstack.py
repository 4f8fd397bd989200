"""The shift-and-stack core of the first-look search (:mod:`astep_dask.kbmod.search`):
numpy in, numpy out.

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
(:func:`~astep_dask.kbmod.kernels.filter_variance_factor`, about 0.89 after registration
and PSF matching) makes it right for a PSF-sized filter, so that the SNR of pure noise has
unit variance.

**Grid.** Velocities in px/day on the reference grid, ``vx`` and ``vy`` from their bounds
in steps of ``v_step`` (by default ``step_psf × σ / T``, T the night's time span: a grid
error of half a step then displaces the end of a trajectory by at most σ/2). Start
positions are every pixel of the grid at the first frame's time ``t0``.

**Stacking.** :func:`search_block` stacks one tile of start positions (read with a margin
of the largest displacement) over a block of the velocity grid. It first bounds ``PHI``
from below for its whole block (per frame, the minimum of ``phi`` over the positions that
block's velocities reach), so that for each velocity only ``PSI`` is summed over the tile
and ``PHI`` is computed exactly only where ``PSI`` beats ``threshold × √(bound)``: the
same results as summing both everywhere, for half the work.

**Filtering.** As KBMOD's sigma-G filter (Whidden et al. 2019) rejects single-frame
outliers along a trajectory, each candidate's per-frame fluxes ``psi_i / phi_i`` are
compared to their median and a frame is dropped when it is further than
``outlier_sigma`` times its own error (``1 / √phi_i``, with ``outlier_fraction`` of the
flux added in quadrature for a mover's real variations); a cosmic-ray remnant or a star
residual in one frame then no longer makes a detection. A trajectory above ``threshold``
both before and after the filter, with at least ``min_frames`` frames left, is a
candidate (so the filter only removes, as KBMOD applies it to the results of its search);
candidates are refined (:func:`refine`: sub-pixel start, sub-step velocity) and clustered
(:func:`cluster`): trajectories that come within ``cluster_radius`` px of each other
during the night are one object, the highest SNR kept.

The tasks that read the KBMOD files and run these on the cluster are in
:mod:`astep_dask.kbmod.search`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from astep_dask.config import SearchSettings
from astep_dask.kbmod.kernels import psf_1d

__all__ = [
    "CANDIDATE_DTYPE",
    "bilinear",
    "cluster",
    "margin_for",
    "phi_bound",
    "psi_phi",
    "refine",
    "robust_sums",
    "row_median",
    "search_block",
    "trajectory_values",
    "velocity_blocks",
    "velocity_grid",
]

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
