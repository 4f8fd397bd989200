"""Times, pointings and sites of two real cameras (issue 29): a Lowell 42-inch LOIS night
(``DATE-OBS`` a date only, the time of day in ``UTCSTART``; WCS cards written as text by
SCAMP / photometrypipeline) and an OPD Andor night (no site cards, ``AIRMASS`` as text).

The frames are not in the repository (their license does not allow it): each test is
skipped where they are not on this machine. The truths are the headers' own values, read
here by hand (UTCSTART, HA, the site's latitude), and spherical trigonometry.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from astropy.io import fits

from astep_dask.io.layout import read_record
from astep_dask.io.times import exposure_cards, frame_pointing, frame_start

LOWELL = Path("/tmp/realnight_lowell/Asteroid_Photometry/data")
OPD = Path("/tmp/realnight_opd/raw_images/opd_ixon_bc_hd5980")
CONCORDIA = (-75.09978, 123.332196, 3233.0)
OPD_SITE = (-(22 + 32 / 60 + 4 / 3600), -(45 + 34 / 60 + 57 / 3600), 1864.0)  # its README


def _frames(folder: Path, pattern: str = "*.fits") -> list[Path]:
    found = sorted(folder.glob(pattern))
    if not found:
        pytest.skip(f"no real frames in {folder}")
    return found


def _sexagesimal(text: str) -> float:
    sign = -1.0 if text.strip().startswith("-") else 1.0
    parts = [abs(float(p)) for p in re.split(r":", text.strip())]
    return sign * sum(p / 60**i for i, p in enumerate(parts))


def test_lowell_frames_start_at_their_utcstart():
    frames = _frames(LOWELL / "5945")
    starts = []
    for path in frames:
        h = fits.getheader(path)
        assert h["DATE-OBS"] == "2019-03-26"  # a date only
        s = frame_start(h)
        assert s.problem == "" and s.source == "DATE-OBS+UTCSTART", (path.name, s)
        seconds = _sexagesimal(h["UTCSTART"]) * 3600
        assert (s.mjd - 58568.0) * 86400 == pytest.approx(seconds, abs=1e-3)
        starts.append(s.mjd)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    first = frame_start(fits.getheader(frames[0])).time.isot
    assert first == "2019-03-26T02:27:31.130"
    # the night's bias and flat frames too, and the inventory takes them all
    for folder in ("zero", "flat", "5945"):
        for path in _frames(LOWELL / folder)[:2]:
            rec = read_record(path)
            assert rec.usable and rec.mjd > 58568.0 + 0.5 / 24, (path, rec.problem)


def test_lowell_pointing_is_the_text_wcs_and_its_altitude_matches_the_header():
    for path in _frames(LOWELL / "5945")[::11]:
        h = fits.getheader(path)
        where, why = frame_pointing(h)
        assert why == "" and where.source == "WCS centre (cards as text)"
        assert where.ra == pytest.approx(float(h["CRVAL1"]), abs=0.01)  # 124.6 deg
        assert where.dec == pytest.approx(float(h["CRVAL2"]), abs=0.01)
        ra_keys = _sexagesimal(h["RA"]) * 15
        assert abs(where.ra - ra_keys) < 0.05 and "apart" not in where.note
        cards, notes = exposure_cards(h, float(h["EXPTIME"]), *CONCORDIA)
        assert cards["SITESRC"][0] == "LATITUDE/LONGITUD/ALTITUDE"
        # altitude by hand: the header's sidereal time at the start, moved to mid-exposure,
        # the field precessed from J2000 to the date (Meeus, Astronomical Algorithms,
        # eq. 21.1: 3.075 + 1.336 sin(ra) tan(dec) s/yr in RA, 20.04 cos(ra) "/yr in Dec)
        years = (frame_start(h).mjd - 51544.5) / 365.25
        ra, dec = math.radians(where.ra), math.radians(where.dec)
        ra_date = where.ra + years * (3.075 + 1.336 * math.sin(ra) * math.tan(dec)) / 240
        dec_date = math.radians(where.dec + years * 20.04 * math.cos(ra) / 3600)
        lst = _sexagesimal(h["LST-OBS"]) * 15 + float(h["EXPTIME"]) / 2 * 1.0027379 / 240
        ha, lat = math.radians(lst - ra_date), math.radians(h["LATITUDE"])
        alt = math.degrees(math.asin(math.sin(lat) * math.sin(dec_date)
                                     + math.cos(lat) * math.cos(dec_date) * math.cos(ha)))
        assert cards["CENTALT"][0] == pytest.approx(alt, abs=0.02)  # LST-OBS to 1 s
        assert cards["AIRMASS"][0] == pytest.approx(h["AIRMASS"], rel=0.05)
        assert cards["AIRMHDR"][0] == h["AIRMASS"]
        assert not any("AIRMASS" in n for n in notes), notes
    first = fits.getheader(_frames(LOWELL / "5945")[0])
    cards, _ = exposure_cards(first, float(first["EXPTIME"]), *CONCORDIA)
    assert cards["CENTALT"][0] == pytest.approx(73.3, abs=0.3)  # not -15.4 (RA, Dec 0, 0)
    assert cards["AIRMASS"][0] == pytest.approx(1.05, abs=0.01)


def test_opd_airmass_against_the_concordia_default_is_a_note():
    path = _frames(OPD, "HD5980_V_*.fits")[0]
    h = fits.getheader(path)
    raw = float(h["AIRMASS"])  # '2.011': text
    cards, notes = exposure_cards(h, 30.0, *CONCORDIA)
    assert cards["SITESRC"][0] == "setting" and cards["AIRMHDR"][0] == raw
    assert any(f"header AIRMASS {raw:.3f}" in n and "[site] setting" in n
               and "75.10 S, 123.33 E" in n for n in notes), notes
    # at OPD (the site its README gives): our airmass agrees with the header's, no note
    cards, notes = exposure_cards(h, 30.0, *OPD_SITE)
    assert cards["AIRMASS"][0] == pytest.approx(raw, rel=0.01)
    assert not any("AIRMASS" in n for n in notes), notes
