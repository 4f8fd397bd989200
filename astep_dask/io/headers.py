"""What a raw header says: the frame's type, its numbers and sections, and whether
they make sense.

A frame is classified from its header (``ACQTYPE``, ``IMAGETYP`` or ``OBSTYPE``), the
file name only as a fallback; its filter is the first of :data:`FILTER_KEYS` that names
one (:func:`frame_filter`). Exposure time, gain, read noise and saturation are checked
when the night is scanned (:func:`value_problems`): a frame with an impossible value is
unusable, with the reason, before any pixel is calibrated with it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from astep_dask.core.calibrate import Section
from astep_dask.io.rawfiles import stem

__all__ = [
    "EXPTIME_KEYS",
    "FILTER_KEYS",
    "GAIN_KEYS",
    "GAIN_RANGE",
    "RDNOISE_KEYS",
    "RDNOISE_RANGE",
    "SATURATE_KEYS",
    "SATURATE_RANGE",
    "FilterReading",
    "FrameType",
    "classify",
    "exposure_time",
    "filter_label",
    "frame_filter",
    "header_float",
    "header_section",
    "image_hdu_index",
    "type_from_name",
    "type_from_text",
    "value_problems",
]


class FrameType(enum.StrEnum):
    """What a raw frame is, as calibration needs to know it."""

    SCIENCE = "science"
    DARK = "dark"
    FLAT = "flat"
    BIAS = "bias"
    UNKNOWN = "unknown"


# Header values (upper-cased) that name each frame type; checked as substrings.
_TYPE_WORDS: tuple[tuple[FrameType, tuple[str, ...]], ...] = (
    (FrameType.BIAS, ("BIAS", "ZERO", "OFFSET")),
    (FrameType.DARK, ("DARK",)),
    (FrameType.FLAT, ("FLAT",)),
    (FrameType.SCIENCE, ("SCIENCE", "LIGHT", "OBJECT")),
)


TYPE_KEYWORDS = ("ACQTYPE", "IMAGETYP", "OBSTYPE")


def type_from_text(text: str) -> FrameType:
    """Frame type named by a header value or file-name part, else UNKNOWN."""
    up = text.upper()
    for kind, words in _TYPE_WORDS:
        if any(w in up for w in words):
            return kind
    return FrameType.UNKNOWN


def type_from_name(path: Path) -> FrameType:
    """Frame type from the file-name suffix (``..._DARK.fits``), else UNKNOWN."""
    last = stem(path).rsplit("_", 1)[-1]
    return type_from_text(last) if last != stem(path) else FrameType.UNKNOWN


def classify(header: fits.Header, path: Path) -> tuple[FrameType, str]:
    """Frame type from the header, falling back to the file name.

    Returns the type and a note (empty unless header and name disagree or the
    name had to be used).
    """
    from_name = type_from_name(path)
    for key in TYPE_KEYWORDS:
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            kind = type_from_text(value)
            if kind is not FrameType.UNKNOWN:
                note = ""
                if from_name not in (FrameType.UNKNOWN, kind):
                    note = f"header {key}={value.strip()!r} overrides file name ({from_name})"
                return kind, note
    if from_name is not FrameType.UNKNOWN:
        return from_name, "type from file name (no frame-type keyword)"
    return FrameType.UNKNOWN, ""


def header_float(header: fits.Header, *keys: str) -> float | None:
    """The first of ``keys`` whose value is a finite number (not a boolean), else None."""
    for key in keys:
        value = header.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            out = float(value)
        except (TypeError, ValueError):
            continue
        if np.isfinite(out):
            return out
    return None


def exposure_time(header: fits.Header) -> float:
    """The one reader of a frame's exposure time, raw or calibrated: ``EXPTIME`` (else
    ``EXPOSURE``, ``ITIME``) in seconds, NaN when none is a finite number. (The inventory
    refuses a raw frame without one, so every product has it.)"""
    value = header_float(header, *EXPTIME_KEYS)
    return float("nan") if value is None else value


def header_section(header: fits.Header, *keys: str) -> Section | None:
    """The first of ``keys`` holding a FITS section (``[x1:x2,y1:y2]``), else None.

    Raises
    ------
    ValueError
        When the value is not a valid section.
    """
    for key in keys:
        value = header.get(key)
        if isinstance(value, str) and value.strip():
            return Section.from_fits(value)
    return None


def image_hdu_index(hdul: fits.HDUList) -> int:
    """Index of the first HDU that holds a 2-D image."""
    for i, hdu in enumerate(hdul):
        if isinstance(hdu, fits.CompImageHDU | fits.ImageHDU | fits.PrimaryHDU):
            if hdu.header.get("ZNAXIS", hdu.header.get("NAXIS", 0)) == 2:
                return i
    raise ValueError("no 2-D image HDU")


EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME")


GAIN_KEYS = ("GAIN", "EGAIN")


RDNOISE_KEYS = ("RDNOISE", "READNOIS", "RON")


SATURATE_KEYS = ("SATURATE", "SATLEVEL")


# The keywords that name a frame's filter, in the order they are tried: the first present
# with a non-empty value is the filter (:func:`frame_filter`). Who writes each (the
# photometrypipeline's telescope table, setup/telescopes.py, lists the same per camera):
FILTER_KEYS = (
    "FILTER",  # the common one: IRAF/NOAO cameras, MaxIm DL, ASCOM/ACP, N.I.N.A., Andor
    #            Solis (an OPD Andor night), Las Cumbres, KPNO, SOAR; our own products
    "FILTNAME",  # Lowell LOIS on the Hall 42-inch (a real night's flats carry only this)
    "FILTERS",  # Lowell DCT LMI (LOIS: both wheels as one name), CTIO 0.9-m ('dia v')
    "FILTERID",  # CTIO 1.0-m Y4KCam
    "INSFLNAM",  # Calar Alto (CAHA) instruments, e.g. CAFOS
    "FLT_ID",  # TNG DOLORES
    "WFFBAND",  # INT Wide Field Camera
)
# Left out: keywords that name one wheel of several (FILTER1/FILTER2 of HST, GMOS, WIYN
# HDI, CFHT MegaPrime; ALFLTNM/FAFLTNM of NOT ALFOSC; FILTNME3 of the Lowell 72-inch):
# one wheel's position ('Open' on the other) is not the filter, and taking the first
# would put every filter of such a camera in one group.


@dataclass(frozen=True)
class FilterReading:
    """A frame's filter as its header names it (:func:`frame_filter`)."""

    name: str  # "" when no keyword of FILTER_KEYS names one
    key: str  # the keyword it was read from ("" when none)
    note: str = ""  # keywords that name another filter, when there are

    def notes(self, kind: FrameType) -> list[str]:
        """What the inventory says about this reading for a frame of ``kind``: only flats
        and science frames are matched by filter (a bias or dark has none that matters).
        """
        if kind not in (FrameType.FLAT, FrameType.SCIENCE):
            return []
        if not self.name:
            return [f"no filter keyword ({', '.join(FILTER_KEYS)}): filter taken as "
                    f"{filter_label('')}"]
        out = [self.note] if self.note else []
        if self.key != FILTER_KEYS[0]:
            out.append(f"filter from {self.key} ({FILTER_KEYS[0]} missing or blank)")
        return out


