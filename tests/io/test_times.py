"""A frame's time and moment: one reader of DATE-OBS / MJD-OBS / TIMESYS for the inventory,
the product writer, the manifest and the readers of calibrated frames (issue 30, item 5),
and the mid-exposure cards of every calibrated frame, MJD-MID, BJD_TDB, CENTALT and
AIRMASS (issue 29, item 6), checked against astropy and ERFA computed here on their own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import erfa
import numpy as np
import pytest
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.utils import iers
from astropy.wcs import WCS

from astep_dask.cli import main
from astep_dask.io.calibrated import calibrated_frames
from astep_dask.io.fitsio import extension_header, mid_exposure
from astep_dask.io.layout import read_record, scan_night
from astep_dask.io.products import output_dir
from astep_dask.io.times import (
    exposure_cards,
    frame_pointing,
    frame_site,
    frame_start,
    parse_date_obs,
)
from astep_dask.testing.simulate import SimConfig, simulate_night

CONCORDIA = (-75.09978, 123.332196, 3233.0)
START = "2026-06-15T20:00:00.000"  # inside the IERS-B table astropy bundles
MJD_START = 61206.0 + 20 / 24  # the same instant, by hand: 2026-06-15 is MJD 61206


def _h(**cards) -> fits.Header:
    h = fits.Header()
    for key, value in cards.items():
        h[key.replace("_", "-") if key in ("DATE_OBS", "MJD_OBS", "TIME_OBS") else key] = value
    return h


# ------------------------------------------------------------------------- frame_start
def test_date_obs_alone_mjd_obs_alone_and_both_agreeing_give_one_time():
    for h in (_h(DATE_OBS=START), _h(MJD_OBS=MJD_START),
              _h(DATE_OBS=START, MJD_OBS=MJD_START + 0.5 / 86400)):  # 0.5 s apart: agree
        s = frame_start(h)
        assert s.problem == "" and s.scale == "UTC"
        assert s.mjd == pytest.approx(MJD_START, abs=1e-6 / 86400 + 0.6 / 86400)
    assert frame_start(_h(DATE_OBS=START)).mjd == pytest.approx(MJD_START, abs=1e-9)
    none = frame_start(_h(EXPTIME=1.0))
    assert none.time is None and none.problem == ""


def test_utc_offsets_are_applied_not_dropped():
    for text in ("2026-06-15T22:00:00+02:00", "2026-06-15T22:00:00+0200",
                 "2026-06-15T17:30:00-02:30", "2026-06-15T20:00:00Z", "2026-06-15T22:00:00+02"):
        s = frame_start(_h(DATE_OBS=text))
        assert s.problem == "", text
        assert s.mjd == pytest.approx(MJD_START, abs=1e-9), text
    # the offset agrees with MJD-OBS once applied: no conflict
    assert frame_start(_h(DATE_OBS="2026-06-15T22:00:00+02:00", MJD_OBS=MJD_START)).problem == ""


def test_a_date_alone_is_completed_by_time_obs():
    s = frame_start(_h(DATE_OBS="2026-06-15", TIME_OBS="20:00:00"))
    assert s.mjd == pytest.approx(MJD_START, abs=1e-9)


def test_timesys_tt_is_converted_to_utc():
    # TT - UTC in 2026 = 32.184 s + 37 leap seconds (none since 2017)
    s = frame_start(_h(MJD_OBS=MJD_START, TIMESYS="TT"))
    assert s.scale == "TT"
    assert (MJD_START - s.mjd) * 86400 == pytest.approx(69.184, abs=1e-4)


def test_date_obs_five_hours_after_mjd_obs_is_a_conflict_with_both_values():
    late = "2026-06-16T01:00:00.000"
    s = frame_start(_h(DATE_OBS=late, MJD_OBS=MJD_START))
    assert s.time is None
    assert "conflict" in s.problem and late in s.problem and repr(MJD_START) in s.problem
    assert "5 h" in s.problem
    # 1.5 s apart is a conflict too
    assert frame_start(_h(DATE_OBS=START, MJD_OBS=MJD_START + 1.5 / 86400)).problem
    # ... unless the caller follows one of them: that one, with a note
    for follow, expect in (("MJD-OBS", MJD_START), ("DATE-OBS", MJD_START + 5 / 24)):
        s = frame_start(_h(DATE_OBS=late, MJD_OBS=MJD_START), follow=follow)
        assert s.problem == "" and "conflict" in s.note and s.source == follow
        assert s.mjd == pytest.approx(expect, abs=1e-9)


@pytest.mark.parametrize("cards, words", [
    ({"DATE_OBS": "yesterday"}, "bad DATE-OBS"),
    ({"DATE_OBS": "1850-01-01T00:00:00"}, "plausible years"),
    ({"DATE_OBS": "2300-01-01T00:00:00"}, "plausible years"),
    ({"DATE_OBS": "2026-13-45T00:00:00"}, "bad DATE-OBS"),
    ({"DATE_OBS": "2026-06-15T22:00:00+25:00"}, "offset"),
    ({"DATE_OBS": 61206.5}, "bad DATE-OBS"),
    ({"DATE_OBS": "2026-06-15T20:00:00Z", "TIMESYS": "TT"}, "UTC date"),
    ({"MJD_OBS": "abc"}, "bad MJD-OBS"),
    ({"MJD_OBS": True}, "bad MJD-OBS"),
    ({"MJD_OBS": 1e300}, "plausible years"),
    ({"MJD_OBS": -5.0}, "plausible years"),
    ({"MJD_OBS": MJD_START, "TIMESYS": "MARS"}, "unknown TIMESYS"),
    ({"DATE_OBS": "garbage", "MJD_OBS": MJD_START}, "bad DATE-OBS"),
])
def test_hostile_times_are_a_problem_with_a_reason(cards, words):
    s = frame_start(_h(**cards))
    assert s.time is None and words in s.problem, s.problem
    with pytest.raises(ValueError, match=words):
        mid_exposure(_h(**cards))


def test_parse_date_obs_refuses_what_is_no_date():
    for text in ("", "2026/06/15", "15/06/26", "2026-06-15T20", "2026-06-15T20:00:00+2:00"):
        with pytest.raises(ValueError):
            parse_date_obs(text)


# -------------------------------------------------- the inventory and the writer agree
def _raw_file(path: Path, **cards) -> Path:
    h = fits.Header()
    h["ACQTYPE"] = "SCIENCE"
    h["EXPTIME"] = 60.0
    for key, value in cards.items():
        h[key] = value
    fits.PrimaryHDU(np.zeros((8, 8), np.uint16), header=h).writeto(path)
    return path


def test_inventory_and_product_read_the_same_time(tmp_path):
    # A DATE-OBS with an offset: the inventory's start and the product's MJD-AVG agree
    p = _raw_file(tmp_path / "a_SCIENCE.fits", **{"DATE-OBS": "2026-06-15T22:00:00+02:00"})
    rec = read_record(p)
    assert rec.usable and rec.mjd == pytest.approx(MJD_START, abs=1e-9)
    ext = extension_header(fits.getheader(p), "LIGHT")
    assert ext["MJD-AVG"] == pytest.approx(rec.mjd_mid, abs=1e-9)
    assert ext["DATE-AVG"] == "2026-06-15T20:00:30.000"
    # 5 h apart: unusable, both values in the reason
    q = _raw_file(tmp_path / "b_SCIENCE.fits",
                  **{"DATE-OBS": "2026-06-16T01:00:00", "MJD-OBS": MJD_START})
    bad = read_record(q)
    assert not bad.usable and "2026-06-16T01:00:00" in bad.problem
    assert repr(MJD_START) in bad.problem


# ------------------------------------------------------------ mid-exposure cards: truth
RA, DEC = 100.0, -60.0  # a field Concordia sees high in June


def _astropy_truth(iso_mid: str, ra: float, dec: float, site=CONCORDIA):
    loc = EarthLocation.from_geodetic(site[1] * u.deg, site[0] * u.deg, site[2] * u.m)
    t = Time(iso_mid, scale="utc", location=loc)
    c = SkyCoord(ra * u.deg, dec * u.deg)
    bjd = (t.tdb + t.light_travel_time(c, "barycentric")).jd
    alt = c.transform_to(AltAz(obstime=t, location=loc)).alt.deg
    return bjd, alt


def test_cards_match_astropy_and_erfa_computed_independently():
    h = _h(DATE_OBS=START, EXPTIME=60.0, RA=RA, DEC=DEC)
    cards, notes = exposure_cards(h, 60.0, *CONCORDIA)
    assert notes == []
    mid_iso = "2026-06-15T20:00:30"
    assert cards["MJD-MID"][0] == pytest.approx(MJD_START + 30 / 86400, abs=1e-9)
    bjd, alt = _astropy_truth(mid_iso, RA, DEC)
    assert abs(cards["BJD_TDB"][0] - bjd) * 86400 < 1e-3  # s
    assert cards["CENTALT"][0] == pytest.approx(alt, abs=1e-4)
    assert cards["AIRMASS"][0] == pytest.approx(1 / np.sin(np.radians(alt)), rel=1e-4)
    # ERFA by hand: Roemer delay of the geocentre (Earth's barycentric position . the
    # field's direction / c), to the ~21 ms the site adds at most
    tt = Time(mid_iso, scale="utc").tt
    tdb = Time(mid_iso, scale="utc").tdb
    _, pvb = erfa.epv00(tt.jd1, tt.jd2)
    n = np.array([np.cos(np.radians(DEC)) * np.cos(np.radians(RA)),
                  np.cos(np.radians(DEC)) * np.sin(np.radians(RA)), np.sin(np.radians(DEC))])
    au_s = (1 * u.au / (299792458 * u.m / u.s)).to_value(u.s)
    roemer = float(pvb[0] @ n) * au_s
    assert abs((cards["BJD_TDB"][0] - tdb.jd) * 86400 - roemer) < 0.03
    assert 0 < abs(roemer) < 500  # a real correction, not zero


def test_header_site_and_wcs_centre_are_used():
    site = (19.8, -155.47, 4200.0)  # Maunakea
    h = _h(DATE_OBS=START, SITELAT="19 48 00", SITELONG=site[1], SITEELEV=site[2],
           CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=RA, CRVAL2=10.0, CRPIX1=50.5,
           CRPIX2=50.5, CD1_1=-1e-4, CD1_2=0.0, CD2_1=0.0, CD2_2=1e-4, NAXIS1=100,
           NAXIS2=100, RA=0.0, DEC=0.0)  # RA/DEC keywords far off: the WCS wins
    where, _ = frame_pointing(h)
    assert where.source == "WCS centre" and where.ra == pytest.approx(RA, abs=1e-6)
    s, why = frame_site(h, *CONCORDIA)
    assert why == "" and s.latitude == pytest.approx(19.8) and s.longitude == site[1]
    cards, _ = exposure_cards(h, 0.0, *CONCORDIA)
    _, alt = _astropy_truth(START, RA, 10.0, site)
    assert cards["CENTALT"][0] == pytest.approx(alt, abs=1e-4)
    assert cards["SITESRC"][0] == "SITELAT/SITELONG/SITEELEV"
    # OBSGEO-X/Y/Z: the same place
    loc = EarthLocation.from_geodetic(site[1] * u.deg, site[0] * u.deg, site[2] * u.m)
    g = _h(**{"OBSGEO-X": loc.x.to_value(u.m), "OBSGEO-Y": loc.y.to_value(u.m),
              "OBSGEO-Z": loc.z.to_value(u.m)})
    s2, _ = frame_site(g, *CONCORDIA)
    assert (s2.latitude, s2.longitude, s2.elevation) == pytest.approx(site, abs=1e-6)


def test_no_pointing_or_impossible_site_gives_no_card_and_a_note():
    for h, words in ((_h(DATE_OBS=START), "no pointing"),
                     (_h(DATE_OBS=START, RA=400.0, DEC=-60.0), "impossible pointing"),
                     (_h(DATE_OBS=START, RA=RA, DEC=DEC, SITELAT=123.0, SITELONG=0.0),
                      "impossible site")):
        cards, notes = exposure_cards(h, 60.0, *CONCORDIA)
        assert "MJD-MID" in cards
        assert not {"BJD_TDB", "AIRMASS", "CENTALT"} & set(cards), cards
        assert len(notes) == 1 and words in notes[0], notes
    # a frame without a usable time: no card at all, and the reason
    cards, notes = exposure_cards(_h(DATE_OBS="garbage", RA=RA, DEC=DEC), 60.0, *CONCORDIA)
    assert cards == {} and "bad DATE-OBS" in notes[0]


def test_the_site_is_recorded_with_or_without_a_pointing():
    # the KBMOD export's observatory is the site the calibration used: a frame without a
    # pointing records it too; an impossible one is not recorded
    chile = (-24.6, -70.4, 2635.0)
    cards, _ = exposure_cards(_h(DATE_OBS=START), 60.0, *chile)
    assert (cards["OBSGEO-B"][0], cards["OBSGEO-L"][0], cards["OBSGEO-H"][0]) == chile
    assert cards["SITESRC"][0] == "setting" and "BJD_TDB" not in cards
    bad, _ = exposure_cards(_h(DATE_OBS=START, SITELAT=123.0, SITELONG=0.0), 60.0, *chile)
    assert "OBSGEO-B" not in bad
    from astep_dask.kbmod.products import OBS_LAT, OBSERVATORY, observatory_cards

    cal = _h(DATE_OBS=START)
    cal.update({k: v[0] for k, v in cards.items()})
    obs = observatory_cards(cal)
    assert obs["OBS-LAT"][0] == -24.6 and obs["OBSGEO-L"][0] == -70.4
    assert "OBSERVAT" not in obs  # no name for a site that is not Concordia
    assert observatory_cards(None)["OBS-LAT"][0] == OBS_LAT
    home, _ = exposure_cards(_h(DATE_OBS=START), 60.0, *CONCORDIA)
    cal = _h(DATE_OBS=START)
    cal.update({k: v[0] for k, v in home.items()})
    assert observatory_cards(cal)["OBSERVAT"][0] == OBSERVATORY


def test_offline_far_future_frame_downloads_nothing(monkeypatch):
    """Beyond every bundled Earth-orientation table (2035): no download is tried, no
    error, no warning left over; astropy's own download switch is off."""
    import astropy.utils.data as data

    def refuse(*args, **kwargs):
        raise AssertionError("a download was tried")

    monkeypatch.setattr(data, "download_file", refuse)
    assert iers.conf.auto_download is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cards, notes = exposure_cards(_h(DATE_OBS="2035-01-01T00:00:00", RA=RA, DEC=DEC),
                                      60.0, *CONCORDIA)
    assert {"BJD_TDB", "CENTALT", "MJD-MID"} <= set(cards) and notes == []


