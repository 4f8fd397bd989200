"""First-look shift-and-stack search (issue 11) on simulated nights, against the truth.

One 256² night of 12 frames (three movers: two main-belt-like at 0.65 and 0.81 px/frame,
one slow at 0.09 px/frame) and two neighbouring nights of the same field (the movers are
elsewhere then), calibrated and exported twice: with a template from the night itself
(leave-one-out) and from the two other nights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.cli import EXIT_OK, main
from astep_dask.config import SearchSettings, Settings, TemplateSettings
from astep_dask.core.register import resample
from astep_dask.errors import RunError
from astep_dask.io.products import output_dir
from astep_dask.kbmod.candidates import CSV_COLUMNS, read_candidates
from astep_dask.kbmod.kernels import filter_factor
from astep_dask.kbmod.products import Layers
from astep_dask.kbmod.search import search_night
from astep_dask.kbmod.shiftstack import (
    CANDIDATE_DTYPE,
    cluster,
    psi_phi,
    robust_sums,
    search_block,
    trajectory_values,
    velocity_grid,
)
from astep_dask.kbmod.stage import export_night
from astep_dask.kbmod.template import homogenise
from astep_dask.run.night import calibrate_night
from astep_dask.run.results import StageResult
from astep_dask.testing.simulate import SimConfig, mover_tracks, psf_stamp, simulate_night

SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})
NIGHTS_FOLDER = "kbmod_nights"
SIM = SimConfig(size=256, n_science=12, n_darks=5, n_flats=7, seed=5, drift=(1.35, -0.8))
# Same field (same seed: same stars), other drifts, no movers: a main-belt object has moved
# hundreds of pixels a day, the slow one ~80 px (the simulator restarts movers each night,
# so the nights are simulated without them).
NEIGHBOURS = (("2026-06-14", (-0.9, 1.1)), ("2026-06-16", (0.6, 1.3)))
FAST = 0.3  # px/frame: the bound for movers the search must find


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def archive(tmp_path_factory, client) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("search_archive")
    out = tmp_path_factory.mktemp("search_out")
    night = simulate_night(root, SIM)
    for date, drift in NEIGHBOURS:
        cfg = SimConfig(**{**SIM.__dict__, "date": date, "drift": drift, "movers": (),
                           "n_science": 8})
        simulate_night(root, cfg)
    for n in sorted(root.iterdir()):
        cal = calibrate_night(n, client, SETTINGS, out=out)
        assert cal.status == "complete", (n, cal.counts)
    return night, out


@pytest.fixture(scope="module")
def one_night(archive, client) -> dict:
    night, out = archive
    exp = export_night(night, client, SETTINGS, out=out)
    assert exp.status == "complete" and exp.details["template"]["mode"].startswith("night")
    res = search_night(night, client, SETTINGS, out=out)
    assert res.stage == "search" and res.status == "complete" and not res.failures
    assert len(res.frames) == len(exp.frames) and res.out_dir == res.details["candidates"].parent
    assert res.details["manifest"] == res.out_dir / "search.json"
    assert res.details["n_candidates"] == res.details["summary"]["n_candidates"] == len(
        read_candidates(res.details["candidates"]))
    return {"export": exp, "csv": res.details["candidates"]}


@pytest.fixture(scope="module")
def other_nights(archive, client) -> dict:
    night, out = archive
    settings = SETTINGS.replace(kbmod={"folder": NIGHTS_FOLDER})
    exp = export_night(night, client, settings, out=out, template=TemplateSettings(nights=2))
    assert exp.status == "complete", exp.error
    assert exp.details["template"]["nights"] == [d for d, _ in NEIGHBOURS]
    csv = search_night(night, client, settings, out=out).details["candidates"]
    return {"export": exp, "csv": csv}


# --------------------------------------------------------------------------- truth


def _kbmod_frames(export: StageResult
                  ) -> list[tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]]:
    out = []
    for r in export.frames:
        with fits.open(export.out_dir / r["output"]) as hdul:
            out.append((hdul[0].header.copy(), hdul[1].data.astype(np.float32),
                        hdul[3].data.astype(np.float32), hdul[2].data.astype(np.int32)))
    return out


def _truth_tracks(night: Path, export: StageResult) -> list[dict]:
    """The simulated movers on the export's reference grid (:func:`mover_tracks`)."""
    headers = [h for h, *_ in _kbmod_frames(export)]
    stems = [h["CALFILE"].removesuffix("_CAL.fits") for h in headers]
    return mover_tracks(night, stems, headers[0]["REFFRAME"])


