"""A celestial WCS for a frame that has none, without which the KBMOD export has no sky
coordinates (its WorkUnit no global WCS, the search's candidates no RA/Dec): a first guess
from the pointing, refined by matching the frame's stars to a reference catalog.

1. :func:`guess_wcs`: a gnomonic (TAN) WCS centred on the frame, from the field's RA/Dec,
   the pixel scale and the orientation (position angle of the frame's +y axis, north
   through east; east to the left unless flipped);
2. :func:`fit_wcs`: the catalog projected through the guess; the translation between it
   and the frame's stars voted over all pairs of the brightest of each
   (:func:`~astep_dask.core.register.vote_offset`, so a pointing error of tens of pixels is
   found); then, three times, nearest-neighbour matching within a shrinking radius and a
   least-squares TAN fit of the matched pairs (``astropy.wcs.utils.fit_wcs_from_points``),
   outliers beyond 3× the robust residual rejected. The result carries the number of
   stars used and the rms of their residuals in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points
from scipy.spatial import cKDTree

from astep_dask.config import AstrometrySettings, MatchSettings
from astep_dask.core.register import STAR_DTYPE, vote_offset

__all__ = ["AstrometryError", "WcsFit", "fit_wcs", "guess_wcs"]


class AstrometryError(ValueError):
    """The catalog and the frame's stars cannot be matched."""


@dataclass(frozen=True)
class WcsFit:
    """A fitted WCS and how well it maps the matched stars."""

    wcs: WCS
    n_stars: int  # matched stars used in the final fit
    rms: float  # px, rms of their residuals (frame position − catalog through the WCS)
    shift: tuple[float, float]  # px, translation of the first guess the vote found


def guess_wcs(ra: float, dec: float, scale_arcsec: float, rotation: float,
              shape: tuple[int, int], flip: bool = False) -> WCS:
    """A TAN WCS with its reference pixel at the frame's centre (0-based ``(nx-1)/2``).

    ``rotation`` (deg) is the position angle of the +y axis, north through east; with
    ``flip`` False east is to the left of north (x grows westwards at rotation 0), as on
    the sky seen through a telescope without a mirror.
    """
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra) % 360.0, float(dec)]
    ny, nx = shape
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]  # FITS 1-based
    s = scale_arcsec / 3600.0
    t = np.radians(rotation)
    parity = 1.0 if flip else -1.0
    # CD columns: the sky directions (east, north) of +x and +y; +y points to PA rotation
    w.wcs.cd = s * np.array([[parity * np.cos(t), np.sin(t)],
                             [-parity * np.sin(t), np.cos(t)]])
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (nx, ny)
    return w


def _project(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Catalog positions through a WCS: (n, 2) 0-based pixel coordinates."""
    x, y = wcs.all_world2pix(ra, dec, 0)
    return np.column_stack([x, y])


def _as_stars(xy: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Positions as a star list for the vote (``snr`` orders them, brightest first)."""
    out = np.zeros(len(xy), STAR_DTYPE)
    out["x"], out["y"], out["snr"] = xy[:, 0], xy[:, 1], rank
    return out


def _match(tree: cKDTree, pred: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One frame star per catalog star within ``radius`` px of its predicted position,
    the closest claim winning: (catalog indices, frame indices)."""
    dist, j = tree.query(pred, distance_upper_bound=radius)
    order = np.argsort(dist)
    taken: set[int] = set()
    ci, fi = [], []
    for i in order:
        if not np.isfinite(dist[i]):
            break
        if int(j[i]) not in taken:
            taken.add(int(j[i]))
            ci.append(int(i))
            fi.append(int(j[i]))
    return np.array(ci, int), np.array(fi, int)


def fit_wcs(stars: np.ndarray, ra: np.ndarray, dec: np.ndarray, mag: np.ndarray,
            guess: WCS, shape: tuple[int, int], settings: AstrometrySettings) -> WcsFit:
    """Refine ``guess`` on the frame's stars (``x``, ``y``, ``snr``; 0-based pixels) with a
    reference catalog (RA, Dec in degrees, magnitudes).

    Raises
    ------
    AstrometryError
        When fewer than ``settings.min_stars`` stars match.
    """
    ny, nx = shape
    margin = settings.search_radius
    xy = _project(guess, ra, dec)
    inside = ((xy[:, 0] > -margin) & (xy[:, 0] < nx - 1 + margin) & (xy[:, 1] > -margin)
              & (xy[:, 1] < ny - 1 + margin) & np.isfinite(xy).all(axis=1))
    cat = np.nonzero(inside)[0]
    cat = cat[np.argsort(mag[cat])][: settings.max_stars]
    frame = stars[np.argsort(stars["snr"])[::-1][: settings.max_stars]]
    if cat.size < settings.min_stars or frame.size < settings.min_stars:
        raise AstrometryError(f"{cat.size} catalog stars in the field and {frame.size} "
                              f"frame stars; at least {settings.min_stars} needed")
    vote = MatchSettings(max_shift=margin * np.sqrt(2.0), n_bright=min(60, cat.size))
    dx, dy, _ = vote_offset(_as_stars(xy[cat], -mag[cat]), frame, vote)
    wcs = guess.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix - np.array([dx, dy])
    tree = cKDTree(np.column_stack([frame["x"], frame["y"]]))
    world = SkyCoord(ra[cat] * u.deg, dec[cat] * u.deg, frame="icrs")
    fxy = np.column_stack([frame["x"], frame["y"]])
    resid = np.zeros(0)
    for radius in (3.0, 2.0 * settings.match_radius, settings.match_radius):
        ci, fi = _match(tree, _project(wcs, ra[cat], dec[cat]), radius)
        if ci.size < settings.min_stars:
            raise AstrometryError(f"only {ci.size} stars match the catalog within "
                                  f"{radius:g} px; at least {settings.min_stars} needed")
        keep = np.ones(ci.size, bool)
        for _ in range(3):
            wcs = _fit(fxy[fi[keep]], world[ci[keep]], wcs)
            resid = np.hypot(*(fxy[fi] - _project(wcs, ra[cat][ci], dec[cat][ci])).T)
            cut = max(3.0 * 1.4826 * float(np.median(resid)), 0.05)
            new = resid <= cut
            if new.sum() < settings.min_stars or np.array_equal(new, keep):
                break
            keep = new
        resid = resid[keep]
    wcs.pixel_shape = (nx, ny)
    return WcsFit(wcs=wcs, n_stars=int(resid.size), rms=float(np.sqrt(np.mean(resid**2))),
                  shift=(float(dx), float(dy)))


def _fit(xy: np.ndarray, world: SkyCoord, start: WCS) -> WCS:
    """TAN WCS fitted to matched pairs, its tangent point kept at the start's."""
    centre = SkyCoord(start.wcs.crval[0] * u.deg, start.wcs.crval[1] * u.deg, frame="icrs")
    w = fit_wcs_from_points((xy[:, 0], xy[:, 1]), world, proj_point=centre,
                            projection="TAN")
    w.wcs.radesys = "ICRS"
    return w
