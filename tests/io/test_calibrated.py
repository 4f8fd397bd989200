"""open_calibrated: a lazy (frame, y, x) Dataset of calibrated files, equal to the files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from astep_dask.core.bits import Bit
from astep_dask.core.calibrate import Section
from astep_dask.io import calibrated as cal_mod
from astep_dask.io.calibrated import open_calibrated
from astep_dask.io.fitsio import atomic_write, calibrated_hdul, read_calibrated, wcs_cards
from astep_dask.io.products import CAL_SUFFIX


def _raw_header(i: int, mjd: float, filt: str = "RC") -> fits.Header:
    h = fits.Header()
    h["ACQTYPE"] = "SCIENCE"
    h["EXPTIME"] = 30.0 + i % 3
    h["FILTER"] = filt
    h["MJD-OBS"] = mjd
    h["DATE-OBS"] = Time(mjd, format="mjd", scale="utc").isot
    return h


def _write_night(folder: Path, n: int, shape=(16, 12), seed: int = 0) -> dict[str, tuple]:
    """``n`` calibrated files written by the package's writer, in reverse time order on
    disk names (so the reader must sort by time); returns their planes by file name."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    planes = {}
    for i in range(n):
        sci = rng.normal(100.0, 10.0, shape).astype(np.float32)
        var = rng.uniform(50.0, 150.0, shape).astype(np.float32)
        mask = (rng.random(shape) < 0.05).astype(np.int32) << int(Bit.CR)
        name = f"f{n - i:04d}{CAL_SUFFIX}"
        hdul = calibrated_hdul(_raw_header(i, 61000.0 + i / 1000.0), sci, var, mask,
                               {"RAWFILE": (f"f{n - i:04d}.fits", "raw frame")})
        atomic_write(hdul, folder / name)
        planes[name] = (sci, var, mask)
    return planes


def _count_reads(monkeypatch) -> Counter:
    calls: Counter = Counter()
    real = cal_mod.ExtensionImage.__getitem__

    def counting(self, key):
        out = real(self, key)
        calls[self.extname] += out.size
        return out

    monkeypatch.setattr(cal_mod.ExtensionImage, "__getitem__", counting)
    return calls


def test_200_frames_open_lazily_and_median_equals_numpy(tmp_path, monkeypatch):
    planes = _write_night(tmp_path / "out", 200)
    calls = _count_reads(monkeypatch)
    ds = open_calibrated(tmp_path / "out")
    assert sum(calls.values()) == 0  # headers only
    assert ds.sci.dims == ("frame", "y", "x") and ds.sci.shape == (200, 16, 12)
    assert ds.sci.data.chunks[0] == (1,) * 200
    assert ds.sci.dtype == np.float32 and ds["var"].dtype == np.float32
    assert ds.mask.dtype == np.int32
    assert np.all(np.diff(ds.mjd.values) > 0)  # time order, not name order
    names = [Path(p).name for p in ds.path.values]
    truth = np.stack([planes[n][0] for n in names])
    median = ds.sci.median("frame").values
    assert calls["SCI"] == truth.size and calls["VAR"] == calls["MASK"] == 0
    np.testing.assert_array_equal(median, np.median(truth, axis=0))
    good = np.stack([planes[n][2] for n in names]) == 0
    clipped = ds.sci.where(ds.mask == 0).mean("frame").values
    expected = np.nanmean(np.where(good, truth, np.nan), axis=0)
    np.testing.assert_allclose(clipped, expected, rtol=1e-6)
    assert ds.sci.attrs["units"] == "electron" and ds["var"].attrs["units"] == "electron2"
    meanings = ds.mask.attrs["flag_meanings"].split()
    assert dict(zip(meanings, ds.mask.attrs["flag_masks"], strict=True))["CR"] == 1 << 3


