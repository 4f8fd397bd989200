"""Per-night QA report (issue 8) and the flow chart: bad frames injected into a simulated
night are flagged with the right reason and no good frame is; the report's figures agree
with the simulation's truth; every plot and the HTML page are written."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy import ndimage

from astep_dask import report as qa
from astep_dask.config import QaSettings, Settings
from astep_dask.core.bits import Bit, flag
from astep_dask.core.register import STAR_DTYPE
from astep_dask.errors import RunError
from astep_dask.io.fitsio import atomic_write, calibrated_hdul
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.products import QA_JSON, REPORT_INDEX, output_dir
from astep_dask.report.graph import collapse, flow_chart, flow_graph, layers, night_graph, to_dot
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night

SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})
# 12 frames of 256², a realistic cosmic-ray rate.
SIM = SimConfig(size=256, n_science=12, n_darks=5, n_flats=7, seed=11)


# --------------------------------------------------------------------------- injection


def cloud(model: np.ndarray, cfg: SimConfig) -> np.ndarray:
    """A cloud: sky and stars three times fainter."""
    return model / 3.0


def defocus(model: np.ndarray, cfg: SimConfig, blur: float = 2.0) -> np.ndarray:
    """Out of focus: the stars (not the flat sky) blurred by a Gaussian of ``blur`` px."""
    return cfg.sky + ndimage.gaussian_filter(model - cfg.sky, blur)


def trail(model: np.ndarray, cfg: SimConfig, peak: float = 80.0, width: float = 1.3,
          angle: float = 25.0) -> np.ndarray:
    """A satellite trail across the frame: a Gaussian line profile of ``peak`` e- (about
    3 sky sigmas) and ``width`` px, at ``angle`` degrees from +x."""
    n = model.shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    a = np.radians(angle)
    d = (xx - 0.3 * n) * np.sin(a) - (yy - 0.2 * n) * np.cos(a)
    return model + peak * np.exp(-0.5 * (d / width) ** 2)


INJECTIONS = {"cloud": cloud, "trail": trail, "defocus": defocus}


def rewrite_frame(night: Path, name: str, change, rng: np.random.Generator) -> None:
    """Expose a raw science frame of a simulated night again from its truth, with its
    noiseless signal changed by ``change(model, cfg)``: the same camera model as the
    simulator (flat, dark current, Poisson, the frame's cosmic rays, read noise, bias,
    16-bit ADU) and the same header."""
    truth = load_truth(night)
    cfg = truth.config
    path = night / f"{night.name}-CAMS" / name
    frame = load_frame_truth(night, name.removesuffix(".fits"))
    model = change(frame["model"].astype(np.float64), cfg)
    e = rng.poisson(truth.flat * model + truth.dark_rate * cfg.science_exptime).astype(float)
    e += frame["cr"] + rng.normal(0.0, cfg.read_noise, e.shape)
    adu = np.clip(np.rint(e / cfg.gain + truth.bias), 0, 65535).astype(np.uint16)
    header = fits.getheader(path)
    fits.PrimaryHDU(adu, header=header).writeto(path, overwrite=True)


def inject_bad_frames(night: Path, dest: Path, seed: int = 7) -> tuple[Path, dict[str, str]]:
    """Copy a simulated night under ``dest`` and, in the copy only, turn three science
    frames into a cloudy, a trailed and a defocused one. Returns the copy and
    ``{reason: raw file name}``."""
    copy = Path(shutil.copytree(night, dest / night.name))
    science = sorted((copy / f"{copy.name}-CAMS").glob("*_SCIENCE.fits"))
    chosen = {"cloud": science[3].name, "trail": science[6].name,
              "defocus": science[9].name}
    rng = np.random.default_rng(seed)
    for reason, name in chosen.items():
        rewrite_frame(copy, name, INJECTIONS[reason], rng)
    return copy, chosen


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    clean = simulate_night(tmp_path_factory.mktemp("qa_clean"), SIM)
    return inject_bad_frames(clean, tmp_path_factory.mktemp("qa_bad"))


@pytest.fixture(scope="module")
def reported(injected, client, tmp_path_factory):
    night, chosen = injected
    out = tmp_path_factory.mktemp("qa_out")
    cal = calibrate_night(night, client, SETTINGS, out=out)
    assert cal.status == "complete", cal.counts
    result = qa.night_report(night, client, out=out)
    assert result.stage == "report" and result.status == "complete"
    assert [r["status"] for r in result.frames] == ["done"] * len(cal.frames)
    folder = result.out_dir
    return night, out, folder, chosen, json.loads((folder / QA_JSON).read_text())


# --------------------------------------------------------------------------- acceptance


def test_injected_frames_flagged_with_their_reason(reported):
    _, _, _, chosen, report = reported
    by_raw = {f["raw"]: f for f in report["frames"]}
    assert len(by_raw) == SIM.n_science
    for reason, name in chosen.items():
        frame = by_raw[name]
        assert frame["flagged"], (reason, frame)
        assert [f["reason"] for f in frame["flags"]] == [reason], frame["flags"]
    for name, frame in by_raw.items():
        if name not in chosen.values():
            assert not frame["flagged"], (name, frame["flags"])
    assert report["summary"]["flagged"] == 3
    assert report["summary"]["flags"] == {"cloud": 1, "sky": 0, "trail": 1, "defocus": 1}


def test_injected_figures_are_what_was_injected(reported):
    _, _, _, chosen, report = reported
    by_raw = {f["raw"]: f for f in report["frames"]}
    good = [f for n, f in by_raw.items() if n not in chosen.values()]
    sky = np.median([f["sky"] for f in good])
    fwhm = np.median([f["fwhm"] for f in good])
    c = by_raw[chosen["cloud"]]
    assert c["transparency"] == pytest.approx(1 / 3, rel=0.05)
    assert c["sky"] == pytest.approx(sky / 3, rel=0.03)
    d = by_raw[chosen["defocus"]]
    # blur of 2 px in quadrature with the PSF
    expected = np.hypot(fwhm / 2.3548, 2.0) * 2.3548
    assert d["fwhm"] == pytest.approx(expected, rel=0.1)
    t = by_raw[chosen["trail"]]["streak"]
    assert t["angle"] == pytest.approx(25.0, abs=1.0)
    assert t["coverage"] > 0.6
    assert max(f["streak"]["coverage"] if f["streak"] else 0 for f in good) < 0.2


def test_figures_against_the_truth(reported):
    night, _, _, _, report = reported
    truth = load_truth(night)
    good = [f for f in report["frames"] if not f["flagged"]]
    for f in good:
        assert f["sky"] == pytest.approx(SIM.sky, rel=0.01)
        assert f["fwhm"] == pytest.approx(2.3548 * SIM.psf_sigma, rel=0.05)
        assert f["transparency"] == pytest.approx(1.0, abs=0.02)
        # The simulated twilight flats carry a ~1.5 % illumination gradient, which the
        # flat-only recipe puts into the science frames (DESIGN.md, known pitfalls).
        assert 0.005 < f["gradient"] < 0.035
        assert f["frac_masked"] >= f["frac_bad"] > 0
        assert 0 <= f["frac_cr"] < 0.01 and f["frac_saturated"] >= 0
        assert f["time"].startswith(SIM.date) and np.isfinite(f["mjd"])
    masters = {m["label"]: m for m in report["masters"]}
    assert set(masters) == {"dark 10s", "dark 90s", "flat RC", "mask"}
    mask = masters["mask"]
    assert mask["n_hot"] == pytest.approx(truth.hot.sum(), rel=0.5)
    assert mask["n_dead"] >= SIM.dead_columns * SIM.size
    assert masters["flat RC"]["level"] == pytest.approx(1.0, abs=0.01)
    assert masters["flat RC"]["gradient"] > 0.003
    dark = masters["dark 90s"]
    assert dark["level"] == pytest.approx(SIM.bias_level + SIM.dark_rate * 90 / SIM.gain, abs=2)
    assert dark["noise"] > 0 and dark["ncombine"] == SIM.n_darks


def test_report_files_and_page(reported):
    _, _, folder, _, report = reported
    plots = report["plots"]
    for name in ("timeseries", "frame", "flagged", "mask", "dark 90s", "dark 10s", "flat RC"):
        assert name in plots, name
    page = (folder / REPORT_INDEX).read_text()
    for png in plots.values():
        path = folder / png
        assert path.stat().st_size > 10_000, png
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"src='{png}'" in page
    assert "cloud" in page and "trail" in page and "defocus" in page
    text = qa.report_summary(report, folder)
    assert "3 flagged (cloud 1, trail 1, defocus 1)" in text
    assert text.count("  flagged: ") == 3 and str(folder / REPORT_INDEX) in text
    # JSON: no NaN (not valid JSON), numbers or null only
    text = (folder / QA_JSON).read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_report_regenerates_without_a_cluster(reported):
    night, out, folder, _, report = reported
    (folder / QA_JSON).unlink()
    again = qa.load_report(qa.night_report(night, out=out).out_dir)
    flags = {f["raw"]: [x["reason"] for x in f["flags"]] for f in again["frames"]}
    assert flags == {f["raw"]: [x["reason"] for x in f["flags"]] for f in report["frames"]}


def test_report_folder_holds_no_temporary_file(reported):
    _, _, folder, _, _ = reported
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("cards", "mjd", "time"), [
    ({"DATE-OBS": "2026-06-15T18:30:00"}, 61206.7708912037, "2026-06-15T18:30:05.000"),
    ({"MJD-OBS": 61206.770833333336}, 61206.7708912037, "2026-06-15T18:30:05.000"),
    ({}, np.nan, ""),  # no time: still measured
    ({"DATE-OBS": "not a date"}, np.nan, ""),
])
def test_measure_file_times(tmp_path, cards, mjd, time):
    """A frame's time is its mid-exposure (io.fitsio.mid_exposure); a frame without a
    readable time is measured all the same, with NaN and ""."""
    sci = np.random.default_rng(5).normal(100.0, 10.0, (96, 96)).astype(np.float32)
    header = fits.Header({"EXPTIME": 10.0, **cards})
    hdul = calibrated_hdul(header, sci, np.full_like(sci, 100.0), np.zeros(sci.shape, np.int32),
                           {})
    row = qa.measure_file(atomic_write(hdul, tmp_path / "frame_CAL.fits"))
    assert "error" not in row
    assert row["time"] == time
    np.testing.assert_allclose(row["mjd"], mjd, rtol=0, atol=1e-9)
    assert row["sky"] == pytest.approx(100.0, abs=1.0)


def test_report_needs_calibrated_frames(tmp_path):
    night = tmp_path / "2026-06-15"
    night.mkdir()
    with pytest.raises(RunError, match="no calibrated frame"):
        qa.night_report(night, out=tmp_path / "out")


# --------------------------------------------------------------------------- pure core


def _noise_image(n: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 10.0, (n, n)).astype(np.float32)


def test_find_streak_finds_a_faint_line_and_not_noise():
    s = QaSettings()
    img = _noise_image()
    usable = np.ones(img.shape, bool)
    none = qa.find_streak(img, 10.0, usable, s)
    assert none is None or none["coverage"] < 0.1
    yy, xx = np.mgrid[0:256, 0:256]
    a = np.radians(120.0)
    d = (xx - 128) * np.sin(a) - (yy - 100) * np.cos(a)
    line = img + 25.0 * np.exp(-0.5 * (d / 1.2) ** 2)  # 2.5 sigma per pixel at its peak
    found = qa.find_streak(line, 10.0, usable, s)
    assert found["angle"] == pytest.approx(120.0, abs=1.0)
    assert found["coverage"] > 0.8
    # binned search on a larger frame (the streak search works on ~512 px)
    big = np.kron(line, np.ones((3, 3), np.float32))
    found = qa.find_streak(big, 10.0, np.ones(big.shape, bool), s)
    assert found["angle"] == pytest.approx(120.0, abs=1.5)
    assert found["length"] > 0.6 * 256 * 3


def test_elongated_keeps_lines_drops_blobs():
    hits = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[0:64, 0:64]
    hits |= (xx - 15) ** 2 + (yy - 15) ** 2 <= 16  # a star
    hits[40:42, 5:40] = True  # a streak piece
    hits[60, 60] = True  # a noise peak
    kept = qa.elongated(hits, 2.5)
    assert kept[40:42, 5:40].all()
    assert not kept[10:21, 10:21].any() and not kept[60, 60]


def _stars(n: int, rng: np.random.Generator, scale: float = 1.0, shift=(0.0, 0.0)):
    s = np.zeros(n, STAR_DTYPE)
    s["x"] = rng.uniform(10, 240, n) + shift[0]
    s["y"] = rng.uniform(10, 240, n) + shift[1]
    s["flux"] = rng.uniform(1e4, 1e5, n) * scale
    s["snr"] = 100.0 * scale
    s["err"] = 0.02
    s["width"] = 1.3
    return s


def test_relative_fluxes_match_the_same_stars():
    rng = np.random.default_rng(3)
    base = _stars(60, np.random.default_rng(1))
    lists = []
    for i, scale in enumerate([1.0, 1.0, 0.4, 1.0, 1.0]):
        s = base.copy()
        s["x"] += 0.7 * i
        s["y"] -= 0.3 * i
        s["flux"] *= scale * rng.normal(1.0, 0.01, s.size)
        s["snr"] = 100.0 * scale
        lists.append(s)
    ratio, n_match, ref = qa.relative_fluxes(lists, [3.0] * 5)
    assert ref in (0, 1, 3, 4)
    assert ratio[2] == pytest.approx(0.4, rel=0.02)
    np.testing.assert_allclose(np.delete(ratio, 2), 1.0, atol=0.02)
    assert (n_match >= 50).all()
    empty, _, ref = qa.relative_fluxes([np.zeros(0, STAR_DTYPE)] * 3, [np.nan] * 3)
    assert ref == -1 and np.isnan(empty).all()


def _row(**kw) -> dict:
    return {"sky": 600.0, "fwhm": 3.0, "n_stars": 100, "transparency": 1.0, "streak": None,
            "side": 256, **kw}


def test_flag_frames_reasons():
    rows = [_row() for _ in range(10)]
    rows[2] = _row(sky=2000.0)  # moon: the sky jumps, stars keep their flux
    rows[4] = _row(transparency=np.nan, n_stars=5)  # thick cloud: no stars to measure
    rows[6] = _row(fwhm=4.2)
    rows[8] = _row(streak={"coverage": 0.7, "length": 200.0, "angle": 30.0, "snr": 5.0})
    rows[9] = _row(streak={"coverage": 0.9, "length": 20.0, "angle": 30.0, "snr": 5.0})
    flags = qa.flag_frames(rows)
    reasons = [[f["reason"] for f in fl] for fl in flags]
    assert reasons == [[], [], ["sky"], [], ["cloud"], [], ["defocus"], [], ["trail"], []]
    assert "too few stars" in flags[4][0]["detail"]
    # a slow sky trend over the night is not a jump
    trend = [_row(sky=600.0 * 1.1**i) for i in range(12)]
    assert not any(qa.flag_frames(trend))


def test_mask_fractions_and_plane_gradient():
    m = np.zeros((10, 10), np.int32)
    m[0, :] = flag(Bit.BAD, Bit.HOT)
    m[1, :5] = flag(Bit.SAT)
    m[2, :2] = flag(Bit.CR)
    f = qa.mask_fractions(m)
    assert f == {"frac_masked": 0.17, "frac_saturated": 0.05, "frac_cr": 0.02,
                 "frac_bad": 0.1}
    edges = np.array([0, 32, 64, 96, 128])
    cy = (edges[:-1] + edges[1:] - 1) / 2
    grid = 100 + 0.1 * cy[None, :] + 0.0 * cy[:, None]  # rises along x by 0.1 per px
    ptp, angle = qa.plane_gradient(grid, edges, edges)
    assert ptp == pytest.approx(12.8) and angle == pytest.approx(0.0, abs=1e-6)


def test_zscale_and_block_reduce():
    img = _noise_image(64)
    lo, hi = qa.zscale_limits(img)
    assert -40 < lo < -5 and 5 < hi < 40
    assert qa.zscale_limits(np.full((4, 4), np.nan)) == (0.0, 1.0)
    b = qa.block_reduce(np.arange(25, dtype=float).reshape(5, 5), 2, np.max)
    assert b.shape == (3, 3) and b[0, 0] == 6 and b[2, 2] == 24


# --------------------------------------------------------------------------- flow chart


def test_flow_graph_of_a_night(injected, tmp_path):
    night, _ = injected
    inv = scan_night(night)
    g = night_graph(inv, SETTINGS)
    flow = collapse(g.dependencies, g.stage_of, g.stages, g.file_edges, g.night)
    n_sci = len(inv.select(FrameType.SCIENCE))
    assert flow.stages["calibrate"].tasks == n_sci
    assert flow.stages["qa measure"].tasks == n_sci
    assert flow.n_tasks == len(g.dependencies) > 2 * n_sci
    names = set(flow.stages)
    for expected in ("read dark 90 s", "combine dark 90 s", "read flat RC", "combine flat RC",
                     "levels flat RC", "mask", "file 2026-06-15_MASTERDARK.fits",
                     "file 2026-06-15_MASTERFLAT_RC.fits", "file 2026-06-15_MASK.fits",
                     "file cal", "file manifest", "input CAMS", "input CAMS_SKYFLAT"):
        assert expected in names, expected
    # the frames' planes are made once per exposure time and filter from the master
    # files they need (one task here), and every frame task reads them
    for f in ("2026-06-15_MASTERDARK.fits", "2026-06-15_MASTERFLAT_RC.fits",
              "2026-06-15_MASK.fits"):
        assert flow.edges[(f"file {f}", "shared planes")] == 1
    assert flow.stages["shared planes"].tasks == 1
    assert flow.edges[("shared planes", "calibrate")] == n_sci
    # Without a bias, a frame's dark current is the 90 s dark less the offset fitted
    # through the 10 s and 90 s darks (core.darks.darks_needed): the planes read both.
    assert flow.edges[("file 2026-06-15_MASTERDARK_FLAT.fits", "shared planes")] == 1
    # the flats subtract the 10 s dark; the chart has no cycle and ends in the products
    assert ("combine dark 10 s", "combine flat RC") in flow.edges
    depth = layers(flow)
    assert all(depth[a] < depth[b] for a, b in flow.edges)
    assert depth["file report"] == max(depth.values())
    dot = to_dot(flow)
    assert dot.startswith("digraph flow {") and '"calibrate" -> "file manifest"' in dot
    assert collapse(g.dependencies, g.stage_of, g.stages).n_tasks == flow.n_tasks
    small = flow_graph(night, SETTINGS, report=False)
    assert "qa measure" not in small.stages


def test_flow_chart_files(injected, tmp_path):
    night, _ = injected
    png = flow_chart(night, tmp_path / "flow.png", engine="matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dot = flow_chart(night, tmp_path / "flow.dot")
    assert "calibrate frame" in dot.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.dot", "flow.png"]
    with pytest.raises(ValueError, match="svg"):
        flow_chart(night, tmp_path / "flow.jpg")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz `dot` is not installed (Debian: graphviz)")
    svg = flow_chart(night, tmp_path / "flow.svg", out=tmp_path / "out")
    text = svg.read_text()
    assert "<svg" in text and "calibrate frame" in text
    assert str(output_dir(night, tmp_path / "out")) in html.unescape(text)
    assert flow_chart(night, tmp_path / "f.png", engine="dot").stat().st_size > 10_000


def test_flow_chart_through_dot_is_atomic(injected, tmp_path, monkeypatch):
    """The ``dot`` engine writes to a temporary file renamed into place; a failing ``dot``
    leaves nothing behind. A stand-in ``dot`` (it copies the DOT text it is given) takes
    Graphviz's place, so this runs without Graphviz."""
    night, _ = injected
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
                    'cat > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "charts"
    svg = flow_chart(night, out / "flow.svg", engine="dot")
    assert svg.read_text().startswith("digraph flow {")
    fake.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(subprocess.CalledProcessError):
        flow_chart(night, out / "broken.svg", engine="dot")
    assert sorted(p.name for p in out.iterdir()) == ["flow.svg"]


def test_flat_ratios_leave_out_nights_of_another_frame_size(tmp_path):
    """A season whose nights have different frame sizes (issue 21, item 11): the flats of
    the most common size are compared, the others are named, and the figure is drawn."""
    rows = []
    for night, shape, level in (("2026-06-01", (32, 32), 1.0), ("2026-06-02", (32, 32), 1.02),
                                ("2026-06-03", (16, 24), 1.0)):
        path = tmp_path / f"{night}_MASTERFLAT_RC.fits"
        fits.PrimaryHDU(np.full(shape, level, np.float32)).writeto(path)
        rows.append({"night": night, "flats": {"RC": path}})
    ref, ratios, left_out = qa.flat_ratios(rows)
    assert ref == "2026-06-01"
    assert [n for n, _ in ratios] == ["2026-06-02"]
    np.testing.assert_allclose(ratios[0][1], 1.02, rtol=1e-6)
    assert left_out == ["2026-06-03 (16 x 24)"]
    fig = qa.fig_flat_ratios(rows)
    assert "2026-06-03 (16 x 24)" in fig._suptitle.get_text()