def _summary(csv: Path) -> dict:
    return json.loads((csv.parent / "search.json").read_text())


def _match(rows: list[dict], track: dict) -> dict | None:
    """The highest-SNR candidate starting within 2 px of the track's start."""
    near = [r for r in rows if np.hypot(r["x"] - track["start"][0],
                                        r["y"] - track["start"][1]) <= 2.0]
    return max(near, key=lambda r: r["snr"]) if near else None


def _on_a_track(row: dict, tracks: list[dict], span: float, radius: float = 3.0) -> bool:
    """A candidate whose path comes within ``radius`` px of a mover's during the night."""
    t = np.linspace(0, span, 50)
    cx, cy = row["x"] + row["vx"] * t, row["y"] + row["vy"] * t
    for tr in tracks:
        tx, ty = tr["start"][0] + tr["v"][0] * t, tr["start"][1] + tr["v"][1] * t
        if np.min(np.hypot(cx - tx, cy - ty)) <= radius:
            return True
    return False


# --------------------------------------------------------------------------- acceptance


def _check_found(run: dict, night: Path, min_ratio: float, label: str) -> list[float]:
    rows = read_candidates(run["csv"])
    summ = _summary(run["csv"])
    step = summ["grid"]["step"]
    ratios = []
    for k, tr in enumerate(_truth_tracks(night, run["export"])):
        if tr["per_frame"] <= FAST:
            continue
        best = _match(rows, tr)
        assert best is not None, (label, k, tr["start"])
        dv = np.abs(np.array([best["vx"], best["vy"]]) - tr["v"])
        ratio = best["snr"] / tr["ideal"]
        ratios.append(ratio)
        print(f"\n{label}: mover {k} ({tr['per_frame']:.2f} px/frame): start off by "
              f"{np.hypot(best['x'] - tr['start'][0], best['y'] - tr['start'][1]):.2f} px, "
              f"velocity off by ({dv[0]:.0f}, {dv[1]:.0f}) px/day (step {step:.0f}), SNR "
              f"{best['snr']:.1f} vs ideal {tr['ideal']:.1f}: {ratio:.3f}; flux "
              f"{best['flux']:.0f} of {tr['flux']:.0f} e-")
        assert np.all(dv <= step), (label, k, dv, step)
        assert min_ratio <= ratio <= 1.2, (label, k, ratio)
    assert len(ratios) == 2
    return ratios


@pytest.mark.slow
def test_search_finds_every_fast_mover_on_a_neighbouring_nights_template(other_nights,
                                                                         archive):
    _check_found(other_nights, archive[0], 0.8, "template from 2 other nights")


def test_a_one_night_template_finds_them_at_a_lower_snr(one_night, archive):
    # Twelve frames: a 0.65 px/frame mover stays within a PSF width of any point of its
    # path for about five of them, so the night's own template either holds some of its
    # flux or, with those frames rejected, is noisier there. Found where it is, at a lower
    # SNR (measured here; the neighbouring-nights template is the cure). A longer night
    # closes the gap: SNR/ideal 0.75 and 0.86 at 12 frames, 0.88 and 0.93 at 24, 0.92 and
    # 0.94 at 48 (benchmarks/search_bench.py night-length).
    _check_found(one_night, archive[0], 0.65, "template from this night (12 frames)")


@pytest.mark.parametrize("run", ["one_night", "other_nights"])
def test_few_false_candidates(run, request, archive):
    res = request.getfixturevalue(run)
    rows = read_candidates(res["csv"])
    summ = _summary(res["csv"])
    tracks = _truth_tracks(archive[0], res["export"])
    false = [r for r in rows if r["snr"] >= 7 and not _on_a_track(r, tracks, summ["span_days"])]
    per_1024 = len(false) * (1024 / SIM.size) ** 2
    print(f"\n{run}: {len(rows)} candidates, {len(false)} false above 7 sigma "
          f"(~{per_1024:.0f} per 1024² frame); {summ['grid']['n_searched']} velocities, "
          f"{summ['search_seconds']:.1f} s")
    for r in false:
        print(f"  false: {r}")
    assert len(false) <= 1, false