# ------------------------------------------------------------------- a calibrated night
@pytest.mark.slow
def test_night_with_hostile_times(tmp_path, capsys):
    """The manifest's time, the product's MJD-AVG and the calibrated-frame reader agree
    for a DATE-OBS with a UTC offset; a frame whose DATE-OBS is 5 h after its MJD-OBS is
    unusable with both values; every product carries the mid-exposure cards and stays
    fitsverify-clean."""
    cfg = SimConfig(size=64, n_science=3, n_darks=3, n_flats=3, seed=5,
                    wcs_center=(RA, DEC))
    night = simulate_night(tmp_path / "archive", cfg)
    science = sorted(p for p in night.rglob("*_SCIENCE.fits"))
    with fits.open(science[0], mode="update") as hdul:  # local time, offset given
        t = Time(hdul[0].header["MJD-OBS"], format="mjd", scale="utc") + 2 * u.h
        hdul[0].header["DATE-OBS"] = t.isot + "+02:00"
    with fits.open(science[1], mode="update") as hdul:  # 5 h later than MJD-OBS
        late = (Time(hdul[0].header["MJD-OBS"], format="mjd", scale="utc") + 5 * u.h).isot
        hdul[0].header["DATE-OBS"] = late
    inv = scan_night(night)
    assert sum(not f.usable for f in inv.frames) == 1
    out = tmp_path / "out"
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"])
    assert code == 3, capsys.readouterr()  # partial: one frame unusable
    folder = output_dir(night, out)
    manifest = json.loads((folder / "manifest.json").read_text())
    reasons = [u["reason"] for u in manifest["unusable"]]
    assert len(reasons) == 1 and late in reasons[0] and "MJD-OBS" in reasons[0]
    rows = {r["file"]: r for r in manifest["frames"] if r.get("status") == "done"}
    assert set(rows) == {science[0].name, science[2].name}
    readers = {f.raw: f for f in calibrated_frames(folder)}
    products = []
    for name, row in rows.items():
        product = folder / row["output"]
        products.append(product)
        with fits.open(product) as hdul:
            h0, sci = hdul[0].header, hdul["SCI"].header
        mid = row["mjd"] + h0["EXPTIME"] / 2 / 86400
        assert sci["MJD-AVG"] == pytest.approx(mid, abs=1e-8)
        assert h0["MJD-MID"] == pytest.approx(mid, abs=1e-8) == sci["MJD-MID"]
        assert readers[name].mjd == pytest.approx(row["mjd"], abs=1e-9)
        raw = fits.getheader(night / f"{night.name}-CAMS" / name)
        centre = WCS(raw).pixel_to_world((raw["NAXIS1"] - 1) / 2, (raw["NAXIS2"] - 1) / 2)
        bjd, alt = _astropy_truth(Time(mid, format="mjd", scale="utc").isot,
                                  centre.ra.deg, centre.dec.deg)
        assert abs(h0["BJD_TDB"] - bjd) * 86400 < 0.01
        assert h0["CENTALT"] == pytest.approx(alt, abs=1e-3)
        assert h0["PNTSRC"] == "WCS centre" and h0["SITESRC"] == "setting"
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify not installed")
    r = subprocess.run(["fitsverify", *map(str, products)], capture_output=True, text=True)
    verdicts = [ln for ln in r.stdout.splitlines() if "Verification found" in ln]
    assert len(verdicts) == len(products)
    assert all("0 warning(s) and 0 error(s)" in v for v in verdicts), r.stdout


