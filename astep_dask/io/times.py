"""The one reader of a frame's time, and what a calibrated frame says about its moment.

:func:`frame_start` reads the start of an exposure from ``DATE-OBS`` (an ISO date, with a
UTC offset such as ``+02:00`` or ``Z`` converted to UTC; a date alone completed by
a time-of-day keyword such as ``TIME-OBS``, ``UT`` or ``UTCSTART``, else by ``MJD-OBS`` or
``JD``, never taken as midnight), ``MJD-OBS`` and ``TIMESYS`` (the scale of both, UTC when
absent).
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
    "AIRMASS_DISAGREEMENT",
    "FOLLOW",
    "MAX_DISAGREEMENT",
    "POINTING_DISAGREEMENT",
    "READING_VERSION",
    "TIME_OF_DAY",
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

# The version of how a raw header is read (here: times, pointing, site, airmass; in
# io.headers and io.layout: type, filter, detector values): raised with every change that
# can give a header another reading (2: a date-only DATE-OBS completed by UTCSTART/UTC-OBS/
# UT-TIME or MJD-OBS/JD, never midnight; WCS cards as text; AIRMHDR and the airmass note;
# the filter from io.headers.FILTER_KEYS). What is cached from an earlier reading (the inventory's
# records in a night's index, a product's provenance) should name it, so that a re-run
# reads the headers again.
READING_VERSION = 2
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
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# Keywords that give the time of day (UTC, hh:mm[:ss[.s]]) of a DATE-OBS that holds a date
# only, in the order they are read. TIME-OBS: the pre-1997 FITS convention (DATE-OBS then
# held dd/mm/yy); UT: NOAO/KPNO and Lowell's older cameras; UTSTART: Lick and other
# observatories; UTCSTART and UTC-OBS: Lowell's LOIS cameras ("universal time (start of
# exposure)", both written); UT-TIME: Magellan/IMACS. The pairs DATE-OBS|TIME-OBS,
# DATE-OBS|UT, DATE-OBS|UTC-OBS, DATE-OBS|UT-TIME are those photometrypipeline's telescope
# definitions (setup/telescopes.py) use for these cameras. Two of them more than
# MAX_DISAGREEMENT apart make the time a problem.
TIME_OF_DAY = ("TIME-OBS", "UT", "UTSTART", "UTCSTART", "UTC-OBS", "UT-TIME")

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

    A ``DATE-OBS`` that holds a date only is completed by the first time-of-day keyword of
    :data:`TIME_OF_DAY` the header has (``TIME-OBS``, ``UT``, ``UTSTART``, ``UTCSTART``,
    ``UTC-OBS``, ``UT-TIME``; two of them more than a second apart are a problem). Without
    one, ``MJD-OBS`` gives the time, else ``JD`` (taken as the start, with a note), when
    it falls on that date; else the frame's time is unknown and ``problem`` says what is
    missing: a date alone is never taken as midnight.

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
    date_only = False  # a DATE-OBS that holds a date and no time of day
    clock_key = ""
    if date is not None and not (isinstance(date, str) and not date.strip()):
        try:
            if not isinstance(date, str):
                raise ValueError("not a date")
            date_only = _DATE_ONLY.match(date.strip()) is not None
            clock_key, clock = _time_of_day(header) if date_only else ("", "")
            if not date_only or clock_key:  # else MJD-OBS or JD may give it (below)
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
    if date_only and not clock_key and "DATE-OBS" not in bad:
        return _date_only_start(header, str(date).strip(), scale, sys_name, found, bad)
    if len(found) == 2:
        diff = float((found["DATE-OBS"] - found["MJD-OBS"]).sec)
        if abs(diff) <= MAX_DISAGREEMENT:  # MJD-OBS: a float holds microseconds
            return FrameStart(found["MJD-OBS"], sys_name, "MJD-OBS, DATE-OBS")
        given = f"DATE-OBS {header['DATE-OBS']!r}" + (
            f" {clock_key} {header[clock_key]!r}" if clock_key else "")
        conflict = (f"{given} and MJD-OBS {header['MJD-OBS']!r} "
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
        if key == "DATE-OBS" and clock_key:
            key = f"DATE-OBS+{clock_key}"
        return FrameStart(t, sys_name, key, note=note)
    return FrameStart(None, sys_name)


def _time_of_day(header: fits.Header) -> tuple[str, str]:
    """The keyword and value that give the time of day of a date-only ``DATE-OBS``
    (:data:`TIME_OF_DAY`, the first one with text), ("", "") when none has one.

    Raises
    ------
    ValueError
        When two of them are readable and more than :data:`MAX_DISAGREEMENT` apart (both
        values are in the reason).
    """
    given = [(k, header[k].strip()) for k in TIME_OF_DAY
             if isinstance(header.get(k), str) and header[k].strip()]
    if not given:
        return "", ""
    seconds = {}
    for key, text in given:
        if _TIME.match(text):
            parts = [float(p) for p in text.split(":")]
            seconds[key] = parts[0] * 3600 + parts[1] * 60 + (parts[2] if len(parts) > 2 else 0)
    if seconds:
        first = next(iter(seconds))
        for key, value in seconds.items():
            gap = abs(value - seconds[first])
            if min(gap, 86400 - gap) > MAX_DISAGREEMENT:
                raise ValueError(f"time of day {first} {header[first]!r} and {key} "
                                 f"{header[key]!r} differ by {_span(gap)}")
    return given[0]


def _date_only_start(header: fits.Header, date: str, scale: str, sys_name: str,
                     found: dict[str, Time], bad: dict[str, str]) -> FrameStart:
    """The start of a frame whose ``DATE-OBS`` is a date alone and no time-of-day keyword
    completes it: ``MJD-OBS`` (else ``JD``) when it falls on that date; else no time and a
    problem naming what is missing (never midnight)."""
    if "MJD-OBS" in bad:
        return FrameStart(None, sys_name, problem=bad["MJD-OBS"])
    source, t = ("MJD-OBS", found["MJD-OBS"]) if "MJD-OBS" in found else ("", None)
    note = ""
    if t is None and header.get("JD") is not None:
        jd = _number(header["JD"])  # a number, or a number as text (OPD's Andor camera)
        try:
            if jd is None:
                raise ValueError("not a number")
            mjd = _mjd_obs(jd - 2400000.5)
        except ValueError as exc:
            return FrameStart(None, sys_name, problem=(
                f"DATE-OBS {date!r} holds a date only, and JD {header['JD']!r} is no time "
                f"({exc})"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ErfaWarning)
            t = Time(mjd, format="mjd", scale=scale)
        source = "JD"
        note = (f"DATE-OBS {date!r} holds a date only: the start of exposure is JD "
                f"{header['JD']!r} (taken as the start)")
    if t is None:
        return FrameStart(None, sys_name, problem=(
            f"DATE-OBS {date!r} holds a date only and no time of day "
            f"({', '.join(TIME_OF_DAY)}) nor MJD-OBS or JD gives the time: "
            f"the frame's time is unknown"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)
        day = t.isot[:10]
    if day != date[:10]:
        return FrameStart(None, sys_name, problem=(
            f"time conflict: DATE-OBS {date!r} (a date only) and {source} "
            f"{header[source]!r} ({t.isot} {sys_name}) fall on different days"))
    return FrameStart(t, sys_name, f"{source}, DATE-OBS", note=note)


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
    """The field centre of a frame (ICRS, deg), where it came from and a note."""

    ra: float
    dec: float
    source: str
    note: str = ""  # what was resolved on the way (WCS cards as text, a disagreement)


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


# WCS cards whose values must be numbers (FITS WCS paper I): a WCS whose CRVAL, CRPIX or
# CD / CDELT / PC card is text is read by astropy (its warnings silenced) as if the card
# were absent, CRVAL then 0: a pointing of (0, 0) that is no pointing at all.
_WCS_NUMERIC = re.compile(r"^(CRVAL[12]|CRPIX[12]|CDELT[12]|CD[12]_[12]|PC[12]_[12]|CROTA2"
                          r"|PV[12]_\d+|LONPOLE|LATPOLE|EQUINOX)$")
# A WCS centre and the header's RA/DEC further apart than this (deg) are a note: more than
# a large field's size, or a telescope's pointing error.
POINTING_DISAGREEMENT = 3.0
# The raw header's AIRMASS and ours further apart than this (relative) are a note: the
# site, the pointing or the time is not the header's (an exposure's start and middle
# differ by less at the airmasses where it matters).
AIRMASS_DISAGREEMENT = 0.05


def _wcs_header(header: fits.Header) -> tuple[fits.Header | None, str, str]:
    """The header with its WCS cards as numbers, whether some were text, and why the WCS
    cannot be used ("" when it can): a CRVAL, CRPIX or CD/CDELT card missing or not a
    number (text that reads as a number is taken as that number)."""
    missing = [k for k in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2") if k not in header]
    scale = [k for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2") if k in header] or [
        k for k in ("CDELT1", "CDELT2") if k in header]
    if missing or not scale:
        absent = missing + ([] if scale else ["CD1_1..CD2_2 or CDELT1/2"])
        return None, "", f"WCS card{'s' * (len(absent) > 1)} {', '.join(absent)} missing"
    out = header.copy()
    text = []
    for card in header.cards:
        if not _WCS_NUMERIC.match(card.keyword):
            continue
        value = card.value
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return None, "", f"WCS card {card.keyword} = {value!r} is not a number"
        if isinstance(value, str):
            number = _number(value.strip()) if value.strip() else None
            if number is None:
                return None, "", f"WCS card {card.keyword} = {value!r} is not a number"
            out[card.keyword] = number
            text.append(card.keyword)
        elif not math.isfinite(float(value)):
            return None, "", f"WCS card {card.keyword} = {value!r} is not a finite number"
    core = [k for k in text if not k.startswith(("PV", "EQUINOX", "LONPOLE", "LATPOLE"))]
    more = len(text) - len(core)
    named = ", ".join(core) + (f" (and {more} more)" if more and core else "")
    return out, named or ", ".join(text), ""


def _keyword_pointing(header: fits.Header) -> tuple[Pointing | None, str]:
    """``RA``/``DEC`` (else ``OBJCTRA``/``OBJCTDEC``, ``TELRA``/``TELDEC``): text RA in
    hours, numbers in degrees."""
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


def _separation(a: Pointing, b: Pointing) -> float:
    """Angle between two pointings (deg)."""
    ra1, dec1, ra2, dec2 = map(math.radians, (a.ra, a.dec, b.ra, b.dec))
    cos = (math.sin(dec1) * math.sin(dec2)
           + math.cos(dec1) * math.cos(dec2) * math.cos(ra1 - ra2))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def frame_pointing(header: fits.Header) -> tuple[Pointing | None, str]:
    """A frame's field centre: the celestial WCS at the image centre when the header has
    a usable one, else ``RA``/``DEC`` (``OBJCTRA``/``OBJCTDEC``, ``TELRA``/``TELDEC``:
    text RA in hours, numbers in degrees).

    A WCS is used only when its ``CRVAL1/2``, ``CRPIX1/2`` and ``CD`` (or ``CDELT``, with
    ``PC``) cards are there and are numbers; cards written as text that reads as a number
    (SCAMP / photometrypipeline headers: ``CRVAL1 = '124.6185920672'``) are taken as that
    number, and the source says so. A WCS with a card missing or not a number is not used
    (astropy would read a missing CRVAL as 0): the keywords are, and ``note`` names the
    card. When both a WCS centre and the keywords are there and lie more than
    :data:`POINTING_DISAGREEMENT` degrees apart, the WCS centre is kept (a fit to the
    stars describes the pixels; the telescope's RA/DEC may be a requested or stale
    position) and ``note`` gives both.

    Returns
    -------
    tuple
        The pointing and "" ; or None and why there is none.
    """
    ctype1 = str(header.get("CTYPE1", ""))
    wcs_note = ""
    if ctype1.startswith("RA--") and str(header.get("CTYPE2", "")).startswith("DEC-"):
        numeric, as_text, why = _wcs_header(header)
        centre = None
        if numeric is not None:
            centre, why = _wcs_centre(numeric)
        if centre is not None:
            source = "WCS centre" + (" (cards as text)" if as_text else "")
            notes = [f"WCS cards {as_text} are text: read as numbers"] if as_text else []
            keywords, _ = _keyword_pointing(header)
            if keywords is not None and (
                    sep := _separation(centre, keywords)) > POINTING_DISAGREEMENT:
                notes.append(
                    f"WCS centre RA {centre.ra:.4f} Dec {centre.dec:.4f} and "
                    f"{keywords.source} RA {keywords.ra:.4f} Dec {keywords.dec:.4f} are "
                    f"{sep:.1f} deg apart: the WCS centre is used")
            return Pointing(centre.ra, centre.dec, source, "; ".join(notes)), ""
        wcs_note = f"{why}: the WCS is not used for the pointing"
    where, why = _keyword_pointing(header)
    if wcs_note:
        if where is None:
            return None, f"{wcs_note}; {why}"
        return Pointing(where.ra, where.dec, where.source, wcs_note), ""
    return where, why


def _wcs_centre(header: fits.Header) -> tuple[Pointing | None, str]:
    """The celestial position of the image centre (of ``CRVAL`` without ``NAXIS``) by the
    header's WCS, whose cards are numbers; None and why when it cannot be computed."""
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
    except Exception as exc:  # an unreadable WCS: the keywords are tried
        return None, f"unreadable WCS ({type(exc).__name__})"
    if np.isfinite(ra) and np.isfinite(dec) and -90 <= dec <= 90:
        return Pointing(float(ra) % 360.0, float(dec), "WCS centre"), ""
    return None, f"WCS centre ({ra}, {dec}) impossible"


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
    if where is not None and where.note:
        notes.append(where.note)
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
    ours = round(1.0 / math.sin(math.radians(alt)), 5) if alt >= 5.0 else None
    raw_key, raw = _header_airmass(header)
    if ours is not None:
        cards["AIRMASS"] = (ours, "sec z of the field at mid-exposure")
        if "AIRMASS" in header and header["AIRMASS"] is not None:  # ours replaces it
            value = _number(header["AIRMASS"])
            cards["AIRMHDR"] = (value if value is not None else str(header["AIRMASS"]),
                                "AIRMASS of the raw header")
    else:
        notes.append(f"field {alt:.1f} deg above the horizon at mid-exposure: no AIRMASS")
    if raw is not None and (ours is None or abs(ours / raw - 1.0) > AIRMASS_DISAGREEMENT):
        computed = f"{ours:.3f}" if ours is not None else f"none (altitude {alt:.1f} deg)"
        place = (f"at the [site] setting's site ({_place(site)}): set [site] for this camera"
                 if site.source == "setting" else
                 f"at the header's site ({_place(site)}, {site.source}) for the field "
                 f"RA {where.ra:.4f} Dec {where.dec:.4f} ({where.source}): check the "
                 f"site, the pointing and the time")
        notes.append(f"header {raw_key} {raw:.3f} differs from {computed} computed {place}")
    cards["PNTSRC"] = (where.source, "field centre used for BJD_TDB, CENTALT, AIRMASS")
    return cards, notes


def _header_airmass(header: fits.Header) -> tuple[str, float | None]:
    """The raw header's own airmass: ``AIRMASS`` (else ``SECZ``, CTIO's ANDICAM), a number
    or a number as text, 1-40; ("", None) when none is there or it is implausible.
    (Altitude cards are not read: ``ALTITUDE`` is the site's height on some cameras, the
    LOIS ones among them.)"""
    for key in ("AIRMASS", "SECZ"):
        value = _number(header.get(key))
        if value is not None and 1.0 <= value <= 40.0:
            return key, value
    return "", None


def _place(site: Site) -> str:
    """A site as '75.10 S, 123.33 E'."""
    return (f"{abs(site.latitude):.2f} {'S' if site.latitude < 0 else 'N'}, "
            f"{abs(site.longitude):.2f} {'W' if site.longitude < 0 else 'E'}")
