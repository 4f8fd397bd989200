"""The products as astropy and ccdproc users read them (issue 17): CCDData round trip of a
calibrated frame (variance, mask, WCS, frame cards), masters in the same layout, one
ImageFileCollection over the output folder, earlier masters rebuilt, open_calibrated."""

from __future__ import annotations

import time

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, VarianceUncertainty
from astropy.wcs import WCS
from ccdproc import ImageFileCollection

import astep_dask as ad
from astep_dask.config import Settings
from astep_dask.io.fitsio import read_calibrated, verify_file
from astep_dask.io.products import output_dir
from astep_dask.masters.store import MasterStore, read_master
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, simulate_night

SIM = SimConfig(size=96, n_science=4, n_darks=5, n_flats=7, seed=5, wcs_center=(97.5, -75.0))
SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})
FRAME_KEYS = ("EXPTIME", "DATE-OBS", "MJD-OBS", "FILTER", "GAIN")


@pytest.fixture(scope="module")
def night(tmp_path_factory, client):
    night = simulate_night(tmp_path_factory.mktemp("wcs_archive"), SIM)
    result = calibrate_night(night, client, SETTINGS)
    assert result.status == "complete", result.counts
    return night, output_dir(night, None)


def _raw_header(night, cal_path) -> fits.Header:
    return fits.getheader(night / f"{night.name}-CAMS" / fits.getval(cal_path, "RAWFILE"))


def test_ccddata_reads_variance_mask_and_raw_wcs(night):
    night_dir, out = night
    frames = sorted(out.glob("*_CAL.fits"))
    assert len(frames) == SIM.n_science
    for path in frames:
        ccd = CCDData.read(path, hdu="SCI", hdu_uncertainty="VAR", hdu_mask="MASK")
        header, sci, var, mask = read_calibrated(path)
        assert ccd.unit == u.electron
        assert isinstance(ccd.uncertainty, VarianceUncertainty)
        assert ccd.uncertainty.unit == u.electron**2
        np.testing.assert_array_equal(ccd.data, sci)
        np.testing.assert_array_equal(ccd.uncertainty.array, var)
        np.testing.assert_array_equal(ccd.mask, mask != 0)
        assert ccd.mask.any() and not ccd.mask.all()
        # The raw frame's celestial WCS, which follows the simulated drift frame by frame.
        raw = WCS(_raw_header(night_dir, path))
        assert ccd.wcs is not None and ccd.wcs.has_celestial
        ys, xs = np.mgrid[0:96:17, 0:96:13]
        sep = raw.pixel_to_world(xs, ys).separation(ccd.wcs.pixel_to_world(xs, ys))
        assert sep.max().arcsec < 1e-6
        # The frame's time, exposure, filter and gain in every extension, as in PRIMARY.
        with fits.open(path) as hdul:
            for ext in ("SCI", "VAR", "MASK"):
                h = hdul[ext].header
                assert h["INHERIT"] is True
                for key in FRAME_KEYS:
                    assert h[key] == header[key], (ext, key)
                assert WCS(h).has_celestial
        assert verify_file(path) is None  # checksums still valid


def test_wcs_of_each_frame_points_at_the_same_stars(night):
    """The WCS carried over is the raw one: the simulator moves it with the drift, so the
    brightest star's position maps to the same sky position in every frame."""
    _, out = night
    sky = []
    for path in sorted(out.glob("*_CAL.fits")):
        ccd = CCDData.read(path, hdu="SCI")
        y, x = np.unravel_index(np.nanargmax(np.where(np.isfinite(ccd.data), ccd.data, 0)),
                                ccd.data.shape)
        sky.append(ccd.wcs.pixel_to_world(x, y))
    pixel = SIM.pixel_scale
    assert max(sky[0].separation(s).arcsec for s in sky) < 2.5 * pixel


def test_image_file_collection_selects_frames_and_masters(night):
    _, out = night
    ic = ImageFileCollection(out, ext="SCI")
    frames = sorted(p.name for p in out.glob("*_CAL.fits"))
    assert sorted(ic.files_filtered(imagetyp="LIGHT")) == frames
    darks = sorted(ic.files_filtered(imagetyp="MASTER DARK"))
    assert darks == [f"{SIM.date}_MASTERDARK.fits", f"{SIM.date}_MASTERDARK_FLAT.fits"]
    assert list(ic.files_filtered(imagetyp="MASTER FLAT")) == [f"{SIM.date}_MASTERFLAT_RC.fits"]
    assert list(ic.files_filtered(imagetyp="BAD PIXEL MASK")) == [f"{SIM.date}_MASK.fits"]
    assert sorted(ic.files) == sorted(frames + darks + [f"{SIM.date}_MASTERFLAT_RC.fits",
                                                        f"{SIM.date}_MASK.fits"])
    for ccd, name in ic.ccds(imagetyp="MASTER DARK", return_fname=True,
                             ccd_kwargs={"hdu_uncertainty": "VAR"}):
        m = read_master(out / name)
        assert ccd.unit == u.adu and ccd.header["EXPTIME"] == m.exptime
        assert isinstance(ccd.uncertainty, VarianceUncertainty)
        assert ccd.uncertainty.unit == u.adu**2
        np.testing.assert_array_equal(ccd.data, m.data)
        np.testing.assert_array_equal(ccd.uncertainty.array, m.var)
    flat = CCDData.read(out / f"{SIM.date}_MASTERFLAT_RC.fits", hdu="SCI",
                        unit=u.dimensionless_unscaled)
    assert abs(np.median(flat.data) - 1.0) < 0.02
    for p in out.glob("*_MASK*.fits"):
        assert verify_file(p) is None


