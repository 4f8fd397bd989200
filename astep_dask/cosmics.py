"""Cosmic-ray post-filter: give back to the stars the pixels LA Cosmic took from them.

astroscrappy (LA Cosmic) flags the cores of some well-sampled, bright stars as cosmic rays:
a core a few pixels wide is sharp enough for its fine-structure test. This module keeps
astroscrappy as the detector and checks each connected group of its detections against a
point source: a pixel-integrated Gaussian of the frame's PSF width (free amplitude,
centre and constant background) is fitted to a stamp around the group, with the variance
plane as weights, excluding unusable pixels and, iteratively, pixels far above the fit
(cosmic rays on the star). A flagged pixel that the fitted star explains, within ``k``
standard deviations, and to which the star contributes significantly, is unflagged;
pixels well above the star (a cosmic ray on a star) and groups with no significant star
under them keep their flag.

Everything is batched over stamps with numpy: the cost is a few percent of
astroscrappy's.
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


@dataclass
class StampFit:
    """Result of fitting ``amp * PSF(x, y, sigma) + bg`` to a batch of stamps.

    All attributes are arrays over the stamps; ``star`` is the fitted source (without
    background) on the stamp grid and ``active`` the pixels the final fit used.
    """

    amp: np.ndarray
    bg: np.ndarray
    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray
    amp_err: np.ndarray
    chi2: np.ndarray  # reduced chi-square over the active pixels
    star: np.ndarray
    active: np.ndarray


def _profile(
    centre: np.ndarray, sigma: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D pixel-integrated unit Gaussian on pixels ``0..size-1`` and its derivatives.

    Returns ``(p, dp/dcentre, dp/dsigma)``, each of shape ``(n, size)``.
    """
    c = centre[:, None]
    s = sigma[:, None]
    lo = np.arange(size, dtype=np.float64)[None, :] - 0.5 - c
    hi = lo + 1.0
    p = 0.5 * (erf(hi / (SQRT2 * s)) - erf(lo / (SQRT2 * s)))
    g_hi = np.exp(-0.5 * (hi / s) ** 2) / (SQRT2PI * s)
    g_lo = np.exp(-0.5 * (lo / s) ** 2) / (SQRT2PI * s)
    dp_dc = g_lo - g_hi
    dp_ds = (lo * g_lo - hi * g_hi) / s
    return p, dp_dc, dp_ds


def _gauss_newton(
    data: np.ndarray, weight: np.ndarray, params: np.ndarray, fit_sigma: bool, n_iter: int
) -> np.ndarray:
    """Weighted Gauss-Newton steps for ``amp, bg, x, y[, sigma]`` of each stamp.

    ``params`` has columns ``amp, bg, x, y, sigma``; steps in position are limited to one
    pixel, in sigma to 30 %, and the position is kept inside the stamp.
    """
    n, size, _ = data.shape
    params = params.copy()
    npar = 5 if fit_sigma else 4
    ridge = 1e-9 * np.eye(npar)
    for _ in range(n_iter):
        amp, bg, x, y, sig = params.T
        px, dpx, dsx = _profile(x, sig, size)
        py, dpy, dsy = _profile(y, sig, size)
        shape = py[:, :, None] * px[:, None, :]
        cols = [
            shape,
            np.ones_like(shape),
            amp[:, None, None] * py[:, :, None] * dpx[:, None, :],
            amp[:, None, None] * dpy[:, :, None] * px[:, None, :],
        ]
        if fit_sigma:
            cols.append(
                amp[:, None, None] * (dsy[:, :, None] * px[:, None, :]
                                      + py[:, :, None] * dsx[:, None, :])
            )
        jac = np.stack([c.reshape(n, -1) for c in cols], axis=2)  # (n, pix, npar)
        resid = (data - amp[:, None, None] * shape - bg[:, None, None]).reshape(n, -1)
        w = weight.reshape(n, -1)
        jw = jac * w[:, :, None]
        normal = np.einsum("npi,npj->nij", jw, jac)
        scale = np.sqrt(np.maximum(np.einsum("nii->ni", normal), 1e-300))
        normal = normal / scale[:, :, None] / scale[:, None, :] + ridge
        rhs = np.einsum("npi,np->ni", jw, resid) / scale
        try:
            step = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0] / scale
        except np.linalg.LinAlgError:
            step = np.stack([np.linalg.lstsq(a, b, rcond=None)[0]
                             for a, b in zip(normal, rhs, strict=True)]) / scale
        step = np.where(np.isfinite(step), step, 0.0)
        step[:, 2:4] = np.clip(step[:, 2:4], -1.0, 1.0)
        if fit_sigma:
            step[:, 4] = np.clip(step[:, 4], -0.3 * sig, 0.3 * sig)
        params[:, :npar] += step
        params[:, 2:4] = np.clip(params[:, 2:4], 0.0, size - 1.0)
        params[:, 4] = np.clip(params[:, 4], 0.3, size / 2.0)
    return params


