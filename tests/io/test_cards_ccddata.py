"""Every header card we write reads back whole, and every product reads with CCDData.

Long string cards (a dark recipe, a fallback master's name, a raw keyword of the camera)
were cut at 68 characters; now they are written over ``CONTINUE`` cards, with
``LONGSTRN`` so ``fitsverify`` stays clean. Masters of every kind carry ``BUNIT``, their
VAR its ``UTYPE``: ``CCDData.read`` reads each product of a night (SCI as data, VAR as a
variance, MASK as the mask) without being told a unit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, VarianceUncertainty

from astep_dask.config import Settings
from astep_dask.core.darks import dark_how
from astep_dask.io.fitsio import atomic_write_digest, calibrated_hdul, read_calibrated
from astep_dask.io.products import output_dir
from astep_dask.masters.store import Master, read_master, write_master
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, simulate_night

RNG = np.random.default_rng(29)
SHAPE = (24, 20)


def _long(tag: str, n: int) -> str:
    """A string of ``n`` characters that says where each part of it was (a cut shows)."""
    text = "".join(f"{tag}{i:03d};" for i in range(n))
    return text[:n]


def _fitsverify(paths: list[Path]) -> None:
    if shutil.which("fitsverify") is None:
        pytest.skip("fitsverify not installed")
    out = subprocess.run(["fitsverify", *map(str, paths)], capture_output=True, text=True)
    verdicts = [ln for ln in out.stdout.splitlines() if "Verification found" in ln]
    assert len(verdicts) == len(paths), out.stdout
    assert all("0 warning(s) and 0 error(s)" in v for v in verdicts), out.stdout


def _cards_whole(header: fits.Header, intended: dict[str, object], where: str) -> None:
    for key, value in intended.items():
        assert key in header, (where, key)
        assert header[key] == value, (where, key, header[key], value)


def test_calibrated_frame_cards_read_back_whole(tmp_path):
    raw = fits.Header()
    raw["OBSERVER"] = (_long("obs", 150), "a raw card longer than one card")
    raw["EXPTIME"] = (90.0, "[s]")
    raw["DATE-OBS"] = ("2026-06-15T18:30:00.000", "start")
    raw["FILTER"] = ("RC", "filter")
    raw["OBJECT"] = (_long("field", 90), "target, long")
    raw["HIERARCH ESO INS LONG NAME"] = (_long("hier", 120), "long HIERARCH value")
    cards = {
        "DARKMETH": (_long("dark", 131), "how the dark was subtracted"),
        "MBIAS": (_long("bias", 95) + ".fits", "master bias used"),
        "MDARK1": (_long("mdark", 80) + ".fits", "master dark used"),
        "MFLAT": (_long("flat", 200) + ".fits", "master flat used"),
        "MMASK": ("2026-06-15_MASK.fits", "bad-pixel mask used"),
        "GAINSRC": (_long("gain", 70), "where GAIN comes from"),
    }
    sci = RNG.normal(100, 5, SHAPE).astype(np.float32)
    var = np.full(SHAPE, 25.0, np.float32)
    mask = (RNG.random(SHAPE) < 0.1).astype(np.int32) * 9
    path = tmp_path / "frame_CAL.fits"
    atomic_write_digest(calibrated_hdul(raw, sci, var, mask, cards), path)

    intended = {k: v for k, v in raw.items()} | {k: v[0] for k, v in cards.items()}
    with fits.open(path) as hdul:
        _cards_whole(hdul[0].header, intended, "PRIMARY")
        for ext in ("SCI", "VAR", "MASK"):  # the frame cards each extension repeats
            _cards_whole(hdul[ext].header, {"OBJECT": raw["OBJECT"]}, ext)
            assert hdul[ext].header["LONGSTRN"] == "OGIP 1.0"
    header, *_ = read_calibrated(path)
    assert header["DARKMETH"] == cards["DARKMETH"][0]
    _fitsverify([path])


def _master(role: str) -> Master:
    data = (RNG.random(SHAPE) < 0.05).astype(np.int32) * 65536 if role == "mask" else (
        RNG.normal(1.0 if role in ("flat", "illum") else 1000.0, 0.01, SHAPE).astype(np.float32))
    var = None if role in ("mask", "illum") else np.full(SHAPE, 1e-4, np.float32)
    count = None if var is None else np.full(SHAPE, 7, np.int16)
    cards = {"NCOMBINE": (7, "frames combined"), "FILTER": (_long("filt", 75), "filter"),
             "DARKMODE": (_long("mode", 140), "dark subtracted from the flats"),
             "FALLBACK": (_long("night", 110) + "_MASTERFLAT_RC.fits", "from another night"),
             "ILLXFER": (_long("xfer", 99), "fitted to this flat through this one"),
             "EXPTIME": (90.0, "[s]")}
    inputs = [{"file": _long("raw", 85), "level": 1.0}]
    return Master(role, data, var, count, f"hash-{role}", cards, inputs)


@pytest.mark.parametrize("role", ["bias", "dark", "flat", "mask", "illum"])
def test_master_cards_read_back_whole_and_ccddata(tmp_path, role):
    m = _master(role)
    path = tmp_path / f"2026-06-15_MASTER{role.upper()}.fits"
    write_master(m, path)
    intended = {k: v[0] for k, v in m.cards.items()}
    with fits.open(path) as hdul:
        _cards_whole(hdul[0].header, intended, "PRIMARY")
        _cards_whole(hdul["SCI"].header, {"FILTER": intended["FILTER"]}, "SCI")
        assert hdul["INPUTS"].data["file"][0] == m.inputs[0]["file"]
    back = read_master(path)
    assert {k: back.cards[k][0] for k in intended} == intended
    assert back.digest == m.digest
    _ccddata_matches(path, m.data, m.var, u.adu if role in ("bias", "dark")
                     else u.dimensionless_unscaled)
    _fitsverify([path])


def _ccddata_matches(path: Path, data: np.ndarray, var: np.ndarray | None,
                     unit: u.UnitBase, mask: np.ndarray | None = None) -> None:
    """CCDData.read of a product as its documented call reads it, and as a user who names
    nothing but the file reads it (the first HDU with data: SCI, its unit from BUNIT)."""
    ccd = CCDData.read(path, hdu="SCI", hdu_uncertainty="VAR", hdu_mask="MASK")
    assert ccd.unit == unit
    np.testing.assert_array_equal(ccd.data, data)
    if var is None:
        assert ccd.uncertainty is None
    else:
        assert isinstance(ccd.uncertainty, VarianceUncertainty)
        assert ccd.uncertainty.unit == unit**2
        np.testing.assert_array_equal(ccd.uncertainty.array, var)
    if mask is None:
        assert ccd.mask is None
    else:
        np.testing.assert_array_equal(ccd.mask, mask != 0)
    plain = CCDData.read(path)
    assert plain.unit == unit
    np.testing.assert_array_equal(plain.data, data)


# A small night with every master kind: bias frames, darks of two exposure times, flats,
# the mask and the illumination correction (few frames needed: min_frames lowered).
SIM = SimConfig(size=96, n_science=6, n_darks=4, n_flats=5, n_bias=4,
                extra_dark_exptimes=(30.0,), seed=29)
SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"},
                              illum={"min_frames": 4, "block": 16})


@pytest.fixture(scope="module")
def night(tmp_path_factory, client):
    night = simulate_night(tmp_path_factory.mktemp("cards_archive"), SIM)
    result = calibrate_night(night, client, SETTINGS)
    assert result.status == "complete", (result.counts, result.error)
    return night, output_dir(night, None), result


def test_every_product_of_a_night_reads_with_ccddata(night):
    _, out, result = night
    paths = result.details["masters"]["paths"]
    assert paths["bias"] and paths["illums"], paths  # every kind was made
    masters = (sorted(out.glob("*_MASTER*.fits")) + sorted(out.glob("*_ILLUM*.fits"))
               + [out / f"{SIM.date}_MASK.fits"])
    kinds = set()
    for p in masters:
        m = read_master(p)
        kinds.add(m.role)
        unit = u.adu if m.role in ("bias", "dark") else u.dimensionless_unscaled
        _ccddata_matches(p, m.data, m.var, unit)
    assert kinds == {"bias", "dark", "flat", "mask", "illum"}, kinds
    frames = sorted(out.glob("*_CAL.fits"))
    assert len(frames) == SIM.n_science
    for p in frames:
        _, sci, var, mask = read_calibrated(p)
        _ccddata_matches(p, sci, var, u.electron, mask)
    _fitsverify(masters + frames)


def test_recipe_cards_of_a_night_are_whole(night):
    """DARKMETH of each frame and DARKMODE of the flat are the recipes dark_how names from
    the darks' exposure times (an independent derivation), whole."""
    _, out, _ = night
    ets = [SIM.science_exptime, SIM.flat_exptime, *SIM.extra_dark_exptimes]
    for p in sorted(out.glob("*_CAL.fits")):
        assert fits.getval(p, "DARKMETH") == dark_how(SIM.science_exptime, ets, True)
    flat = out / f"{SIM.date}_MASTERFLAT_{SIM.filter}.fits"
    assert fits.getval(flat, "DARKMODE") == dark_how(SIM.flat_exptime, ets, True)