def test_pointing_keywords_text_and_numbers():
    for ra, dec in (("06:40:00", "-60:00:00"), ("06 40 00", "-60 00 00"),
                    ("06h40m00s", "-60d00m00s"), (100.0, -60.0), ("100.0", "-60.0")):
        where, why = frame_pointing(_h(OBJCTRA=ra, OBJCTDEC=dec))
        assert why == "" and where.ra == pytest.approx(100.0) and where.dec == -60.0, (ra, dec)
    assert frame_pointing(_h(RA="x", DEC=0.0))[0] is None


OFFLINE = """
import socket, urllib.request, astropy.utils.data as data
tried = []
def refuse(*a, **k):
    tried.append(a[:1])
    raise OSError("no network here")
data.download_file = refuse
urllib.request.urlopen = refuse
socket.create_connection = refuse
from astropy.io import fits
from astep_dask.io.times import exposure_cards
for when in ("2026-06-15T20:00:00", "2035-01-01T00:00:00", "1991-01-01T00:00:00"):
    h = fits.Header({"DATE-OBS": when, "RA": 100.0, "DEC": -60.0})
    cards, notes = exposure_cards(h, 60.0, -75.1, 123.35, 3233.0)
    assert {"BJD_TDB", "CENTALT", "AIRMASS"} <= set(cards), (when, cards, notes)
assert not tried, tried
print("offline ok")
"""


