"""Stars, frame-to-frame offsets and resampling onto a reference grid: numpy in, numpy out.

**Stars.** Peaks of the background-subtracted frame smoothed by a Gaussian of the PSF
size, above ``nsigma`` times the smoothed noise. A peak is kept only when no flagged pixel
(BAD, SAT, CR, NO_DATA, any bit) lies in its measuring box, so saturated stars, cosmic
rays and bad columns never give a position. Positions are Gaussian-windowed centroids,
the iteration SExtractor uses for its ``XWIN_IMAGE`` (Bertin, SExtractor manual,
"Windowed positional parameters")::

    x ← x + 2 Σ w I (x_i − x) / Σ w I,    w = exp(−r² / 2σ_w²)

It is unbiased for any symmetric PSF and, with σ_w about the PSF σ, close to optimal in
noise. The windowed second moment gives the PSF width: for a Gaussian PSF of σ and a
window of σ_w it equals σ²σ_w² / (σ² + σ_w²) per axis, solved for σ (minus the 1/12 px²
that pixel integration adds). Peaks far narrower than the frame's median width (cosmic-ray
remnants, hot pixels the mask missed) are dropped.

**Offsets.** A translation per frame, measured against the reference frame's star list:
a vote over all pairwise position differences of the brightest stars gives the integer
part without any prior on the drift (moving objects and spurious peaks do not vote
coherently), then stars are matched within ``match_radius`` and the translation refined
as the inverse-variance weighted mean of the matched differences with iterative
clipping, so a moving object matched to its own earlier position, a blend or a variable
star is rejected. The convention is the simulator's: a star at ``(x, y)`` in the reference
frame is at ``(x + dx, y + dy)`` in this frame.

**Resampling.** The registered frame at reference pixel ``(x, y)`` is the frame at
``(x + dx, y + dy)``, interpolated by a separable kernel of the fractional offset
``(fx, fy)`` (:func:`axis_weights`; an integer shift copies pixels). Two kernels:

``"overlap"`` (the export's default)
    the exact overlap of the shifted output pixel with the input pixels (drizzle with
    ``pixfrac = 1``, Fruchter & Hook 2002, PASP 114, 144): 2 × 2 taps with the bilinear
    weights ``(1−fx)(1−fy), fx(1−fy), (1−fx)fy, fx·fy``, all positive, so masks grow by at
    most one pixel and nothing rings. The price: it smooths, the PSF variance grows by
    ``fx(1−fx)`` and ``fy(1−fy)`` (up to 0.25 px² per axis). That smooths the noise as
    much as the signal, so a matched filter whose variance accounts for the correlation
    (``FILTVARF``) loses little: for Gaussians, SNR² falls by ``σ²(σ²+2a)/(σ²+a)²``, 0.967
    for σ = 1.06 px and a = 0.25 px² (a filter that takes the noise as white loses ~10 %).
``"cubic"``
    Keys' cubic convolution (Keys 1981, IEEE Trans. ASSP 29, 1153; ``a = −1/2``): 4 × 4
    taps, weights summing to 1 (flux conserved), exact for polynomials up to degree 2, so
    the PSF's centroid and second moment are unchanged (:func:`kernel_moment` is 0): no
    blur. Its outer weights are negative (at most −1/16), so an output pixel takes the OR
    of the mask bits of all 16 input pixels: masks grow by up to two pixels on the side
    of the shift and one on the other, and a masked pixel's value never rings into an
    unmasked one. Measured on a 256² test night of 12 frames (PSF σ 1.3 px, many cosmic
    rays): 10.3 % of pixels masked against 7.0 %, and no gain in a mover's matched-filter
    SNR; it is the kernel for undersampled PSFs (σ < 0.8 px), where the overlap kernel's
    widening costs more.

An output pixel takes the OR of the mask bits of every input pixel with non-zero weight.
Variance goes through the weights in one of two conventions:

``"area"`` (default)
    ``Σ |w|·var / Σ |w|``: the variance appropriate for any sum over an area larger than
    the kernel (a PSF-matched filter, an aperture), which is what KBMOD's likelihood
    computes; it is then neither under- nor over-estimated (for the overlap kernel,
    ``Σ w·var``; the absolute values keep it positive beside a bright star for the cubic
    one, and give the same on a smooth variance).
``"pixel"``
    ``Σ w²·var``: the variance of one output pixel taken alone; smaller by the factor
    ``Σ w²`` (down to 0.25 at a half-pixel shift in both axes for the overlap kernel,
    0.41 for the cubic one). Using it in a matched filter would overstate signal-to-noise.

The factor ``Σ w²`` is the same for every pixel of a frame and is returned, so either
convention can be converted to the other. What either does to a matched filter's noise is
in :func:`astep_dask.kbmod.kernels.filter_factor`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from astep_dask.config import MatchSettings, StarSettings
from astep_dask.core.bits import MASK_DTYPE, Bit, flag

__all__ = [
    "FWHM_PER_SIGMA",
    "RESAMPLING_KERNELS",
    "STAR_DTYPE",
    "Offset",
    "RegistrationError",
    "Resampled",
    "axis_weights",
    "count_stars",
    "find_stars",
    "gaussian_kernel_norm",
    "kernel_moment",
    "measure_offset",
    "resample",
    "shift_weights",
    "shifted",
    "sigma_from_moment",
    "stars_psf_sigma",
    "vote_offset",
    "windowed_centroids",
]

STAR_DTYPE = np.dtype([
    ("x", "f8"), ("y", "f8"), ("flux", "f8"), ("snr", "f8"), ("err", "f8"), ("width", "f8"),
])


OFF_FRAME = flag(Bit.NO_DATA, Bit.EDGE)  # output pixels fed by no input pixel
FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
PIXEL_VARIANCE = 1.0 / 12.0  # px², variance of a uniform pixel response
RESAMPLING_KERNELS = ("overlap", "cubic")  # see the module doc


@dataclass(frozen=True)
class Offset:
    """A frame's translation to the reference: star at (x, y) in the reference is at
    (x + dx, y + dy) in the frame."""

    dx: float
    dy: float
    err_x: float
    err_y: float
    n_match: int
    rms: float  # px, inverse-variance weighted rms of the matched stars' residuals
    n_vote: int  # pairs that voted for the integer offset

    def to_dict(self) -> dict:
        """Plain dict (for summary rows)."""
        return asdict(self)


class RegistrationError(ValueError):
    """A frame cannot be registered (too few stars or matches); the message says why."""


def gaussian_kernel_norm(sigma: float) -> float:
    """Root sum of squares of a normalised Gaussian filter: the noise of a smoothed white
    noise image relative to the input's."""
    half = int(np.ceil(4 * sigma))
    impulse = np.zeros((2 * half + 1, 2 * half + 1))
    impulse[half, half] = 1.0
    return float(np.sqrt(np.sum(ndimage.gaussian_filter(impulse, sigma) ** 2)))


