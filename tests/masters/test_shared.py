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
    PlaneChanged,
    load_shared,
    make_shared_folder,
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


def _fresh(shared):
    """The planes as a new worker process would see them (nothing mapped yet)."""
    from astep_dask.masters import shared as module
    module._mapped.cache_clear()
    module._refused.clear()
    return shared


def test_a_truncated_or_replaced_plane_is_never_mapped(built, tmp_path):
    inv, masters, digest, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    shared = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path, digest)
    flat = shared.path("flat")
    whole = flat.read_bytes()
    flat.write_bytes(whole[: len(whole) // 2])  # mapped, it would kill the worker (SIGBUS)
    with pytest.raises(PlaneChanged, match="bytes"):
        load_shared(_fresh(shared))
    spoiled = bytearray(whole)
    spoiled[-4:] = np.float32(7.0).tobytes()  # same size, another flat value
    flat.write_bytes(bytes(spoiled))
    with pytest.raises(PlaneChanged, match="changed since it was written"):
        load_shared(_fresh(shared))


def test_a_plane_rewritten_while_mapped_is_not_used_for_the_next_frame(built, tmp_path):
    inv, masters, digest, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    shared = share_frame_masters(masters, rec.exptime, rec.filter, tmp_path / "sh", digest)
    job = FrameJob(rec, tmp_path / "a_CAL.fits", masters, "p", SETTINGS, True, _fresh(shared))
    assert process_frame(job)["status"] == "done"
    dark = shared.path("dark")
    values = np.load(dark)
    dark.unlink()  # replaced under the same name: what the mapped file no longer is
    np.save(dark, values + np.float32(100))
    with pytest.raises(PlaneChanged, match="replaced or rewritten during the run"):
        load_shared(shared)
    # refused for the rest of the run: a later frame does not hash the planes again
    dark.unlink()
    with pytest.raises(PlaneChanged, match="replaced or rewritten during the run"):
        load_shared(shared)
    np.save(dark, values + np.float32(100))
    # The frame is made from the master files instead: the numbers of the first frame.
    again = dataclasses.replace(job, output=tmp_path / "b_CAL.fits")
    assert process_frame(again)["status"] == "done"
    with fits.open(job.output) as one, fits.open(again.output) as two:
        assert np.array_equal(one["SCI"].data, two["SCI"].data, equal_nan=True)


def test_a_master_changed_after_the_plan_fails_its_frames_with_the_reason(built, tmp_path):
    inv, masters, _, _ = built
    rec = inv.select(FrameType.SCIENCE)[0]
    copies = tmp_path / "masters"
    copies.mkdir()
    flat_path = dict(masters.flats)[rec.filter]
    copy = copies / flat_path.name
    copy.write_bytes(flat_path.read_bytes())
    planned = dict(masters.digests())
    mine = dataclasses.replace(masters, flats=((rec.filter, copy),),
                               expect=tuple(sorted(planned.items())))
    job = FrameJob(rec, tmp_path / "a_CAL.fits", mine, "p", SETTINGS, True)
    assert process_frame(job)["status"] == "done"  # the master the run planned with
    with fits.open(copy, mode="update") as hdul:  # then rewritten, valid FITS
        hdul["SCI"].data[0, 0] *= 2
    row = process_frame(dataclasses.replace(job, output=tmp_path / "b_CAL.fits"))
    assert row["status"] == "failed", row
    assert f"master {copy.name} changed since the run planned with it" in row["reason"]
    assert not (tmp_path / "b_CAL.fits").exists()


def test_a_symlink_in_place_of_the_planes_folder_is_removed_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    folder = tmp_path / "night" / ".frame-masters"
    folder.parent.mkdir()
    folder.symlink_to(victim, target_is_directory=True)
    made = make_shared_folder(folder)
    assert made.is_dir() and not made.is_symlink()
    assert (made.stat().st_mode & 0o777) == 0o700
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    folder.rmdir()
    folder.symlink_to(victim, target_is_directory=True)
    remove_shared(folder)
    assert not folder.exists() and (victim / "keep.txt").read_text() == "precious"
