"""Per-night quality assessment: figures per frame and per master, outlier flags, plots,
and a one-page HTML report.

``night_report`` reads a calibrated night's output (``manifest.json``, the masters, every
``*_CAL.fits``) and writes ``OUTPUT/report/``:

``qa.json``
    Per frame: mid-exposure time, sky level and noise (e-), PSF FWHM (px), number of
    stars, relative star flux (transparency), masked / saturated / cosmic-ray pixel
    fractions, background gradient, the strongest linear streak found, and flags. Per
    master: level, noise, frames combined; hot and dead pixel counts from the mask.
``*.png``
    Each master with a z-scale stretch and a colour bar, the bad-pixel mask, the per-frame
    time series with flagged frames marked, one calibrated frame with its cosmic-ray and
    mask overlays, and thumbnails of the flagged frames.
``index.html``
    All of it on one page.

Flags say why a frame looks wrong; they never delete or move anything. The reasons:

``cloud``
    The frame's stars are fainter than the night's median by more than ``cloud_drop``
    (fluxes of the same stars, matched to a reference frame), or too few stars are found
    to measure it while the PSF is normal.
``sky``
    The sky level jumps by more than ``sky_jump`` against its neighbours in time while the
    stars keep their flux (moon, twilight, a light).
``trail``
    A straight streak (satellite, aircraft, meteor) covers at least ``trail_coverage`` of
    its path across the frame and ``trail_min_length`` of the frame's side.
``defocus``
    The PSF FWHM is ``defocus_jump`` times the night's median or more (and far outside
    its scatter).

Star finding and the sky background are those of the KBMOD export
(:func:`astep_dask.register.find_stars`, :func:`astep_dask.background.estimate_background`).
The per-frame measures are pure functions of the calibrated planes; reading files,
drawing and writing sit at the edges. With a dask client, each frame is measured in one
task on the cluster, which returns a small row (no image).
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from scipy import ndimage
from scipy.spatial import cKDTree

from .background import estimate_background, plane_slopes
from .config import QaSettings
from .mask import Bit, flag, robust_sigma
from .register import (
    FWHM_PER_SIGMA,
    RegistrationError,
    find_stars,
    gaussian_kernel_norm,
    measure_offset,
    psf_sigma,
)

REPORT_FOLDER = "report"
QA_JSON = "qa.json"
INDEX = "index.html"
CAL_SUFFIX = "_CAL.fits"
REASONS = ("cloud", "sky", "trail", "defocus")
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
        stars, masked / saturated / CR / bad fractions, background gradient (peak-to-peak
        across the frame, e- and fraction of the sky, and direction) and the strongest
        streak (see :func:`find_streak`). ``stars``: the frame's star list
        (:data:`astep_dask.register.STAR_DTYPE`), for flux ratios between frames.
    """
    settings = settings or QaSettings()
    mask = np.asarray(mask)
    usable_pix = (mask == 0) & np.isfinite(sci) & np.isfinite(var)
    bkg = estimate_background(sci, ~usable_pix, settings.background())
    level = bkg.level()
    residual = sci - level
    stars = find_stars(residual, var, ~usable_pix, bkg.rms(), settings.stars())
    sigma = psf_sigma(stars, settings.min_snr)
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
        "n_stars": int(stars.size),
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
    :func:`astep_dask.register.measure_offset`); stars matched within ``match_radius``
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


def _robust_sigma(values: np.ndarray) -> float:
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
    sig_fwhm = _robust_sigma(fwhm)
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


def zscale_limits(image: np.ndarray, max_samples: int = 100_000) -> tuple[float, float]:
    """Display limits of the z-scale stretch (IRAF's, via astropy) over finite pixels."""
    from astropy.visualization import ZScaleInterval

    v = np.asarray(image)[np.isfinite(image)]
    if v.size == 0:
        return 0.0, 1.0
    if v.size > max_samples:
        v = v[:: v.size // max_samples]
    lo, hi = ZScaleInterval().get_limits(v)
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max()) + 1e-6
    return float(lo), float(hi)


# --------------------------------------------------------------------------- I/O edges