def _box(settings: StarSettings, window: float) -> int:
    return settings.box or int(np.ceil(3.5 * window))


def windowed_centroids(
    image: np.ndarray, var: np.ndarray | float, usable: np.ndarray, x: np.ndarray,
    y: np.ndarray, window: float, half: int, iterations: int = 30,
) -> dict[str, np.ndarray]:
    """Gaussian-windowed centroids, widths and errors of sources near ``(x, y)``.

    Parameters
    ----------
    image
        Background-subtracted frame.
    var
        Its variance (array or scalar), for the position errors.
    usable
        Pixels that may be used; a source with any unusable pixel in its box is rejected.
    x, y
        Starting positions (px).
    window
        σ of the Gaussian window (px).
    half
        Half-size of the square box around each start.

    Returns
    -------
    dict
        ``x``, ``y`` (refined), ``sum`` (Σ w I), ``m2`` (windowed second moment per axis,
        px²), ``err`` (1-σ position error per axis), ``snr`` and ``ok`` (bool).
    """
    ny, nx = image.shape
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ix, iy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    inside = (ix >= half) & (ix < nx - half) & (iy >= half) & (iy < ny - half)
    ixc, iyc = np.where(inside, ix, half), np.where(inside, iy, half)
    off = np.arange(-half, half + 1)
    rows = iyc[:, None, None] + off[None, :, None]
    cols = ixc[:, None, None] + off[None, None, :]
    stamps = image[rows, cols].astype(np.float64)
    good = usable[rows, cols].all(axis=(1, 2)) & np.isfinite(stamps).all(axis=(1, 2))
    variance = (np.broadcast_to(var, image.shape)[rows, cols].astype(np.float64)
                if np.ndim(var) else np.full(stamps.shape, float(var)))
    stamps = np.where(np.isfinite(stamps), stamps, 0.0)
    px = cols.astype(np.float64)
    py = rows.astype(np.float64)
    cx, cy = x.copy(), y.copy()
    s2 = 2.0 * window * window
    ok = inside & good
    for _ in range(iterations):
        rx, ry = px - cx[:, None, None], py - cy[:, None, None]
        w = np.exp(-(rx * rx + ry * ry) / s2)
        wi = w * stamps
        total = wi.sum(axis=(1, 2))
        ok &= total > 0
        safe = np.where(total > 0, total, 1.0)
        step_x = np.clip(2.0 * (wi * rx).sum(axis=(1, 2)) / safe, -1.0, 1.0)
        step_y = np.clip(2.0 * (wi * ry).sum(axis=(1, 2)) / safe, -1.0, 1.0)
        cx = np.where(ok, cx + step_x, cx)
        cy = np.where(ok, cy + step_y, cy)
        if np.all(np.abs(np.where(ok, step_x, 0)) < 1e-5) and np.all(
            np.abs(np.where(ok, step_y, 0)) < 1e-5
        ):
            break
    rx, ry = px - cx[:, None, None], py - cy[:, None, None]
    w = np.exp(-(rx * rx + ry * ry) / s2)
    wi = w * stamps
    total = wi.sum(axis=(1, 2))
    safe = np.where(total > 0, total, 1.0)
    m2 = 0.5 * (wi * (rx * rx + ry * ry)).sum(axis=(1, 2)) / safe
    # Linearised noise of the fixed point x = x + 2 Σ w I rx / Σ w I.
    err_x = 2.0 * np.sqrt((w * w * rx * rx * variance).sum(axis=(1, 2))) / safe
    err_y = 2.0 * np.sqrt((w * w * ry * ry * variance).sum(axis=(1, 2))) / safe
    noise = np.sqrt((w * w * variance).sum(axis=(1, 2)))
    ok &= (np.abs(cx - x) <= half / 2) & (np.abs(cy - y) <= half / 2) & (total > 0)
    return {
        "x": cx, "y": cy, "sum": total, "m2": m2, "err": 0.5 * (err_x + err_y),
        "snr": total / np.where(noise > 0, noise, np.inf), "ok": ok,
    }