def frame_filter(header: fits.Header) -> FilterReading:
    """The one reader of a raw frame's filter: the value of the first of
    :data:`FILTER_KEYS` present with a non-empty value (surrounding blanks removed; a
    boolean names no filter), "" when none is. When another of the keywords names a
    different filter, the reading's ``note`` says which was used."""
    found: list[tuple[str, str]] = []
    for key in FILTER_KEYS:
        value = header.get(key)
        if value is None or isinstance(value, bool):
            continue
        text = str(value).strip()
        if text:
            found.append((key, text))
    if not found:
        return FilterReading("", "")
    key, name = found[0]
    others = [f"{k} {v!r}" for k, v in found[1:] if v != name]
    note = (f"filter keywords disagree: {key} {name!r} used, not {', '.join(others)}"
            if others else "")
    return FilterReading(name, key, note)


def filter_label(name: str) -> str:
    """A filter as messages show it: quoted (``'VR'``), or ``(no filter)`` for ""."""
    return repr(name) if name else "(no filter)"


MAX_EXPTIME = 86400.0  # s: an exposure longer than a day is a broken header


# Plausible ranges (inclusive) of the detector values a header gives: outside them a
# value is a broken header, and the frame is unusable with the value named (a GAIN of
# 1e-300 or 1e6 would "calibrate" to absurd electrons).
GAIN_RANGE = (0.01, 100.0)  # e-/ADU
RDNOISE_RANGE = (0.0, 1000.0)  # e-
SATURATE_RANGE = (100.0, 2.0**32)  # ADU: below a bias level, every pixel would be SAT


