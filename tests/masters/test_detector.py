"""Gain and read noise measured from the night itself (masters.detector), on simulated
nights whose headers give none, against the simulator's truth."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import dask
import numpy as np
import pytest
from astropy.io import fits

from astep_dask.config import Settings
from astep_dask.errors import CalibrationError
from astep_dask.io.layout import detector_values, scan_night
from astep_dask.io.products import MANIFEST, output_dir
from astep_dask.masters import detector as mdet
from astep_dask.masters.detector import measure_detector, night_detector
from astep_dask.run.night import calibrate_night
from astep_dask.run.plan import plan_night
from astep_dask.testing.simulate import SimConfig, load_truth, simulate_night

BARE = SimConfig(size=256, n_science=2, n_darks=4, n_flats=6, movers=(),
                 omit_keys=("GAIN", "RDNOISE"), seed=5)
SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """Nights without GAIN and RDNOISE at three gains (the read noise is 10 e-)."""
    root = tmp_path_factory.mktemp("bare")
    return {g: simulate_night(root / f"g{g}", replace(BARE, gain=g)) for g in (0.5, 1.5, 4.0)}


@pytest.mark.parametrize("gain", [0.5, 1.5, 4.0])
def test_measured_within_3_percent_of_truth(nights, gain):
    inv = scan_night(nights[gain])
    assert all(f.gain is None and f.read_noise is None for f in inv.frames)
    with dask.config.set(scheduler="threads"):
        m = measure_detector(inv, Settings())
    truth = load_truth(nights[gain]).config
    assert m.gain == pytest.approx(truth.gain, rel=0.03)
    assert m.read_noise_adu * m.gain == pytest.approx(truth.read_noise, rel=0.03)
    assert m.gain_method == "flat pairs, 3 pairs"
    assert m.read_noise_method == "dark (10 s) pairs, 2 pairs"
    assert json.loads(json.dumps(m.to_dict(), allow_nan=False)) == m.to_dict()  # manifest


def test_night_calibrated_with_measured_gain(nights, client, tmp_path):
    """The whole run: every product says where its gain came from, the manifest holds the
    measurement, and the electrons are right (sky of the truth)."""
    night = nights[4.0]
    before = plan_night(night, SETTINGS, out=tmp_path).detector
    assert before["action"] == "measure" and len(before["files"]) == 10  # 6 flats, 4 darks
    n_frames = BARE.n_science + 2 * BARE.n_darks + BARE.n_flats  # none has a GAIN card
    assert f"used by {n_frames} frame(s) whose headers give none" in before["reason"]
    result = calibrate_night(night, client, SETTINGS, out=tmp_path)
    assert result.status == "complete", result.error
    after = plan_night(night, SETTINGS, out=tmp_path)
    assert after.detector["action"] == "reuse"  # the manifest holds it: nothing read
    assert "reuse     gain and read noise: measured from the same frames" in after.text()
    folder = output_dir(night, tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["detector"]["gain"] == pytest.approx(4.0, rel=0.03)
    cfg = load_truth(night).config
    cals = sorted(folder.glob("*_CAL.fits"))
    assert len(cals) == cfg.n_science
    for path in cals:
        with fits.open(path) as hdul:
            h = hdul[0].header
            assert h["GAINSRC"] == "flat pairs, 3 pairs"
            assert h["RDNSRC"] == "dark (10 s) pairs, 2 pairs"
            assert h["GAIN"] == pytest.approx(4.0, rel=0.03)
            assert h["RDNOISE"] == pytest.approx(cfg.read_noise, rel=0.03)
            sky = np.median(hdul["SCI"].data[hdul["MASK"].data == 0])
            assert sky == pytest.approx(cfg.sky + cfg.dark_rate * cfg.science_exptime,
                                        rel=0.03)


def test_rerun_reuses_the_measurement(nights, monkeypatch):
    """Same frames, same method: the earlier manifest's measurement, no frame read."""
    inv = scan_night(nights[1.5])
    with dask.config.set(scheduler="threads"):
        first = measure_detector(inv, Settings())

    def no_read(*args, **kwargs):
        raise AssertionError("a frame was read")

    monkeypatch.setattr(mdet, "_region", no_read)
    again = measure_detector(inv, Settings(), previous=first.to_dict())
    assert again == first
    with pytest.raises(AssertionError, match="a frame was read"):  # another key: measured
        with dask.config.set(scheduler="threads"):
            measure_detector(inv, Settings(), previous={**first.to_dict(), "key": "x"})