def sigma_from_moment(m2: np.ndarray | float, window: float) -> np.ndarray:
    """PSF Gaussian σ from the windowed second moment (removing the window and the pixel
    integration); NaN where the moment is not below the window's own variance."""
    m2 = np.asarray(m2, np.float64)
    w2 = window * window
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = np.where(m2 < w2, m2 * w2 / (w2 - m2), np.nan) - PIXEL_VARIANCE
        return np.sqrt(np.where(s2 > 0, s2, np.nan))


def find_stars(
    image: np.ndarray, var: np.ndarray | float, mask: np.ndarray, rms: np.ndarray | float,
    settings: StarSettings | None = None,
) -> np.ndarray:
    """Stars of a background-subtracted frame, brightest first: :func:`count_stars`
    without the count."""
    return count_stars(image, var, mask, rms, settings)[0]


def count_stars(
    image: np.ndarray, var: np.ndarray | float, mask: np.ndarray, rms: np.ndarray | float,
    settings: StarSettings | None = None,
) -> tuple[np.ndarray, int]:
    """Stars of a background-subtracted frame, brightest first (structured array), and
    how many sources were detected in all.

    Parameters
    ----------
    image
        Background-subtracted frame.
    var
        Its variance (for position errors and signal-to-noise).
    mask
        Mask bits (any non-zero pixel is unusable) or a boolean of unusable pixels.
    rms
        Sky noise per pixel (scalar or image), for the detection threshold.
    settings
        Detection threshold, window, number kept.

    Returns
    -------
    stars : ndarray of :data:`STAR_DTYPE`
        At most ``settings.max_stars``, the highest signal-to-noise first: ``x``, ``y``
        (px, pixel centres at integers), ``flux`` (for a Gaussian PSF), ``snr``, ``err``
        (position error, px), ``width`` (Gaussian σ, px).
    detected : int
        Sources detected: peaks of the PSF-smoothed frame above the threshold whose whole
        measuring box is usable, however many (not limited by ``max_stars``).
    """
    settings = settings or StarSettings()
    usable = (np.asarray(mask) == 0) & np.isfinite(image)
    window = settings.psf_sigma
    half = _box(settings, window)
    data = np.where(usable, image, 0).astype(np.float32)
    smooth = ndimage.gaussian_filter(data, window, mode="constant")
    threshold = settings.nsigma * gaussian_kernel_norm(window) * np.asarray(rms)
    size = 2 * int(np.ceil(window)) + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size, mode="constant")) & (
        smooth > threshold) & usable
    # A peak is measurable only when its whole box is usable.
    near_bad = ndimage.maximum_filter(~usable, size=2 * half + 1, mode="constant", cval=True)
    peaks &= ~near_bad
    ys, xs = np.nonzero(peaks)
    detected = int(ys.size)
    order = np.argsort(smooth[ys, xs])[::-1][: 4 * settings.max_stars]
    ys, xs = ys[order], xs[order]
    m = windowed_centroids(image, var, usable, xs.astype(float), ys.astype(float), window,
                           half)
    ok = m["ok"]
    width = sigma_from_moment(m["m2"], window)
    ok &= np.isfinite(width)
    if ok.sum() >= 3:
        med = np.median(width[ok])
        ok &= (width > settings.min_width_ratio * med) & (width < settings.max_width_ratio * med)
    # Two peaks converging on one star: keep the first (brightest).
    ok &= _unique_positions(m["x"], m["y"], ok, radius=1.0)
    sel = np.nonzero(ok)[0]
    sel = sel[np.argsort(m["snr"][sel])[::-1]][: settings.max_stars]
    out = np.zeros(sel.size, STAR_DTYPE)
    out["x"], out["y"] = m["x"][sel], m["y"][sel]
    s2, w2 = width[sel] ** 2 + PIXEL_VARIANCE, window * window
    out["flux"] = m["sum"][sel] * (s2 + w2) / w2
    out["snr"], out["err"], out["width"] = m["snr"][sel], m["err"][sel], width[sel]
    return out, detected