def test_masters_of_an_earlier_layout_are_rebuilt(night, tmp_path):
    """A master of ours with its image in PRIMARY (versions before issue 17) is rebuilt,
    not reused; one of another tool in that layout is still read when asked to reuse it."""
    _, out = night
    path = out / f"{SIM.date}_MASTERDARK.fits"
    m = read_master(path)
    old = tmp_path / path.name
    header = fits.Header()
    header["MASTTYPE"] = "DARK"
    header["ADHASH"] = m.digest
    header["EXPTIME"] = m.exptime
    fits.HDUList([fits.PrimaryHDU(m.data, header=header),
                  fits.ImageHDU(m.var, name="VAR")]).writeto(old)
    store = MasterStore(tmp_path)
    assert store.existing(old, m.digest) is None
    assert any("earlier layout" in n for n in store.report.notes)
    del header["ADHASH"]
    foreign = tmp_path / "foreign.fits"
    fits.PrimaryHDU(m.data, header=header).writeto(foreign)
    reused = MasterStore(tmp_path, reuse_foreign=True).existing(foreign, m.digest)
    assert reused is not None
    np.testing.assert_array_equal(reused.data, m.data)


def test_open_calibrated_on_the_night(night):
    night_dir, out = night
    ds = ad.open_calibrated(night_dir)
    raw = ad.open_stack(ad.scan_night(night_dir).select(ad.FrameType.SCIENCE))
    assert ds.sci.shape == raw.shape
    for coord in ("time", "mjd", "exptime", "filter", "kind"):
        np.testing.assert_array_equal(ds[coord].values, raw[coord].values)
    assert [p.split("/")[-1] for p in ds.raw.values] == [
        p.split("/")[-1] for p in raw.path.values]
    for i, path in enumerate(ds.path.values):
        _, sci, var, mask = read_calibrated(path)
        np.testing.assert_array_equal(ds.sci[i].values, sci)
        np.testing.assert_array_equal(ds["var"][i].values, var)
        np.testing.assert_array_equal(ds.mask[i].values, mask)
    assert ds.attrs["folder"] == str(out)


def _to_earlier_layout(path) -> None:
    """Rewrite a master as versions before issue 17 wrote it: image in PRIMARY."""
    with fits.open(path) as hdul:
        header = hdul[0].header.copy()
        data = hdul["SCI"].data.copy()
        rest = [h.copy() for h in hdul[2:]]
    for key in ("IMAGETYP", "BUNIT", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True)
    fits.HDUList([fits.PrimaryHDU(data, header=header), *rest]).writeto(path, overwrite=True)


def test_a_rerun_rebuilds_earlier_masters_and_redoes_their_frames(night, client, tmp_path):
    night_dir, _ = night
    first = calibrate_night(night_dir, client, SETTINGS, out=tmp_path)
    folder = output_dir(night_dir, tmp_path)
    masters = sorted(folder.glob("*_MASTER*.fits")) + sorted(folder.glob("*_MASK.fits"))
    assert len(masters) == 4
    first_bytes = {p: p.read_bytes() for p in masters}
    for p in masters:
        _to_earlier_layout(p)
        assert read_master(p).digest  # still ours, still readable
    # A master rebuilt within the same second as the first is the same file, bit for bit
    # (its DATE card has 1 s resolution), and its frames then rightly stand; a second
    # later, the rebuilt masters are other files and the frames must be redone.
    time.sleep(1.1)
    second = calibrate_night(night_dir, client, SETTINGS, out=tmp_path)
    assert all(p.read_bytes() != first_bytes[p] for p in masters)
    notes = second.details["masters"]["notes"]
    assert sum("earlier layout" in n for n in notes) == 4, notes
    for p in masters:
        with fits.open(p) as hdul:
            assert "SCI" in hdul and hdul[0].data is None
    assert second.counts["done"] == first.counts["done"] == SIM.n_science
    assert second.counts["skipped"] == 0  # made from rebuilt masters: redone
    third = calibrate_night(night_dir, client, SETTINGS, out=tmp_path)
    assert third.counts["skipped"] == SIM.n_science
    assert not [n for n in third.details["masters"]["notes"] if "earlier layout" in n]
