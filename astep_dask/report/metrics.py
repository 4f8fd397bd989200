"""The per-frame measures of the QA report and the rules that flag outlier frames.

A calibrated frame (SCI, VAR, MASK) gives one row of figures (:func:`measure_planes`):
sky level and noise from the mesh background, PSF FWHM and number of stars from the star
finder (the KBMOD export's own, :mod:`astep_dask.core.background` and
:mod:`astep_dask.core.register`), masked / saturated / cosmic-ray / bad pixel fractions,
the background gradient across the frame, and the strongest straight streak
(:func:`find_streak`, a Hough transform of the binned, star-masked residual). Across the
night, :func:`relative_fluxes` compares the same stars in every frame (transparency) and
:func:`flag_frames` turns the rows into flags, each with one of :data:`REASONS`.

Everything here is a pure function of arrays, but for :func:`measure_file`, the cluster
task that reads one calibrated file (:func:`astep_dask.io.fitsio.read_calibrated`) and
never raises: a frame that cannot be read or measured gives a row with ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from astep_dask.config import QaSettings
from astep_dask.core.background import estimate_background, plane_slopes
from astep_dask.core.bits import Bit, flag
from astep_dask.core.register import (
    FWHM_PER_SIGMA,
    RegistrationError,
    count_stars,
    gaussian_kernel_norm,
    measure_offset,
    stars_psf_sigma,
)
from astep_dask.core.stats import robust_sigma
from astep_dask.io.fitsio import mid_exposure, read_calibrated
from astep_dask.io.headers import exposure_time

__all__ = [
    "KEEP_STARS",
    "REASONS",
    "block_reduce",
    "elongated",
    "find_streak",
    "flag_frames",
    "mask_fractions",
    "measure_file",
    "measure_planes",
    "plane_gradient",
    "relative_fluxes",
    "star_discs",
]

REASONS = ("cloud", "sky", "trail", "defocus")  # why a frame is flagged, in this order


_BAD_BITS = flag(Bit.BAD, Bit.HOT, Bit.DEAD)


KEEP_STARS = 150  # stars a measuring task returns (brightest first)


# --------------------------------------------------------------------------- pure core


def mask_fractions(mask: np.ndarray) -> dict[str, float]:
    """Fractions of pixels that are masked (any bit), saturated, cosmic rays, bad pixels."""
    m = np.asarray(mask)
    n = max(m.size, 1)
    return {
        "frac_masked": float(np.count_nonzero(m) / n),
        "frac_saturated": float(np.count_nonzero(m & flag(Bit.SAT)) / n),
        "frac_cr": float(np.count_nonzero(m & flag(Bit.CR)) / n),
        "frac_bad": float(np.count_nonzero(m & _BAD_BITS) / n),
    }


def plane_gradient(grid: np.ndarray, edges_y: np.ndarray, edges_x: np.ndarray
                   ) -> tuple[float, float]:
    """Peak-to-peak of the plane fitted to a mesh grid across the frame, and the direction
    of its rise (degrees from +x towards +y)."""
    cy = (edges_y[:-1] + edges_y[1:] - 1) / 2.0
    cx = (edges_x[:-1] + edges_x[1:] - 1) / 2.0
    sy, sx = plane_slopes(np.asarray(grid, np.float64), cy, cx)
    ptp = abs(sy) * float(edges_y[-1]) + abs(sx) * float(edges_x[-1])
    return ptp, float(np.degrees(np.arctan2(sy, sx)))


def block_reduce(image: np.ndarray, factor: int, func: Callable = np.mean) -> np.ndarray:
    """Image binned by ``factor`` on both axes (edges padded by repetition), reduced by
    ``func`` over each block (``np.mean``, ``np.max``...)."""
    if factor <= 1:
        return image
    ny, nx = image.shape
    py, px = -ny % factor, -nx % factor
    padded = np.pad(image, ((0, py), (0, px)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return func(blocks, axis=(1, 3))


def star_discs(shape: tuple[int, int], stars: np.ndarray, sigma: float, rms: float,
               saturated: np.ndarray | None = None) -> np.ndarray:
    """Pixels covered by the stars (out to where their profile falls to the sky noise)
    and by grown saturated blobs (stars too bright to be measured)."""
    ny, nx = shape
    out = np.zeros(shape, bool)
    sigma = sigma if np.isfinite(sigma) and sigma > 0 else 1.5
    rms = rms if np.isfinite(rms) and rms > 0 else 1.0
    peaks = stars["flux"] / (2 * np.pi * sigma * sigma) if stars.size else np.zeros(0)
    radii = sigma * np.sqrt(2 * np.log(np.maximum(peaks / rms, 1.0))) + 2.0
    discs = [(x, y, r) for x, y, r in zip(stars["x"], stars["y"], np.minimum(radii, 60.0),
                                          strict=True)] if stars.size else []
    if saturated is not None and saturated.any():
        labels, _ = ndimage.label(saturated)
        for i, sl in enumerate(ndimage.find_objects(labels)):
            area = np.count_nonzero(labels[sl] == i + 1)
            r = 3.0 * np.sqrt(area / np.pi) + 3.0
            discs.append(((sl[1].start + sl[1].stop - 1) / 2, (sl[0].start + sl[0].stop - 1) / 2,
                          min(r, 200.0)))
    for x, y, r in discs:
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 2, ny)
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 2, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    return out


def _line_length(theta: float, rho: float, shape: tuple[int, int]) -> float:
    """Length (px) of the line ``x cos θ + y sin θ = ρ`` inside a frame of ``shape``."""
    ny, nx = shape
    c, s = np.cos(theta), np.sin(theta)
    t = np.arange(-np.hypot(ny, nx), np.hypot(ny, nx), 0.5)
    x, y = rho * c - t * s, rho * s + t * c
    inside = (x >= -0.5) & (x <= nx - 0.5) & (y >= -0.5) & (y <= ny - 0.5)
    return 0.5 * float(np.count_nonzero(inside))


def elongated(hits: np.ndarray, min_ratio: float) -> np.ndarray:
    """The connected groups of ``hits`` (8-connected, 3 pixels or more) whose length is at
    least ``min_ratio`` times their width (from their second moments): pieces of a streak
    stay, stars and noise peaks go."""
    labels, n = ndimage.label(hits, structure=np.ones((3, 3), bool))
    if n == 0:
        return hits
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    index = np.arange(1, n + 1)

    def total(v: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=v, minlength=n + 1)[index]

    npix = total(np.ones(ys.size))
    mx, my = total(xs) / npix, total(ys) / npix
    vxx = total(xs * xs.astype(float)) / npix - mx * mx + 1 / 12
    vyy = total(ys * ys.astype(float)) / npix - my * my + 1 / 12
    vxy = total(xs * ys.astype(float)) / npix - mx * my
    half = np.sqrt(np.maximum(0.25 * (vxx - vyy) ** 2 + vxy * vxy, 0))
    major = 0.5 * (vxx + vyy) + half
    minor = np.maximum(0.5 * (vxx + vyy) - half, 1 / 12)
    keep = (npix >= 3) & (np.sqrt(major / minor) >= min_ratio)
    return np.concatenate([[False], keep])[labels]


def find_streak(residual: np.ndarray, rms: float, usable: np.ndarray,
                settings: QaSettings) -> dict | None:
    """The strongest straight streak of a sky-subtracted frame, or None.

    The residual is binned to about ``trail_scale`` px on a side (a faint streak gains
    signal-to-noise), smoothed by a Gaussian of one binned pixel and thresholded at
    ``trail_sigma``. A Hough transform of the pixels above the threshold gives candidate
    lines; for the five with most pixels, the coverage is the fraction of the line's
    path across the frame that has a pixel above the threshold within 1.5 binned px.
    Stars, saturated blobs and masked pixels must already be excluded from ``usable``.

    Returns
    -------
    dict or None
        ``angle`` (deg, direction of the streak from +x towards +y), ``coverage``,
        ``length`` (px covered, full resolution), ``x0, y0, x1, y1`` (ends of the covered
        part, full-resolution px) and ``snr`` (median smoothed significance along it);
        None when nothing stands above the threshold.
    """
    ny, nx = residual.shape
    b = max(1, int(np.ceil(max(ny, nx) / settings.trail_scale)))
    data = np.where(usable, residual, 0).astype(np.float32)
    total = block_reduce(data, b, np.sum)
    count = block_reduce(usable.astype(np.float32), b, np.sum)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), 0)
        snr = mean * np.sqrt(count) / max(rms, 1e-12)
    smooth = ndimage.gaussian_filter(snr, 1.0, mode="constant") / gaussian_kernel_norm(1.0)
    hits = elongated((smooth > settings.trail_sigma) & (count > 0.5 * b * b),
                     settings.trail_elongation)
    ys, xs = np.nonzero(hits)
    if ys.size < 10:
        return None
    shape_b = hits.shape
    diag = np.hypot(*shape_b)
    step = np.degrees(np.arctan(1.0 / max(shape_b)))
    thetas = np.radians(np.arange(0.0, 180.0, step))
    offset = int(np.ceil(diag)) + 2
    best: list[tuple[int, float, float]] = []
    for th in thetas:
        rho = xs * np.cos(th) + ys * np.sin(th)
        acc = np.bincount(np.rint(rho).astype(np.int64) + offset, minlength=2 * offset + 1)
        acc3 = acc + np.roll(acc, 1) + np.roll(acc, -1)
        i = int(np.argmax(acc3))
        best.append((int(acc3[i]), float(th), float(i - offset)))
    best.sort(reverse=True)
    found = None
    for _, th, rho0 in best[:5]:
        dist = xs * np.cos(th) + ys * np.sin(th) - rho0
        near = np.abs(dist) <= 1.5
        t = -xs[near] * np.sin(th) + ys[near] * np.cos(th)
        covered = np.unique(np.floor(t)).size
        path = _line_length(th, rho0, shape_b)
        coverage = covered / max(path, 1.0)
        if found is None or coverage > found["coverage"]:
            c, s = np.cos(th), np.sin(th)
            t0, t1 = float(t.min()), float(t.max())
            ends = [(rho0 * c - tt * s, rho0 * s + tt * c) for tt in (t0, t1)]
            found = {
                "angle": float((np.degrees(th) + 90.0) % 180.0),
                "coverage": float(min(coverage, 1.0)),
                "length": float(covered * b),
                "x0": float((ends[0][0] + 0.5) * b - 0.5),
                "y0": float((ends[0][1] + 0.5) * b - 0.5),
                "x1": float((ends[1][0] + 0.5) * b - 0.5),
                "y1": float((ends[1][1] + 0.5) * b - 0.5),
                "snr": float(np.median(smooth[ys[near], xs[near]])),
            }
    return found


def measure_planes(sci: np.ndarray, var: np.ndarray, mask: np.ndarray,
                   settings: QaSettings | None = None) -> tuple[dict, np.ndarray]:
    """QA figures of one calibrated frame (SCI e-, VAR e-², MASK bits).

    Returns
    -------
    row, stars
        ``row``: sky and noise (e-, from the mesh background), FWHM (px), number of
        stars (``n_stars``: every source detected above ``detect_sigma``, not only the
        ``max_stars`` brightest that are measured), masked / saturated / CR / bad
        fractions, background gradient (peak-to-peak across the frame, e- and fraction of
        the sky, and direction) and the strongest streak (see :func:`find_streak`).
        ``stars``: the frame's measured stars (at most ``max_stars``,
        :data:`astep_dask.core.register.STAR_DTYPE`), for flux ratios between frames.
    """
    settings = settings or QaSettings()
    mask = np.asarray(mask)
    usable_pix = (mask == 0) & np.isfinite(sci) & np.isfinite(var)
    bkg = estimate_background(sci, ~usable_pix, settings.background())
    level = bkg.level()
    residual = sci - level
    stars, detected = count_stars(residual, var, ~usable_pix, bkg.rms(), settings.stars())
    sigma = stars_psf_sigma(stars, settings.min_snr)
    sky, noise = bkg.median_level, bkg.median_rms
    ptp, angle = plane_gradient(bkg.mesh_level, bkg.edges_y, bkg.edges_x)
    # The streak search may use cosmic-ray pixels (a sharp streak can be taken for one).
    cr_only = (mask & ~flag(Bit.CR)) == 0
    streak_usable = cr_only & np.isfinite(sci) & ~star_discs(
        sci.shape, stars, sigma, noise, (mask & flag(Bit.SAT)) != 0)
    streak = find_streak(residual, noise, streak_usable, settings)
    row = {
        "sky": sky,
        "noise": noise,
        "fwhm": float(sigma * FWHM_PER_SIGMA),
        "n_stars": detected,
        **mask_fractions(mask),
        "gradient_e": ptp,
        "gradient": ptp / sky if sky > 0 else float("nan"),
        "gradient_angle": angle,
        "streak": streak,
    }
    return row, stars


def relative_fluxes(star_lists: Sequence[np.ndarray], fwhm: Sequence[float],
                    settings: QaSettings | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Flux of each frame's stars relative to the same stars in a reference frame,
    normalised to the night's median (1 = a typical frame; 0.5 = half the light).

    The reference is the frame with most stars among those with a PSF no wider than 1.1x
    the night's median. Each frame is registered to it (translation from the stars,
    :func:`astep_dask.core.register.measure_offset`); stars matched within ``match_radius``
    and bright in the reference (``snr >= min_snr``) give the median flux ratio.

    Returns
    -------
    ratio, n_match, reference
        Per frame: the normalised ratio (NaN when the frame cannot be matched) and the
        number of stars it rests on; the index of the reference frame (-1 if none).
    """
    settings = settings or QaSettings()
    n = len(star_lists)
    ratio = np.full(n, np.nan)
    n_match = np.zeros(n, np.int64)
    if n == 0:
        return ratio, n_match, -1
    fw = np.asarray(fwhm, float)
    counts = np.array([s.size for s in star_lists])
    sharp = np.isfinite(fw) & (fw <= 1.1 * np.nanmedian(fw)) if np.isfinite(fw).any() else (
        np.ones(n, bool))
    if not sharp.any() or counts.max() == 0:
        return ratio, n_match, -1
    ref_i = int(np.argmax(np.where(sharp, counts, -1)))
    ref = star_lists[ref_i]
    bright = ref[ref["snr"] >= settings.min_snr]
    for i, stars in enumerate(star_lists):
        if stars.size < settings.min_matches or bright.size < settings.min_matches:
            continue
        try:
            off = measure_offset(stars, ref, settings.match())
        except RegistrationError:
            continue
        tree = cKDTree(np.column_stack([stars["x"], stars["y"]]))
        dist, j = tree.query(np.column_stack([bright["x"] + off.dx, bright["y"] + off.dy]),
                             distance_upper_bound=settings.match_radius)
        ok = np.isfinite(dist)
        if ok.sum() < settings.min_matches:
            continue
        r = stars["flux"][j[ok]] / bright["flux"][ok]
        r = r[np.isfinite(r) & (r > 0)]
        if r.size >= settings.min_matches:
            ratio[i] = float(np.median(r))
            n_match[i] = int(r.size)
    if np.isfinite(ratio).any():
        ratio = ratio / np.nanmedian(ratio)
    return ratio, n_match, ref_i


