"""Point sources on small stamps: pixel-integrated Gaussian fits and a frame's PSF width.

The cosmic-ray post-filter (:mod:`astep_dask.core.cosmics`) asks, around each group of
flagged pixels, whether stars explain them. This module holds the fitting it needs, batched
over many stamps at once with numpy: stamps cut from a frame (:func:`fit_stamps`'s
inputs), Gauss-Newton fits of several Gaussians of common width plus a constant, with
iterative clipping of pixels far above the model; and :func:`psf_sigma`, the PSF width of a
frame measured on its bright isolated stars, with :func:`sky_level` for the sky.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

from astep_dask.core.stats import MAD_TO_SIGMA, nonzero2d

__all__ = [
    "EDGE_SLACK",
    "SQRT2",
    "StampFit",
    "cut_stamps",
    "fit_stamps",
    "gaussian_images",
    "linear_fluxes",
    "psf_sigma",
    "sky_level",
    "stamp_stat",
    "unpack_params",
]


SQRT2 = np.sqrt(2.0)
SQRT2PI = np.sqrt(2.0 * np.pi)
DEFAULT_SIGMA = 1.3  # px, used when a frame has too few stars to measure its PSF
EDGE_SLACK = 4.0  # PSF sigmas a star's centre may lie outside the frame
CLIP_FRAC = 0.5  # a clipping round drops pixels above this fraction of the worst excess
FIRST_ITER = 5  # iterations of the first, rough fit (before any clipping)


@dataclass
class StampFit:
    """``bg + Σ_m amp_m · PSF(x_m, y_m, sigma)`` fitted to a batch of ``n`` stamps.

    Attributes
    ----------
    bg, sigma : ndarray, shape (n,)
        Background and Gaussian width.
    amp, x, y, amp_err : ndarray, shape (n, m)
        Total flux, centre (stamp pixel coordinates) and flux error of each source.
    stars : ndarray, shape (n, m, s, s)
        Image of each fitted source (without background).
    active : ndarray of bool, shape (n, s, s)
        The pixels the final fit used (usable and not clipped).
    """

    bg: np.ndarray
    sigma: np.ndarray
    amp: np.ndarray
    x: np.ndarray
    y: np.ndarray
    amp_err: np.ndarray
    stars: np.ndarray
    active: np.ndarray

    @property
    def model(self) -> np.ndarray:
        """Fitted image of each stamp, background included."""
        return self.stars.sum(axis=1) + self.bg[:, None, None]

    def params(self) -> np.ndarray:
        """Packed parameters ``bg, amp_1..m, x_1..m, y_1..m, sigma`` (see unpack_params)."""
        return np.column_stack([self.bg, self.amp, self.x, self.y, self.sigma])


def unpack_params(params: np.ndarray) -> tuple[np.ndarray, ...]:
    """``bg, amp, x, y, sigma`` views of packed parameters (``amp, x, y`` are (n, m))."""
    m = (params.shape[1] - 2) // 3
    return (params[:, 0], params[:, 1:1 + m], params[:, 1 + m:1 + 2 * m],
            params[:, 1 + 2 * m:1 + 3 * m], params[:, -1])


def stamp_stat(func, values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """``func`` (np.nanmedian, np.nanmin...) of each stamp's ``values`` where ``where``;
    NaN for a stamp with no such pixel."""
    n = values.shape[0]
    with warnings.catch_warnings():  # stamps without any such pixel are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        return func(np.where(where, values, np.nan).reshape(n, -1), axis=1)


def _profile(
    centre: np.ndarray, sigma: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D pixel-integrated unit Gaussians on pixels ``0..size-1`` and their derivatives.

    ``centre`` is (n, m), ``sigma`` (n,). Returns ``p, dp/dcentre, dp/dsigma``, each of
    shape (n, m, size).
    """
    c = centre[:, :, None]
    s = sigma[:, None, None]
    lo = np.arange(size, dtype=np.float64) - 0.5 - c
    hi = lo + 1.0
    p = 0.5 * (erf(hi / (SQRT2 * s)) - erf(lo / (SQRT2 * s)))
    g_hi = np.exp(-0.5 * (hi / s) ** 2) / (SQRT2PI * s)
    g_lo = np.exp(-0.5 * (lo / s) ** 2) / (SQRT2PI * s)
    return p, g_lo - g_hi, (lo * g_lo - hi * g_hi) / s


