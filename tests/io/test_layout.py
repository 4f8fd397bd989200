"""Archive discovery, header classification and the inventory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.cli import EXIT_FAILED, EXIT_PARTIAL, main
from astep_dask.core.calibrate import Section
from astep_dask.errors import ArchiveError
from astep_dask.io.headers import FrameType, classify
from astep_dask.io.layout import find_nights, read_record, scan_night
from astep_dask.testing.simulate import BAD_FILES, BAD_FLATS, BAD_FRAMES


def _write(path: Path, **header) -> Path:
    hdu = fits.PrimaryHDU(np.zeros((8, 10), np.uint16))
    for k, v in header.items():
        hdu.header[k.replace("_", "-")] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path)
    return path


@pytest.mark.parametrize(
    ("header", "name", "kind"),
    [
        ({"ACQTYPE": "SCIENCE"}, "a.fits", FrameType.SCIENCE),
        ({"IMAGETYP": "Dark Frame"}, "a.fits", FrameType.DARK),
        ({"IMAGETYP": "FLAT"}, "a.fits", FrameType.FLAT),
        ({"ACQTYPE": "SKYFLAT"}, "a.fits", FrameType.FLAT),
        ({"IMAGETYP": "Bias Frame"}, "a.fits", FrameType.BIAS),
        ({"IMAGETYP": "LIGHT"}, "a.fits", FrameType.SCIENCE),
        ({}, "x_DARK.fits", FrameType.DARK),
        ({}, "x_SKYFLAT.fits.gz", FrameType.FLAT),
        ({}, "x_BIAS.fits", FrameType.BIAS),
        ({}, "plain.fits", FrameType.UNKNOWN),
        ({"ACQTYPE": "weird"}, "x_SCIENCE.fits", FrameType.SCIENCE),
    ],
)
def test_classify(header, name, kind):
    got, _ = classify(fits.Header(header), Path(name))
    assert got == kind


def test_header_beats_file_name_and_says_so():
    kind, note = classify(fits.Header({"ACQTYPE": "DARK"}), Path("f_SCIENCE.fits"))
    assert kind == FrameType.DARK
    assert "overrides file name" in note


def test_record_reads_header_facts(tmp_path):
    p = _write(tmp_path / "f_SCIENCE.fits", ACQTYPE="SCIENCE", EXPTIME=90.0, FILTER="RC",
               DATE_OBS="2026-06-15T20:00:00", GAIN=1.5, RDNOISE=9.0)
    rec = read_record(p)
    assert rec.usable, rec.problem
    assert rec.kind == FrameType.SCIENCE
    assert rec.exptime == 90.0 and rec.filter == "RC"
    assert rec.shape == (8, 10) and rec.bitpix == 16
    assert rec.mjd == pytest.approx(61206.8333333, abs=1e-6)
    assert rec.gain == 1.5 and rec.read_noise == 9.0


def test_science_without_time_is_unusable(tmp_path):
    p = _write(tmp_path / "f_SCIENCE.fits", ACQTYPE="SCIENCE", EXPTIME=90.0)
    assert read_record(p).problem == "no DATE-OBS or MJD-OBS"


def test_unknown_type_is_unusable(tmp_path):
    p = _write(tmp_path / "f.fits", EXPTIME=1.0)
    assert "unknown frame type" in read_record(p).problem


def test_section_round_trip():
    s = Section.from_fits("[1:2048, 3:100]")
    assert s.slices == (slice(2, 100), slice(0, 2048))
    assert Section.from_fits(s.to_fits()) == s
    with pytest.raises(ValueError):
        Section.from_fits("1:2,3:4")


def test_inventory_of_bad_night_names_every_bad_file(bad_night):
    inv = scan_night(bad_night)
    problems = {f.path.name: f.problem for f in inv.problems}
    assert set(problems) == set(BAD_FILES)
    for name, reason in BAD_FILES.items():
        assert reason in problems[name], (name, problems[name])
    good = [f for f in inv.frames if f.usable]
    assert {f.path.name for f in good if f.path.name.startswith("bad_")} == (
        set(BAD_FRAMES) | set(BAD_FLATS)
    )
    assert sum(f.path.name.endswith((".fits.gz", ".fits.fz")) for f in good) == 2
    kinds = {(f.folder, f.kind, f.exptime) for f in good}
    assert kinds == {
        ("CAMS", FrameType.SCIENCE, 90.0),
        ("CAMS", FrameType.DARK, 90.0),
        ("CAMS_SKYFLAT", FrameType.FLAT, 10.0),
        ("CAMS_SKYFLAT", FrameType.DARK, 10.0),
    }
    assert len(inv.select(FrameType.SCIENCE)) == 6 + len(BAD_FRAMES)
    assert len(inv.select(FrameType.FLAT)) == 7 + len(BAD_FLATS)
    assert len(inv.select(FrameType.DARK, exptime=10.0)) == 5


def test_inventory_read_by_threads_is_the_inventory_read_in_order(bad_night, monkeypatch):
    """The threads that read the files give the records of one reader, in the same order,
    bad files included, and leave the warning filters as they found them."""
    import warnings

    from astep_dask.io import layout, rawfiles

    filters = list(warnings.filters)
    monkeypatch.setattr(layout, "INVENTORY_THREADS", 8)
    monkeypatch.setattr(layout.os, "sched_getaffinity", lambda _: set(range(8)))
    assert layout.inventory_threads() == 8
    rawfiles._CONTENT.clear()  # nothing known from earlier tests: every file read
    layout._RECORDS.clear()
    threaded = scan_night(bad_night)
    assert warnings.filters == filters
    rawfiles._CONTENT.clear()  # read again, by one thread
    layout._RECORDS.clear()
    monkeypatch.setattr(layout, "INVENTORY_THREADS", 1)
    assert layout.inventory_threads() == 1
    one = scan_night(bad_night)
    assert [f.path for f in one.frames] == [f.path for f in threaded.frames]
    assert repr(one) == repr(threaded)  # NaN fields (no date, no exposure) equal as text


def test_scan_never_modifies_files(bad_night):
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in bad_night.rglob("*.fits*")}
    scan_night(bad_night)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in bad_night.rglob("*.fits*")}
    assert before == after


def test_find_nights(small_night, tmp_path):
    assert find_nights(small_night) == [small_night]
    assert find_nights(small_night.parent) == [small_night]
    with pytest.raises(ArchiveError, match="no such"):
        find_nights(tmp_path / "missing")
    with pytest.raises(ArchiveError, match="no archive night"):
        find_nights(tmp_path)


def test_inspect_cli(bad_night, capsys):
    assert main(["inspect", str(bad_night)]) == EXIT_PARTIAL  # unusable files listed
    out = capsys.readouterr().out
    assert f"unusable files ({len(BAD_FILES)})" in out
    for name in BAD_FILES:
        assert name in out
    assert main(["inspect", "--json", str(bad_night)]) == EXIT_PARTIAL
    data = json.loads(capsys.readouterr().out)
    assert data[0]["n_usable"] == 6 + 5 + 5 + 7 + len(BAD_FRAMES) + len(BAD_FLATS)
    assert len(data[0]["problems"]) == len(BAD_FILES)


def test_inspect_cli_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1
    night = tmp_path / "2026-01-01" / "2026-01-01-CAMS"
    night.mkdir(parents=True)
    assert main(["inspect", str(night.parent)]) == EXIT_FAILED
    assert "no usable FITS frame" in capsys.readouterr().err


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    p = _write(tmp_path / "f_DARK.fits", EXPTIME=1.0)
    import os

    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(p)
                        else real(path, mode))
    assert read_record(p).problem == "not readable (permissions)"