def test_a_fresh_process_computes_offline():
    """In a new interpreter (no Earth-orientation table loaded yet), with every way to the
    network refused: the cards are made, for dates inside and beyond the bundled tables."""
    import sys

    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", OFFLINE],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "offline ok" in r.stdout, r.stderr[-2000:]


def test_a_frame_is_redone_when_the_site_changes(small_night):
    """The site makes a frame's BJD_TDB, CENTALT and AIRMASS: it is in its provenance, so
    a re-run with another ``[site]`` remakes the frames rather than keeping stale cards."""
    from astep_dask.config import Settings
    from astep_dask.io.headers import FrameType
    from astep_dask.io.provenance import frame_provenance

    rec = scan_night(small_night).select(FrameType.SCIENCE)[0]
    here = frame_provenance(rec, "masters", Settings())
    assert frame_provenance(rec, "masters", Settings()) == here
    elsewhere = Settings().replace(site={"latitude": -24.6, "longitude": -70.4})
    assert frame_provenance(rec, "masters", elsewhere) != here


# ------------------------------------------- real cameras (issue 29): three silent values
LOIS_WCS = {  # a Lowell LOIS frame after SCAMP/photometrypipeline: WCS cards as text
    "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": "124.6185920672",
    "CRVAL2": "25.32885681452", "CRPIX1": "716.0", "CRPIX2": "685.0",
    "CD1_1": "-0.0003073728745725", "CD1_2": "1.223604312691e-05",
    "CD2_1": "1.223604312691e-05", "CD2_2": "0.0003073728745725", "NAXIS1": 1432,
    "NAXIS2": 1370}


