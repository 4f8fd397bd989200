"""Plausible ranges of the detector values a header gives (issue 30, item 8): a GAIN of
1e-300 or 1e6 makes the frame unusable with a named reason, never absurd electrons."""

from __future__ import annotations

import pytest
from astropy.io import fits

from astep_dask.config import Settings, load_settings
from astep_dask.errors import SettingsError
from astep_dask.io.headers import FrameType, value_problems
from astep_dask.io.layout import scan_night
from astep_dask.testing.simulate import SimConfig, simulate_night


def _header(**cards) -> fits.Header:
    h = fits.Header()
    h["EXPTIME"] = 90.0
    h["GAIN"], h["RDNOISE"], h["SATURATE"] = 1.5, 10.0, 65535.0
    for key, value in cards.items():
        h[key] = value
    return h


@pytest.mark.parametrize(
    ("cards", "reason"),
    [
        ({"GAIN": 1e-300}, "implausible GAIN 1e-300 e-/ADU (a plausible value lies between "
                           "0.01 and 100)"),
        ({"GAIN": 1e6}, "implausible GAIN 1e+06 e-/ADU"),
        ({"EGAIN": 1e6, "GAIN": None}, "implausible EGAIN 1e+06 e-/ADU"),
        ({"RDNOISE": 1e5}, "implausible RDNOISE 100000 e- (a plausible value lies between "
                           "0 and 1000)"),
        ({"SATURATE": 1e-3}, "implausible SATURATE 0.001 ADU"),
        ({"SATURATE": 1e12}, "implausible SATURATE 1e+12 ADU"),
    ],
)
def test_implausible_values_are_named(cards, reason):
    header = _header()
    for key, value in cards.items():
        if value is None:
            del header[key]
        else:
            header[key] = value
    problem, _ = value_problems(header, FrameType.SCIENCE)
    assert problem.startswith(reason)


def test_plausible_values_pass():
    for cards in ({"GAIN": 0.01}, {"GAIN": 100.0}, {"RDNOISE": 0.0}, {"SATURATE": 4095.0}):
        assert value_problems(_header(**cards), FrameType.SCIENCE)[0] == ""


def test_frames_with_absurd_gain_are_unusable(tmp_path):
    night = simulate_night(tmp_path, SimConfig(size=32, n_science=3, n_darks=2, n_flats=2))
    science = sorted(night.rglob("*_SCIENCE.fits"))
    for path, gain in zip(science[:2], (1e-300, 1e6), strict=True):
        with fits.open(path, mode="update") as hdul:
            hdul[0].header["GAIN"] = gain
    records = {f.path: f for f in scan_night(night).frames}
    assert "implausible GAIN 1e-300" in records[science[0]].problem
    assert "implausible GAIN 1e+06" in records[science[1]].problem
    assert records[science[2]].usable


def test_detector_settings_not_given_by_default(tmp_path):
    det = Settings().detector
    assert det.gain is None and det.read_noise is None
    path = tmp_path / "s.toml"
    path.write_text("[detector]\ngain = 1e6\n")
    with pytest.raises(SettingsError, match=r"\[detector\] gain = 1000000.0: must be between"):
        load_settings(path)
    path.write_text("[detector]\ngain = 2.5\nread_noise = 6.0\n")
    assert load_settings(path).detector.gain == 2.5
