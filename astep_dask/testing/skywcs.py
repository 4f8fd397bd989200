"""The sky of a simulated night: its true WCS and a reference catalog, so that the WCS
fitted to frames without one can be checked against the truth.

The simulator (:mod:`astep_dask.testing.simulate`) places stars on a sky grid in pixels
and writes raw frames without a WCS. :func:`write_sky` gives that grid a celestial TAN
WCS (:func:`true_wcs`) and writes, beside the truth, ``catalog.csv`` (RA, Dec in
degrees, magnitude of every simulated star, as a Gaia extract would give them) and
``wcs.fits`` (the WCS as header cards). A frame's true WCS is the grid's moved by the
frame's offset (:func:`frame_true_wcs`): the export's registered grid is the reference
frame's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from astep_dask.io.fitsio import atomic_path, atomic_write
from astep_dask.testing.simulate import TRUTH_FOLDER, load_truth

__all__ = ["SKY", "frame_true_wcs", "true_wcs", "write_sky"]

# The simulated field: centre (deg), pixel scale (arcsec/px, about ASTEP's), position
# angle of +y (deg, north through east), east to the left.
SKY = {"ra": 215.25, "dec": -62.4, "scale": 1.3, "rotation": 25.0}
ZERO_POINT = 25.0  # mag of 1 e- per exposure


def true_wcs(size: int, ra: float = SKY["ra"], dec: float = SKY["dec"],
             scale: float = SKY["scale"], rotation: float = SKY["rotation"]) -> WCS:
    """The TAN WCS of the simulated sky grid (``size``², tangent point at its centre)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    s, t = scale / 3600.0, np.radians(rotation)
    w.wcs.cd = s * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (size, size)
    return w


def frame_true_wcs(night_dir: str | Path, stem: str) -> WCS:
    """The true WCS of one frame's own pixel grid (the sky grid moved by its offset)."""
    truth = load_truth(night_dir)
    frames = {fr["file"].removesuffix(".fits"): fr for fr in truth.frames}
    w = true_wcs(truth.config.size)
    w.wcs.crpix = w.wcs.crpix + np.asarray(frames[stem]["offset"], float)
    return w


def write_sky(night_dir: str | Path, fmt: str = "csv") -> Path:
    """Write the night's reference catalog (``truth/catalog.csv`` or ``.fits``: RA, DEC,
    MAG of every star) and its true WCS (``truth/wcs.fits``); returns the catalog."""
    night_dir = Path(night_dir)
    truth = load_truth(night_dir)
    w = true_wcs(truth.config.size)
    ra, dec = w.all_pix2world(truth.stars[:, 0], truth.stars[:, 1], 0)
    mag = ZERO_POINT - 2.5 * np.log10(truth.stars[:, 2])
    table = Table({"RA": ra, "DEC": dec, "MAG": mag})
    folder = night_dir / TRUTH_FOLDER
    atomic_write(fits.HDUList([fits.PrimaryHDU(header=w.to_header())]), folder / "wcs.fits")
    path = folder / f"catalog.{fmt}"
    with atomic_path(path) as tmp:
        table.write(tmp, format="ascii.csv" if fmt == "csv" else "fits", overwrite=True)
    return path