def _initial_params(data: np.ndarray, weight: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Starting ``amp, bg, x, y, sigma``: border median, peak of the 3×3-smoothed stamp."""
    n, size, _ = data.shape
    good = weight > 0
    border = np.zeros((size, size), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    edge = np.where(good & border, data, np.nan)
    with np.errstate(all="ignore"):
        bg = np.nanmedian(edge.reshape(n, -1), axis=1)
    if np.isnan(bg).any():
        fallback = np.nanmin(np.where(good, data, np.nan).reshape(n, -1), axis=1)
        bg = np.where(np.isnan(bg), fallback, bg)
    bg = np.nan_to_num(bg)
    smooth = ndimage.uniform_filter(np.where(good, data, bg[:, None, None]), size=(1, 3, 3),
                                    mode="nearest")
    peak = np.argmax(smooth.reshape(n, -1), axis=1)
    y, x = np.divmod(peak, size)
    p0 = 1.0 / (2.0 * np.pi * sigma**2)  # approximate peak fraction of a unit source
    amp = np.maximum(smooth.reshape(n, -1)[np.arange(n), peak] - bg, 0.0) / np.minimum(p0, 1)
    return np.column_stack([amp, bg, x.astype(float), y.astype(float), sigma])


def fit_stamps(
    data: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    sigma: float | np.ndarray,
    fit_sigma: bool = False,
    k: float = 5.0,
    n_clip: int = 6,
    n_iter: int = 4,
) -> StampFit:
    """Fit one pixel-integrated Gaussian plus a constant to each stamp, clipping outliers.

    Parameters
    ----------
    data, var, usable : ndarray, shape (n, s, s)
        Stamps of the science image, of its variance and of the usable-pixel mask.
    sigma : float or ndarray
        Gaussian width (px), fixed unless ``fit_sigma``, then the starting value.
    fit_sigma : bool
        Also fit the width.
    k : float
        After each fit, usable pixels more than ``k`` standard deviations above the fit
        (and above half the largest such excess of their stamp) are excluded and the fit
        is repeated, at most ``n_clip`` times: cosmic rays on a star do not pull the fit.
    n_clip, n_iter : int
        Clipping rounds; Gauss-Newton iterations per round.

    Returns
    -------
    StampFit
    """
    n, size, _ = data.shape
    data = np.where(usable, data, 0.0).astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = usable & np.isfinite(data) & np.isfinite(var) & (var > 0)
    inv = np.where(ok, 1.0 / np.where(ok, var, 1.0), 0.0)
    sig = np.broadcast_to(np.asarray(sigma, np.float64), (n,)).copy()
    active = ok.copy()
    params = _initial_params(data, inv * active, sig)
    params = _gauss_newton(data, inv * active, params, fit_sigma, n_iter + 2)
    for _ in range(n_clip):
        amp, bg, x, y, s = params.T
        model = amp[:, None, None] * _outer(x, y, s, size) + bg[:, None, None]
        excess = np.where(active, (data - model) * np.sqrt(inv), 0.0)
        worst = excess.reshape(n, -1).max(axis=1)
        cut = np.maximum(k, 0.5 * worst)
        drop = active & (excess > cut[:, None, None])
        if not drop.any():
            break
        changed = drop.any(axis=(1, 2))
        active &= ~drop
        params[changed] = _gauss_newton(data[changed], (inv * active)[changed],
                                        params[changed], fit_sigma, n_iter)
    amp, bg, x, y, s = params.T
    shape = _outer(x, y, s, size)
    w = inv * active
    # Amplitude error from the linear (amp, bg) part of the normal matrix.
    saa = np.einsum("nij,nij->n", w, shape * shape)
    sab = np.einsum("nij,nij->n", w, shape)
    sbb = w.sum(axis=(1, 2))
    det = saa * sbb - sab**2
    with np.errstate(all="ignore"):
        amp_err = np.where(det > 0, np.sqrt(sbb / det), np.inf)
        resid = (data - amp[:, None, None] * shape - bg[:, None, None]) ** 2 * w
        dof = np.maximum(active.sum(axis=(1, 2)) - (5 if fit_sigma else 4), 1)
        chi2 = resid.sum(axis=(1, 2)) / dof
    return StampFit(amp=amp, bg=bg, x=x, y=y, sigma=s, amp_err=amp_err, chi2=chi2,
                    star=amp[:, None, None] * shape, active=active)


def _outer(x: np.ndarray, y: np.ndarray, sigma: np.ndarray, size: int) -> np.ndarray:
    """Unit pixel-integrated Gaussians at ``(x, y)`` on ``size``² stamps."""
    px = _profile(x, sigma, size)[0]
    py = _profile(y, sigma, size)[0]
    return py[:, :, None] * px[:, None, :]


def _stamps(
    arrays: tuple[np.ndarray, ...], fill: tuple, ys: np.ndarray, xs: np.ndarray, half: int
) -> list[np.ndarray]:
    """Cut ``(2·half+1)``² stamps centred on ``(ys, xs)``; outside the frame gets ``fill``."""
    ny, nx = arrays[0].shape
    off = np.arange(-half, half + 1)
    rows = ys[:, None] + off[None, :]
    cols = xs[:, None] + off[None, :]
    inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
    r = np.clip(rows, 0, ny - 1)[:, :, None]
    c = np.clip(cols, 0, nx - 1)[:, None, :]
    return [np.where(inside, a[r, c], f) for a, f in zip(arrays, fill, strict=True)]


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
    with no brighter peak nearby and no unusable pixel in their stamp, are fitted with a
    pixel-integrated Gaussian of free width (cosmic rays on them clipped); the median
    width of the good fits is returned, ``default`` when fewer than 3 stars qualify.

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
    peaks = (smooth == ndimage.maximum_filter(smooth, 2 * half + 1)) & (
        smooth - sky > snr * noise / 3.0
    )
    # Unsaturated and clean: no unusable pixel in the stamp.
    bad_near = ndimage.maximum_filter(~usable, 2 * half + 1)
    peaks &= ~bad_near
    peaks[:half], peaks[-half:], peaks[:, :half], peaks[:, -half:] = False, False, False, False
    ys, xs = np.nonzero(peaks)
    if ys.size < 3:
        return float(default)
    order = np.argsort(smooth[ys, xs])[::-1][:max_stars]
    ys, xs = ys[order], xs[order]
    d, v, u = _stamps((sci, var, usable), (sky, 1.0, False), ys, xs, half)
    fit = fit_stamps(d, v, u, default, fit_sigma=True, n_iter=8)
    central = (np.abs(fit.x - half) < 1.5) & (np.abs(fit.y - half) < 1.5)
    good = (
        central
        & (fit.amp > snr * fit.amp_err)
        & (fit.sigma > 0.3)
        & (fit.sigma < half / 2.0)
        & np.isfinite(fit.sigma)
    )
    if good.sum() < 3:
        return float(default)
    return float(np.median(fit.sigma[good]))


_measure_psf_sigma = psf_sigma  # reachable where a parameter named psf_sigma shadows it


def unflag_stars(
    crmask: np.ndarray,
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    psf_sigma: float | None = None,
    k: float = 5.0,
    snr: float = 5.0,
    star_sigma: float = 2.0,
    max_half: int = 30,
) -> np.ndarray:
    """Remove from a cosmic-ray mask the pixels that are explained by a star.

    Each 8-connected group of flagged pixels gets a stamp covering it and a margin of
    about 3 PSF sigmas, to which a pixel-integrated Gaussian of width ``psf_sigma`` (free
    amplitude, centre and background) is fitted with :func:`fit_stamps` (unusable pixels
    excluded, pixels ``k`` sigmas above the fit clipped iteratively). A flagged pixel is
    unflagged when the fitted star is significant (amplitude above ``snr`` times its
    error), contributes more than ``star_sigma`` standard deviations to that pixel, and
    the data there lie less than ``k`` standard deviations above the fit.

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
        Minimum significance of the fitted star's amplitude.
    star_sigma : float
        Minimum contribution of the star to a pixel, in its standard deviations, for the
        pixel to be unflagged.
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
    halves = np.maximum((extent + 1) // 2 + margin, 2 * margin - 1)
    halves = np.where(halves % 2, halves, halves + 1)  # fewer distinct stamp sizes
    sky = _sky(sci, usable)[0]
    for half in np.unique(halves):
        if half > max_half:
            continue
        idx = np.nonzero(halves == half)[0]
        d, v, u, lab = _stamps((sci, var, usable, labels), (sky, 1.0, False, 0),
                               cy[idx], cx[idx], int(half))
        fit = fit_stamps(d, v, u, sigma, k=k)
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.where(u, v, np.inf))
            resid = (d - fit.star - fit.bg[:, None, None]) / std
            starry = np.isfinite(fit.amp_err) & (fit.amp > snr * fit.amp_err)
            keep_star = (
                starry[:, None, None]
                & (fit.star / std > star_sigma)
                & (resid < k)
                & (lab == (idx + 1)[:, None, None])
            )
        if not keep_star.any():
            continue
        g, r, c = np.nonzero(keep_star)
        off = int(half)
        out[cy[idx][g] + r - off, cx[idx][g] + c - off] = False
    return out
