"""Reference catalogs for the astrometric fit of frames without a WCS
(:mod:`astep_dask.core.astrometry`) and the pointing of a frame.

A catalog is a FITS table (first table HDU) or a CSV file with a header line, holding
right ascension and declination in degrees and a magnitude; column names are matched
case-insensitively among the usual spellings (``ra``/``ra_icrs``/``raj2000``,
``dec``/``de_icrs``/``dej2000``, ``mag``/``phot_g_mean_mag``/``gmag``/``rmag``...), as in a
Gaia extract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import Angle
from astropy.io import fits
from astropy.table import Table

__all__ = ["Catalog", "pointing", "read_catalog"]

_RA = ("ra", "ra_icrs", "raj2000", "_raj2000", "radeg", "ra_deg", "alpha_j2000")
_DEC = ("dec", "de", "de_icrs", "dej2000", "_dej2000", "decdeg", "dec_deg", "delta_j2000")
_MAG = ("mag", "phot_g_mean_mag", "gmag", "g", "rmag", "r", "vmag", "v", "magnitude")


class Catalog:
    """RA, Dec (deg) and magnitude arrays of a reference catalog."""

    def __init__(self, ra: np.ndarray, dec: np.ndarray, mag: np.ndarray, path: Path):
        self.ra, self.dec, self.mag, self.path = ra, dec, mag, path

    def __len__(self) -> int:
        return int(self.ra.size)


def _column(table: Table, names: tuple[str, ...], what: str, path: Path) -> np.ndarray:
    by_lower = {c.lower(): c for c in table.colnames}
    for n in names:
        if n in by_lower:
            return np.asarray(table[by_lower[n]], float)
    raise ValueError(f"{path}: no {what} column (looked for {', '.join(names[:4])}...)")


def read_catalog(path: str | Path) -> Catalog:
    """Read a reference catalog; rows with a non-finite value are dropped.

    Raises
    ------
    ValueError
        One line naming the file and the reason (missing, unreadable, no RA/Dec/mag
        column, no usable row).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: catalog not found")
    try:
        if path.suffix.lower() in (".csv", ".txt"):
            table = Table.read(path, format="ascii.csv")
        else:
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU | fits.TableHDU)),
                           None)
                if hdu is None:
                    raise ValueError("no table HDU")
                table = Table(hdu.data)
    except (OSError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: cannot read the catalog: {exc}") from None
    ra = _column(table, _RA, "RA", path)
    dec = _column(table, _DEC, "Dec", path)
    mag = _column(table, _MAG, "magnitude", path)
    ok = np.isfinite(ra) & np.isfinite(dec) & np.isfinite(mag) & (np.abs(dec) <= 90)
    if not ok.any():
        raise ValueError(f"{path}: no catalog row with finite RA, Dec and magnitude")
    return Catalog(ra[ok], dec[ok], mag[ok], path)


def _angle(value: object, unit: u.UnitBase) -> float | None:
    """A header angle in degrees (a number in degrees, or sexagesimal text in ``unit``)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(Angle(str(value).strip(), unit=unit).deg)
    except (ValueError, TypeError):
        return None


def pointing(header: fits.Header) -> dict[str, float | None]:
    """The pointing a frame's header gives: ``ra``, ``dec`` (deg), ``scale`` (arcsec/px),
    ``rotation`` (deg); None for what it does not give. RA text is read in hours, Dec
    text in degrees; numbers are degrees."""
    ra = next((v for k in ("RA", "OBJCTRA", "TELRA", "CRVAL1")
               if (v := _angle(header.get(k), u.hourangle)) is not None), None)
    dec = next((v for k in ("DEC", "OBJCTDEC", "TELDEC", "CRVAL2")
                if (v := _angle(header.get(k), u.deg)) is not None), None)
    scale = next((float(header[k]) for k in ("PIXSCALE", "SECPIX", "PIXSCAL1", "SCALE")
                  if isinstance(header.get(k), int | float) and header[k] > 0), None)
    rot = next((float(header[k]) for k in ("ROTANG", "POSANG", "PA", "ROTATION")
                if isinstance(header.get(k), int | float)), None)
    return {"ra": ra, "dec": dec, "scale": scale, "rotation": rot}