def read_planes(path: Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]:
    """Primary header, SCI, VAR and MASK of a calibrated frame."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header.copy()
        sci = np.asarray(hdul["SCI"].data, np.float32)
        var = np.asarray(hdul["VAR"].data, np.float32)
        mask = np.asarray(hdul["MASK"].data, np.int32)
    return header, sci, var, mask


def frame_time(header: fits.Header) -> tuple[float, str]:
    """Mid-exposure MJD (UTC) and ISO time of a frame, from DATE-OBS or MJD-OBS and
    EXPTIME; NaN and "" without either."""
    exptime = float(header.get("EXPTIME", 0.0) or 0.0)
    try:
        if header.get("DATE-OBS"):
            start = Time(str(header["DATE-OBS"]).strip(), scale="utc")
        elif header.get("MJD-OBS") is not None:
            start = Time(float(header["MJD-OBS"]), format="mjd", scale="utc")
        else:
            return float("nan"), ""
    except ValueError:
        return float("nan"), ""
    mid = Time(start.mjd + exptime / 2 / 86400.0, format="mjd", scale="utc")
    mid.precision = 1
    return float(mid.mjd), str(mid.isot)


def measure_file(path: str | Path, settings: QaSettings | None = None) -> dict:
    """Measure one calibrated frame file (a cluster task). Never raises: a frame that
    cannot be read or measured gives a row with ``error``.

    Returns
    -------
    dict
        The figures of :func:`measure_planes` plus ``file``, ``raw``, ``mjd``, ``time``,
        ``exptime``, ``filter``, ``shape``, ``side``, ``seconds`` and ``stars`` (the star
        list, a small structured array).
    """
    path = Path(path)
    t0 = time.perf_counter()
    row: dict = {"file": path.name}
    try:
        header, sci, var, mask = read_planes(path)
        mjd, iso = frame_time(header)
        row.update(raw=str(header.get("RAWFILE", "")), mjd=mjd, time=iso,
                   exptime=float(header.get("EXPTIME", np.nan)),
                   filter=str(header.get("FILTER", "")), shape=list(sci.shape),
                   side=int(min(sci.shape)))
        figures, stars = measure_planes(sci, var, mask, settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {**row, "error": f"{type(exc).__name__}: {exc}",
                "seconds": time.perf_counter() - t0}
    # The brightest stars are enough for the flux ratios; they keep the row small.
    stars = stars[np.argsort(stars["snr"])[::-1][:KEEP_STARS]]
    return {**row, **figures, "stars": stars, "seconds": time.perf_counter() - t0}


def read_manifest(out_dir: Path) -> dict:
    """The night's ``manifest.json`` (an empty dict when missing or unreadable)."""
    try:
        return json.loads((out_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _local(path: str | None, out_dir: Path) -> Path | None:
    """A product path from a manifest: the file of that name in ``out_dir`` when there
    (manifests may hold paths relative to another working directory), else as given."""
    if not path:
        return None
    here = out_dir / Path(path).name
    return here if here.exists() else Path(path)


def master_files(out_dir: Path, manifest: dict | None = None) -> dict[str, Path]:
    """Master files of a night's output by label (``dark 90s``, ``flat RC``, ``mask``...),
    from the manifest, or from the file names when there is none."""
    paths = (manifest or {}).get("masters", {}).get("paths") or {}
    out: dict[str, Path] = {}
    if paths:
        if (p := _local(paths.get("bias"), out_dir)) is not None:
            out["bias"] = p
        for et, p in sorted((paths.get("darks") or {}).items(), key=lambda kv: float(kv[0])):
            out[f"dark {et}s"] = _local(p, out_dir)
        for f, p in sorted((paths.get("flats") or {}).items()):
            out[f"flat {f}"] = _local(p, out_dir)
        if (p := _local(paths.get("mask"), out_dir)) is not None:
            out["mask"] = p
        return {k: v for k, v in out.items() if v is not None and v.exists()}
    for p in sorted(out_dir.glob("*_MASTER*.fits")) + sorted(out_dir.glob("*_MASK.fits")):
        role = str(fits.getval(p, "MASTTYPE", default="")).lower()
        if role == "dark":
            out[f"dark {fits.getval(p, 'EXPTIME', default=0):g}s"] = p
        elif role == "flat":
            out[f"flat {fits.getval(p, 'FILTER', default='')}".strip()] = p
        elif role in ("bias", "mask"):
            out[role] = p
    return out


def master_figures(label: str, path: Path, mask: np.ndarray | None = None) -> dict:
    """Level, spatial scatter and noise of a master; hot/dead counts of the mask; the
    large-scale gradient of a flat."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header
        data = np.asarray(hdul[0].data)
        names = [h.name for h in hdul]
        inputs = (np.asarray(hdul["INPUTS"].data["LEVEL"], float)
                  if "INPUTS" in names and "LEVEL" in hdul["INPUTS"].columns.names else None)
    role = label.split()[0]
    row: dict = {"label": label, "file": path.name, "role": role,
                 "shape": list(data.shape), "ncombine": header.get("NCOMBINE")}
    if role == "mask":
        m = data.astype(np.int64)
        row.update(n_hot=int(np.count_nonzero(m & flag(Bit.HOT))),
                   n_dead=int(np.count_nonzero(m & flag(Bit.DEAD))),
                   n_bad=int(np.count_nonzero(m & flag(Bit.BAD))),
                   frac_bad=float(np.count_nonzero(m) / max(m.size, 1)))
        return row
    good = np.isfinite(data) if mask is None else (np.isfinite(data) & (mask == 0))
    values = data[good].astype(np.float64)
    row.update(
        unit="relative" if role == "flat" else "adu",
        level=float(np.median(values)) if values.size else float("nan"),
        scatter=robust_sigma(values),
        noise=float(header["NOISE"]) if "NOISE" in header else None,
        p01=float(np.percentile(values, 1)) if values.size else float("nan"),
        p99=float(np.percentile(values, 99)) if values.size else float("nan"),
    )
    if role == "dark":
        row["exptime"] = float(header.get("EXPTIME", np.nan))
    if role == "flat":
        row["filter"] = str(header.get("FILTER", ""))
        b = max(1, min(data.shape) // 16)
        grid = block_reduce(np.where(good, data, np.nan), b, np.nanmedian)
        ey = np.minimum(np.arange(grid.shape[0] + 1) * b, data.shape[0])
        ex = np.minimum(np.arange(grid.shape[1] + 1) * b, data.shape[1])
        ok = np.isfinite(grid)
        if ok.all():
            ptp, angle = plane_gradient(grid, ey, ex)
            row.update(gradient=ptp / row["level"], gradient_angle=angle)
        if inputs is not None and inputs.size:
            row.update(input_level_min=float(inputs.min()), input_level_max=float(inputs.max()))
    return row


def submit_measures(paths: Sequence[str | Path], client,
                    settings: QaSettings | None = None) -> list:
    """Submit one measuring task per calibrated frame to the cluster; returns the futures
    (e.g. for ``distributed.progress``), whose results are :func:`measure_file` rows."""
    settings = settings or QaSettings()
    paths = [Path(p) for p in paths]
    return client.map(measure_file, [str(p) for p in paths], settings=settings, pure=False,
                      key=[f"qa-measure-{p.stem}-{time.time_ns()}" for p in paths])


def calibrated_paths(out_dir: str | Path) -> list[Path]:
    """The calibrated frames (``*_CAL.fits``) of a night's output folder."""
    return sorted(Path(out_dir).glob(f"*{CAL_SUFFIX}"))


def _measure_all(paths: list[Path], settings: QaSettings, client=None,
                 log: Callable[[str], None] | None = None) -> list[dict]:
    if client is not None:
        return list(client.gather(submit_measures(paths, client, settings)))
    rows = []
    for i, p in enumerate(paths):
        rows.append(measure_file(p, settings))
        if log:
            log(f"  [{i + 1}/{len(paths)}] {p.name}")
    return rows


def night_report(night_dir: str | Path, out: str | Path | None = None, client=None,
                 settings: QaSettings | None = None,
                 log: Callable[[str], None] | None = None,
                 rows: list[dict] | None = None) -> Path:
    """Write the QA report of a calibrated night and return its folder.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/`` (its output is found as ``calibrate`` writes it).
    out
        The ``--out`` root given to ``calibrate``, if any.
    client
        A ``distributed.Client``: each frame is then measured in one task on the cluster.
        Without one, frames are measured here, one after the other.
    settings
        Measures and thresholds.
    log
        Called with progress lines.
    rows
        Rows already measured (from :func:`submit_measures`); measured here when None.

    Returns
    -------
    Path
        ``OUTPUT/report/`` holding ``qa.json``, ``index.html`` and the PNG plots.

    Raises
    ------
    FileNotFoundError
        When the night's output folder holds no calibrated frame.
    """
    from .pipeline import output_dir

    settings = settings or QaSettings()
    night_dir = Path(night_dir)
    out_dir = output_dir(night_dir, Path(out) if out is not None else None)
    paths = calibrated_paths(out_dir)
    if not paths:
        raise FileNotFoundError(f"{out_dir}: no calibrated frame (*{CAL_SUFFIX}); run "
                                f"`astep-dask calibrate` first")
    t0 = time.perf_counter()
    folder = out_dir / REPORT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    if rows is None:
        rows = _measure_all(paths, settings, client, log)
    t_measure = time.perf_counter() - t0
    report = assemble_report(night_dir.name, out_dir, rows, manifest, settings)
    report["seconds"] = {"measure": t_measure}
    t1 = time.perf_counter()
    report["plots"] = write_plots(report, out_dir, folder, settings)
    report["seconds"]["plots"] = time.perf_counter() - t1
    report["seconds"]["total"] = time.perf_counter() - t0
    _write_text(folder / QA_JSON, json.dumps(_clean(report), indent=1))
    _write_text(folder / INDEX, render_html(report))
    return folder


def assemble_report(night: str, out_dir: Path, rows: list[dict], manifest: dict,
                    settings: QaSettings) -> dict:
    """The content of ``qa.json`` from the measured rows: transparency, flags, masters."""
    ok = [r for r in rows if "error" not in r]
    ok.sort(key=lambda r: (np.nan_to_num(r.get("mjd", np.nan), nan=np.inf), r["file"]))
    ratio, n_match, ref_i = relative_fluxes([r["stars"] for r in ok], [r["fwhm"] for r in ok],
                                            settings)
    for r, t, m in zip(ok, ratio, n_match, strict=True):
        r["transparency"] = float(t)
        r["n_flux_stars"] = int(m)
    for r, fl in zip(ok, flag_frames(ok, settings), strict=True):
        r["flags"] = fl
        r["flagged"] = bool(fl)
    frames = [{k: v for k, v in r.items() if k != "stars"} for r in ok]
    errors = [r for r in rows if "error" in r]
    masters = master_files(out_dir, manifest)
    mask_data = None
    if "mask" in masters:
        mask_data = np.asarray(fits.getdata(masters["mask"]))
    master_rows = [master_figures(label, p, mask_data) for label, p in masters.items()]
    counts = {reason: sum(any(f["reason"] == reason for f in r["flags"]) for r in frames)
              for reason in REASONS}
    failed = [{"file": r.get("file"), "reason": r.get("reason")}
              for r in manifest.get("frames", []) if r.get("status") == "failed"]
    return {
        "night": night,
        "output": str(out_dir),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": dataclasses.asdict(settings),
        "summary": {
            "frames": len(frames),
            "flagged": sum(r["flagged"] for r in frames),
            "flags": counts,
            "unreadable": len(errors),
            "failed_in_calibration": len(failed),
            "unusable_files": len(manifest.get("unusable", [])),
            "reference_frame": frames[ref_i]["file"] if ref_i >= 0 else None,
            "median_sky": _median(frames, "sky"),
            "median_noise": _median(frames, "noise"),
            "median_fwhm": _median(frames, "fwhm"),
            "calibration_status": manifest.get("status"),
        },
        "frames": frames,
        "unreadable": [{"file": r["file"], "reason": r["error"]} for r in errors],
        "failed": failed,
        "unusable": manifest.get("unusable", []),
        "masters": master_rows,
    }


def _median(rows: list[dict], key: str) -> float:
    v = np.array([r.get(key, np.nan) for r in rows], float)
    return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(obj: object) -> object:
    """JSON-ready: NaN/inf become null, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def report_summary(report: dict, folder: str | Path | None = None) -> str:
    """A few lines for the terminal: counts, medians, each flagged frame with its reasons,
    files not measured, and where the page is."""
    s = report["summary"]
    flags = ", ".join(f"{k} {v}" for k, v in s["flags"].items() if v) or "none"
    lines = [f"night {report['night']}: {s['frames']} frames measured, {s['flagged']} flagged "
             f"({flags}); median sky {_fmt(s['median_sky'], 4)} e-, noise "
             f"{_fmt(s['median_noise'])} e-, FWHM {_fmt(s['median_fwhm'])} px"]
    for f in report["frames"]:
        for fl in f["flags"]:
            lines.append(f"  flagged: {f['file']}: {fl['reason']}: {fl['detail']}")
    for r in report.get("unreadable", []):
        lines.append(f"  not measured: {r['file']}: {r['reason']}")
    if folder is not None:
        lines.append(f"  report: {Path(folder) / INDEX}")
    return "\n".join(lines)


def load_report(folder: str | Path) -> dict:
    """Read ``qa.json`` from a report folder (or a night's output folder)."""
    folder = Path(folder)
    path = folder / QA_JSON if (folder / QA_JSON).exists() else folder / REPORT_FOLDER / QA_JSON
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _display(image: np.ndarray, limit: int, func: Callable = np.nanmean) -> tuple[np.ndarray, int]:
    """An image reduced by whole blocks to at most ``limit`` px a side, and the factor."""
    b = max(1, int(np.ceil(max(image.shape) / max(limit, 1))))
    if b == 1:
        return image, 1
    return block_reduce(image, b, func), b


def draw_image(ax, image: np.ndarray, unit: str, title: str, limit: int = 800,
               cmap: str = "gray", colorbar: bool = True):
    """Draw an image with a z-scale stretch, pixel axes and a colour bar in ``unit``."""
    shown, _ = _display(np.asarray(image, np.float32), limit)
    lo, hi = zscale_limits(shown)
    ny, nx = image.shape
    im = ax.imshow(shown, origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                   extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(title, fontsize=10)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        cb.set_label(unit)
    return im


def fig_master(path: Path, label: str, settings: QaSettings | None = None):
    """A master frame with a z-scale stretch and a colour bar (ADU, or relative response
    for a flat)."""
    settings = settings or QaSettings()
    data = np.asarray(fits.getdata(path), np.float32)
    unit = "relative response (median 1)" if label.startswith("flat") else "ADU"
    fig = _figure(6.4, 5.4)
    ax = fig.add_subplot()
    draw_image(ax, data, unit, f"{label}: {path.name}\nz-scale stretch", settings.thumbnail,
               cmap="viridis" if label.startswith("flat") else "gray")
    return fig


MASK_COLOURS = {"hot": "#d62728", "dead": "#1f77b4", "bad (other)": "#ff7f0e"}


def _mask_classes(mask: np.ndarray) -> dict[str, np.ndarray]:
    m = np.asarray(mask, np.int64)
    hot = (m & flag(Bit.HOT)) != 0
    dead = (m & flag(Bit.DEAD)) != 0
    other = ((m & flag(Bit.BAD)) != 0) & ~hot & ~dead
    return {"hot": hot, "dead": dead, "bad (other)": other}


def fig_mask(path: Path, settings: QaSettings | None = None):
    """The bad-pixel mask: hot, dead and other bad pixels, each with its count."""
    settings = settings or QaSettings()
    mask = np.asarray(fits.getdata(path))
    ny, nx = mask.shape
    fig = _figure(6.4, 5.6)
    ax = fig.add_subplot()
    ax.set_facecolor("#f4f4f4")
    for name, where in _mask_classes(mask).items():
        ys, xs = np.nonzero(where)
        if ys.size > 200_000:
            sel = np.linspace(0, ys.size - 1, 200_000).astype(int)
            ys, xs = ys[sel], xs[sel]
        # squares of ~1.5 image pixels, never smaller than ~2 screen pixels
        size = max(2.0, (1.5 * 0.72 * 450 / max(ny, nx)) ** 2)
        ax.scatter(xs, ys, s=size, marker="s", linewidths=0,
                   color=MASK_COLOURS[name], label=f"{name}: {int(where.sum())} px")
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(f"bad-pixel mask: {path.name}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, markerscale=3, framealpha=0.9)
    return fig


def _times(frames: Sequence[dict]):
    import datetime as dt

    base = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
    return [base + dt.timedelta(days=f["mjd"]) if f.get("mjd") is not None
            and np.isfinite(f["mjd"]) else base for f in frames]


TIMESERIES = (  # key, axis label, scale, the reasons this figure flags
    ("sky", "sky [e-]", 1.0, ("sky", "cloud")),
    ("noise", "sky noise [e-]", 1.0, ()),
    ("fwhm", "PSF FWHM [px]", 1.0, ("defocus",)),
    ("transparency", "star flux\n[night median = 1]", 1.0, ("cloud",)),
    ("coverage", "longest streak\n[% of its path]", 100.0, ("trail",)),
    ("frac_masked", "pixels [%]", 100.0, ()),
    ("gradient", "sky gradient\nacross frame [%]", 100.0, ()),
)


def _series(frames: Sequence[dict], key: str) -> np.ndarray:
    if key == "coverage":
        return np.array([(f.get("streak") or {}).get("coverage", 0.0) for f in frames], float)
    return np.array([np.nan if f.get(key) is None else f[key] for f in frames], float)


def fig_timeseries(frames: Sequence[dict], settings: QaSettings | None = None):
    """Per-frame figures against time (UTC): flagged frames shaded and named, the figure
    that flagged each marked with a cross, flag thresholds dashed."""
    from matplotlib.dates import DateFormatter

    s = settings or QaSettings()
    times = _times(frames)
    fig = _figure(9.0, 12.5, layout=None)  # fixed margins: much faster than constrained
    fig.subplots_adjust(left=0.11, right=0.82, top=0.93, bottom=0.05, hspace=0.12)
    axes = fig.subplots(len(TIMESERIES), 1, sharex=True)
    flagged = [i for i, f in enumerate(frames) if f.get("flags")]
    fwhm = _series(frames, "fwhm")
    limits = {
        "fwhm": s.defocus_jump * np.nanmedian(fwhm) if np.isfinite(fwhm).any() else None,
        "transparency": 1.0 - s.cloud_drop,
        "coverage": s.trail_coverage,
    }
    for ax, (key, label, scale, reasons) in zip(axes, TIMESERIES, strict=True):
        if key == "frac_masked":
            for k, name, style in (("frac_masked", "masked (any bit)", "o-"),
                                   ("frac_saturated", "saturated", "s-"),
                                   ("frac_cr", "cosmic rays", "^-")):
                v = _series(frames, k) * scale
                ax.plot(times, np.where(v > 0, v, np.nan), style, ms=3, lw=0.8, label=name)
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.plot(times, _series(frames, key) * scale, "o-", ms=3, lw=0.8, color="#1f77b4")
        if limits.get(key) is not None:
            ax.axhline(limits[key] * scale, color="#d62728", ls="--", lw=0.8,
                       label="flag threshold")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        v = _series(frames, key)
        for i in flagged:
            ax.axvline(times[i], color="#d62728", alpha=0.2, lw=4)
            if any(fl["reason"] in reasons for fl in frames[i]["flags"]) and np.isfinite(v[i]):
                ax.plot([times[i]], [v[i] * scale], "x", color="#d62728", ms=9, mew=2)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    top = axes[0]
    for i in flagged[:40]:  # beyond that, names would only hide each other
        text = ", ".join(fl["reason"] for fl in frames[i]["flags"])
        top.annotate(text, (times[i], 1.0), xycoords=("data", "axes fraction"),
                     xytext=(0, 4), textcoords="offset points", ha="left", va="bottom",
                     fontsize=8, color="#d62728", rotation=30)
    axes[-1].set_xlabel("time [UTC], mid-exposure")
    axes[-1].xaxis.set_major_formatter(DateFormatter("%H:%M"))
    fig.suptitle("per-frame figures (red band: a flagged frame; x: the figure that flagged it; "
                 "dashed: flag threshold)", fontsize=10)
    return fig


OVERLAYS = (  # (name, bits, RGBA), drawn in this order: later wins
    ("bad", flag(Bit.BAD, Bit.HOT, Bit.DEAD), (0.1, 0.6, 1.0, 0.8)),
    ("no data", flag(Bit.NO_DATA), (0.6, 0.6, 0.6, 0.8)),
    ("saturated", flag(Bit.SAT), (1.0, 0.6, 0.0, 0.9)),
    ("cosmic ray", flag(Bit.CR), (1.0, 0.0, 1.0, 0.95)),
)


def overlay_rgba(mask: np.ndarray, factor: int = 1) -> np.ndarray:
    """RGBA image of mask classes (bad, no data, saturated, cosmic ray), binned by
    ``factor`` with a block maximum so that a single flagged pixel stays visible."""
    m = block_reduce(np.asarray(mask, np.int64), factor, np.bitwise_or.reduce) if factor > 1 \
        else np.asarray(mask, np.int64)
    rgba = np.zeros((*m.shape, 4), np.float32)
    for _, bits, colour in OVERLAYS:
        rgba[(m & bits) != 0] = colour
    return rgba


def _busiest(mask: np.ndarray, bits: int, size: int) -> tuple[slice, slice]:
    """The ``size`` x ``size`` window holding most pixels with ``bits``."""
    ny, nx = mask.shape
    size = min(size, ny, nx)
    hits = ((mask & bits) != 0).astype(np.float32)
    dens = ndimage.uniform_filter(hits, size, mode="constant")
    y, x = np.unravel_index(int(np.argmax(dens)), dens.shape)
    y0 = int(np.clip(y - size // 2, 0, ny - size))
    x0 = int(np.clip(x - size // 2, 0, nx - size))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def fig_frame(path: Path, settings: QaSettings | None = None, zoom: int = 96):
    """One calibrated frame (SCI, z-scale) with mask overlays, whole and zoomed on the
    area with most cosmic-ray pixels."""
    from matplotlib.patches import Patch, Rectangle

    settings = settings or QaSettings()
    _, sci, _, mask = read_planes(path)
    ny, nx = sci.shape
    fig = _figure(12.0, 5.6)
    ax1, ax2 = fig.subplots(1, 2)
    draw_image(ax1, sci, "e-", f"{path.name}\nSCI, z-scale, mask overlays",
               settings.thumbnail, colorbar=False)
    _, b = _display(sci, settings.thumbnail)
    ax1.imshow(overlay_rgba(mask, b), origin="lower", interpolation="nearest",
               extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
    rows, cols = _busiest(mask, flag(Bit.CR), zoom)
    ax1.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                            rows.stop - rows.start, fill=False, ec="yellow", lw=1.2))
    lo, hi = zscale_limits(sci)
    sub = sci[rows, cols]
    im = ax2.imshow(sub, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                    extent=(cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5))
    over = overlay_rgba(mask[rows, cols])
    over[..., 3] *= 0.55
    ax2.imshow(over, origin="lower", interpolation="nearest",
               extent=(cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5))
    ax2.set_xlabel("x [px]")
    ax2.set_ylabel("y [px]")
    ax2.set_title("zoom (yellow box): the area with most cosmic-ray pixels", fontsize=10)
    cb = fig.colorbar(im, ax=[ax1, ax2], shrink=0.85, pad=0.02)
    cb.set_label("SCI [e-]")
    counts = {name: int(np.count_nonzero(mask & bits)) for name, bits, _ in OVERLAYS}
    ax2.legend(handles=[Patch(color=c[:3], label=f"{n}: {counts[n]} px") for n, _, c in OVERLAYS],
               loc="upper right", fontsize=8, framealpha=0.85)
    return fig


def fig_flagged(frames: Sequence[dict], out_dir: Path, settings: QaSettings | None = None,
                limit: int = 8):
    """Thumbnails of the flagged frames (up to ``limit``), each titled with its reasons and
    with the streak drawn when there is one; None when no frame is flagged."""
    settings = settings or QaSettings()
    bad = [f for f in frames if f.get("flags")][:limit]
    if not bad:
        return None
    ncol = min(4, len(bad))
    nrow = int(np.ceil(len(bad) / ncol))
    fig = _figure(3.6 * ncol + 0.8, 3.7 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    im = None
    for ax, f in zip(axes, bad, strict=False):
        _, sci, _, _ = read_planes(out_dir / f["file"])
        ny, nx = sci.shape
        reasons = ", ".join(fl["reason"] for fl in f["flags"])
        im = draw_image(ax, sci, "e-", f"{f['file'].removesuffix(CAL_SUFFIX)}\n{reasons}",
                        min(settings.thumbnail, 400), colorbar=False)
        st = f.get("streak")
        if st and any(fl["reason"] == "trail" for fl in f["flags"]):
            ax.plot([st["x0"], st["x1"]], [st["y0"], st["y1"]], color="#d62728", lw=1.0,
                    alpha=0.6, ls="--")
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(-0.5, ny - 0.5)
    for ax in axes[len(bad):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[: len(bad)]), shrink=0.8, pad=0.02).set_label(
            "SCI [e-] (each panel its own z-scale)")
    return fig


def fig_raw_vs_calibrated(raw_path: Path, cal_path: Path, settings: QaSettings | None = None):
    """A raw frame (ADU) next to its calibrated frame (e-), each with a z-scale stretch."""
    from .stack import read_section

    settings = settings or QaSettings()
    raw = read_section(raw_path, 0 if not raw_path.name.endswith(".fz") else 1,
                       slice(None), slice(None))
    _, sci, _, _ = read_planes(cal_path)
    fig = _figure(12.0, 5.4)
    ax1, ax2 = fig.subplots(1, 2)
    draw_image(ax1, raw, "ADU", f"raw: {raw_path.name}", settings.thumbnail)
    draw_image(ax2, sci, "e-", f"calibrated: {cal_path.name}", settings.thumbnail)
    return fig


def save(fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and return its path."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path


def write_plots(report: dict, out_dir: Path, folder: Path, settings: QaSettings) -> dict:
    """Draw every plot of the report into ``folder``; returns ``{name: file name}``."""
    plots: dict[str, str] = {}
    masters = {m["label"]: out_dir / m["file"] for m in report["masters"]}
    for label, path in masters.items():
        if not path.exists():
            continue
        name = "mask.png" if label == "mask" else f"master_{label.replace(' ', '_')}.png"
        fig = fig_mask(path, settings) if label == "mask" else fig_master(path, label, settings)
        plots[label] = save(fig, folder / name).name
    frames = report["frames"]
    if frames:
        plots["timeseries"] = save(fig_timeseries(frames, settings), folder / "timeseries.png").name
        good = [f for f in frames if not f["flagged"]] or frames
        mids = np.array([f.get("mjd") or 0.0 for f in good])
        pick = good[int(np.argmin(np.abs(mids - np.median(mids))))]
        plots["frame"] = save(fig_frame(out_dir / pick["file"], settings),
                              folder / "frame.png").name
        report["summary"]["frame_shown"] = pick["file"]
        fig = fig_flagged(frames, out_dir, settings)
        if fig is not None:
            plots["flagged"] = save(fig, folder / "flagged.png").name
    return plots


# --------------------------------------------------------------------------- HTML


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.4g}"
    return html.escape(str(value))


CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; } td.l { text-align: left; }
tr.flag td { background: #fde2e2; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid img { max-width: 610px; border: 1px solid #ddd; }
img.wide { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(report: dict) -> str:
    """The report's ``index.html`` (self-contained but for the PNGs beside it)."""
    s = report["summary"]
    plots = report.get("plots", {})
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>QA {e(report['night'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Night {e(report['night'])}: quality report</h1>",
           f"<p class='note'>Output folder {e(report['output'])}; generated "
           f"{e(report['generated'])}; calibration status {_fmt(s.get('calibration_status'))}."
           f" Flagged frames are kept, never deleted. Data: <a href='{QA_JSON}'>{QA_JSON}</a>."
           "</p>"]
    flag_text = ", ".join(f"{k}: {v}" for k, v in s["flags"].items() if v) or "none"
    out.append("<table><tr><th>frames measured</th><th>flagged</th><th>flags</th>"
               "<th>median sky [e-]</th><th>median noise [e-]</th><th>median FWHM [px]</th>"
               "<th>failed in calibration</th><th>unusable files</th></tr>"
               f"<tr><td>{s['frames']}</td><td>{s['flagged']}</td><td class='l'>{e(flag_text)}"
               f"</td><td>{_fmt(s['median_sky'])}</td><td>{_fmt(s['median_noise'])}</td>"
               f"<td>{_fmt(s['median_fwhm'])}</td><td>{s['failed_in_calibration']}</td>"
               f"<td>{s['unusable_files']}</td></tr></table>")
    flagged = [f for f in report["frames"] if f["flagged"]]
    out.append("<h2>Flagged frames</h2>")
    if flagged:
        out.append("<table><tr><th>frame</th><th>time [UTC]</th><th>reason</th>"
                   "<th>detail</th></tr>")
        for f in flagged:
            for fl in f["flags"]:
                out.append(f"<tr class='flag'><td class='l'>{e(f['file'])}</td>"
                           f"<td>{e(f.get('time') or '')}</td><td class='l'>{e(fl['reason'])}"
                           f"</td><td class='l'>{e(fl['detail'])}</td></tr>")
        out.append("</table>")
        if "flagged" in plots:
            out.append(f"<img class='wide' src='{plots['flagged']}' alt='flagged frames'>")
    else:
        out.append("<p>No frame flagged.</p>")
    if "timeseries" in plots:
        out.append("<h2>Per-frame figures</h2>"
                   f"<img class='wide' src='{plots['timeseries']}' alt='time series'>")
    if "frame" in plots:
        out.append(f"<h2>A calibrated frame: {e(s.get('frame_shown', ''))}</h2>"
                   f"<img class='wide' src='{plots['frame']}' alt='calibrated frame'>")
    out.append("<h2>Masters and bad-pixel mask</h2><div class='grid'>")
    for m in report["masters"]:
        if m["label"] in plots:
            out.append(f"<img src='{plots[m['label']]}' alt='{e(m['label'])}'>")
    out.append("</div>")
    out.append("<table><tr><th>master</th><th>file</th><th>frames</th><th>level</th>"
               "<th>scatter</th><th>pixel noise</th><th>1%–99%</th><th>unit</th>"
               "<th>hot px</th><th>dead px</th></tr>")
    for m in report["masters"]:
        rng = (f"{_fmt(m.get('p01'), 5)}–{_fmt(m.get('p99'), 5)}" if "p01" in m else "–")
        out.append(f"<tr><td class='l'>{e(m['label'])}</td><td class='l'>{e(m['file'])}</td>"
                   f"<td>{_fmt(m.get('ncombine'))}</td><td>{_fmt(m.get('level'), 5)}</td>"
                   f"<td>{_fmt(m.get('scatter'))}</td><td>{_fmt(m.get('noise'))}</td>"
                   f"<td>{rng}</td><td>{_fmt(m.get('unit'))}</td><td>{_fmt(m.get('n_hot'))}</td>"
                   f"<td>{_fmt(m.get('n_dead'))}</td></tr>")
    out.append("</table>")
    out.append("<h2>All frames</h2><table><tr><th>frame</th><th>time [UTC]</th>"
               "<th>sky [e-]</th><th>noise [e-]</th><th>FWHM [px]</th><th>stars</th>"
               "<th>star flux</th><th>masked %</th><th>sat. %</th><th>CR %</th>"
               "<th>gradient %</th><th>flags</th></tr>")
    for f in report["frames"]:
        cls = " class='flag'" if f["flagged"] else ""
        reasons = ", ".join(fl["reason"] for fl in f["flags"])
        out.append(
            f"<tr{cls}><td class='l'>{e(f['file'])}</td><td>{e(f.get('time') or '')}</td>"
            f"<td>{_fmt(f.get('sky'), 4)}</td><td>{_fmt(f.get('noise'))}</td>"
            f"<td>{_fmt(f.get('fwhm'))}</td><td>{f.get('n_stars', '')}</td>"
            f"<td>{_fmt(f.get('transparency'))}</td>"
            f"<td>{_fmt(100 * f['frac_masked'])}</td><td>{_fmt(100 * f['frac_saturated'])}</td>"
            f"<td>{_fmt(100 * f['frac_cr'])}</td><td>{_fmt(_pct(f.get('gradient')))}</td>"
            f"<td class='l'>{e(reasons)}</td></tr>")
    out.append("</table>")
    problems = ([(r["file"], r["reason"]) for r in report.get("failed", [])]
                + [(r["file"], r["reason"]) for r in report.get("unreadable", [])]
                + [(Path(r["path"]).name, r["reason"]) for r in report.get("unusable", [])])
    if problems:
        out.append("<h2>Files not measured</h2><table><tr><th>file</th><th>reason</th></tr>")
        out += [f"<tr><td class='l'>{e(str(a))}</td><td class='l'>{e(str(b))}</td></tr>"
                for a, b in problems]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


# --------------------------------------------------------------------------- season


def season_rows(folder: str | Path) -> list[dict]:
    """One row per night of a season, from ``season.json`` in ``folder`` and each night's
    manifest and masters: status, frames calibrated and failed, per-frame sky levels,
    master dark levels (ADU, per exposure time), flat files, hot and dead pixel counts.

    A night without output (failed before its masters) keeps its status and reason only.
    """
    folder = Path(folder)
    season = json.loads((folder / "season.json").read_text())
    rows = []
    for n in season.get("nights", []):
        row = {"night": n["night"], "status": n["status"], "frames": n.get("done", 0),
               "failed": n.get("failed", 0), "reason": n.get("reason", ""),
               "seconds": n.get("seconds"), "output": n.get("output", "")}
        out_dir = Path(row["output"]) if row["output"] else None
        manifest = read_manifest(out_dir) if out_dir and out_dir.is_dir() else {}
        if manifest:
            frames = manifest.get("frames", [])
            row["frames"] = sum(f.get("status") in ("done", "skipped") for f in frames)
            row["failed"] = sum(f.get("status") == "failed" for f in frames)
            row["sky"] = [f["sky"] for f in frames if f.get("sky") is not None]
            row["mjd"] = [f["mjd"] for f in frames if f.get("sky") is not None]
            masters = master_files(out_dir, manifest)
            row["dark_levels"] = {}
            for label, path in masters.items():
                if label.startswith("dark"):
                    et = label.split()[1].removesuffix("s")
                    row["dark_levels"][et] = float(np.median(fits.getdata(path)))
                elif label.startswith("flat"):
                    row.setdefault("flats", {})[label.split(" ", 1)[1]] = str(path)
                elif label == "mask":
                    m = master_figures("mask", path)
                    row.update(n_hot=m["n_hot"], n_dead=m["n_dead"])
        rows.append(row)
    return rows


STATUS_COLOURS = {"complete": "#2ca02c", "skipped": "#98df8a", "partial": "#ff7f0e",
                  "failed": "#d62728"}


def fig_season(rows: Sequence[dict]):
    """Season overview: frames per night coloured by status, sky levels, master dark
    levels and hot/dead pixel counts, night by night."""
    fig = _figure(10.0, 10.0)
    axes = fig.subplots(4, 1, sharex=True)
    x = np.arange(len(rows))
    names = [r["night"] for r in rows]
    ax = axes[0]
    ax.bar(x, [r["frames"] for r in rows], color=[STATUS_COLOURS.get(r["status"], "grey")
                                                 for r in rows], label="calibrated")
    ax.bar(x, [r["failed"] for r in rows], bottom=[r["frames"] for r in rows],
           color="#d62728", alpha=0.5, label="failed frames")
    for i, r in enumerate(rows):
        ax.annotate(r["status"], (i, r["frames"] + r["failed"]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8,
                    color=STATUS_COLOURS.get(r["status"], "black"))
    ax.set_ylabel("frames")
    ax.set_title("frames per night (bar colour: night status)", fontsize=10)
    ax.set_ylim(0, 1.25 * max([r["frames"] + r["failed"] for r in rows] + [1]))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = axes[1]
    for i, r in enumerate(rows):
        sky = np.asarray(r.get("sky", []), float)
        if sky.size:
            jitter = np.linspace(-0.2, 0.2, sky.size)
            ax.plot(i + jitter, sky, "o", ms=3, color="#1f77b4", alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [np.median(sky)] * 2, color="k", lw=1.5)
    ax.set_ylabel("sky [e-]")
    ax.set_title("sky level of each frame (line: night median)", fontsize=10)
    ax = axes[2]
    exptimes = sorted({et for r in rows for et in r.get("dark_levels", {})}, key=float)
    for et in exptimes:
        v = [r.get("dark_levels", {}).get(et, np.nan) for r in rows]
        ax.plot(x, v, "o-", label=f"{et} s")
    ax.set_ylabel("master dark\nmedian [ADU]")
    ax.set_title("master dark level (bias + dark current)", fontsize=10)
    if exptimes:
        ax.legend(fontsize=8, title="exposure", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    ax = axes[3]
    for key, name, colour in (("n_hot", "hot", "#d62728"), ("n_dead", "dead", "#1f77b4")):
        ax.plot(x, [r.get(key, np.nan) for r in rows], "o-", color=colour, label=name)
    ax.set_ylabel("pixels")
    ax.set_title("bad pixels in each night's mask", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xticks(x, names, rotation=30, ha="right")
    axes[-1].set_xlabel("night")
    for a in axes:
        a.grid(alpha=0.3)
    return fig


def flat_ratios(rows: Sequence[dict], filter: str | None = None
                ) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """Each night's master flat divided by the first night's (same filter): 1 where the
    response did not change; dust moving or a new flat-field defect shows up.

    Returns the reference night and ``[(night, ratio image)]`` for the other nights.
    """
    with_flats = [r for r in rows if r.get("flats")]
    if not with_flats:
        return "", []
    filt = filter or sorted(with_flats[0]["flats"])[0]
    have = [r for r in with_flats if filt in r["flats"]]
    ref = np.asarray(fits.getdata(have[0]["flats"][filt]), np.float32)
    out = []
    for r in have[1:]:
        flat = np.asarray(fits.getdata(r["flats"][filt]), np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ref > 0.05, flat / ref, np.nan)
        out.append((r["night"], ratio))
    return have[0]["night"], out


def fig_flat_ratios(rows: Sequence[dict], filter: str | None = None,
                    settings: QaSettings | None = None):
    """Master-flat stability: each night's flat over the first night's, one panel per
    night, on a common stretch (the widest z-scale of the ratios) with a colour bar."""
    settings = settings or QaSettings()
    ref, ratios = flat_ratios(rows, filter)
    if not ratios:
        fig = _figure(6.0, 2.0)
        fig.text(0.5, 0.5, "fewer than two nights with a master flat: no ratio to show",
                 ha="center", va="center")
        return fig
    limits = [zscale_limits(r) for _, r in ratios]
    lo, hi = min(a for a, _ in limits), max(b for _, b in limits)
    half = max(abs(1 - lo), abs(hi - 1), 1e-4)
    ncol = min(3, len(ratios))
    nrow = int(np.ceil(len(ratios) / ncol))
    fig = _figure(4.2 * ncol + 1.0, 4.0 * nrow + 0.4)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    im = None
    for ax, (night, ratio) in zip(axes, ratios, strict=False):
        shown, _ = _display(ratio, settings.thumbnail)
        ny, nx = ratio.shape
        im = ax.imshow(shown, origin="lower", cmap="RdBu_r", vmin=1 - half, vmax=1 + half,
                       interpolation="nearest", extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
        ax.set_title(f"{night} / {ref}\nrobust scatter {robust_sigma(ratio):.2e}", fontsize=9)
        ax.set_xlabel("x [px]")
        ax.set_ylabel("y [px]")
    for ax in axes[len(ratios):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[: len(ratios)]), shrink=0.85).set_label(
        "flat ratio (1 = unchanged)")
    fig.suptitle("master-flat stability across nights", fontsize=10)
    return fig