def _unique_positions(x: np.ndarray, y: np.ndarray, ok: np.ndarray, radius: float
                      ) -> np.ndarray:
    keep = ok.copy()
    idx = np.nonzero(ok)[0]
    if idx.size < 2:
        return keep
    tree = cKDTree(np.column_stack([x[idx], y[idx]]))
    for i, j in sorted(tree.query_pairs(radius)):
        if keep[idx[i]]:
            keep[idx[j]] = False
    return keep


def stars_psf_sigma(stars: np.ndarray, min_snr: float = 20.0) -> float:
    """The frame's PSF Gaussian σ (px): median width of its stars above ``min_snr``
    (all stars when fewer than 5 are); NaN without stars."""
    if stars.size == 0:
        return float("nan")
    bright = stars[stars["snr"] >= min_snr]
    use = bright if bright.size >= 5 else stars
    return float(np.median(use["width"]))


def vote_offset(stars: np.ndarray, ref: np.ndarray, settings: MatchSettings
                ) -> tuple[float, float, int]:
    """Integer-pixel translation from a vote over all pairwise position differences of
    the brightest stars; returns (dx, dy, votes). The winning 1-px cell is chosen by the
    votes in it and its eight neighbours (a true offset near a cell edge splits its vote)."""
    a = stars[np.argsort(stars["snr"])[::-1][: settings.n_bright]]
    b = ref[np.argsort(ref["snr"])[::-1][: settings.n_bright]]
    if a.size == 0 or b.size == 0:
        return 0.0, 0.0, 0
    ddx = (a["x"][:, None] - b["x"][None, :]).ravel()
    ddy = (a["y"][:, None] - b["y"][None, :]).ravel()
    if settings.max_shift is not None:
        keep = np.hypot(ddx, ddy) <= settings.max_shift
        ddx, ddy = ddx[keep], ddy[keep]
        if ddx.size == 0:
            return 0.0, 0.0, 0
    kx, ky = np.rint(ddx).astype(np.int64), np.rint(ddy).astype(np.int64)
    cells, counts = np.unique(np.column_stack([kx, ky]), axis=0, return_counts=True)
    lookup = {(int(cx), int(cy)): int(c) for (cx, cy), c in zip(cells, counts, strict=True)}
    best, best_score = (0, 0), -1
    for i in np.argsort(counts)[::-1][:50]:
        cx, cy = int(cells[i, 0]), int(cells[i, 1])
        score = sum(lookup.get((cx + u, cy + v), 0) for u in (-1, 0, 1) for v in (-1, 0, 1))
        if score > best_score:
            best, best_score = (cx, cy), score
    near = (np.abs(ddx - best[0]) <= 1.5) & (np.abs(ddy - best[1]) <= 1.5)
    return float(np.median(ddx[near])), float(np.median(ddy[near])), int(near.sum())