@pytest.mark.parametrize("key", ["TIME-OBS", "UT", "UTSTART", "UTCSTART", "UTC-OBS",
                                 "UT-TIME"])
def test_a_date_alone_is_completed_by_each_time_of_day_keyword(key):
    h = _h(DATE_OBS="2026-06-15")
    h[key] = "20:00:00.25"
    s = frame_start(h)
    assert s.problem == "" and s.source == f"DATE-OBS+{key}"
    assert (s.mjd - MJD_START) * 86400 == pytest.approx(0.25, abs=1e-4)


def test_a_date_alone_without_a_time_of_day_is_never_midnight():
    s = frame_start(_h(DATE_OBS="2026-06-15", EXPTIME=60.0))
    assert s.time is None
    assert "'2026-06-15'" in s.problem and "date only" in s.problem
    assert "UTCSTART" in s.problem and "MJD-OBS" in s.problem
    cards, notes = exposure_cards(_h(DATE_OBS="2026-06-15", RA=RA, DEC=DEC), 60.0,
                                  *CONCORDIA)
    assert cards == {} and "date only" in notes[0]
    with pytest.raises(ValueError, match="date only"):
        mid_exposure(_h(DATE_OBS="2026-06-15"))
    # ... the inventory makes such a frame unusable, with that reason
    # (checked in test_a_date_only_frame_is_unusable_in_the_inventory)