def test_a_neighbouring_nights_template_keeps_the_slow_mover(one_night, other_nights,
                                                             archive):
    # Self-subtraction of the slow mover (0.09 px/frame: 1 px over the night): its flux
    # along its true path (KBMOD's psi/phi at the true positions) in the difference frames.
    kept = {}
    for label, run in (("one night", one_night), ("other nights", other_nights)):
        slow = [t for t in _truth_tracks(archive[0], run["export"]) if t["per_frame"] < FAST]
        (tr,) = slow
        psi = phi = 0.0
        for (h, sci, var, mask), (x, y) in zip(_kbmod_frames(run["export"]), tr["positions"],
                                              strict=True):
            a, b = psi_phi(sci, var * h["FILTVARF"], mask, h["PSFSIGMA"])
            psi += a[round(y), round(x)]
            phi += b[round(y), round(x)]
        kept[label] = (psi / phi / tr["flux"], psi / np.sqrt(phi), tr["ideal"])
        found = _match(read_candidates(run["csv"]), tr)
        print(f"\nslow mover, template from {label}: {kept[label][0]:.1%} of its flux kept, "
              f"SNR {kept[label][1]:.1f} (ideal {tr['ideal']:.1f}); search: "
              + (f"found at SNR {found['snr']:.1f}, v ({found['vx']:.0f}, {found['vy']:.0f})"
                 f" px/day" if found else "not found"))
    assert kept["one night"][0] < 0.2
    assert kept["other nights"][0] > 0.85 and kept["other nights"][1] > 0.75 * tr["ideal"]