def measure_offset(stars: np.ndarray, ref: np.ndarray, settings: MatchSettings | None = None
                   ) -> Offset:
    """Translation of a frame's star list relative to the reference star list.

    Raises
    ------
    RegistrationError
        When fewer than ``min_matches`` stars match.
    """
    settings = settings or MatchSettings()
    if stars.size < settings.min_matches or ref.size < settings.min_matches:
        raise RegistrationError(
            f"too few stars to register ({stars.size} in the frame, {ref.size} in the "
            f"reference; at least {settings.min_matches} needed)")
    dx, dy, votes = vote_offset(stars, ref, settings)
    tree = cKDTree(np.column_stack([stars["x"], stars["y"]]))
    floor2 = settings.floor**2
    keep = np.ones(0, bool)
    d = np.zeros((0, 2))
    w = np.zeros(0)
    radius = settings.match_radius
    for _ in range(10):
        pred = np.column_stack([ref["x"] + dx, ref["y"] + dy])
        dist, j = tree.query(pred, distance_upper_bound=radius)
        found = np.isfinite(dist)
        # One frame star for one reference star: keep the closest claim.
        order = np.argsort(np.where(found, dist, np.inf))
        taken: set[int] = set()
        for i in order:
            if not found[i]:
                break
            if j[i] in taken:
                found[i] = False
            else:
                taken.add(int(j[i]))
        ri = np.nonzero(found)[0]
        fi = j[ri]
        if ri.size < settings.min_matches:
            raise RegistrationError(
                f"only {ri.size} stars match the reference within {radius:g} px of the voted "
                f"offset ({dx:+.1f}, {dy:+.1f}); at least {settings.min_matches} needed")
        d = np.column_stack([stars["x"][fi] - ref["x"][ri], stars["y"][fi] - ref["y"][ri]])
        e2 = stars["err"][fi] ** 2 + ref["err"][ri] ** 2 + floor2
        w = 1.0 / e2
        keep = np.ones(ri.size, bool)
        for _ in range(5):
            mx = np.sum(w[keep] * d[keep, 0]) / np.sum(w[keep])
            my = np.sum(w[keep] * d[keep, 1]) / np.sum(w[keep])
            chi = np.hypot(d[:, 0] - mx, d[:, 1] - my) * np.sqrt(w / 2.0)
            scale = max(1.0, 1.4826 * float(np.median(chi[keep])) / 0.8326)
            new = chi < settings.clip * scale
            if new.sum() < settings.min_matches or np.array_equal(new, keep):
                break
            keep = new
        moved = np.hypot(mx - dx, my - dy)
        dx, dy = float(mx), float(my)
        radius = min(settings.match_radius, max(0.5, 5 * _rms(d[keep] - [dx, dy])))
        if moved < 1e-4:
            break
    resid = d[keep] - [dx, dy]
    chi2 = np.sum(w[keep][:, None] * resid**2) / max(2 * keep.sum() - 2, 1)
    err = np.sqrt(1.0 / np.sum(w[keep]) * max(1.0, float(chi2)))
    wk = w[keep]
    rms = float(np.sqrt(np.sum(wk * np.sum(resid**2, axis=1)) / np.sum(wk)))
    return Offset(dx=dx, dy=dy, err_x=float(err), err_y=float(err), n_match=int(keep.sum()),
                  rms=rms, n_vote=votes)


def _rms(d: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(d * d, axis=1)))) if d.size else float("nan")


def shifted(a: np.ndarray, iy: int, ix: int, fill: float | int) -> np.ndarray:
    """``out[y, x] = a[y + iy, x + ix]``, ``fill`` where that falls outside ``a``."""
    ny, nx = a.shape
    out = np.full(a.shape, fill, dtype=a.dtype)
    y0, y1 = max(0, -iy), min(ny, ny - iy)
    x0, x1 = max(0, -ix), min(nx, nx - ix)
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = a[y0 + iy : y1 + iy, x0 + ix : x1 + ix]
    return out


