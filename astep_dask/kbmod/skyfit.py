"""The WCS of the export's grid when the frames carry none: without one the WorkUnit has
no global WCS (``REPRJCTD = F``) and the search's candidates no RA/Dec.

The reference frame's grid is the grid of every KBMOD product. When its header has a
celestial WCS that WCS is used (:func:`~astep_dask.kbmod.products.reference_wcs`); when it
has none and a reference catalog is given (``--catalog``, settings ``[astrometry]``), a
first guess from the pointing (the header's RA/DEC, pixel scale and rotation keywords;
each replaced by its setting when set) is refined on the reference frame's stars
(:func:`astep_dask.core.astrometry.fit_wcs`). The fit's star count and residual rms go
into the WCS cards (``WCSNSTAR``, ``WCSRMS``), hence onto every plane, into the reference
record and ``kbmod.json``.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from astep_dask.config import AstrometrySettings
from astep_dask.core.astrometry import AstrometryError, fit_wcs, guess_wcs
from astep_dask.io.catalog import pointing, read_catalog

__all__ = ["DEFAULT_SCALE", "fitted_wcs"]

DEFAULT_SCALE = 1.3  # arcsec/px: ASTEP 400's camera, when neither header nor settings say


def fitted_wcs(header: fits.Header, stars: np.ndarray, shape: tuple[int, int],
               ast: AstrometrySettings) -> tuple[fits.Header | None, dict]:
    """A WCS header for the reference grid fitted to the catalog, and a summary
    (``status``: fitted or failed, ``reason``, ``n_stars``, ``rms_px``, ``catalog``).

    Raises
    ------
    ValueError
        The catalog cannot be read (one line naming it).
    """
    catalog = read_catalog(ast.catalog)
    info: dict = {"status": "failed", "catalog": str(catalog.path), "n_stars": 0,
                  "rms_px": None, "reason": None}
    p = pointing(header)
    ra = ast.ra if ast.ra >= 0 else p["ra"]
    dec = ast.dec if ast.dec >= -90 else p["dec"]
    if ra is None or dec is None:
        info["reason"] = ("no pointing: the header has no RA/DEC (or OBJCTRA/OBJCTDEC) and "
                          "[astrometry] ra, dec are not set")
        return None, info
    scale = ast.pixel_scale or p["scale"] or DEFAULT_SCALE
    rotation = ast.rotation if ast.rotation or p["rotation"] is None else p["rotation"]
    guess = guess_wcs(ra, dec, scale, rotation, shape, ast.flip)
    try:
        fit = fit_wcs(stars, catalog.ra, catalog.dec, catalog.mag, guess, shape, ast)
    except AstrometryError as exc:
        info["reason"] = str(exc)
        return None, info
    h = fit.wcs.to_header(relax=True)
    h["WCSSRC"] = ("catalog fit", "WCS fitted to a reference catalog (astep-dask)")
    h["WCSCAT"] = (catalog.path.name[:60], "reference catalog")
    h["WCSNSTAR"] = (fit.n_stars, "stars matched in the final fit")
    h["WCSRMS"] = (round(fit.rms, 4), "[px] rms residual of the matched stars")
    info.update(status="fitted", n_stars=fit.n_stars, rms_px=fit.rms,
                first_guess_shift_px=list(fit.shift))
    return h, info