def test_products(other_nights, archive):
    csv = other_nights["csv"]
    night, out = archive
    assert csv == output_dir(night, out) / NIGHTS_FOLDER / "search" / f"{SIM.date}_CANDIDATES.csv"
    header = csv.read_text().splitlines()[0].split(",")
    assert header[:7] == ["x", "y", "vx", "vy", "flux", "snr", "n_frames"]
    assert tuple(header) == CSV_COLUMNS
    rows = read_candidates(csv)
    assert rows and all(r["snr"] >= 7 for r in rows)
    assert [r["snr"] for r in rows] == sorted((r["snr"] for r in rows), reverse=True)
    for r in rows:
        png = csv.parent / r["stamp"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summ = _summary(csv)
    sigma, span = summ["psf_sigma"], summ["span_days"]
    assert summ["grid"]["step"] == pytest.approx(sigma / span)  # default: PSF σ over the night
    assert span == pytest.approx((SIM.n_science - 1) * SIM.cadence_s / 86400, rel=1e-4)
    assert summ["n_frames"] == SIM.n_science and summ["tasks"] >= 4
    assert not summ["notes"]


def test_part_of_a_night_and_the_memory_guard(other_nights, archive, client):
    night, out = archive
    settings = SETTINGS.replace(kbmod={"folder": NIGHTS_FOLDER})
    with pytest.raises(RunError, match="part of the night"):
        search_night(night, client, settings, out=out,
                     search_settings=SearchSettings(memory_mb=1.0))
    part = SearchSettings(frame_start=6, frame_count=6, stamps=0, folder="search_part")
    csv = search_night(night, client, settings, out=out,
                       search_settings=part).details["candidates"]
    summ = _summary(csv)
    assert summ["n_frames"] == 6 and summ["frames"] == [
        r["output"] for r in other_nights["export"].frames[6:]]
    assert summ["mjd0"] == pytest.approx(other_nights["export"].frames[6]["mjd"])
    rows = read_candidates(csv)
    assert len(rows) >= 2 and all(r["stamp"] == "" for r in rows)


def test_a_search_without_candidates_is_complete(one_night, archive, client):
    night, out = archive
    quiet = SearchSettings(frame_count=3, threshold=1e6, stamps=0, folder="search_quiet")
    res = search_night(night, client, SETTINGS, out=out, search_settings=quiet)
    assert res.status == "complete" and res.counts["done"] == 3 and not res.failures
    assert res.details["n_candidates"] == 0 and read_candidates(res.details["candidates"]) == []
    assert json.loads(res.details["manifest"].read_text())["n_candidates"] == 0


def test_the_search_needs_an_export(tmp_path, client):
    (tmp_path / "2026-01-01").mkdir()
    with pytest.raises(RunError, match="KBMOD frame"):
        search_night(tmp_path / "2026-01-01", client, SETTINGS)


# --------------------------------------------------------------------------- pure functions


def _brute_force(psi, phi, dt, velocities, margin, ss, min_frames):
    """Every (start pixel, velocity) with exact PHI: the candidates above threshold."""
    ty = psi[0].shape[0] - 2 * margin
    tx = psi[0].shape[1] - 2 * margin
    ys, xs = np.divmod(np.arange(ty * tx), tx)
    found = set()
    for vx, vy in velocities:
        sx = np.rint(vx * dt).astype(int)
        sy = np.rint(vy * dt).astype(int)
        p = trajectory_values(psi, ys, xs, sy, sx, margin)
        f = trajectory_values(phi, ys, xs, sy, sx, margin)
        big_psi, big_phi, n = robust_sums(p, f, ss)
        with np.errstate(invalid="ignore", divide="ignore"):
            snr = big_psi / np.sqrt(big_phi)
        raw = p.sum(axis=1) / np.sqrt(f.sum(axis=1)) >= ss.threshold
        ok = raw & (snr >= ss.threshold) & (n >= min_frames) & (big_psi > 0)
        found |= {(int(x), int(y), float(vx), float(vy)) for x, y in zip(xs[ok], ys[ok],
                                                                          strict=True)}
    return found


def test_stacking_with_a_phi_bound_finds_what_exact_phi_finds():
    rng = np.random.default_rng(3)
    n, tile, margin = 6, 40, 8
    dt = np.linspace(0, 0.02, n)
    shape = (tile + 2 * margin, tile + 2 * margin)
    psi, phi = [], []
    for i in range(n):
        var = np.full(shape, 50.0, np.float32)
        sci = rng.normal(0, np.sqrt(50), shape).astype(np.float32)
        mask = (rng.random(shape) < 0.05).astype(np.int32)  # cosmic rays, bad pixels
        mask[:, :3] = 1  # an edge band
        x, y = margin + 12 + 200 * dt[i], margin + 20 - 150 * dt[i]  # a mover
        p, ys, xs = psf_stamp(x, y, 1.4, shape)
        sci[np.ix_(ys, xs)] += 900 * p
        if i == 2:
            sci[margin + 30, margin + 30] += 3000  # a one-frame outlier
        a, b = psi_phi(sci, var, mask, 1.4)
        psi.append(a)
        phi.append(b)
    ss = SearchSettings(threshold=5.0)
    gx, gy = np.meshgrid(np.arange(-300, 301, 50.0), np.arange(-300, 301, 50.0))
    velocities = np.column_stack([gx.ravel(), gy.ravel()])
    got, tested = search_block(psi, phi, dt, velocities, margin, ss, 3)
    want = _brute_force(psi, phi, dt, velocities, margin, ss, 3)
    assert {(int(c["x"]), int(c["y"]), c["vx"], c["vy"]) for c in got} == want
    assert tested < 0.2 * tile * tile * len(velocities)  # PHI computed for few pairs
    best = got[np.argmax(got["snr"])]
    assert abs(best["x"] - 12) <= 1 and abs(best["y"] - 20) <= 1
    assert abs(best["vx"] - 200) <= 50 and abs(best["vy"] + 150) <= 50
    # the outlier frame alone makes no candidate
    assert not any(abs(c["x"] - 30) + abs(c["y"] - 30) < 3 and abs(c["vx"]) + abs(c["vy"]) > 0
                   and c["snr"] > 7 for c in got)


def test_outlier_frames_are_rejected_along_a_trajectory():
    ss = SearchSettings()
    phi = np.full((2, 10), 1e-4)  # per-frame flux error 100
    psi = np.full((2, 10), 500 * 1e-4)  # flux 500 in every frame
    psi[1, 4] = 20000 * 1e-4  # one frame 20000
    big_psi, big_phi, n = robust_sums(psi, phi, ss)
    assert list(n) == [10, 9]
    assert big_psi[1] / big_phi[1] == pytest.approx(500)
    psi[0, :] = 0
    psi[0, 2] = 30000 * 1e-4  # a single bright frame and noise-free zeros: not an object
    big_psi, big_phi, n = robust_sums(psi, phi, ss)
    assert n[0] == 9 and big_psi[0] == 0


def test_velocity_grid_and_clustering():
    ss = SearchSettings(vx_min=-100, vx_max=100, vy_min=-50, vy_max=130)
    vx, vy, step = velocity_grid(ss, sigma=1.5, span=0.05)
    assert step == pytest.approx(30.0)
    assert 0.0 in vx and 0.0 in vy and vx.min() >= -100 and vy.max() <= 130
    assert np.allclose(np.diff(vx), 30) and vx.size == 7 and vy.size == 6
    vx, _, step = velocity_grid(SearchSettings(v_step=40.0, vx_min=-1200, vx_max=1160), 1, 1)
    assert step == 40 and vx.size == 60
    c = np.zeros(4, CANDIDATE_DTYPE)
    c["x"], c["y"] = [10, 11, 14, 60], [10, 10, 12, 60]
    c["vx"], c["vy"] = [100, 130, 0, 100], [0, 0, 0, 0]
    c["snr"] = [20, 15, 9, 8]
    out = cluster(c, span=0.05, radius=3.0)
    # 0 and 1 start 1 px apart; 2 is met by 0 (at 15, 10 when t = 0.05); 3 is elsewhere
    assert list(out["snr"]) == [20, 8]


@pytest.mark.slow
def test_the_command_line_exports_with_other_nights_and_searches(archive, other_nights,
                                                                 tmp_path, capsys):
    night, out = archive
    config = tmp_path / "run.toml"
    config.write_text('[kbmod]\nfolder = "kbmod_cli"\n[search]\nstamps = 2\n')
    common = ["--out", str(out), "--config", str(config), "--workers", "1",
              "--dashboard-address", ":0"]
    assert main(["kbmod", str(night), "--template-nights", "2", *common]) == EXIT_OK
    text = capsys.readouterr().out
    assert "template:" in text and "2026-06-14" in text and "difference frames" in text
    assert main(["search", str(night), "--threshold", "7", *common]) == EXIT_OK
    text = capsys.readouterr().out
    csv = output_dir(night, out) / "kbmod_cli" / "search" / f"{SIM.date}_CANDIDATES.csv"
    assert str(csv) in text and "SNR" in text
    rows, expected = read_candidates(csv), read_candidates(other_nights["csv"])
    # The same export and search as the library calls, through the command line.
    assert [(round(r["x"], 3), round(r["y"], 3), r["vx"]) for r in rows] == [
        (round(r["x"], 3), round(r["y"], 3), r["vx"]) for r in expected]
    assert sum(bool(r["stamp"]) for r in rows) == min(2, len(rows))
    # Without an export the command says so in one line and does nothing.
    config.write_text('[kbmod]\nfolder = "nowhere"\n')
    assert main(["search", str(night), *common]) == 1
    assert "astep-dask kbmod first" in capsys.readouterr().err


@pytest.mark.parametrize("kind, low, high", [("overlap", 0.8, 0.95), ("cubic", 0.85, 0.99)])
def test_the_filter_variance_factor_makes_the_snr_of_noise_unit(kind, low, high):
    # White noise on the camera's pixels, resampled by a 2 × 2 overlap kernel (or the
    # 4 × 4 cubic one) and PSF-matched (VAR carried in the area convention, as the export
    # does): psi / √phi at fixed positions has a standard deviation below 1 by √FILTVARF,
    # and 1 with it.
    rng = np.random.default_rng(11)
    n, v, sigma = 400, 25.0, 1.3
    dx, dy, kvar = 0.4, 0.7, (0.05, 0.2)
    raw = rng.normal(0, np.sqrt(v), (n, n)).astype(np.float32)
    reg = resample(raw, np.full((n, n), v, np.float32), np.zeros((n, n), np.int32), dx, dy,
                   kind=kind)
    frame = homogenise(Layers(reg.sci, reg.var, reg.mask), kvar)
    target = np.sqrt(sigma**2 + reg.kernel_var[0] + kvar[0])
    psi, phi = psi_phi(frame.sci, frame.var, frame.mask, target)
    inner = (slice(20, n - 20, 7), slice(20, n - 20, 7))  # nearly independent positions
    snr = (psi / np.sqrt(phi))[inner].ravel()
    c = filter_factor(dx, dy, kvar, target, kind=kind)
    assert low < c < high
    assert filter_factor(0.0, 0.0, (0.0, 0.0), target, kind=kind) == pytest.approx(1.0)
    assert np.std(snr) == pytest.approx(np.sqrt(c), rel=0.04)
    psi_c, phi_c = psi_phi(frame.sci, frame.var * c, frame.mask, target)
    assert np.std((psi_c / np.sqrt(phi_c))[inner]) == pytest.approx(1.0, rel=0.04)
    # the flux estimate psi / phi does not change
    assert np.allclose((psi_c / phi_c)[inner], (psi / phi)[inner], rtol=1e-4)