# Kinds whose exposure time must be positive (a bias is a zero-second exposure).
_EXPOSED = (FrameType.SCIENCE, FrameType.FLAT, FrameType.DARK)


def _first(header: fits.Header, keys: tuple[str, ...]) -> tuple[str, object] | None:
    """The first of ``keys`` present in the header, with its value."""
    for key in keys:
        if key in header:
            return key, header[key]
    return None


def _number(value: object) -> float | None:
    """A header value as a finite float, else None (booleans and text are no numbers)."""
    if isinstance(value, bool):
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def value_problems(header: fits.Header, kind: FrameType) -> tuple[str, list[str]]:
    """Why the header's exposure time or detector values make a frame unusable ("" when
    they do not), and notes on the values the calibration will take from the settings.

    EXPTIME must be a number, positive for science, flat and dark frames (zero for a bias)
    and at most a day; GAIN, RDNOISE and SATURATE numbers within :data:`GAIN_RANGE`,
    :data:`RDNOISE_RANGE` and :data:`SATURATE_RANGE`. A missing GAIN or RDNOISE is no
    problem: the ``[detector]`` setting is used, else the night's own frames measure it
    (:mod:`astep_dask.masters.detector`); a missing SATURATE takes the setting. Each is
    noted.
    """
    notes = []
    found = _first(header, EXPTIME_KEYS)
    if found is not None:
        key, value = found
        t = _number(value)
        if t is None:
            return f"bad {key} {value!r} (not a number)", notes
        if t < 0:
            return f"negative {key} {t:g}", notes
        if t == 0 and kind in _EXPOSED:
            return f"{key} {t:g} s for a {kind} frame (must be > 0)", notes
        if t > MAX_EXPTIME:
            return f"{key} {t:g} s is longer than a day", notes
    for keys, name, strict, (low, high), unit, fallback in (
        (GAIN_KEYS, "GAIN", True, GAIN_RANGE, "e-/ADU",
         "the settings' gain is used if given, else the night's flat pairs measure it"),
        (RDNOISE_KEYS, "RDNOISE", False, RDNOISE_RANGE, "e-",
         "the settings' read noise is used if given, else the night's bias or dark "
         "pairs measure it"),
        (SATURATE_KEYS, "SATURATE", True, SATURATE_RANGE, "ADU",
         "the settings' saturation level is used"),
    ):
        found = _first(header, keys)
        if found is None:
            notes.append(f"no {name} in header: {fallback}")
            continue
        key, value = found
        v = _number(value)
        if v is None or v < 0 or (strict and v == 0):
            bound = ">" if strict else "≥"
            return f"bad {key} {value!r} (must be a number {bound} 0)", notes
        if not low <= v <= high:
            return (f"implausible {key} {v:g} {unit} (a plausible value lies between "
                    f"{low:g} and {high:g})"), notes
    return "", notes