def test_coordinates_are_the_headers(tmp_path):
    _write_night(tmp_path / "out", 5)
    ds = open_calibrated(tmp_path / "out")
    for i in range(5):
        with fits.open(ds.path.values[i]) as hdul:
            h = hdul[0].header
            assert ds.mjd.values[i] == h["MJD-OBS"]
            assert ds.exptime.values[i] == h["EXPTIME"]
            assert ds.filter.values[i] == h["FILTER"]
            assert ds.raw.values[i] == h["RAWFILE"]
            expected = np.datetime64(Time(h["MJD-OBS"], format="mjd").isot, "ns")
            assert abs(ds.time.values[i] - expected) < np.timedelta64(1, "ms")
            _, sci, var, mask = read_calibrated(ds.path.values[i])
            np.testing.assert_array_equal(ds.sci.isel(frame=i).values, sci)
            np.testing.assert_array_equal(ds["var"].isel(frame=i).values, var)
            np.testing.assert_array_equal(ds.mask.isel(frame=i).values, mask)
    assert set(ds.kind.values) == {"science"}


def test_compressed_frames_read_the_same(tmp_path):
    rng = np.random.default_rng(1)
    sci = rng.normal(100.0, 10.0, (32, 32)).astype(np.float32)
    mask = np.zeros(sci.shape, np.int32)
    mask[3, 4] = 1 << int(Bit.SAT)
    hdul = calibrated_hdul(_raw_header(0, 61000.0), sci, np.full_like(sci, 100.0), mask, {},
                           quantize=16)
    atomic_write(hdul, tmp_path / f"a{CAL_SUFFIX}")
    ds = open_calibrated(tmp_path)
    _, sci_file, _, mask_file = read_calibrated(tmp_path / f"a{CAL_SUFFIX}")
    np.testing.assert_array_equal(ds.sci.values[0], sci_file)
    np.testing.assert_array_equal(ds.mask.values[0], mask_file)
    assert ds.mask.values[0, 3, 4] == 1 << int(Bit.SAT)


def test_missing_products_are_named(tmp_path):
    night = tmp_path / "2026-06-15"
    night.mkdir()
    with pytest.raises(FileNotFoundError, match="2026-06-15-CAMS_CAL: no calibrated frame"):
        open_calibrated(night)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / f"broken{CAL_SUFFIX}").write_text("not FITS\n" * 400)
    with pytest.raises(ValueError, match=f"broken{CAL_SUFFIX}: not a readable"):
        open_calibrated(tmp_path / "out")


def test_wcs_moves_with_the_trimmed_section():
    raw = fits.Header()
    for key, value in (("CTYPE1", "RA---TAN"), ("CTYPE2", "DEC--TAN"), ("CRPIX1", 100.0),
                       ("CRPIX2", 50.0), ("CRVAL1", 10.0), ("CRVAL2", -70.0),
                       ("CD1_1", -2.5e-4), ("CD1_2", 1e-6), ("CD2_1", 2e-6),
                       ("CD2_2", 2.5e-4), ("EXPTIME", 3.0)):
        raw[key] = value
    cards = wcs_cards(raw, Section(y0=7, y1=90, x0=5, x1=120))
    assert "EXPTIME" not in cards and cards["CD1_2"] == 1e-6
    assert (cards["CRPIX1"], cards["CRPIX2"]) == (95.0, 43.0)
    raw_wcs, trimmed = WCS(raw), WCS(cards)
    sky_raw = raw_wcs.pixel_to_world(30.0 + 5, 20.0 + 7)
    sky_trim = trimmed.pixel_to_world(30.0, 20.0)
    assert sky_raw.separation(sky_trim).arcsec < 1e-6
    assert len(wcs_cards(fits.Header({"EXPTIME": 1.0}))) == 0


def test_a_relative_folder_gives_absolute_paths(tmp_path, monkeypatch):
    # The lazy arrays' tasks may run in worker processes started in another folder.
    truth = _write_night(tmp_path / "out", 3)
    monkeypatch.chdir(tmp_path)
    ds = open_calibrated("out")
    assert all(Path(p).is_absolute() for p in ds.path.values)
    monkeypatch.chdir("/")
    assert sorted(Path(p).name for p in ds.path.values) == sorted(truth)
    np.testing.assert_array_equal(ds.sci.values[0], read_calibrated(ds.path.values[0])[1])
