"""Cosmic-ray post-filter: give back to the stars the pixels LA Cosmic took from them.

astroscrappy (LA Cosmic) flags the cores of some well-sampled, bright stars as cosmic rays:
a core a few pixels wide is sharp enough for its fine-structure test. This module keeps
astroscrappy as the detector and checks each connected group of its detections against
point sources: pixel-integrated Gaussians of the frame's PSF width (free amplitudes and
centres, a constant background) are fitted to a stamp around the group, weighted by the
variance plane, without unusable pixels and, iteratively, without pixels far above the
fit (cosmic rays on a star). A second or third source is added when the residuals of the
unclipped pixels still show a significant point source (blends). A flagged pixel that the
fitted stars explain, within ``k`` standard deviations, and to which they contribute
significantly, is unflagged; pixels well above the stars (a cosmic ray on a star) and
groups with no star detectable outside them keep their flag.

Everything is batched over stamps with numpy; the cost is small next to astroscrappy's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import erf

SQRT2 = np.sqrt(2.0)
SQRT2PI = np.sqrt(2.0 * np.pi)
DEFAULT_SIGMA = 1.3  # px, used when a frame has too few stars to measure its PSF
EIGHT = np.ones((3, 3), bool)  # 8-connectivity
EDGE_SLACK = 4.0  # PSF sigmas a star's centre may lie outside the frame
RING_SNR = -np.inf  # groups with less light around them are not fitted (no star there)


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
        """Packed parameters ``bg, amp_1..m, x_1..m, y_1..m, sigma`` (see _unpack)."""
        return np.column_stack([self.bg, self.amp, self.x, self.y, self.sigma])


def _unpack(params: np.ndarray) -> tuple[np.ndarray, ...]:
    """``bg, amp, x, y, sigma`` views of packed parameters (``amp, x, y`` are (n, m))."""
    m = (params.shape[1] - 2) // 3
    return (params[:, 0], params[:, 1:1 + m], params[:, 1 + m:1 + 2 * m],
            params[:, 1 + 2 * m:1 + 3 * m], params[:, -1])


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


def _images(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, size: int) -> np.ndarray:
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
) -> np.ndarray:
    """Weighted Gauss-Newton iterations on packed parameters (see :meth:`StampFit.params`).

    Position steps are limited to one pixel and sigma steps to 30 %; centres are kept in
    ``bounds`` (n, 4: x_lo, x_hi, y_lo, y_hi, stamp coordinates). A stamp stops when its
    centres and width move less than ``tol`` pixels, all after ``n_iter`` iterations.
    """
    n, size, _ = data.shape
    params = params.copy()
    m = (params.shape[1] - 2) // 3
    npar = params.shape[1] if fit_sigma else params.shape[1] - 1
    moving = slice(1 + m, npar)  # centres (and sigma)
    todo = np.arange(n)
    for it in range(n_iter):
        p = params[todo]
        before = p[:, moving].copy()
        bg, amp, x, y, sig = _unpack(p)
        k = todo.size
        px, dpx, dsx = _profile(x, sig, size)
        py, dpy, dsy = _profile(y, sig, size)
        a = amp[:, :, None, None]
        unit = py[:, :, :, None] * px[:, :, None, :]
        cols = [np.ones((k, 1, size, size)), unit,
                a * py[:, :, :, None] * dpx[:, :, None, :],
                a * dpy[:, :, :, None] * px[:, :, None, :]]
        if fit_sigma:
            d_sig = a * (dsy[:, :, :, None] * px[:, :, None, :]
                         + py[:, :, :, None] * dsx[:, :, None, :])
            cols.append(d_sig.sum(axis=1, keepdims=True))
        jac = np.concatenate(cols, axis=1).reshape(k, npar, -1)  # (k, npar, pix)
        resid = (data[todo] - (a * unit).sum(axis=1) - bg[:, None, None]).reshape(k, -1)
        jw = jac * weight[todo].reshape(k, 1, -1)
        normal = np.einsum("nip,njp->nij", jw, jac)
        step = _solve(normal, np.einsum("nip,np->ni", jw, resid))
        step[:, 1 + m:1 + 3 * m] = np.clip(step[:, 1 + m:1 + 3 * m], -1.0, 1.0)
        if fit_sigma:
            step[:, -1] = np.clip(step[:, -1], -0.3 * sig, 0.3 * sig)
        p[:, :npar] += step
        _, _, x, y, sig = _unpack(p)
        np.clip(x, bounds[todo, 0:1], bounds[todo, 1:2], out=x)
        np.clip(y, bounds[todo, 2:3], bounds[todo, 3:4], out=y)
        np.clip(sig, 0.3, size / 2.0, out=sig)
        params[todo] = p
        # Converged: every source either stopped moving or is not significant (then its
        # position does not matter and may wander for ever).
        change = np.abs(p[:, moving] - before)
        moved = np.maximum(change[:, :m], change[:, m:2 * m])
        if fit_sigma:
            moved = np.maximum(moved, change[:, -1:])
        # (flux below twice its error at fixed position, i.e. 1 / its normal-matrix term)
        info = np.einsum("nii->ni", normal)[:, 1:1 + m]
        faint = (p[:, 1:1 + m] ** 2 * info < 4.0) & (it >= 3)
        todo = todo[((moved > tol) & ~faint).any(axis=1)]
        if todo.size == 0:
            break
    return params


def _linear_fluxes(
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
    """Packed one-source start: border median, peak of the 3×3-smoothed stamp (within
    ``focus`` where given)."""
    n, size, _ = data.shape
    border = np.zeros((size, size), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    with np.errstate(all="ignore"):
        bg = np.nanmedian(np.where(good & border, data, np.nan).reshape(n, -1), axis=1)
        low = np.nanmin(np.where(good, data, np.nan).reshape(n, -1), axis=1)
    bg = np.nan_to_num(np.where(np.isnan(bg), low, bg))
    smooth = ndimage.uniform_filter(np.where(good, data, bg[:, None, None]), size=(1, 3, 3),
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
    k: float = 5.0,
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
        Also fit the (common) width.
    k : float
        After each fit, usable pixels more than ``k`` standard deviations above the fit
        (and above half the largest such excess of their stamp) are excluded and the fit
        is repeated, at most ``n_clip`` times: cosmic rays on a star do not pull it.
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
    std_inv = np.sqrt(inv)
    if bounds is None:
        bounds = np.tile([0.0, size - 1.0, 0.0, size - 1.0], (n, 1))
    if start is None:
        sig = np.broadcast_to(np.asarray(sigma, np.float64), (n,)).astype(np.float64)
        start = _first_guess(data, ok, sig, bounds, focus)
    active = ok.copy()
    params = _gauss_newton(data, inv, start, bounds, fit_sigma, n_iter)
    todo = np.ones(n, bool)
    for _ in range(n_clip):
        bg, amp, x, y, s = _unpack(params[todo])
        model = (amp[:, :, None, None] * _images(x, y, s, size)).sum(axis=1)
        excess = np.where(active[todo], (data[todo] - model - bg[:, None, None])
                          * std_inv[todo], 0.0)
        cut = np.maximum(k, 0.5 * excess.reshape(excess.shape[0], -1).max(axis=1))
        drop = active[todo] & (excess > cut[:, None, None])
        changed = drop.any(axis=(1, 2))
        if not changed.any():
            break
        active[todo] &= ~drop
        todo[todo] = changed
        params[todo] = _gauss_newton(data[todo], (inv * active)[todo], params[todo],
                                     bounds[todo], fit_sigma, n_iter)
    bg, amp, x, y, s = _unpack(params)
    unit = _images(x, y, s, size)
    return StampFit(bg=bg.copy(), sigma=s.copy(), amp=amp.copy(), x=x.copy(), y=y.copy(),
                    amp_err=_linear_fluxes(data, inv * active, unit)[1],
                    stars=amp[:, :, None, None] * unit, active=active)


def _stamps(
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


def _sky(sci: np.ndarray, usable: np.ndarray) -> tuple[float, float]:
    """Median and robust sigma of the usable pixels (a subsample on big frames)."""
    values = sci[usable & np.isfinite(sci)]
    if values.size > 1_000_000:
        values = values[:: values.size // 1_000_000]
    if values.size == 0:
        return 0.0, 1.0
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    return med, max(1.482602218505602 * mad, 1e-6)


def psf_sigma(
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    snr: float = 50.0,
    max_stars: int = 300,
    default: float = DEFAULT_SIGMA,
) -> float:
    """Gaussian sigma (px) of the PSF, from bright isolated unsaturated stars.

    Local maxima of the 3×3-smoothed image that stand ``snr`` sky sigmas above the sky,
    the brightest within 6 px and with no unusable pixel in their 13×13 stamp, are fitted
    with a pixel-integrated Gaussian of free width (cosmic rays on them clipped); the
    median width of the good fits is returned, ``default`` when fewer than 3 qualify.

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
    """
    half = 6
    sky, noise = _sky(sci, usable)
    data = np.where(usable & np.isfinite(sci), sci, sky).astype(np.float32)
    smooth = ndimage.uniform_filter(data, 3)
    peaks = (smooth - sky > snr * noise / 3.0)
    peaks[:half], peaks[-half:], peaks[:, :half], peaks[:, -half:] = False, False, False, False
    ys, xs = np.nonzero(peaks)
    if ys.size < 3:
        return float(default)
    # Local maxima over 13×13 with no unusable pixel there, checked on candidates only.
    (box, ok), _ = _stamps((smooth, usable), (-np.inf, False), ys, xs, half)
    keep = (smooth[ys, xs] >= box.reshape(ys.size, -1).max(axis=1)) & ok.all(axis=(1, 2))
    ys, xs = ys[keep], xs[keep]
    if ys.size < 3:
        return float(default)
    order = np.argsort(smooth[ys, xs])[::-1][:max_stars]
    ys, xs = ys[order], xs[order]
    (d, v, u), bounds = _stamps((sci, var, usable), (sky, 1.0, False), ys, xs, half)
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


_measure_psf_sigma = psf_sigma  # reachable where a parameter named psf_sigma shadows it


def _matched_filter(resid: np.ndarray, weight: np.ndarray, sigma: float,
                    bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best position, flux and significance of one more point source in residual stamps.

    Returns ``x, y, flux, snr`` per stamp (position restricted to ``bounds``).
    """
    n, size, _ = resid.shape
    half = max(int(np.ceil(3 * sigma)), 1)
    kern = _images(np.array([[half]], float), np.array([[half]], float),
                   np.array([sigma]), 2 * half + 1)[0, 0]
    num = ndimage.correlate(resid * weight, kern[None], mode="constant")
    den = ndimage.correlate(weight, (kern**2)[None], mode="constant")
    with np.errstate(all="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), -np.inf)
        flux = np.where(den > 0, num / den, 0.0)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((xx[None] >= bounds[:, 0, None, None]) & (xx[None] <= bounds[:, 1, None, None])
              & (yy[None] >= bounds[:, 2, None, None]) & (yy[None] <= bounds[:, 3, None, None]))
    snr = np.where(inside, snr, -np.inf)
    best = np.argmax(snr.reshape(n, -1), axis=1)
    y, x = np.divmod(best, size)
    rows = np.arange(n)
    return (x.astype(float), y.astype(float), flux.reshape(n, -1)[rows, best],
            snr.reshape(n, -1)[rows, best])


def _fit_groups(
    d: np.ndarray, v: np.ndarray, u: np.ndarray, group: np.ndarray, bounds: np.ndarray,
    sigma: float, k: float, snr: float, snr_out: float, max_sources: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit stars to the stamps of some groups; return their star images and residuals.

    Sources are added one at a time while the group still has pixels more than ``k``
    sigmas above the fit and the unclipped residuals show a point source of significance
    above ``snr``. Only sources detected in the pixels outside the group (their fluxes
    refitted there alone, centres fixed, above ``snr_out`` times their errors) count as
    stars, and none does in a stamp where the fit leaves a usable pixel more than ``k``
    sigmas below the data (no cosmic ray explains that: the model is wrong).
    Returns the star image (n, s, s) and the residual in sigmas (n, s, s).
    """
    n = d.shape[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(u, v, np.inf))
        inv = np.where(u & np.isfinite(v) & (v > 0), 1.0 / np.where(u, v, 1.0), 0.0)
    focus = ndimage.binary_dilation(group, EIGHT[None])
    fit = fit_stamps(d, v, u, sigma, bounds=bounds, focus=focus, k=k)
    stars = np.zeros_like(d, dtype=np.float64)
    resid = np.zeros_like(stars)
    todo = np.arange(n)
    for m in range(1, max_sources + 1):
        # A star must show in the pixels outside the group: its flux fitted there alone.
        outside = inv[todo] * fit.active * ~group[todo]
        unit = _images(fit.x, fit.y, fit.sigma, d.shape[1])
        flux_out, err_out = _linear_fluxes(d[todo], outside, unit)
        resid[todo] = (d[todo] - fit.model) / std[todo]
        sound = ~(resid[todo] < -k).any(axis=(1, 2))
        real = (flux_out > snr_out * err_out) & (fit.amp > 0) & sound[:, None]
        stars[todo] = (fit.stars * real[:, :, None, None]).sum(axis=1)
        if m == max_sources:
            break
        # Another source: where the group keeps unexplained pixels and the unclipped
        # residuals show a point source.
        left = (group[todo] & (resid[todo] > k)).any(axis=(1, 2)) & real.any(axis=1)
        if not left.any():
            break
        sub = np.nonzero(left)[0]
        w = (inv[todo] * fit.active)[sub]
        x, y, flux, sig = _matched_filter(d[todo][sub] - fit.model[sub], w, sigma,
                                          bounds[todo][sub])
        more = sig > snr
        if not more.any():
            break
        sub = sub[more]
        p = fit.params()[sub]
        bg, amp, px, py, s = _unpack(p)
        start = np.column_stack([bg, amp, flux[more], px, x[more], py, y[more], s])
        idx = todo[sub]
        new = fit_stamps(d[idx], v[idx], u[idx], sigma, start=start, bounds=bounds[idx], k=k)
        todo, fit = idx, new
    return stars, resid


def _near_light(d: np.ndarray, v: np.ndarray, u: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Significance of the light around each group: the summed excess, over the median of
    the stamp's border, of the usable pixels within 2 px of the group (not in it)."""
    ring = ndimage.binary_dilation(group, EIGHT[None], iterations=2) & ~group & u
    border = np.ones(d.shape[1:], bool)
    border[1:-1, 1:-1] = False
    with np.errstate(all="ignore"):
        level = np.nanmedian(np.where(u & border, d, np.nan).reshape(d.shape[0], -1), axis=1)
        level = np.where(np.isfinite(level), level, -np.inf)  # no border: always fit
        excess = np.where(ring, d - level[:, None, None], 0.0).sum(axis=(1, 2))
        noise = np.sqrt(np.where(ring, v, 0.0).sum(axis=(1, 2)))
        return np.where(noise > 0, excess / noise, 0.0)


def unflag_stars(
    crmask: np.ndarray,
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    psf_sigma: float | None = None,
    k: float = 5.0,
    snr: float = 5.0,
    snr_out: float = 3.0,
    star_sigma: float = 2.0,
    max_sources: int = 3,
    max_half: int = 30,
) -> np.ndarray:
    """Remove from a cosmic-ray mask the pixels that are explained by stars.

    Each 8-connected group of flagged pixels gets a stamp covering it with a margin of
    about 3 PSF sigmas. Pixel-integrated Gaussians of width ``psf_sigma`` (free fluxes and
    centres, centres inside the frame) plus a constant are fitted to it with
    :func:`fit_stamps` (unusable pixels excluded, pixels ``k`` sigmas above the fit
    clipped iteratively); a source is added, up to ``max_sources``, while flagged pixels
    stay unexplained and the unclipped residuals show another point source. A source is
    a star when its flux is significant (``snr_out``) from the pixels outside the group
    alone, and the fit leaves no pixel ``k`` sigmas below the data. A flagged pixel is
    unflagged when the stars contribute more than ``star_sigma`` standard deviations to
    it and it lies less than ``k`` standard deviations above the fit.

    Parameters
    ----------
    crmask : ndarray of bool
        Cosmic-ray pixels from astroscrappy.
    sci, var : ndarray
        The calibrated image (electrons, sky included) and its variance.
    usable : ndarray of bool
        Pixels with valid data (neither bad, saturated nor without data).
    psf_sigma : float, optional
        Gaussian sigma of the PSF in pixels; measured with :func:`psf_sigma` when None.
    k : float
        Residual threshold, in standard deviations (from ``var``).
    snr : float
        Minimum significance of an added source (from the unclipped residuals).
    snr_out : float
        Minimum significance of a star's flux measured outside the group alone.
    star_sigma : float
        Minimum contribution of the stars to a pixel, in its standard deviations, for the
        pixel to be unflagged.
    max_sources : int
        Most point sources fitted to one stamp.
    max_half : int
        Groups needing a stamp larger than ``2·max_half+1`` pixels are left as they are.

    Returns
    -------
    ndarray of bool
        The cleaned cosmic-ray mask (a new array).
    """
    out = np.array(crmask, dtype=bool, copy=True)
    if not out.any():
        return out
    sigma = psf_sigma if psf_sigma is not None else _measure_psf_sigma(sci, var, usable)
    labels, _ = ndimage.label(out, EIGHT)
    boxes = ndimage.find_objects(labels)
    y0 = np.array([b[0].start for b in boxes])
    y1 = np.array([b[0].stop for b in boxes])
    x0 = np.array([b[1].start for b in boxes])
    x1 = np.array([b[1].stop for b in boxes])
    cy, cx = (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    margin = max(int(np.ceil(3.0 * sigma)), 3)
    extent = np.maximum(y1 - y0, x1 - x0)
    halves = np.maximum(extent // 2 + margin, 2 * margin - 1)
    halves = halves + (halves % 2 == 0)  # odd: fewer distinct stamp sizes
    sky = _sky(sci, usable)[0]
    for half in np.unique(halves):
        if half > max_half:
            continue
        idx = np.nonzero(halves == half)[0]
        (d, v, u, lab), bounds = _stamps((sci, var, usable, labels), (sky, 1.0, False, 0),
                                         cy[idx], cx[idx], int(half))
        # Stars centred a little outside the frame still have their core on it.
        slack = EDGE_SLACK * sigma
        bounds = bounds + np.array([-slack, slack, -slack, slack])
        group = lab == (idx + 1)[:, None, None]
        near = _near_light(d, v, u, group) > RING_SNR
        if not near.any():
            continue
        d, v, u, group, bounds = (a[near] for a in (d, v, u, group, bounds))
        idx = idx[near]
        stars, resid = _fit_groups(d, v, u, group, bounds, sigma, k, snr, snr_out,
                                   max_sources)
        with np.errstate(invalid="ignore", divide="ignore"):
            clear = group & (stars / np.sqrt(np.where(u, v, np.inf)) > star_sigma) & (resid < k)
        g, r, c = np.nonzero(clear)
        out[cy[idx][g] + r - half, cx[idx][g] + c - half] = False
    return out
