"""The one reader of a frame's time, and what a calibrated frame says about its moment.

:func:`frame_start` reads the start of an exposure from ``DATE-OBS`` (an ISO date, with a
UTC offset such as ``+02:00`` or ``Z`` converted to UTC; a date alone completed by
``TIME-OBS`` or ``UT``), ``MJD-OBS`` and ``TIMESYS`` (the scale of both, UTC when absent).
The inventory (:mod:`astep_dask.io.layout`), the product writer
(:func:`astep_dask.io.fitsio.mid_exposure`), the manifest and the readers of calibrated
frames all take a frame's time from it, so they cannot disagree. A header whose time is
there but unusable has a ``problem``: an unreadable value, an unknown ``TIMESYS``, a date
outside 1990-2100, or ``DATE-OBS`` and ``MJD-OBS`` more than a second apart (a conflict:
both values are in the reason; ``follow`` may choose one of them instead).

:func:`exposure_cards` gives the cards every calibrated frame carries about its
mid-exposure: ``MJD-MID`` (UTC), and with a pointing (the WCS centre, else ``RA``/``DEC``
or ``OBJCTRA``/``OBJCTDEC``) and a site (header keywords, else the ``[site]`` setting)
``BJD_TDB``, ``CENTALT`` and ``AIRMASS``. A frame without a pointing gets none of the three
and a note.

Offline by design: importing this module sets astropy's
``astropy.utils.iers.conf.auto_download`` to False, so that no computation here (nor any
other in the process) tries to download Earth-orientation tables; the tables bundled with
astropy are used, and UT1 - UTC is taken as 0 beyond them (an altitude error below 0.005°;
the barycentric correction does not depend on it at the millisecond level).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.utils import iers
from erfa import ErfaWarning

if TYPE_CHECKING:
    from astropy.coordinates import EarthLocation

__all__ = [
    "FOLLOW",
    "MAX_DISAGREEMENT",
    "YEARS",
    "FrameStart",
    "Pointing",
    "Site",
    "exposure_cards",
    "frame_pointing",
    "frame_site",
    "frame_start",
    "parse_date_obs",
    "product_follow",
]

# No download, ever: see the module docstring. Set once, for the whole process (a
# temporary setting would not be thread-safe: workers calibrate frames in threads).
iers.conf.auto_download = False

YEARS = (1990, 2100)  # plausible years of a frame's start (inclusive)
MAX_DISAGREEMENT = 1.0  # s: DATE-OBS and MJD-OBS further apart are a conflict
FOLLOW = ("none", "DATE-OBS", "MJD-OBS")  # what a conflict resolves to

# TIMESYS values (FITS standard, section 9.2.1, and its deprecated synonyms) and the
# astropy scale each names.
_SCALES = {"UTC": "utc", "UT": "utc", "GMT": "utc", "Z": "utc", "TAI": "tai",
           "IAT": "tai", "TT": "tt", "TDT": "tt", "ET": "tt", "TDB": "tdb", "TCG": "tcg",
           "TCB": "tcb"}

_DATE = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[T ](?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d*)?)?))?"
    r"(?P<zone>Z|[+-]\d{2}(?::?\d{2})?)?$")
_TIME = re.compile(r"^\d{2}:\d{2}(?::\d{2}(?:\.\d*)?)?$")

# The same years as MJDs: 1990-01-01 and 2101-01-01 (checked before any time is made:
# astropy warns of "dubious years" far from today).
_MJD_RANGE = (47892.0, 88434.0)


@dataclass(frozen=True)
class FrameStart:
    """A frame's start of exposure as its header gives it (:func:`frame_start`).

    ``time`` is None when the header gives no usable time; ``problem`` then says why
    when a time is there but cannot be used ("" when there is none at all, or when it is
    fine). ``scale`` is the header's ``TIMESYS`` as FITS names it (``UTC`` when none);
    ``source`` the keyword(s) the time comes from; ``note`` what was resolved on the way
    (a conflict followed by a setting).
    """

    time: Time | None
    scale: str = "UTC"
    source: str = ""
    problem: str = ""
    note: str = ""

    @property
    def mjd(self) -> float:
        """Start of exposure as an MJD in UTC; NaN without a time."""
        if self.time is None:
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ErfaWarning)
            return float(self.time.utc.mjd)

    def mid(self, exptime: float) -> Time:
        """Mid-exposure (``exptime`` in seconds; NaN counts as 0).

        Raises
        ------
        ValueError
            When there is no usable start time (the reason, or "no DATE-OBS or
            MJD-OBS").
        """
        if self.time is None:
            raise ValueError(self.problem or "no DATE-OBS or MJD-OBS: the frame has no time")
        half = exptime / 2.0 if exptime == exptime else 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ErfaWarning)  # years far from today
            return self.time + TimeDelta(half, format="sec")


def _implausible(what: str) -> str:
    return f"{what} is outside the plausible years {YEARS[0]}-{YEARS[1]}"


def parse_date_obs(text: str, scale: str = "utc", time_of_day: str = "") -> Time:
    """A ``DATE-OBS`` value as a time: ISO ``YYYY-MM-DD[Thh:mm[:ss[.s]]]`` with an
    optional UTC offset (``Z``, ``+hh:mm``, ``-hhmm``, ``+hh``) that is applied (the result
    is in UTC). A date alone is completed by ``time_of_day`` (``TIME-OBS``, ``UT``).

    Parameters
    ----------
    text
        The header value.
    scale
        The astropy scale of the value (from ``TIMESYS``).
    time_of_day
        ``hh:mm[:ss[.s]]`` for a value that holds a date only ("": midnight).

    Raises
    ------
    ValueError
        When the value is no such date, or has an offset while its scale is not UTC.
    """
    m = _DATE.match(text.strip())
    if m is None:
        raise ValueError("not an ISO date (YYYY-MM-DDThh:mm:ss)")
    if not YEARS[0] <= int(m.group("date")[:4]) <= YEARS[1]:
        raise ValueError(_implausible("the year"))
    clock = m.group("time")
    if clock is None and time_of_day:
        if not _TIME.match(time_of_day.strip()):
            raise ValueError(f"time of day {time_of_day!r} is not hh:mm:ss")
        clock = time_of_day.strip()
    iso = f"{m.group('date')}T{clock or '00:00:00'}"
    if clock is not None and clock.count(":") == 1:
        iso += ":00"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)  # "dubious year": leap seconds unknown
        t = Time(iso, format="isot", scale=scale)
    zone = m.group("zone")
    if zone and zone != "Z":
        if scale != "utc":
            raise ValueError(f"a UTC offset ({zone}) in a time of scale {scale.upper()}")
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        if hours > 14 or minutes > 59:
            raise ValueError(f"UTC offset {zone} out of range")
        sign = 1 if zone[0] == "+" else -1
        t = t - TimeDelta(sign * (hours * 3600 + minutes * 60), format="sec")
    elif zone == "Z" and scale != "utc":
        raise ValueError(f"a UTC date (Z) in a time of scale {scale.upper()}")
    return t


def _mjd_obs(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("not a number")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("not a number") from None
    if not math.isfinite(out):
        raise ValueError("not a finite number")
    if not _MJD_RANGE[0] <= out < _MJD_RANGE[1]:
        raise ValueError(_implausible(f"MJD {out:g}"))
    return out


def _span(seconds: float) -> str:
    s = abs(seconds)
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    if s < 172800:
        return f"{s / 3600:.3g} h"
    return f"{s / 86400:.4g} d"


def frame_start(header: fits.Header, follow: str = "none") -> FrameStart:
    """The start of a frame's exposure, from ``DATE-OBS``, ``MJD-OBS`` and ``TIMESYS``.

    Parameters
    ----------
    header
        A raw frame's (merged) header, or a calibrated frame's primary header.
    follow
        What a conflict (both keywords readable, more than :data:`MAX_DISAGREEMENT`
        apart) or one unreadable keyword resolves to: ``"none"`` (the frame's time is a
        problem), ``"DATE-OBS"`` or ``"MJD-OBS"`` (that keyword is used, and a note says
        so).

    Returns
    -------
    FrameStart
        The time (None when the header has none, or an unusable one), the reason when
        one is there but cannot be used, its scale and source keyword(s).
    """
    if follow not in FOLLOW:
        raise ValueError(f"follow = {follow!r}: expected one of {', '.join(FOLLOW)}")
    raw_sys = header.get("TIMESYS")
    if raw_sys is None or (isinstance(raw_sys, str) and not raw_sys.strip()):
        sys_name = "UTC"
    elif not isinstance(raw_sys, str) or raw_sys.strip().upper() not in _SCALES:
        return FrameStart(None, problem=f"unknown TIMESYS {raw_sys!r}")
    else:
        sys_name = raw_sys.strip().upper()
    scale = _SCALES[sys_name]
    sys_name = "UTC" if scale == "utc" else sys_name

    found: dict[str, Time] = {}
    bad: dict[str, str] = {}
    date = header.get("DATE-OBS")
    if date is not None and not (isinstance(date, str) and not date.strip()):
        clock = next((str(header[k]) for k in ("TIME-OBS", "UT", "UTSTART")
                      if isinstance(header.get(k), str) and header[k].strip()), "")
        try:
            if not isinstance(date, str):
                raise ValueError("not a date")
            found["DATE-OBS"] = parse_date_obs(date, scale, clock)
        except ValueError as exc:
            bad["DATE-OBS"] = f"bad DATE-OBS {date!r} ({exc})"
    if "MJD-OBS" in header and header["MJD-OBS"] is not None and not (
            isinstance(header["MJD-OBS"], str) and not header["MJD-OBS"].strip()):
        value = header["MJD-OBS"]
        try:
            mjd = _mjd_obs(value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ErfaWarning)
                found["MJD-OBS"] = Time(mjd, format="mjd", scale=scale)
        except ValueError as exc:
            bad["MJD-OBS"] = f"bad MJD-OBS {value!r} ({exc})"

    note = ""
    if len(found) == 2:
        diff = float((found["DATE-OBS"] - found["MJD-OBS"]).sec)
        if abs(diff) <= MAX_DISAGREEMENT:  # MJD-OBS: a float holds microseconds
            return FrameStart(found["MJD-OBS"], sys_name, "MJD-OBS, DATE-OBS")
        conflict = (f"DATE-OBS {header['DATE-OBS']!r} and MJD-OBS {header['MJD-OBS']!r} "
                    f"({found['MJD-OBS'].isot} {sys_name}) differ by {_span(diff)} "
                    f"(more than {MAX_DISAGREEMENT:g} s)")
        if follow == "none":
            return FrameStart(None, sys_name, problem=f"time conflict: {conflict}")
        return FrameStart(found[follow], sys_name, follow,
                          note=f"time conflict, {follow} followed: {conflict}")
    if bad:
        keys = list(bad)
        if follow in found and follow not in bad:
            return FrameStart(found[follow], sys_name, follow,
                              note=f"{'; '.join(bad.values())}: {follow} followed")
        return FrameStart(None, sys_name, problem="; ".join(bad[k] for k in keys))
    if found:
        key, t = next(iter(found.items()))
        return FrameStart(t, sys_name, key, note=note)
    return FrameStart(None, sys_name)


def product_follow(header: fits.Header) -> str:
    """What a calibrated frame's time follows: its ``TIMEFROM`` card (written by
    :func:`exposure_cards`) when it names one keyword, else "none". Only for our products:
    a raw header's own ``TIMEFROM`` is never read (the inventory passes the setting)."""
    value = header.get("TIMEFROM")
    return value if isinstance(value, str) and value in FOLLOW[1:] else "none"