def test_header_then_setting_then_measurement(nights):
    with dask.config.set(scheduler="threads"):
        inv, details = night_detector(scan_night(nights[1.5]), Settings())
    rec = inv.select()[0]
    measured = detector_values(rec, Settings().detector)
    assert measured.source("gain") == details["gain_method"] == "flat pairs, 3 pairs"
    assert measured.read_noise == pytest.approx(details["read_noise_adu"] * measured.gain)
    given = Settings().replace(detector={"gain": 2.0, "read_noise": 7.0})
    from_setting = detector_values(rec, given.detector)
    assert (from_setting.gain, from_setting.source("gain")) == (2.0, "setting")
    assert (from_setting.read_noise, from_setting.source("read_noise")) == (7.0, "setting")
    header = detector_values(replace(rec, gain=1.2, read_noise=9.0), given.detector)
    assert (header.gain, header.source("gain"), header.read_noise) == (1.2, "header", 9.0)


def test_header_that_disagrees_is_noted(nights):
    """A header GAIN 20 % from what the flats measure is used, and noted; one within
    10 % is not noted."""
    inv = scan_night(nights[1.5])
    # RDNOISE 12 e- agrees with the read noise measured in ADU times the header's gain.
    off = replace(inv, frames=[replace(f, gain=1.8, read_noise=12.0) for f in inv.frames])
    with dask.config.set(scheduler="threads"):
        _, details = night_detector(off, Settings())
    assert len(details["header_notes"]) == 1
    assert "GAIN 1.8 e-/ADU of the headers differs" in details["header_notes"][0]
    assert "-17 %" in details["header_notes"][0]
    near = replace(inv, frames=[replace(f, gain=1.55, read_noise=10.2) for f in inv.frames])
    with dask.config.set(scheduler="threads"):
        _, details = night_detector(near, Settings())
    assert details["header_notes"] == []


def test_no_gain_anywhere_is_refused(tmp_path, client):
    """No GAIN in the headers, no setting, no flats: the night is refused with one line
    naming the setting; given the setting, it is not."""
    night = simulate_night(tmp_path / "raw", replace(BARE, size=64, n_flats=0,
                                                     omit_keys=("GAIN",)))
    inv = scan_night(night)
    planned = plan_night(night, SETTINGS, out=tmp_path / "out").detector
    assert planned["action"] == "refuse" and "[detector] gain = <e-/ADU>" in planned["reason"]
    with pytest.raises(CalibrationError, match=r"give \[detector\] gain = <e-/ADU>"):
        with dask.config.set(scheduler="threads"):
            night_detector(inv, Settings())
    result = calibrate_night(night, client, SETTINGS, out=tmp_path / "out")
    assert result.status == "failed"
    assert "no gain for" in result.error and "[detector] gain" in result.error
    assert "\n" not in result.error
    assert not list(output_dir(night, tmp_path / "out").glob("*_CAL.fits"))
    given = Settings().replace(detector={"gain": 1.5})
    with dask.config.set(scheduler="threads"):
        inv2, _ = night_detector(inv, given)
    assert detector_values(inv2.select()[0], given.detector).source("gain") == "setting"


def test_a_frame_gone_since_the_scan_costs_only_its_pair(nights, tmp_path):
    """A flat removed between the scan and the measurement: its pair is not used (and
    says why), the others still measure the gain."""
    night = tmp_path / nights[1.5].name
    shutil.copytree(nights[1.5], night)
    inv = scan_night(night)
    first_flat = sorted(night.rglob("*_SKYFLAT.fits"))[0]
    first_flat.unlink()
    with dask.config.set(scheduler="threads"):
        m = measure_detector(inv, Settings())
    unused = [p for p in m.pairs if "unused" in p]
    assert len(unused) == 1 and unused[0]["unused"].startswith(f"cannot read {first_flat.name}")
    assert m.gain_method == "flat pairs, 2 pairs"
    assert m.gain == pytest.approx(1.5, rel=0.03)


@pytest.mark.parametrize(("extra", "method"), [
    ({"n_bias": 4}, "bias pairs, 2 pairs"),  # bias frames: the read noise from them
    ({"overscan": 8}, "dark (10 s) pairs, 2 pairs"),  # trimmed data, overscan subtracted
])
def test_bias_frames_and_overscan(tmp_path, extra, method):
    cfg = replace(BARE, gain=2.5, **extra)
    night = simulate_night(tmp_path, cfg)
    with dask.config.set(scheduler="threads"):
        m = measure_detector(scan_night(night), Settings())
    assert m.read_noise_method == method
    assert m.gain == pytest.approx(cfg.gain, rel=0.03)
    assert m.read_noise_adu * m.gain == pytest.approx(cfg.read_noise, rel=0.03)