def _night_scatter(values: np.ndarray) -> float:
    """Robust sigma (:func:`astep_dask.core.stats.robust_sigma`) of a night's finite
    values; 0 with fewer than three, so that the flag rules fall back on their ratio
    thresholds alone (where core's would give NaN and the rule would never fire)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return robust_sigma(v) if v.size >= 3 else 0.0


def flag_frames(rows: Sequence[dict], settings: QaSettings | None = None) -> list[list[dict]]:
    """Outlier flags of each frame, from its figures and the night's (rows in time order,
    each with ``sky``, ``fwhm``, ``n_stars``, ``transparency`` and ``streak``).

    Returns one list per frame of ``{"reason": one of REASONS, "detail": text}``; an
    empty list for a good frame.
    """
    s = settings or QaSettings()
    n = len(rows)
    sky = np.array([r.get("sky", np.nan) for r in rows], float)
    fwhm = np.array([r.get("fwhm", np.nan) for r in rows], float)
    tr = np.array([r.get("transparency", np.nan) for r in rows], float)
    n_stars = np.array([r.get("n_stars", 0) for r in rows], float)
    med_fwhm = float(np.nanmedian(fwhm)) if np.isfinite(fwhm).any() else np.nan
    sig_fwhm = _night_scatter(fwhm)
    med_stars = float(np.median(n_stars)) if n else 0.0
    flags: list[list[dict]] = []
    for i, row in enumerate(rows):
        out: list[dict] = []
        lo, hi = max(0, i - s.sky_window), min(n, i + s.sky_window + 1)
        neighbours = np.delete(sky[lo:hi], i - lo)
        neighbours = neighbours[np.isfinite(neighbours)]
        sky_ratio = (sky[i] / np.median(neighbours)
                     if neighbours.size and np.median(neighbours) > 0 else np.nan)
        defocus = (np.isfinite(fwhm[i]) and fwhm[i] >= s.defocus_jump * med_fwhm
                   and fwhm[i] > med_fwhm + s.outlier_sigma * sig_fwhm)
        if defocus:
            out.append({"reason": "defocus", "detail":
                        f"FWHM {fwhm[i]:.2f} px, {fwhm[i] / med_fwhm:.2f} x the night's "
                        f"median ({med_fwhm:.2f} px)"})
        sky_text = f"sky {sky_ratio:.2f} x its neighbours'" if np.isfinite(sky_ratio) else ""
        if np.isfinite(tr[i]) and tr[i] < 1.0 - s.cloud_drop:
            out.append({"reason": "cloud", "detail":
                        f"star flux {tr[i]:.2f} x the night's median"
                        + (f"; {sky_text}" if sky_text else "")})
        elif (not np.isfinite(tr[i]) and not defocus
              and n_stars[i] < (1.0 - s.cloud_drop) * med_stars):
            out.append({"reason": "cloud", "detail":
                        f"too few stars to measure ({int(n_stars[i])}, night median "
                        f"{med_stars:.0f})" + (f"; {sky_text}" if sky_text else "")})
        elif np.isfinite(sky_ratio) and (sky_ratio > s.sky_jump or sky_ratio < 1 / s.sky_jump):
            out.append({"reason": "sky", "detail": f"{sky_text}, stars unchanged"})
        st = row.get("streak")
        side = row.get("side") or 0
        if (st and st["coverage"] >= s.trail_coverage
                and st["length"] >= s.trail_min_length * side):
            out.append({"reason": "trail", "detail":
                        f"streak at {st['angle']:.1f} deg, {st['length']:.0f} px long, covering "
                        f"{100 * st['coverage']:.0f} % of its path, S/N {st['snr']:.1f}"})
        flags.append(out)
    return flags


# --------------------------------------------------------------------------- I/O edges


def measure_file(path: str | Path, settings: QaSettings | None = None) -> dict:
    """Measure one calibrated frame file (a cluster task). Never raises: a frame that
    cannot be read or measured gives a row with ``error``.

    Returns
    -------
    dict
        The figures of :func:`measure_planes` plus ``file``, ``raw``, ``mjd``, ``time``,
        ``exptime``, ``filter``, ``shape``, ``side``, ``seconds`` and ``stars`` (the star
        list, a small structured array). ``mjd`` and ``time`` are the mid-exposure
        (:func:`astep_dask.io.fitsio.mid_exposure`: MJD in UTC, ISO to the millisecond in
        the header's ``TIMESYS``); NaN and "" for a frame whose header has no time.
    """
    path = Path(path)
    t0 = time.perf_counter()
    row: dict = {"file": path.name}
    try:
        header, sci, var, mask = read_calibrated(path)
        try:
            mjd, iso, _ = mid_exposure(header)
        except ValueError:  # no (readable) DATE-OBS nor MJD-OBS: the row has no time
            mjd, iso = float("nan"), ""
        row.update(raw=str(header.get("RAWFILE", "")), mjd=mjd, time=iso,
                   exptime=exposure_time(header),
                   filter=str(header.get("FILTER", "")), shape=list(sci.shape),
                   side=int(min(sci.shape)))
        figures, stars = measure_planes(sci, var, mask, settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {**row, "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    # The brightest stars are enough for the flux ratios; they keep the row small.
    stars = stars[np.argsort(stars["snr"])[::-1][:KEEP_STARS]]
    return {**row, **figures, "stars": stars, "seconds": time.perf_counter() - t0}
