"""Cosmic-ray post-filter: give back to the stars the pixels LA Cosmic took from them.

astroscrappy (LA Cosmic) flags the cores of some bright, well-sampled stars as cosmic rays:
a core a few pixels wide passes its fine-structure test. This module keeps astroscrappy as
the detector (:mod:`astep_dask.core.cosmics`) and checks each connected group of its
detections against point sources.

Around each group a stamp is cut, and pixel-integrated Gaussians (the PSF width measured on
the frame's stars by :func:`psf_sigma`, refitted per stamp within a narrow range; free
fluxes and centres; a constant background) are fitted by weighted least squares (the
variance plane), without unusable pixels and, iteratively, without pixels far above the
fit (cosmic rays on a star). More sources are added while the residuals outside the flagged
pixels show one (blends). A source counts as a star only when the unflagged pixels around
the group detect it on their own and its peak is well above the noise: a fit given nothing
but a cosmic ray makes a faint, unsupported "star" of it. A flagged pixel is unflagged when
those stars contribute significantly to it and it lies less than ``k`` standard deviations
above the fit; cosmic rays on stars stand out from the fit and keep their flags, and so do
groups with no star, or whose fit leaves pixels far below the data (a model it cannot
trust).

Everything is batched over stamps with numpy; see :func:`unflag_stars`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph
from scipy.special import erf

from astep_dask.core.psf import (
    EDGE_SLACK,
    SQRT2,
    cut_stamps,
    fit_stamps,
    gaussian_images,
    linear_fluxes,
    psf_sigma,
    stamp_stat,
    unpack_params,
)

__all__ = ["EIGHT", "label_sparse", "unflag_stars"]



@dataclass(frozen=True)
class _Rules:
    """The tunables of :func:`unflag_stars` that the fits use (see its parameters)."""

    k: float
    snr: float
    snr_out: float
    min_peak: float
    max_sources: int
    width: tuple[float, float] | None
    model_error: float


_measure_psf_sigma = psf_sigma  # reachable where a parameter named psf_sigma shadows it


def _matched_filter(
    resid: np.ndarray, weight: np.ndarray, sigma: float, bounds: np.ndarray,
    where: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best position, flux and significance of one more point source in residual stamps.

    Returns ``x, y, flux, snr`` per stamp (position restricted to ``bounds`` and to the
    pixels of ``where``).
    """
    n, size, _ = resid.shape
    half = max(int(np.ceil(3 * sigma)), 1)
    kern = gaussian_images(np.array([[half]], float), np.array([[half]], float),
                   np.array([sigma]), 2 * half + 1)[0, 0]
    num = ndimage.correlate(resid * weight, kern[None], mode="constant")
    den = ndimage.correlate(weight, (kern**2)[None], mode="constant")
    with np.errstate(all="ignore"):
        snr = np.where(den > 0, num / np.sqrt(den), -np.inf)
        flux = np.where(den > 0, num / den, 0.0)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((xx[None] >= bounds[:, 0, None, None]) & (xx[None] <= bounds[:, 1, None, None])
              & (yy[None] >= bounds[:, 2, None, None]) & (yy[None] <= bounds[:, 3, None, None]))
    snr = np.where(inside & where, snr, -np.inf)
    best = np.argmax(snr.reshape(n, -1), axis=1)
    y, x = np.divmod(best, size)
    rows = np.arange(n)
    return (x.astype(float), y.astype(float), flux.reshape(n, -1)[rows, best],
            snr.reshape(n, -1)[rows, best])