def _keys(s: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (``a = −1/2``) at distances ``s``."""
    s = np.abs(s)
    near = (1.5 * s - 2.5) * s * s + 1.0
    far = ((-0.5 * s + 2.5) * s - 4.0) * s + 2.0
    return np.where(s <= 1.0, near, np.where(s < 2.0, far, 0.0))


def axis_weights(f: float, kind: str = "overlap") -> tuple[int, np.ndarray]:
    """The taps along one axis of a shift by ``n + f`` (``0 ≤ f < 1``): the first tap's
    offset from ``n`` and the weights (summing to 1) of the input pixels from there on;
    ``f = 0`` gives ``(0, [1])`` for either kernel."""
    if kind not in RESAMPLING_KERNELS:
        raise ValueError(f"resampling kernel must be one of {RESAMPLING_KERNELS}, not {kind!r}")
    if f == 0.0:
        return 0, np.ones(1)
    if kind == "overlap":
        return 0, np.array([1.0 - f, f])
    w = _keys(np.array([1.0 + f, f, 1.0 - f, 2.0 - f]))
    return -1, w / w.sum()


def kernel_moment(f: float, kind: str = "overlap") -> float:
    """Second moment (px²) of an axis's taps about the interpolated point: what the kernel
    adds to the PSF variance along that axis (``f(1−f)`` for "overlap", 0 for "cubic")."""
    first, w = axis_weights(f, kind)
    x = first + np.arange(w.size) - f
    return max(float(np.sum(w * x * x)), 0.0)


def shift_weights(dx: float, dy: float, tol: float = 1e-3, kind: str = "overlap"
                  ) -> tuple[list[tuple[int, int, float]], float, float]:
    """Taps ``(iy, ix, weight)`` of the resampling kernel of a shift, and its fractional
    parts ``(fx, fy)``. Fractional parts within ``tol`` px of an integer are rounded (a
    0.001 px error, rather than growing every mask for a negligible weight)."""

    def split(s: float) -> tuple[int, float]:
        n = int(np.floor(s))
        f = s - n
        if f < tol:
            return n, 0.0
        if f > 1.0 - tol:
            return n + 1, 0.0
        return n, f

    ny0, fy = split(dy)
    nx0, fx = split(dx)
    (ax, wx), (ay, wy) = axis_weights(fx, kind), axis_weights(fy, kind)
    taps = [(ny0 + ay + j, nx0 + ax + i, float(wy[j] * wx[i]))
            for j in range(wy.size) for i in range(wx.size)]
    return [t for t in taps if t[2] != 0], fx, fy


@dataclass(frozen=True)
class Resampled:
    """A frame on the reference grid."""

    sci: np.ndarray
    var: np.ndarray
    mask: np.ndarray
    var_pixel_factor: float  # Σ w²: per-pixel variance / area variance
    kernel_var: tuple[float, float]  # (x, y) px² the resampling adds to the PSF variance


def resample(sci: np.ndarray, var: np.ndarray, mask: np.ndarray, dx: float, dy: float,
             variance: str = "area", tol: float = 1e-3, kind: str = "overlap") -> Resampled:
    """Put a frame onto the reference grid given its offset ``(dx, dy)``, with the
    resampling kernel ``kind`` (see module doc).

    Output pixels fed by any input pixel outside the frame get NO_DATA | EDGE and NaN;
    the others take the OR of the mask bits of their contributing input pixels.
    """
    if variance not in ("area", "pixel"):
        raise ValueError(f"variance must be 'area' or 'pixel', not {variance!r}")
    taps, fx, fy = shift_weights(dx, dy, tol, kind)
    norm = sum(abs(w) for _, _, w in taps)
    out_sci = np.zeros(sci.shape, np.float64)
    out_var = np.zeros(sci.shape, np.float64)
    out_mask = np.zeros(sci.shape, MASK_DTYPE)
    off = np.zeros(sci.shape, bool)
    present = np.ones(sci.shape, bool)
    mask = mask.astype(MASK_DTYPE, copy=False)
    for iy, ix, w in taps:
        out_sci += w * shifted(sci, iy, ix, np.nan)
        out_var += (abs(w) / norm if variance == "area" else w * w) * shifted(
            var, iy, ix, np.nan)
        out_mask |= shifted(mask, iy, ix, 0)
        off |= ~shifted(present, iy, ix, False)
    out_mask[off] |= OFF_FRAME
    out_sci[off] = np.nan
    out_var[off] = np.nan
    return Resampled(
        sci=out_sci.astype(np.float32), var=out_var.astype(np.float32), mask=out_mask,
        var_pixel_factor=float(sum(w * w for _, _, w in taps)),
        kernel_var=(kernel_moment(fx, kind), kernel_moment(fy, kind)),
    )
