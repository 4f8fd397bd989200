"""A frame's filter from the keyword its camera writes (issue 29, real cameras): a Lowell
LOIS night's twilight flats name their filter only in FILTNAME, its science frames in
FILTER too; the V flat and the VR flats must make two groups, not one with no filter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.cli import main
from astep_dask.cli.commands import distinct_notes
from astep_dask.config import Settings
from astep_dask.io import layout
from astep_dask.io.headers import FILTER_KEYS, FrameType, filter_label, frame_filter
from astep_dask.io.index import RACY_NS, FileIndex
from astep_dask.io.layout import (
    READER_VERSION,
    known_record,
    read_record,
    remember_record,
    scan_night,
)
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.store import MasterPaths, no_flat_reason

NIGHT = "2019-03-25"
KEYS = ", ".join(FILTER_KEYS)


def _header(**cards) -> fits.Header:
    h = fits.Header()
    for key, value in cards.items():
        h[key] = value
    return h


@pytest.mark.parametrize(
    ("cards", "name", "key", "note"),
    [
        ({"FILTER": "V"}, "V", "FILTER", ""),
        ({"FILTNAME": "VR"}, "VR", "FILTNAME", ""),  # Lowell LOIS flats
        ({"FILTER": "VR", "FILTNAME": "VR"}, "VR", "FILTER", ""),  # agreeing: no note
        ({"FILTER": "  ", "FILTNAME": "V "}, "V", "FILTNAME", ""),  # blank is no filter
        ({"FILTERS": "dia v"}, "dia v", "FILTERS", ""),
        ({"WFFBAND": "r"}, "r", "WFFBAND", ""),
        ({"FILTER": 2}, "2", "FILTER", ""),  # a wheel position is a name too
        ({"FILTER": True, "FILTNAME": "B"}, "B", "FILTNAME", ""),  # a boolean names none
        ({"OBJECT": "x"}, "", "", ""),
        ({"FILTER": "R", "FILTNAME": "VR", "FILTERS": "R"}, "R", "FILTER",
         "filter keywords disagree: FILTER 'R' used, not FILTNAME 'VR'"),
    ],
)
def test_the_first_keyword_that_names_a_filter_wins(cards, name, key, note):
    reading = frame_filter(_header(**cards))
    assert (reading.name, reading.key, reading.note) == (name, key, note)


def test_filter_label():
    assert filter_label("VR") == "'VR'"
    assert filter_label("") == "(no filter)"


def _write(path: Path, **cards) -> Path:
    hdu = fits.PrimaryHDU(np.full((8, 10), 1000, np.uint16))
    for key, value in cards.items():
        hdu.header[key.replace("_", "-")] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu.writeto(path)
    return path


def _night(root: Path, flats: list[dict], science: list[dict]) -> Path:
    """A night laid out as the archive's: 3 bias and the science frames in CAMS, the
    flats in CAMS_SKYFLAT, each with the filter cards given."""
    night = root / NIGHT
    cams, sky = night / f"{NIGHT}-CAMS", night / f"{NIGHT}-CAMS_SKYFLAT"
    for i in range(3):
        _write(cams / f"b{i}.fits", IMAGETYP="BIAS", EXPTIME=0.0, FILTNAME="VR",
               DATE_OBS=f"2019-03-26T01:0{i}:00")
    for i, cards in enumerate(flats):
        _write(sky / f"f{i}.fits", IMAGETYP="SKYFLAT", EXPTIME=3.0,
               DATE_OBS=f"2019-03-26T02:{i:02d}:00", **cards)
    for i, cards in enumerate(science):
        _write(cams / f"s{i}.fits", IMAGETYP="OBJECT", EXPTIME=300.0,
               DATE_OBS=f"2019-03-26T03:{i:02d}:00", **cards)
    return night


def _lowell(root: Path) -> Path:
    """The real night's filter cards: 1 V flat and 4 VR flats with FILTNAME only, science
    frames with FILTER and FILTNAME."""
    return _night(root, [{"FILTNAME": "V"}] + [{"FILTNAME": "VR"}] * 4,
                  [{"FILTER": "VR", "FILTNAME": "VR"}] * 3)


def test_flats_named_by_filtname_make_one_group_per_filter(tmp_path):
    inv = scan_night(_lowell(tmp_path))
    assert all(f.usable for f in inv.frames)
    assert inv.filters(FrameType.FLAT) == ["V", "VR"]
    assert [len(inv.select(FrameType.FLAT, filter=f)) for f in ("V", "VR")] == [1, 4]
    assert inv.filters(FrameType.SCIENCE) == ["VR"]
    # the masters planned: a VR flat from its 4 frames (V has 1, fewer than min_frames 3)
    plan = MasterBuilder(inv, tmp_path / "out", Settings()).plan()
    flats = [(s.filter, len(s.records)) for s in plan if s.role == "flat"]
    assert flats == [("VR", 4)]
    notes = {text: n for text, n, _ in distinct_notes(inv)}
    assert notes["filter from FILTNAME (FILTER missing or blank)"] == 5  # the 5 flats
    assert not any("no filter keyword" in t for t in notes)


def test_flats_without_a_filter_are_noted_once_and_not_used(tmp_path, capsys):
    night = _night(tmp_path, [{}] * 3 + [{"FILTER": "VR"}],
                   [{"FILTER": "VR"}] * 2 + [{"FILTER": "B"}])
    inv = scan_night(night)
    assert inv.filters(FrameType.FLAT) == ["", "VR"]
    notes = {text: (n, ex) for text, n, ex in distinct_notes(inv)}
    assert notes[f"no filter keyword ({KEYS}): filter taken as (no filter)"] == (3, "f0.fits")
    assert notes["flats with no filter keyword are not used for the science frames' "
                 "filters 'B', 'VR'"] == (3, "f0.fits")
    main(["inspect", str(night)])
    out = capsys.readouterr().out
    assert out.count("no filter keyword") == 2  # one line per distinct note, with counts
    assert "are not used for the science frames' filters 'B', 'VR' (3 files, e.g. f0.fits)" \
        in out
    # bias frames are not matched by filter: no note on theirs
    assert all("filter" not in f.note for f in inv.select(FrameType.BIAS))


def test_science_without_a_filter_is_noted(tmp_path):
    inv = scan_night(_night(tmp_path, [{"FILTER": "V"}] * 3, [{}] * 2))
    notes = {text: n for text, n, _ in distinct_notes(inv)}
    assert notes["science frames with no filter keyword have no flat (flats for: 'V')"] == 2
    assert notes[f"no filter keyword ({KEYS}): filter taken as (no filter)"] == 2


def _paths(*filters: str) -> MasterPaths:
    return MasterPaths(bias=None, darks=(), mask=Path("m.fits"),
                       flats=tuple((f, Path(f"flat_{f}.fits")) for f in filters))


def test_no_flat_reason_names_the_flats_filters():
    # the real night's failure read "(flats for: none)" with a master flat for '' written
    assert no_flat_reason(_paths(""), "VR") == (
        "no master flat for filter 'VR' (flats for: (no filter)); flats with no filter "
        f"keyword ({KEYS}) are not used for filter 'VR'")
    assert no_flat_reason(_paths("", "V"), "VR", unfiltered=3) == (
        "no master flat for filter 'VR' (flats for: (no filter), 'V'); 3 flats have no "
        f"filter keyword ({KEYS}): they are not used for filter 'VR'")
    assert no_flat_reason(_paths("V"), "VR", unfiltered=1).endswith(
        f"1 flat has no filter keyword ({KEYS}): it is not used for filter 'VR'")
    assert no_flat_reason(_paths("V", "VR"), "") == (
        "no master flat for a frame with no filter (flats for: 'V', 'VR'); its header has "
        f"no filter keyword ({KEYS}): the flats of a filter are not used for it")
    assert no_flat_reason(_paths(), "B") == "no master flat for filter 'B' (flats for: none)"
    assert no_flat_reason(_paths("V"), "B") == "no master flat for filter 'B' (flats for: 'V')"


def _key(path: Path) -> tuple[int, int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def test_a_reading_by_earlier_rules_is_read_again(tmp_path):
    flat = _write(tmp_path / "f.fits", IMAGETYP="SKYFLAT", EXPTIME=3.0, FILTNAME="V",
                  DATE_OBS="2019-03-26T02:00:00")
    layout._RECORDS.clear()
    try:
        # What an earlier version read (FILTER only), as its index kept it: no reader.
        earlier = {**read_record(flat).to_dict(), "filter": "", "digest": ""}
        layout._RECORDS.clear()
        remember_record(flat, _key(flat), earlier)
        assert known_record(flat, _key(flat)) is None
        assert read_record(flat).filter == "V"
        kept = known_record(flat, _key(flat))
        assert kept is not None and kept["filter"] == "V" and kept["reader"] == READER_VERSION
        # A reading by this version's rules is used as it is (the header is not read).
        remember_record(flat, _key(flat), {**kept, "filter": "told"})
        assert read_record(flat).filter == "told"
    finally:
        layout._RECORDS.clear()


def test_the_night_index_keeps_this_versions_readings_only(tmp_path):
    flat = _write(tmp_path / "f.fits", IMAGETYP="SKYFLAT", EXPTIME=3.0, FILTNAME="V",
                  DATE_OBS="2019-03-26T02:00:00")
    st = os.stat(flat)
    layout._RECORDS.clear()
    try:
        read_record(flat)
        index = FileIndex()
        index.record(flat, st, "d" * 16, checked_ns=st.st_mtime_ns + 2 * RACY_NS)
        index.keep_records()
        manifest = {"files": index.to_manifest()}
        (entry,) = manifest["files"]["entries"].values()
        assert entry["record"]["filter"] == "V" and entry["record"]["reader"] == READER_VERSION
        layout._RECORDS.clear()
        FileIndex.from_manifest(manifest).seed()
        assert known_record(flat, _key(flat))["filter"] == "V"  # the next run reads nothing
        # an earlier version's index entry (no reader, filter read from FILTER only)
        del entry["record"]["reader"]
        entry["record"]["filter"] = ""
        layout._RECORDS.clear()
        FileIndex.from_manifest(manifest).seed()
        assert known_record(flat, _key(flat)) is None
        assert read_record(flat).filter == "V"
    finally:
        layout._RECORDS.clear()


def test_a_filter_named_only_in_filtname_is_the_products_filter(tmp_path):
    # a camera that writes FILTNAME only (Lowell LOIS): the calibrated frames carry the
    # filter under FILTER, where every reader of a product looks for it
    from distributed import Client, LocalCluster

    from astep_dask.run.night import calibrate_night
    from astep_dask.testing.simulate import SimConfig, simulate_night

    night = simulate_night(tmp_path / "root", SimConfig(size=48, n_science=2, n_darks=3,
                                                        n_flats=3, seed=41))
    for raw in night.rglob("*.fits"):
        with fits.open(raw, mode="update") as hdul:
            h = hdul[0].header
            if "FILTER" in h:
                h["FILTNAME"] = h["FILTER"]
                del h["FILTER"]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        res = calibrate_night(night, client, Settings(), out=tmp_path / "out")
    assert res.status == "complete", res.error
    cal = sorted((tmp_path / "out").rglob("*_CAL.fits"))
    assert len(cal) == 2
    assert all(fits.getheader(p)["FILTER"] == "RC" for p in cal)