def gaussian_images(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, size: int) -> np.ndarray:
    """Unit sources at ``(x, y)`` (each (n, m)) on ``size``² stamps: (n, m, s, s)."""
    px = _profile(x, sigma, size)[0]
    py = _profile(y, sigma, size)[0]
    return py[:, :, :, None] * px[:, :, None, :]


def _solve(normal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched, diagonally scaled solve of ``normal @ step = rhs`` (singular → zeros)."""
    scale = np.sqrt(np.maximum(np.einsum("nii->ni", normal), 1e-300))
    a = normal / scale[:, :, None] / scale[:, None, :] + 1e-9 * np.eye(normal.shape[1])
    try:
        step = np.linalg.solve(a, (rhs / scale)[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        step = np.stack([np.linalg.lstsq(ai, bi, rcond=None)[0]
                         for ai, bi in zip(a, rhs / scale, strict=True)])
    step = step / scale
    return np.where(np.isfinite(step), step, 0.0)


def _gauss_newton(
    data: np.ndarray,
    weight: np.ndarray,
    params: np.ndarray,
    bounds: np.ndarray,
    fit_sigma: bool,
    n_iter: int,
    tol: float = 1e-3,
    sigma_range: tuple[float, float] = (0.3, np.inf),
) -> np.ndarray:
    """Weighted Gauss-Newton fit of packed parameters (see :meth:`StampFit.params`).

    Fluxes are kept positive, position steps limited to one pixel and sigma steps to 30 %;
    centres are kept in ``bounds`` (n, 4: x_lo, x_hi, y_lo, y_hi, stamp coordinates) and
    the width in ``sigma_range``.
    A step that raises a stamp's chi-square is halved (backtracking), so fits do not
    oscillate. A stamp stops when its centres and width move less than ``tol`` pixels or
    its sources are not significant; all stop after ``n_iter`` iterations. Returns the
    best parameters met.
    """
    n, size, _ = data.shape
    params = params.copy()
    best = params.copy()
    best_chi2 = np.full(n, np.inf)
    m = (params.shape[1] - 2) // 3
    npar = params.shape[1] if fit_sigma else params.shape[1] - 1
    moving = slice(1 + m, npar)  # centres (and sigma)
    todo = np.arange(n)
    for it in range(n_iter):
        p = params[todo]
        bg, amp, x, y, sig = unpack_params(p)
        k = todo.size
        px, dpx, dsx = _profile(x, sig, size)
        py, dpy, dsy = _profile(y, sig, size)
        a = amp[:, :, None, None]
        unit = py[:, :, :, None] * px[:, :, None, :]
        resid = (data[todo] - (a * unit).sum(axis=1) - bg[:, None, None]).reshape(k, -1)
        w = weight[todo].reshape(k, -1)
        chi2 = np.einsum("np,np->n", resid * resid, w)
        worse = chi2 > best_chi2[todo] * (1 + 1e-12)
        good = ~worse
        best[todo[good]] = p[good]
        best_chi2[todo[good]] = chi2[good]
        change = np.zeros((k, npar - 1 - m))
        # Worse: go back half way towards the best point.
        back = 0.5 * (p[worse] - best[todo[worse]])
        params[todo[worse]] = best[todo[worse]] + back
        change[worse] = np.abs(back[:, moving])
        # Better: a Gauss-Newton step from here.
        faint = np.zeros((k, m), bool)
        if good.any():
            g = np.nonzero(good)[0]
            ag = a[g]
            # Jacobian rows scaled by sqrt(weight): (g, npar, pix).
            jac = np.empty((g.size, npar, size, size))
            jac[:, 0] = 1.0
            jac[:, 1:1 + m] = unit[g]
            jac[:, 1 + m:1 + 2 * m] = ag * py[g][:, :, :, None] * dpx[g][:, :, None, :]
            jac[:, 1 + 2 * m:1 + 3 * m] = ag * dpy[g][:, :, :, None] * px[g][:, :, None, :]
            if fit_sigma:
                jac[:, -1] = (ag * (dsy[g][:, :, :, None] * px[g][:, :, None, :]
                                    + py[g][:, :, :, None] * dsx[g][:, :, None, :])).sum(axis=1)
            sw = np.sqrt(w[g])
            jac = jac.reshape(g.size, npar, -1) * sw[:, None, :]
            normal = np.matmul(jac, jac.transpose(0, 2, 1))
            step = _solve(normal, np.matmul(jac, (resid[g] * sw)[:, :, None])[:, :, 0])
            step[:, 1 + m:1 + 3 * m] = np.clip(step[:, 1 + m:1 + 3 * m], -1.0, 1.0)
            if fit_sigma:
                step[:, -1] = np.clip(step[:, -1], -0.3 * sig[g], 0.3 * sig[g])
            q = p[g]
            q[:, :npar] += step
            _, qamp, qx, qy, qsig = unpack_params(q)
            np.maximum(qamp, 0.0, out=qamp)  # stars are not holes
            np.clip(qx, bounds[todo[g], 0:1], bounds[todo[g], 1:2], out=qx)
            np.clip(qy, bounds[todo[g], 2:3], bounds[todo[g], 3:4], out=qy)
            np.clip(qsig, sigma_range[0], min(sigma_range[1], size / 2.0), out=qsig)
            params[todo[g]] = q
            change[g] = np.abs(q[:, moving] - p[g][:, moving])
            # Not significant: flux below twice its error at fixed position (1 / its
            # normal-matrix term); its position does not matter and may wander for ever.
            info = np.einsum("nii->ni", normal)[:, 1:1 + m]
            faint[g] = (q[:, 1:1 + m] ** 2 * info < 4.0) & (it >= 3)
        moved = np.maximum(change[:, :m], change[:, m:2 * m])
        if fit_sigma:
            moved = np.maximum(moved, change[:, -1:])
        todo = todo[((moved > tol) & ~faint).any(axis=1)]
        if todo.size == 0:
            break
    return best


def linear_fluxes(
    data: np.ndarray, weight: np.ndarray, unit: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear fit of a background and the fluxes of sources of fixed shape.

    ``unit`` (n, m, s, s) holds the unit source images. Returns the fluxes and their
    errors, each (n, m); both are 0 and inf where the system is singular.
    """
    n, m = unit.shape[:2]
    design = np.concatenate([np.ones((n, 1, *unit.shape[2:])), unit], axis=1).reshape(
        n, m + 1, -1)
    dw = design * weight.reshape(n, 1, -1)
    normal = np.einsum("nip,njp->nij", dw, design)
    rhs = np.einsum("nip,np->ni", dw, data.reshape(n, -1))
    diag = np.einsum("nii->ni", normal)
    scale = np.sqrt(np.maximum(diag, 1e-300))
    normal_s = normal / scale[:, :, None] / scale[:, None, :]
    ok = np.all(diag > 0, axis=1) & (np.abs(np.linalg.det(normal_s)) > 1e-10)
    flux = np.zeros((n, m))
    err = np.full((n, m), np.inf)
    if ok.any():
        cov = np.linalg.inv(normal_s[ok]) / scale[ok, :, None] / scale[ok, None, :]
        flux[ok] = np.einsum("nij,nj->ni", cov, rhs[ok])[:, 1:]
        err[ok] = np.sqrt(np.maximum(np.einsum("nii->ni", cov)[:, 1:], 0.0))
    return flux, err


def _first_guess(data: np.ndarray, good: np.ndarray, sigma: np.ndarray,
                 bounds: np.ndarray, focus: np.ndarray | None) -> np.ndarray:
    """Packed one-source start: border median, peak of the 3×3-median-filtered stamp
    (within ``focus`` where given)."""
    n, size, _ = data.shape
    border = np.zeros((size, size), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    bg = stamp_stat(np.nanmedian, data, good & border)
    low = stamp_stat(np.nanmin, data, good)
    bg = np.nan_to_num(np.where(np.isnan(bg), low, bg))
    # A 3×3 median: cosmic-ray tracks, one pixel wide, do not survive it; star cores do.
    smooth = ndimage.median_filter(np.where(good, data, bg[:, None, None]), size=(1, 3, 3),
                                   mode="nearest")
    where = smooth if focus is None else np.where(focus, smooth, -np.inf)
    peak = np.argmax(where.reshape(n, -1), axis=1)
    y, x = np.divmod(peak, size)
    x = np.clip(x, bounds[:, 0], bounds[:, 1])
    y = np.clip(y, bounds[:, 2], bounds[:, 3])
    frac = np.minimum(1.0 / (2.0 * np.pi * sigma**2), 1.0)  # peak pixel of a unit source
    amp = np.maximum(smooth.reshape(n, -1)[np.arange(n), peak] - bg, 0.0) / frac
    return np.column_stack([bg, amp, x, y, sigma])


def fit_stamps(
    data: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    sigma: float | np.ndarray,
    start: np.ndarray | None = None,
    bounds: np.ndarray | None = None,
    focus: np.ndarray | None = None,
    fit_sigma: bool = False,
    sigma_range: tuple[float, float] = (0.3, np.inf),
    k: float = 5.0,
    model_error: float = 0.0,
    n_clip: int = 6,
    n_iter: int = 20,
) -> StampFit:
    """Fit point sources plus a constant to each stamp, clipping positive outliers.

    Parameters
    ----------
    data, var, usable : ndarray, shape (n, s, s)
        Stamps of the science image, of its variance and of the usable-pixel mask.
    sigma : float or ndarray
        Gaussian width (px), fixed unless ``fit_sigma``, then the starting value.
    start : ndarray, optional
        Packed starting parameters (see :meth:`StampFit.params`); the number of sources
        is taken from it. One source at the brightest spot when None.
    bounds : ndarray, shape (n, 4), optional
        ``x_lo, x_hi, y_lo, y_hi`` limits of the source centres (default: the stamp).
    focus : ndarray of bool, shape (n, s, s), optional
        Where to look for the starting position of the source when ``start`` is None.
    fit_sigma : bool
        Also fit the (common) width, within ``sigma_range``.
    sigma_range : tuple of float
        Limits of the fitted width (px).
    k : float
        After each fit, usable pixels more than ``k`` standard deviations above the fit
        (and above half the largest such excess of their stamp) are excluded and the fit
        is repeated, at most ``n_clip`` times: cosmic rays on a star do not pull it.
    model_error : float
        Fractional error of the source model (PSF mismatch) added in quadrature to the
        standard deviation of each pixel for that test.
    n_clip, n_iter : int
        Most clipping rounds; most Gauss-Newton iterations per round (stamps stop when
        converged).

    Returns
    -------
    StampFit
    """
    n, size, _ = data.shape
    with np.errstate(invalid="ignore"):
        ok = usable & np.isfinite(data) & np.isfinite(var) & (var > 0)
    data = np.where(ok, data, 0.0).astype(np.float64)
    inv = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    if bounds is None:
        bounds = np.tile([0.0, size - 1.0, 0.0, size - 1.0], (n, 1))
    if start is None:
        sig = np.broadcast_to(np.asarray(sigma, np.float64), (n,)).astype(np.float64)
        start = _first_guess(data, ok, sig, bounds, focus)
    active = ok.copy()
    # A rough first fit is enough: cosmic rays, not yet clipped, may keep it from settling.
    params = _gauss_newton(data, inv, start, bounds, fit_sigma, min(n_iter, FIRST_ITER),
                           sigma_range=sigma_range)
    todo = np.ones(n, bool)
    for rnd in range(n_clip):
        bg, amp, x, y, s = unpack_params(params[todo])
        model = (amp[:, :, None, None] * gaussian_images(x, y, s, size)).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            std = np.sqrt(var[todo] + (model_error * model) ** 2)
            excess = np.where(active[todo], (data[todo] - model - bg[:, None, None]) / std, 0.0)
        cut = np.maximum(k, CLIP_FRAC * excess.reshape(excess.shape[0], -1).max(axis=1))
        drop = active[todo] & (excess > cut[:, None, None])
        changed = drop.any(axis=(1, 2))
        if rnd and not changed.any():
            break
        active[todo] &= ~drop
        if rnd:  # the first round refits all stamps: the first fit was rough
            todo[todo] = changed
        params[todo] = _gauss_newton(data[todo], (inv * active)[todo], params[todo],
                                     bounds[todo], fit_sigma, n_iter, sigma_range=sigma_range)
    bg, amp, x, y, s = unpack_params(params)
    unit = gaussian_images(x, y, s, size)
    return StampFit(bg=bg.copy(), sigma=s.copy(), amp=amp.copy(), x=x.copy(), y=y.copy(),
                    amp_err=linear_fluxes(data, inv * active, unit)[1],
                    stars=amp[:, :, None, None] * unit, active=active)


def cut_stamps(
    arrays: tuple[np.ndarray, ...], fill: tuple, ys: np.ndarray, xs: np.ndarray, half: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut ``(2·half+1)``² stamps centred on ``(ys, xs)``; outside the frame gets ``fill``.

    Also returns the ``x_lo, x_hi, y_lo, y_hi`` bounds of the in-frame part of each stamp.
    """
    ny, nx = arrays[0].shape
    off = np.arange(-half, half + 1)
    rows = ys[:, None] + off[None, :]
    cols = xs[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    r = np.clip(rows, 0, ny - 1)[:, :, None]
    c = np.clip(cols, 0, nx - 1)[:, None, :]
    bounds = np.column_stack([
        np.maximum(half - xs, 0), np.minimum(half + nx - 1 - xs, 2 * half),
        np.maximum(half - ys, 0), np.minimum(half + ny - 1 - ys, 2 * half),
    ]).astype(np.float64)
    return [np.where(inside, a[r, c], f) for a, f in zip(arrays, fill, strict=True)], bounds


def sky_level(sci: np.ndarray, usable: np.ndarray) -> tuple[float, float]:
    """Median and robust sigma of the usable pixels (of a subsample on big frames)."""
    stride = max(sci.size // 250_000, 1)
    values = sci.ravel()[::stride]
    values = values[usable.ravel()[::stride] & np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    return med, max(MAD_TO_SIGMA * mad, 1e-6)


def _smooth3(
    sci: np.ndarray, usable: np.ndarray, fill: float, threshold: float,
    strips: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3×3 mean of ``sci`` (float32) on some strips of rows, and the pixels of those
    strips where it exceeds ``threshold``.

    ``strips`` are ``(y0, y1)`` row ranges; the mean is ``-inf`` outside them. Pixels that
    are not usable or not finite count as ``fill``; edge pixels are repeated past the
    frame's edges, as ``ndimage.uniform_filter(data, 3)`` does. Short strips keep the
    temporaries in the CPU cache: a few times faster than the filter on a whole frame.
    """
    ny = sci.shape[0]
    smooth = np.full(sci.shape, -np.inf, np.float32)
    ys, xs = [], []
    for y0, y1 in strips:
        lo, hi = max(y0 - 1, 0), min(y1 + 1, ny)
        with np.errstate(invalid="ignore"):
            part = np.where(usable[lo:hi] & np.isfinite(sci[lo:hi]), sci[lo:hi],
                            np.float32(fill)).astype(np.float32, copy=False)
        part = np.pad(part, ((lo - y0 + 1, y1 + 1 - hi), (1, 1)), mode="edge")
        rows = part[:-2] + part[1:-1]
        rows += part[2:]
        out = smooth[y0:y1]
        np.add(rows[:, :-2], rows[:, 1:-1], out=out)
        out += rows[:, 2:]
        out *= np.float32(1.0 / 9.0)
        r, c = nonzero2d(out > threshold)
        ys.append(r + y0)
        xs.append(c)
    return smooth, np.concatenate(ys), np.concatenate(xs)


def psf_sigma(
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    snr: float = 50.0,
    max_stars: int = 100,
    default: float = DEFAULT_SIGMA,
    max_pixels: int = 1_000_000,
) -> float:
    """Gaussian sigma (px) of the PSF, from bright isolated unsaturated stars.

    Local maxima of the 3×3-smoothed image that stand ``snr`` sky sigmas above the sky,
    the brightest within 6 px and with no unusable pixel in their 13×13 stamp, are fitted
    with a pixel-integrated Gaussian of free width (cosmic rays on them clipped); the
    median width of the good fits is returned, ``default`` when fewer than 3 qualify.
    On frames larger than ``max_pixels`` the stars are sought in evenly spaced strips of
    rows that add up to about that many pixels: the brightest hundred stars of a quarter
    of a 2048² frame measure its PSF as well, over the whole field, for a quarter of the
    cost of smoothing it all.

    Parameters
    ----------
    sci, var : ndarray
        Calibrated image and its variance (electrons, electrons²).
    usable : ndarray of bool
        Pixels with valid data (not bad, saturated or without data).
    snr : float
        Minimum peak height above the sky, in sky sigmas.
    max_stars : int
        At most this many of the brightest candidates are fitted.
    default : float
        Returned when the frame has too few suitable stars.
    max_pixels : int
        Frames larger than this are sampled in strips of rows.
    """
    half = 6
    ny, nx = sci.shape
    sky, noise = sky_level(sci, usable)
    height = 64
    step = max(int(np.ceil(sci.size / max_pixels)), 1) * height
    strips = [(y0, min(y0 + height, ny)) for y0 in range(0, ny, height)]
    if step > height:  # evenly spaced strips, away from the frame's edges
        strips = [(y0, y0 + height) for y0 in range((ny % step) // 2, ny - height + 1, step)]
    smooth, ys, xs = _smooth3(sci, usable, sky, sky + snr * noise / 3.0, strips)
    # Peaks whose 13×13 box lies in the frame and in the smoothed rows.
    done = np.zeros(ny + 1, int)
    for y0, y1 in strips:
        done[y0 + 1:y1 + 1] = 1
    done = np.cumsum(done)  # smoothed rows before each row
    lo, hi = ys - half, ys + half + 1
    inside = (lo >= 0) & (hi <= ny) & (xs >= half) & (xs < nx - half)
    inside[inside] &= done[hi[inside]] - done[lo[inside]] == 2 * half + 1
    ys, xs = ys[inside], xs[inside]
    # 3×3 local maxima, then the brightest few of them checked over 13×13: the brightest
    # there, and no unusable pixel.
    level = smooth[ys, xs]
    top = np.ones(ys.size, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                top &= level >= smooth[ys + dy, xs + dx]
    ys, xs, level = ys[top], xs[top], level[top]
    order = np.argsort(level)[::-1][:3 * max_stars]
    ys, xs = ys[order], xs[order]
    if ys.size < 3:
        return float(default)
    (box, ok), _ = cut_stamps((smooth, usable), (-np.inf, False), ys, xs, half)
    keep = (smooth[ys, xs] >= box.reshape(ys.size, -1).max(axis=1)) & ok.all(axis=(1, 2))
    ys, xs = ys[keep][:max_stars], xs[keep][:max_stars]
    if ys.size < 3:
        return float(default)
    (d, v, u), bounds = cut_stamps((sci, var, usable), (sky, 1.0, False), ys, xs, half)
    fit = fit_stamps(d, v, u, default, bounds=bounds, fit_sigma=True)
    x, y = fit.x[:, 0], fit.y[:, 0]
    good = (
        (np.abs(x - half) < 1.5)
        & (np.abs(y - half) < 1.5)
        & (fit.amp[:, 0] > snr * fit.amp_err[:, 0])
        & (fit.sigma > 0.3)
        & (fit.sigma < half / 2.0)
        & np.isfinite(fit.sigma)
    )
    if good.sum() < 3:
        return float(default)
    return float(np.median(fit.sigma[good]))