def test_a_date_alone_takes_its_time_from_mjd_obs_or_jd():
    s = frame_start(_h(DATE_OBS="2026-06-15", MJD_OBS=MJD_START))
    assert s.problem == "" and s.mjd == pytest.approx(MJD_START, abs=1e-9)
    assert "MJD-OBS" in s.source
    h = _h(DATE_OBS="2026-06-15")
    h["JD"] = f"{MJD_START + 2400000.5:.5f}"  # as OPD's Andor camera writes it: text
    s = frame_start(h)
    assert s.problem == "" and s.source == "JD, DATE-OBS" and "JD" in s.note
    assert abs(s.mjd - MJD_START) * 86400 < 0.5  # 5 decimals of a day: 0.43 s
    # another day than the date: a conflict, not a time
    s = frame_start(_h(DATE_OBS="2026-06-14", MJD_OBS=MJD_START))
    assert s.time is None and "different days" in s.problem
    # a time-of-day keyword wins over JD; MJD-OBS then is checked against it
    h = _h(DATE_OBS="2026-06-15", UT="21:00:00", MJD_OBS=MJD_START)
    assert "conflict" in frame_start(h).problem and "UT '21:00:00'" in frame_start(h).problem


def test_two_time_of_day_keywords_that_disagree_are_a_problem():
    h = _h(DATE_OBS="2026-06-15", UTCSTART="20:00:00", UT="20:30:00")
    s = frame_start(h)
    assert s.time is None and "UT" in s.problem and "30 min" in s.problem
    h = _h(DATE_OBS="2026-06-15", UTCSTART="20:00:00.2", UT="20:00:00")  # agree
    assert frame_start(h).problem == ""


def test_a_date_only_frame_is_unusable_in_the_inventory(tmp_path):
    p = _raw_file(tmp_path / "a_SCIENCE.fits", **{"DATE-OBS": "2026-06-15"})
    rec = read_record(p)
    assert not rec.usable and "date only" in rec.problem
    q = _raw_file(tmp_path / "b_SCIENCE.fits", UTCSTART="20:00:00",
                  **{"DATE-OBS": "2026-06-15"})
    rec = read_record(q)
    assert rec.usable and rec.mjd == pytest.approx(MJD_START, abs=1e-9)