def _fit_groups(
    d: np.ndarray, v: np.ndarray, u: np.ndarray, group: np.ndarray, flagged: np.ndarray,
    frame: np.ndarray, sigma: float, rules: _Rules,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit stars to the stamps of some groups; return their star images and residuals.

    ``d, v, u`` are the stamps of data, variance and usable pixels, ``group`` the pixels
    of each stamp's group, ``flagged`` all flagged pixels of the stamps, ``frame`` the
    bounds of the stamps' part in the frame (see :func:`cut_stamps`). Stamps whose
    pixels outside the flagged ones show no point source near the group are not fitted.
    Sources are added one at a time while a star leaves pixels of the group more than
    ``k`` sigmas above the fit, or the fit is unsound (below), and the residuals outside
    the flagged pixels show a point source of significance ``snr`` near the group. A
    source counts as a star when its peak stands ``min_peak`` sigmas above the background
    and it is detected in the usable pixels outside the group (its flux refitted there
    alone, centres fixed, above ``snr_out`` times its error) or, centred in the frame and
    ``BRIGHT`` times brighter, the fit keeps most of the group's pixels. None does in a
    stamp where the fit leaves a pixel near the group more than ``k`` sigmas below the data
    (no cosmic ray explains that: the model is wrong). Returns the stars' image (n, s, s)
    and the residual in sigmas (n, s, s), both zero for the stamps not fitted.
    """
    n, size, _ = d.shape
    # Stars centred a little outside the frame still have their core on it.
    slack = EDGE_SLACK * sigma
    bounds = frame + np.array([-slack, slack, -slack, slack])
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.where(u, v, np.inf))
        inv = np.where(u & np.isfinite(v) & (v > 0), 1.0 / np.where(u, v, 1.0), 0.0)
        sky_std = np.sqrt(stamp_stat(np.nanmedian, v, u))
    level = stamp_stat(np.nanmedian, d, u & ~group)
    focus = ndimage.binary_dilation(group, EIGHT[None])
    close = ndimage.binary_dilation(group, EIGHT[None], iterations=2)
    # Added sources are sought near the group: only they matter for its pixels.
    near = ndimage.binary_dilation(group, EIGHT[None], iterations=int(np.ceil(2 * sigma)) + 1)
    stars = np.zeros((n, size, size))
    resid = np.zeros((n, size, size))
    # Cheap screen: no point source next to the group in the unflagged pixels, no star.
    screen = _matched_filter(d - np.nan_to_num(level)[:, None, None], inv * ~flagged, sigma,
                             bounds, close)[3]
    todo = np.nonzero(screen > SCREEN_SNR)[0]
    if todo.size == 0:
        return stars, resid
    opts: dict = {"k": rules.k, "model_error": rules.model_error}
    if rules.width is not None:
        opts.update(fit_sigma=True, sigma_range=(rules.width[0] * sigma, rules.width[1] * sigma))
    fit = fit_stamps(d[todo], v[todo], u[todo], sigma, bounds=bounds[todo], focus=focus[todo],
                     **opts)
    for m in range(1, rules.max_sources + 1):
        # A star must show in the pixels outside the group: its flux fitted there alone.
        outside = inv[todo] * fit.active * ~group[todo]
        unit = gaussian_images(fit.x, fit.y, fit.sigma, size)
        flux_out, err_out = linear_fluxes(d[todo], outside, unit)
        with np.errstate(invalid="ignore"):
            resid[todo] = (d[todo] - fit.model) / np.sqrt(
                std[todo] ** 2 + (rules.model_error * fit.stars.sum(axis=1)) ** 2)
        sound = ~((resid[todo] < -rules.k) & near[todo]).any(axis=(1, 2))
        peak_frac = erf(0.5 / (SQRT2 * fit.sigma)) ** 2  # of a source centred on a pixel
        peak = fit.amp * peak_frac[:, None] / sky_std[todo, None]
        # Or, for a bright star, the group itself: a Gaussian not much sharper than the PSF
        # fits no cosmic ray, whose pixels are clipped, so most of the group kept says star.
        # (Not a star centred off the frame: its tail may pass for anything on the edge.)
        kept = (fit.active & group[todo]).sum(axis=(1, 2)) / group[todo].sum(axis=(1, 2))
        fb = frame[todo]
        on_frame = ((fit.x >= fb[:, 0:1]) & (fit.x <= fb[:, 1:2])
                    & (fit.y >= fb[:, 2:3]) & (fit.y <= fb[:, 3:4]))
        supported = (flux_out > rules.snr_out * err_out) | (
            (peak > BRIGHT * rules.min_peak) & on_frame & (kept >= 0.5)[:, None])
        real = supported & (peak > rules.min_peak) & sound[:, None]
        stars[todo] = (fit.stars * real[:, :, None, None]).sum(axis=1)
        if m == rules.max_sources:
            break
        unexplained = (group[todo] & (resid[todo] > rules.k)).any(axis=(1, 2))
        sub = np.nonzero((unexplained & real.any(axis=1)) | ~sound)[0]
        if sub.size == 0:
            break
        x, y, flux, sig = _matched_filter(d[todo][sub] - fit.model[sub],
                                          (inv * ~flagged)[todo][sub], sigma,
                                          bounds[todo][sub], near[todo][sub])
        more = sig > rules.snr
        if not more.any():
            break
        sub = sub[more]
        bg, amp, px, py, s = unpack_params(fit.params()[sub])
        start = np.column_stack([bg, amp, flux[more], px, x[more], py, y[more], s])
        todo = todo[sub]
        fit = fit_stamps(d[todo], v[todo], u[todo], sigma, start=start, bounds=bounds[todo],
                         **opts)
    return stars, resid


def label_sparse(image: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """8-connected groups of a sparse boolean image: labels and bounding boxes.

    The same labels as ``ndimage.label(image, EIGHT)`` (1, 2, ... in the order of each
    group's first pixel in raster order), found from the set pixels alone: on a frame of
    a few million pixels with a few hundred set, labelling and ``find_objects`` cost more
    than everything else done with the groups.

    Returns
    -------
    labels : ndarray of int32
        0 outside the groups.
    y0, y1, x0, x1 : ndarray of int
        Bounding box of each group (end exclusive), in label order.
    """
    ny, nx = image.shape
    flat = np.flatnonzero(image)
    n = flat.size
    ys, xs = np.divmod(flat, nx)
    heads, tails = [], []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # the other four are their mirrors
        ok = (ys + dy < ny) & (xs + dx >= 0) & (xs + dx < nx)
        target = flat + dy * nx + dx
        pos = np.minimum(np.searchsorted(flat, target), max(n - 1, 0))
        ok &= flat[pos] == target if n else ok
        heads.append(np.nonzero(ok)[0])
        tails.append(pos[ok])
    head, tail = np.concatenate(heads), np.concatenate(tails)
    graph = sparse.coo_matrix((np.ones(head.size, bool), (head, tail)), shape=(n, n))
    _, group = csgraph.connected_components(graph, directed=False)
    # Number the groups by their first pixel (``flat`` is in raster order).
    _, first = np.unique(group, return_index=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    number = rank[group]
    labels = np.zeros(image.shape, np.int32)
    labels.flat[flat] = number + 1
    m = first.size
    y0, x0 = np.full(m, ny), np.full(m, nx)
    y1, x1 = np.zeros(m, int), np.zeros(m, int)
    np.minimum.at(y0, number, ys)
    np.maximum.at(y1, number, ys + 1)
    np.minimum.at(x0, number, xs)
    np.maximum.at(x1, number, xs + 1)
    return labels, (y0, y1, x0, x1)


def unflag_stars(
    crmask: np.ndarray,
    sci: np.ndarray,
    var: np.ndarray,
    usable: np.ndarray,
    psf_sigma: float | None = None,
    k: float = 5.0,
    snr: float = 5.0,
    snr_out: float = 3.0,
    min_peak: float = 10.0,
    star_sigma: float = 2.0,
    max_sources: int = 3,
    width: tuple[float, float] | None = (0.85, 1.5),
    model_error: float = 0.0,
    max_half: int = 30,
) -> np.ndarray:
    """Remove from a cosmic-ray mask the pixels that are explained by stars.

    Each 8-connected group of flagged pixels gets a stamp covering it with a margin of
    about 3 PSF sigmas. Groups with no point source in the unflagged pixels next to them
    are left alone at once. For the others, pixel-integrated Gaussians (width fitted
    within ``width`` × ``psf_sigma``, free fluxes and centres, centres in the frame or
    just outside it) plus a constant are fitted with :func:`fit_stamps`: unusable pixels
    excluded, pixels ``k`` sigmas above the fit clipped iteratively. A source is added, up
    to ``max_sources``, while a star leaves flagged pixels unexplained (or pixels far below
    the fit) and the unflagged residuals show another point source near the group. A
    source is a star when the usable pixels outside the group detect it on their own
    (``snr_out``), its peak stands ``min_peak`` sigmas above the noise, and the fit leaves
    no pixel near the group ``k`` sigmas below the data. A flagged pixel is unflagged when
    the stars contribute more than ``star_sigma`` standard deviations to it and its excess
    over the fit is less than both ``k`` standard deviations and the stars' contribution.

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
        Minimum significance of an added source (matched filter on the residuals of the
        unflagged pixels).
    snr_out : float
        Minimum significance of a star's flux measured outside the group alone.
    min_peak : float
        Minimum height of a star's peak, in sigmas of the stamp's typical pixel: LA
        Cosmic leaves faint stars alone, and faint "stars" are what a fit makes of the
        cosmic rays it is given.
    star_sigma : float
        Minimum contribution of the stars to a pixel, in its standard deviations, for the
        pixel to be unflagged.
    max_sources : int
        Most point sources fitted to one stamp.
    width : tuple of float, optional
        The width of the sources of a stamp is fitted too, between these multiples of
        ``psf_sigma``: the PSF varies across a field and with focus. Fits may not go much
        sharper than the PSF: a narrow Gaussian would pass cosmic rays for stars. Fixed at
        ``psf_sigma`` when None.
    model_error : float
        Fractional error of the fitted stars (the PSF is not exactly Gaussian), added in
        quadrature to each pixel's standard deviation in the residual tests: real stars
        then keep their cores flagged less often, cosmic rays fainter than that fraction
        of a star are unflagged with it.
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
    rules = _Rules(k, snr, snr_out, min_peak, max_sources, width, model_error)
    labels, (y0, y1, x0, x1) = label_sparse(out)
    cy, cx = (y0 + y1 - 1) // 2, (x0 + x1 - 1) // 2
    margin = max(int(np.ceil(3.0 * sigma)), 3)
    extent = np.maximum(y1 - y0, x1 - x0)
    halves = np.maximum(extent // 2 + margin, margin + 2)
    halves = halves + (halves % 2 == 0)  # odd: fewer distinct stamp sizes
    for half in np.unique(halves):
        if half > max_half:
            continue
        idx = np.nonzero(halves == half)[0]
        (d, v, u, lab), frame = cut_stamps((sci, var, usable, labels), (0.0, 1.0, False, 0),
                                        cy[idx], cx[idx], int(half))
        group = lab == (idx + 1)[:, None, None]
        stars, resid = _fit_groups(d, v, u, group, lab > 0, frame, sigma, rules)
        with np.errstate(invalid="ignore", divide="ignore"):
            star = stars / np.sqrt(np.where(u, v, np.inf))  # in sigmas, like resid
        # Explained by the stars: they contribute significantly, and the excess over the
        # fit is below k sigmas and below their own contribution.
        clear = group & (star > star_sigma) & (resid < np.minimum(k, star))
        g, r, c = np.nonzero(clear)
        out[cy[idx][g] + r - half, cx[idx][g] + c - half] = False
    return out


EIGHT = np.ones((3, 3), bool)  # 8-connectivity
BRIGHT = 5.0  # stars this many times min_peak need no support from outside their group
SCREEN_SNR = 2.0  # groups with no point source this significant just outside them: no fit
