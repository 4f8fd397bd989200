"""The illumination master of a simulated night: built from its science frames, written
with its provenance, reused, switched off, taken from another night, applied to frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.config import Settings
from astep_dask.io.fitsio import verify_file
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.provenance import frame_provenance
from astep_dask.masters.builder import MasterBuilder, frame_needs
from astep_dask.masters.store import (
    Master,
    corrected_flat,
    frame_masters,
    read_master,
    write_master,
)
from astep_dask.report.graph import collapse, night_graph
from astep_dask.report.night import night_report
from astep_dask.run.frames import FrameJob, process_frame
from astep_dask.testing.simulate import SimConfig, load_truth, simulate_night

# 256², 24 science frames whose sky has its own 0.5 % gradient turning through the night.
CFG = SimConfig(size=256, n_science=24, n_darks=5, n_flats=7, cr_per_mpix=30.0,
                sky_gradient=0.005, seed=11)
SET = Settings().replace(illum={"min_frames": 10})


def plane_rms(ratio: np.ndarray, good: np.ndarray) -> float:
    """rms of the plane fitted to ``ratio`` over ``good`` pixels, relative to its mean:
    the large-scale error of a flat (issue 18's measure)."""
    yy, xx = np.nonzero(good)
    a = np.column_stack([np.ones(yy.size), xx, yy])
    coef = np.linalg.lstsq(a, ratio[good], rcond=None)[0]
    plane = a @ coef
    return float(np.std(plane) / np.mean(plane))


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    return simulate_night(tmp_path_factory.mktemp("illum_archive"), CFG)


@pytest.fixture(scope="module")
def built(night, tmp_path_factory):
    out = tmp_path_factory.mktemp("illum_out") / CFG.date
    builder = MasterBuilder(scan_night(night), out, SET)
    return builder.build(), builder, out


def test_illumination_master_and_its_provenance(built):
    paths, builder, _ = built
    (filt, path), = paths.illums
    assert filt == "RC" and path.name == f"{CFG.date}_ILLUM_RC.fits"
    assert path.name in builder.report.built
    assert verify_file(path) is None
    with fits.open(path) as hdul:
        h = hdul[0].header
        assert h["MASTTYPE"] == "ILLUM" and h["ADHASH"]
        assert h["ILLFLAT"] == paths.flats[0][1].name
        assert h["NCOMBINE"] + h["NREJECT"] == CFG.n_science
        assert h["NCOMBINE"] >= CFG.n_science - 2  # no cloud, no dawn: (nearly) all used
        inputs = hdul["INPUTS"].data
        assert len(inputs) == CFG.n_science and inputs["USED"].sum() == h["NCOMBINE"]
    summary = builder.report.illum["RC"]
    assert summary["file"] == path.name and summary["frames"] == h["NCOMBINE"]
    # The simulated twilight gradient: 1.5 % (±20 %) along 0.6 rad, so ~1.2-1.9 % peak to
    # peak over the field.
    assert 0.01 < summary["amplitude"] < 0.025


def test_corrected_flat_loses_the_twilight_gradient(built, night):
    paths, _, _ = built
    truth = load_truth(night)
    mask = read_master(paths.mask).data
    good = (mask == 0) & ~truth.dead
    master = read_master(paths.flats[0][1]).data
    corrected, _ = corrected_flat(paths.flats[0][1], paths.mask, paths.illums[0][1])
    before = plane_rms(master / truth.flat, good)
    after = plane_rms(corrected / truth.flat, good)
    assert before > 0.003  # the twilight gradient is there ...
    assert after < 0.001 and after < before / 4, (before, after)  # ... and then it is not
    assert np.median(corrected[good]) == pytest.approx(1, abs=1e-6)


def test_reused_switched_off_and_fallback(built, night, tmp_path):
    paths, _, out = built
    again = MasterBuilder(scan_night(night), out, SET)
    assert again.build() == paths
    assert paths.illums[0][1].name in again.report.reused and not again.report.built
    off = MasterBuilder(scan_night(night), tmp_path / "off",
                        SET.replace(illum={"enabled": False})).build()
    assert off.illums == ()
    few = SET.replace(illum={"min_frames": 100})
    alone = MasterBuilder(scan_night(night), tmp_path / "few", few)
    assert alone.build().illums == ()
    assert any("illumination RC" in n and "need 100" in n for n in alone.report.notes)
    # Another night's correction stands in, and says so. That night's twilight had
    # another gradient: its flat (beside its correction) is this one times a plane, and its
    # correction corrects it; fitted to this night's flat through the ratio of the flats,
    # it corrects this night's as well as this night's own correction does.
    other = tmp_path / "other"
    other.mkdir()
    flat_here = read_master(paths.flats[0][1])
    own = read_master(paths.illums[0][1])
    n = CFG.size
    tilt = (1 + 0.01 * (np.arange(n) / n - 0.5))[None, :] * np.ones((n, 1), np.float32)
    flat_there = Master("flat", flat_here.data * tilt, None, None, "x", {"FILTER": ("RC", "")})
    write_master(flat_there, other / "2026-06-14_MASTERFLAT_RC.fits")
    there = Master("illum", own.data * tilt, None, None, "y",
                   {"FILTER": ("RC", ""), "ILLFLAT": ("2026-06-14_MASTERFLAT_RC.fits", "")})
    write_master(there, other / "2026-06-14_ILLUM_RC.fits")
    fb = MasterBuilder(scan_night(night), tmp_path / "fb", few, fallbacks=[other])
    fb_paths = fb.build()
    (_, fb_path), = fb_paths.illums
    assert fb_path.name == f"{CFG.date}_ILLUM_RC.fits"
    h = fits.getheader(fb_path)
    assert h["FALLBACK"] == "2026-06-14_ILLUM_RC.fits"
    assert h["ILLXFER"] == "2026-06-14_MASTERFLAT_RC.fits"
    assert any("too few usable science frames" in n for n in fb.report.notes)
    got = fits.getdata(fb_path)
    good = read_master(paths.mask).data == 0
    # As good as this night's own: the 1 % tilt of the other night is gone.
    assert plane_rms(got / own.data, good) < 2e-4
    assert plane_rms(there.data / own.data, good) > 2e-3


def test_frames_are_calibrated_with_the_corrected_flat(built, night):
    paths, _, out = built
    fm, cards = frame_masters(paths, CFG.science_exptime, "RC")
    assert cards["MILLUM"][0] == paths.illums[0][1].name
    assert cards["MILLUMH"][0] == fits.getheader(paths.illums[0][1])["ADHASH"]
    flat = read_master(paths.flats[0][1]).data
    illum = read_master(paths.illums[0][1]).data
    mask = read_master(paths.mask).data
    expected = flat / illum
    expected /= np.median(expected[mask == 0])
    np.testing.assert_allclose(fm.flat, expected, rtol=1e-5)
    rec = scan_night(night).select(FrameType.SCIENCE)[0]
    job = FrameJob(rec, out / "one_CAL.fits", paths,
                   frame_provenance(rec, "x", SET), SET)
    row = process_frame(job)
    assert row["status"] == "done"
    h = fits.getheader(out / "one_CAL.fits")
    assert h["MILLUM"] == paths.illums[0][1].name and h["MFLAT"] == paths.flats[0][1].name


def test_report_shows_the_correction(built, night):
    paths, _, out = built
    for rec in scan_night(night).select(FrameType.SCIENCE)[:2]:
        process_frame(FrameJob(rec, out / f"{rec.path.stem}_CAL.fits", paths,
                               frame_provenance(rec, "x", SET), SET))
    result = night_report(night, out=out.parent)
    report = json.loads(result.details["qa_json"].read_text())
    illum = {m["label"]: m for m in report["masters"]}["illum RC"]
    header = fits.getheader(paths.illums[0][1])
    assert illum["amplitude"] == pytest.approx(header["ILLAMP"])
    assert illum["ncombine"] == header["NCOMBINE"]
    assert report["summary"]["illum_amplitude"] == {"RC": pytest.approx(header["ILLAMP"])}
    assert (result.out_dir / report["plots"]["illum RC"]).stat().st_size > 10_000
    html = result.details["index"].read_text()
    assert "Illumination correction RC" in html and report["plots"]["illum RC"] in html


def test_plan_and_flow_chart_name_it(built, night):
    paths, _, _ = built
    inv = scan_night(night)
    steps = MasterBuilder(inv, paths.mask.parent, SET).plan()
    assert [s.role for s in steps] == ["dark", "dark", "flat", "mask", "illum"]
    illum = steps[-1]
    assert illum.name == paths.illums[0][1].name
    assert {paths.flats[0][1].name, paths.mask.name} <= set(illum.needs)
    assert len(illum.records) == CFG.n_science
    rec = inv.select(FrameType.SCIENCE)[0]
    assert illum.name in frame_needs(steps, rec.exptime, rec.filter)
    g = night_graph(inv, SET)
    flow = collapse(g.dependencies, g.stage_of, g.stages, g.file_edges, g.night)
    assert flow.stages["read illum RC"].tasks == CFG.n_science
    assert f"file {illum.name}" in flow.stages
    off = MasterBuilder(inv, paths.mask.parent, SET.replace(illum={"enabled": False}))
    assert "illum" not in [s.role for s in off.plan()]