def _alt_truth(when: str, ra: float, dec: float, site: tuple) -> float:
    loc = EarthLocation.from_geodetic(site[1] * u.deg, site[0] * u.deg, site[2] * u.m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aa = SkyCoord(ra * u.deg, dec * u.deg).transform_to(
            AltAz(obstime=Time(when, scale="utc"), location=loc))
    return float(aa.alt.deg)


def test_a_wcs_written_as_text_is_read_as_numbers_and_said_so():
    h = _h(DATE_OBS=START, **LOIS_WCS)
    where, why = frame_pointing(h)
    assert why == "" and where.source == "WCS centre (cards as text)"
    numeric = fits.Header({k: (float(v) if isinstance(v, str) and k[:2] != "CT" else v)
                           for k, v in LOIS_WCS.items()})
    truth = WCS(numeric).pixel_to_world((1432 - 1) / 2, (1370 - 1) / 2)
    assert where.ra == pytest.approx(truth.ra.deg, abs=1e-7)
    assert where.dec == pytest.approx(truth.dec.deg, abs=1e-7)
    assert "CRVAL1" in where.note and "text" in where.note
    cards, notes = exposure_cards(h, 0.0, *CONCORDIA)
    assert cards["PNTSRC"][0] == "WCS centre (cards as text)"
    assert any("CRVAL1" in n for n in notes)


@pytest.mark.parametrize("bad, card", [({"CRVAL1": "n/a"}, "CRVAL1"),
                                        ({"CD1_1": "  "}, "CD1_1"),
                                        ({"CRVAL2": None}, "CRVAL2")])
def test_a_wcs_with_a_card_that_is_no_number_is_not_the_pointing(bad, card):
    cards = {**LOIS_WCS, **bad}
    if bad.get(card, 0) is None:
        del cards[card]
    h = _h(DATE_OBS=START, **cards, RA="08:18:29.9", DEC="+25:19:59")
    where, why = frame_pointing(h)
    assert why == "" and where.source == "RA/DEC keywords"
    assert where.ra == pytest.approx(124.624583, abs=1e-5)
    assert where.dec == pytest.approx(25 + 19 / 60 + 59 / 3600, abs=1e-6)
    assert card in where.note and "not used" in where.note
    # without keywords: no pointing (never (0, 0)), the card named
    h = _h(DATE_OBS=START, **cards)
    where, why = frame_pointing(h)
    assert where is None and card in why


def test_a_wcs_centre_far_from_ra_dec_is_kept_with_a_note():
    num = {k: (float(v) if isinstance(v, str) and k[:2] != "CT" else v)
           for k, v in LOIS_WCS.items()}
    h = _h(**num, RA=130.0, DEC=25.3)  # 4.9 deg east of the WCS centre
    where, _ = frame_pointing(h)
    assert where.source == "WCS centre" and where.ra == pytest.approx(124.618, abs=1e-2)
    assert "apart" in where.note and "130.0000" in where.note and "124.61" in where.note
    h = _h(**num, RA=124.7, DEC=25.3)  # near: no note
    assert frame_pointing(h)[0].note == ""


def test_a_header_airmass_far_from_ours_at_the_setting_site_is_a_note():
    """The OPD case: no site cards, the [site] default (Concordia) used; the header's own
    AIRMASS (text, as that camera writes it) disagrees: a note naming both and the site;
    the raw value kept as AIRMHDR."""
    when, ra, dec = START, RA, DEC
    alt = _alt_truth(when, ra, dec, CONCORDIA)
    ours = 1 / np.sin(np.radians(alt))
    h = _h(DATE_OBS=when, RA=ra, DEC=dec, AIRMASS=f"{ours * 1.3:.3f}")
    cards, notes = exposure_cards(h, 0.0, *CONCORDIA)
    assert cards["AIRMASS"][0] == pytest.approx(ours, abs=1e-3)
    assert cards["AIRMHDR"][0] == pytest.approx(ours * 1.3, abs=1e-3)
    assert len(notes) == 1 and "[site] setting" in notes[0]
    assert f"{ours * 1.3:.3f}" in notes[0] and f"{ours:.3f}" in notes[0]
    assert "75.10 S, 123.33 E" in notes[0]
    # within 5 %: no note, the raw value still kept
    h = _h(DATE_OBS=when, RA=ra, DEC=dec, AIRMASS=round(ours * 1.03, 4))
    cards, notes = exposure_cards(h, 0.0, *CONCORDIA)
    assert notes == [] and cards["AIRMHDR"][0] == round(ours * 1.03, 4)
    # a header site that disagrees is a note too (site, pointing or time to check)
    h = _h(DATE_OBS=when, RA=ra, DEC=dec, AIRMASS=round(ours * 1.3, 4),
           SITELAT=CONCORDIA[0], SITELONG=CONCORDIA[1], SITEELEV=CONCORDIA[2])
    _, notes = exposure_cards(h, 0.0, *CONCORDIA)
    assert len(notes) == 1 and "header's site" in notes[0]