# ---------------------------------------------------------------------- site and pointing
@dataclass(frozen=True)
class Site:
    """Where a frame was taken: geodetic latitude, east longitude (deg), height (m), and
    where these came from (the header keywords, or ``setting``)."""

    latitude: float
    longitude: float
    elevation: float
    source: str

    def location(self) -> EarthLocation:
        """The site as an astropy ``EarthLocation`` (WGS84). (astropy.coordinates is
        imported where it is used: most commands never need it.)"""
        from astropy.coordinates import EarthLocation

        return EarthLocation.from_geodetic(self.longitude * u.deg, self.latitude * u.deg,
                                           self.elevation * u.m)


@dataclass(frozen=True)
class Pointing:
    """The field centre of a frame (ICRS, deg) and where it came from."""

    ra: float
    dec: float
    source: str


# Site keywords, in order: (latitude, longitude, height) of one convention each.
_SITE_KEYS = (("SITELAT", "SITELONG", "SITEELEV"), ("OBS-LAT", "OBS-LONG", "OBS-ELEV"),
              ("LATITUDE", "LONGITUD", "ALTITUDE"), ("OBSGEO-B", "OBSGEO-L", "OBSGEO-H"))


def _degrees(value: object) -> float | None:
    """A header angle in degrees: a number, or sexagesimal / decimal text in degrees."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(text)
        except ValueError:
            parts = re.split(r"[:\s]+", text.replace("h", " ").replace("d", " ").replace("m", " ")
                             .replace("s", " ").strip())
            try:
                nums = [float(p) for p in parts if p]
            except ValueError:
                return None
            if not 1 <= len(nums) <= 3:
                return None
            sign = -1.0 if text.startswith("-") else 1.0
            out = sign * sum(abs(n) / 60**i for i, n in enumerate(nums))
    return out if math.isfinite(out) else None


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def frame_site(header: fits.Header, latitude: float, longitude: float, elevation: float
               ) -> tuple[Site | None, str]:
    """The site of a frame: from its header (``SITELAT``/``SITELONG``/``SITEELEV``,
    ``OBS-LAT``/``OBS-LONG``/``OBS-ELEV``, ``LATITUDE``/``LONGITUD``/``ALTITUDE``,
    ``OBSGEO-B``/``-L``/``-H``, or geocentric ``OBSGEO-X``/``-Y``/``-Z`` in metres), else
    the given setting (latitude and longitude east in degrees, height in metres).

    Returns
    -------
    tuple
        The site and "" ; or None and why, when the header's site keywords are there but
        impossible (a latitude beyond ±90°, a height outside -500 m .. 10 km, ...).
    """
    for lat_k, lon_k, h_k in _SITE_KEYS:
        if lat_k in header and lon_k in header:
            lat, lon = _degrees(header[lat_k]), _degrees(header[lon_k])
            height = _number(header.get(h_k, 0.0))
            if lat is None or lon is None or height is None or not -90 <= lat <= 90 \
                    or not -360 <= lon <= 360 or not -500 <= height <= 10_000:
                return None, (f"impossible site {lat_k}={header[lat_k]!r} "
                              f"{lon_k}={header[lon_k]!r} {h_k}={header.get(h_k)!r}")
            lon = (lon + 180.0) % 360.0 - 180.0
            return Site(lat, lon, height, f"{lat_k}/{lon_k}/{h_k}"), ""
    xyz = [_number(header.get(k)) for k in ("OBSGEO-X", "OBSGEO-Y", "OBSGEO-Z")]
    if all(v is not None for v in xyz):
        radius = math.sqrt(sum(v * v for v in xyz))  # type: ignore[operator, misc]
        if not 6.3e6 <= radius <= 6.4e6:
            return None, f"impossible site OBSGEO-X/Y/Z {xyz} (not on the Earth's surface)"
        from astropy.coordinates import EarthLocation

        geo = EarthLocation.from_geocentric(*xyz, unit=u.m).to_geodetic()
        return Site(float(geo.lat.deg), float(geo.lon.deg), float(geo.height.to_value(u.m)),
                    "OBSGEO-X/Y/Z"), ""
    return Site(float(latitude), float(longitude), float(elevation), "setting"), ""


def frame_pointing(header: fits.Header) -> tuple[Pointing | None, str]:
    """A frame's field centre: the celestial WCS at the image centre when the header has
    one, else ``RA``/``DEC`` (``OBJCTRA``/``OBJCTDEC``, ``TELRA``/``TELDEC``: text RA in
    hours, numbers in degrees).

    Returns
    -------
    tuple
        The pointing and "" ; or None and why there is none.
    """
    ctype1 = str(header.get("CTYPE1", ""))
    if ctype1.startswith("RA--") and str(header.get("CTYPE2", "")).startswith("DEC-"):
        from astropy.wcs import WCS  # a WCS only for frames that have one

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w = WCS(header, naxis=2)
                nx = _number(header.get("ZNAXIS1", header.get("NAXIS1")))
                ny = _number(header.get("ZNAXIS2", header.get("NAXIS2")))
                if nx and ny:
                    ra, dec = w.all_pix2world([[(nx - 1) / 2, (ny - 1) / 2]], 0)[0]
                else:
                    ra, dec = w.wcs.crval[:2]
            if np.isfinite(ra) and np.isfinite(dec) and -90 <= dec <= 90:
                return Pointing(float(ra) % 360.0, float(dec), "WCS centre"), ""
        except Exception:  # an unreadable WCS: try the keywords
            pass
    for ra_key, dec_key in (("RA", "DEC"), ("OBJCTRA", "OBJCTDEC"), ("TELRA", "TELDEC")):
        if header.get(ra_key) is None or header.get(dec_key) is None:
            continue
        ra_value = header[ra_key]
        ra = _degrees(ra_value)
        if ra is not None and isinstance(ra_value, str) and re.search(r"[:\sh]", ra_value.strip()):
            ra *= 15.0  # sexagesimal text: hours
        dec = _degrees(header[dec_key])
        if ra is None or dec is None or not (0 <= ra < 360 and -90 <= dec <= 90):
            return None, (f"impossible pointing {ra_key}={ra_value!r} "
                          f"{dec_key}={header[dec_key]!r}")
        return Pointing(ra, dec, f"{ra_key}/{dec_key} keywords"), ""
    return None, "no pointing (no WCS, no RA/DEC or OBJCTRA/OBJCTDEC in the header)"


# ------------------------------------------------------------------- mid-exposure cards
def _ut1_known(t: Time) -> Time:
    """``t`` with UT1 - UTC from the bundled IERS tables, or 0 beyond them (never a
    download, never the error astropy raises for stale predictions)."""
    table = iers.earth_orientation_table.get()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dut, status = table.ut1_utc(t.utc, return_status=True)
    t = t.copy()
    t.delta_ut1_utc = np.where(np.asarray(status) >= 0, u.Quantity(dut, u.s).value, 0.0)
    return t


def exposure_cards(header: fits.Header, exptime: float, latitude: float,
                   longitude: float, elevation: float, follow: str = "none"
                   ) -> tuple[dict[str, tuple], list[str]]:
    """The mid-exposure cards of a calibrated frame, and notes.

    ``MJD-MID`` (UTC) for every frame with a time; with a pointing
    (:func:`frame_pointing`) and a site (:func:`frame_site`, the given setting when the
    header has none) also ``BJD_TDB`` (barycentric Julian date in TDB: light travel time
    to the solar-system barycentre for the field, astropy's builtin ephemeris),
    ``CENTALT`` (geometric altitude of the field, no refraction) and ``AIRMASS`` (sec z,
    only above 5° of altitude) and ``PNTSRC``; with a site, with or without a pointing,
    ``OBSGEO-B``/``-L``/``-H`` (the site used: the KBMOD export's observatory too) and
    ``SITESRC``. ``TIMEFROM`` names the keyword(s) the start was read from (one keyword
    when ``follow`` chose it: the product's readers then follow it too,
    :func:`product_follow`). A frame without a pointing, or with an impossible site, gets
    no BJD_TDB, CENTALT or AIRMASS and a note, never a guessed value.

    Parameters
    ----------
    header
        The raw frame's header.
    exptime
        Exposure time (s).
    latitude, longitude, elevation
        The ``[site]`` setting: used when the header names no site.
    follow
        As :func:`frame_start`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)  # "dubious year": years far from today
        return _exposure_cards(header, exptime, latitude, longitude, elevation, follow)


def _exposure_cards(header: fits.Header, exptime: float, latitude: float,
                    longitude: float, elevation: float, follow: str
                    ) -> tuple[dict[str, tuple], list[str]]:
    start = frame_start(header, follow)
    if start.time is None:
        return {}, [start.problem or "no DATE-OBS or MJD-OBS: no mid-exposure cards"]
    mid = start.mid(exptime)
    cards: dict[str, tuple] = {
        "MJD-MID": (float(mid.utc.mjd), "[d] MJD (UTC) at mid-exposure"),
        "TIMEFROM": (start.source, "start of exposure read from these keywords"),
    }
    notes = [start.note] if start.note else []
    where, why = frame_pointing(header)
    site, site_why = frame_site(header, latitude, longitude, elevation)
    if site is not None:  # the site, with or without a pointing (the KBMOD export's too)
        cards.update({
            "OBSGEO-B": (site.latitude, "[deg] site latitude (north +)"),
            "OBSGEO-L": (site.longitude, "[deg] site longitude (east +)"),
            "OBSGEO-H": (site.elevation, "[m] site height above the WGS84 ellipsoid"),
            "SITESRC": (site.source, "site from these header keys or the setting"),
        })
    if where is None or site is None:
        notes.append(f"{why or site_why}: no BJD_TDB, AIRMASS or CENTALT")
        return cards, notes
    from astropy.coordinates import AltAz, SkyCoord  # only for frames that need it

    loc = site.location()
    target = SkyCoord(where.ra * u.deg, where.dec * u.deg, frame="icrs")
    t = _ut1_known(Time(mid.utc, location=loc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # polar motion beyond the tables: its 50-yr mean
        ltt = t.light_travel_time(target, kind="barycentric")
        bjd = (t.tdb + ltt).jd
        altaz = target.transform_to(AltAz(obstime=t, location=loc))
    alt = float(altaz.alt.deg)
    cards.update({
        "BJD_TDB": (float(bjd), "[d] barycentric JD (TDB) at mid-exposure"),
        "CENTALT": (round(alt, 5), "[deg] altitude of the field at mid-exposure"),
    })
    if alt >= 5.0:
        cards["AIRMASS"] = (round(1.0 / math.sin(math.radians(alt)), 5),
                            "sec z of the field at mid-exposure")
    else:
        notes.append(f"field {alt:.1f} deg above the horizon at mid-exposure: no AIRMASS")
    cards["PNTSRC"] = (where.source, "field centre used for BJD_TDB, CENTALT, AIRMASS")
    return cards, notes
