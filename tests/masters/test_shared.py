"""The planes a frame needs, made once per run and memory-mapped by the workers
(issue 16): the same numbers as each worker making its own, read-only, no master kept in
the process that made them, a fallback when a worker cannot see them, and the frames of
an exposure time that cannot be calibrated failed up front with the reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.config import Settings
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.provenance import digest_of
from astep_dask.masters import store
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.shared import (
    PLANES,
    load_shared,
    remove_shared,
    share_frame_masters,
)
from astep_dask.masters.store import MasterPaths, frame_masters
from astep_dask.run.frames import FrameJob, process_frame, share_masters

SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})


@pytest.fixture(scope="module")
def built(small_night, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / small_night.name
    inv = scan_night(small_night)
    masters = MasterBuilder(inv, out, SETTINGS).build()
    digest = digest_of(sorted(masters.digests().items()))
    return inv, masters, digest, out


def test_shared_planes_are_the_masters_planes_read_only(built, tmp_path):
    inv, masters, digest, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    expected, cards = frame_masters(masters, rec.exptime, rec.filter)
    store._load.cache_clear()
    shared = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path, digest)
    # The task that made them keeps no master in its process: the workers map the planes.
    assert store._load.cache_info().currsize == 0
    got, got_cards = load_shared(shared)
    assert got_cards == cards
    for plane in PLANES:
        a, b = getattr(got, plane), getattr(expected, plane)
        assert isinstance(a, np.memmap) and not a.flags.writeable
        assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), plane
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{shared.key}-{plane}.npy" for plane in PLANES)


def test_planes_of_other_masters_or_exposures_have_other_names(built, tmp_path):
    inv, masters, digest, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    a = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path, digest)
    b = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path, "another digest")
    flat_et = inv.exptimes(FrameType.FLAT)[0]
    c = share_frame_masters(masters, flat_et, rec.filter, tmp_path, digest)
    assert len({a.key, b.key, c.key}) == 3
    # The dark of another exposure time is another plane.
    assert not np.array_equal(load_shared(a)[0].dark, load_shared(c)[0].dark)


def test_a_worker_that_cannot_see_the_planes_makes_its_own(built, tmp_path):
    inv, masters, digest, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    shared = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path / "sh", digest)
    job = FrameJob(rec, tmp_path / "a_CAL.fits", masters, "p", SETTINGS, True, shared)
    assert process_frame(job)["status"] == "done"
    remove_shared(tmp_path / "sh")
    assert not (tmp_path / "sh").exists()
    moved = dataclasses.replace(shared, folder=tmp_path / "elsewhere")
    again = dataclasses.replace(job, output=tmp_path / "b_CAL.fits", shared=moved)
    assert process_frame(again)["status"] == "done"
    with fits.open(job.output) as one, fits.open(again.output) as two:
        for ext in ("SCI", "VAR", "MASK"):
            assert np.array_equal(one[ext].data, two[ext].data, equal_nan=True), ext
        assert one[0].header["MFLAT"] == two[0].header["MFLAT"]


def test_frames_whose_dark_cannot_be_made_get_the_reason(built, client, tmp_path):
    inv, masters, digest, _ = built
    flat_et = inv.exptimes(FrameType.FLAT)[0]
    # Only the flats' dark and no bias: a 90 s frame's dark cannot be scaled from it.
    only = MasterPaths(bias=None, darks=tuple((et, p) for et, p in masters.darks
                                              if et == flat_et),
                       flats=masters.flats, mask=masters.mask, illums=masters.illums)
    recs = inv.select(FrameType.SCIENCE)
    jobs = [FrameJob(r, tmp_path / f"{i}_CAL.fits", only, "p", SETTINGS) for i, r in
            enumerate(recs)]
    shared, reasons = share_masters(client, only, jobs, tmp_path / "sh", digest)
    assert shared == {}
    assert list(reasons) == [(recs[0].exptime, recs[0].filter)]
    assert "none can be scaled" in reasons[(recs[0].exptime, recs[0].filter)]
    # With the darks of both exposure times, one set of planes for the science frames.
    shared, reasons = share_masters(client, masters, jobs, tmp_path / "sh", digest)
    assert reasons == {} and list(shared) == [(recs[0].exptime, recs[0].filter)]
    assert Path(shared[(recs[0].exptime, recs[0].filter)].path("dark")).exists()
