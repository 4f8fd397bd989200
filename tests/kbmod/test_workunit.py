"""The night as a KBMOD WorkUnit file, with a WCS fitted to a catalog (issue 19).

One 256² night of 12 frames with three movers (two fast), raw frames without a WCS; the
simulator's catalog and true WCS (:mod:`astep_dask.testing.skywcs`). The export gets a
first guess off by ~15" in pointing, 0.7° in rotation and 0.8 % in scale, and fits the
WCS on the catalog. Tests here read the WorkUnit the way KBMOD's ``WorkUnit.from_fits``
does (``src/kbmod/work_unit.py`` at dirac-institute/kbmod 617cd33) without KBMOD; the
last ones load it with KBMOD itself when it is installed (skipped otherwise).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy.signal import convolve2d

from astep_dask.cli.commands import _kbmod, _settings
from astep_dask.cli.parser import build_parser
from astep_dask.config import AstrometrySettings, Settings
from astep_dask.core.astrometry import AstrometryError, fit_wcs, guess_wcs
from astep_dask.core.bits import Bit, flag
from astep_dask.io.catalog import pointing, read_catalog
from astep_dask.io.fitsio import verify_file
from astep_dask.kbmod.candidates import read_candidates
from astep_dask.kbmod.search import search_night
from astep_dask.kbmod.stage import export_night
from astep_dask.kbmod.workunit import KBMOD_LIMIT, psf_kernel, workunit_search_mask
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_truth, mover_tracks, simulate_night
from astep_dask.testing.skywcs import SKY, frame_true_wcs, true_wcs, write_sky

SIM = SimConfig(size=256, n_science=12, n_darks=5, n_flats=7, seed=5, drift=(1.35, -0.8))
FAST = 0.3  # px/frame
# KBMOD's ImageCollection reader (standardizer KBMODV0_5): masks BAD, EDGE, NO_DATA,
# SUSPECT, UNMASKEDNAN (bit 15), then grows the mask by a 10x10 kernel.
KBMOD_DEFAULT = flag(Bit.BAD, Bit.EDGE, Bit.NO_DATA, Bit.SUSPECT) | (1 << 15)


def _guess(cat: str) -> dict:
    return {"catalog": cat, "ra": SKY["ra"] + 0.004, "dec": SKY["dec"] - 0.003,
            "rotation": SKY["rotation"] + 0.7, "pixel_scale": SKY["scale"] * 1.008}


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    night = simulate_night(tmp_path_factory.mktemp("wu_archive"), SIM)
    return night, write_sky(night)


@pytest.fixture(scope="module")
def exported(night, client, tmp_path_factory):
    night, cat = night
    out = tmp_path_factory.mktemp("wu_out")
    settings = Settings().replace(cluster={"dashboard_address": ":0"},
                                  astrometry=_guess(str(cat)))
    assert calibrate_night(night, client, settings, out=out).status == "complete"
    exp = export_night(night, client, settings, out=out)
    assert exp.status == "complete", exp.error
    exp.details["test_out"] = out
    return exp


def _truth_sky(night_dir, stem: str):
    """Every simulated star: its sky position and its true pixel position on ``stem``'s
    own grid."""
    truth = load_truth(night_dir)
    w = true_wcs(truth.config.size)
    ra, dec = w.all_pix2world(truth.stars[:, 0], truth.stars[:, 1], 0)
    x, y = frame_true_wcs(night_dir, stem).all_world2pix(ra, dec, 0)
    n = truth.config.size
    inside = (x > 0) & (x < n - 1) & (y > 0) & (y < n - 1)
    return ra[inside], dec[inside], x[inside], y[inside]


def _rms(w: WCS, ra, dec, x, y) -> float:
    px, py = w.all_world2pix(ra, dec, 0)
    return float(np.sqrt(np.mean((px - x) ** 2 + (py - y) ** 2)))


def _read_like_kbmod(path) -> dict:
    """What ``WorkUnit.from_fits`` reads (written from its code, not calling it)."""
    with fits.open(path) as hdul:
        h = hdul[0].header
        n = h["NUMIMG"]
        meta = hdul["IMG_META"].data
        per = []
        for s in meta["_WCSSTR_per_image_wcs"]:
            d = json.loads(s)
            w = WCS(d)
            w.pixel_shape = (d["NAXIS1"], d["NAXIS2"])
            per.append(w)
        images = []
        for i in range(n):
            sci = hdul[f"SCI_{i}"].data.astype(np.float32)
            var = hdul[f"VAR_{i}"].data.astype(np.float32)
            msk = hdul[f"MSK_{i}"].data.astype(np.float32)
            images.append({"mjd": hdul[f"SCI_{i}"].header["MJD"],
                           "sci": np.where(msk > 0, np.nan, sci),
                           "var": np.where(msk > 0, np.nan, var), "msk": msk,
                           "psf": hdul[f"PSF_{i}"].data.astype(np.float64),
                           "psf_header": hdul[f"PSF_{i}"].header.copy(),
                           "ind": [hdul[f"SCI_{i}"].header[f"IND_{j}"]
                                   for j in range(hdul[f"SCI_{i}"].header["NIND"])]})
        return {"header": h.copy(), "wcs": WCS(h), "per_image": per, "images": images}


# --------------------------------------------------------------------------- always run


def test_workunit_layout_times_and_planes(exported, night):
    night_dir, _ = night
    wu = _read_like_kbmod(exported.details["workunit"])
    h = wu["header"]
    rows = exported.frames
    assert h["NUMIMG"] == h["NCON"] == len(rows) == SIM.n_science
    assert h["REPRJCTD"] is True and h["REPFRAME"] == "original" and "BARY" not in h
    # Concordia, Dome C: 75°06' S, 123°20' E, 3233 m
    assert h["OBS_LAT"] == pytest.approx(-75.1, abs=0.01)
    assert h["OBS_LON"] == pytest.approx(123.33, abs=0.01)
    assert h["OBS_ELEV"] == pytest.approx(3233)
    starts = sorted(f["mjd"] for f in load_truth(night_dir).frames)
    n_repaired = n_used = n_refused = 0
    for i, (img, r) in enumerate(zip(wu["images"], rows, strict=True)):
        assert img["ind"] == [i]
        assert img["mjd"] == pytest.approx(starts[i] + SIM.science_exptime / 2 / 86400,
                                           abs=1e-7)
        with fits.open(exported.out_dir / r["output"]) as kb:
            mask = kb[2].data
            h = kb[0].header
            # KBMOD refuses values above 1e8 (a bright star's core): those are masked
            within = (kb[3].data * np.float32(h["FILTVARF"]) <= KBMOD_LIMIT) & (
                np.abs(kb[1].data) <= KBMOD_LIMIT)
            usable = ((mask & ~flag(Bit.HOT, Bit.DEAD)) == 0) & np.isfinite(kb[1].data)
            n_refused += int((usable & ~within).sum())
            usable &= within
            assert np.array_equal(img["msk"] > 0, ~usable)
            assert np.array_equal(img["sci"][usable], kb[1].data[usable])
            # VAR_i is VAR x FILTVARF: KBMOD's likelihood is then a unit-variance SNR
            assert 0.5 < h["FILTVARF"] < 1.0
            np.testing.assert_allclose(img["var"][usable],
                                       kb[3].data[usable] * np.float32(h["FILTVARF"]),
                                       rtol=1e-6)
            repaired = (mask & flag(Bit.HOT, Bit.DEAD)) != 0
        # most repaired pixels (hot, or dead but responsive) keep a value KBMOD uses
        n_repaired += int(repaired.sum())
        n_used += int((repaired & usable).sum())
        # KBMOD loses single pixels only: inside the registration edges at most 5 %
        e = int(np.ceil(max(abs(h["REGDX"]), abs(h["REGDY"])))) + 1
        assert (img["msk"][e:-e, e:-e] > 0).mean() <= 0.05
        assert np.all(np.isfinite(img["sci"][usable]) & (img["var"][usable] > 0))
    assert [i["mjd"] for i in wu["images"]] == sorted(i["mjd"] for i in wu["images"])
    print(f"\nrepaired pixels used by KBMOD: {n_used} of {n_repaired}; masked for values "
          f"above KBMOD's limit: {n_refused}")
    assert n_repaired > 100 and n_used >= 0.5 * n_repaired


def test_psf_kernels_are_normalised_and_measured(exported):
    wu = _read_like_kbmod(exported.details["workunit"])
    for img in wu["images"]:
        k = img["psf"]
        n = k.shape[0]
        assert k.shape == (n, n) and n % 2 == 1
        assert k.sum() == pytest.approx(1.0, abs=1e-5)
        c = np.arange(n) - n // 2
        assert abs(np.sum(k * c[None, :])) < 1e-5 and abs(np.sum(k * c[:, None])) < 1e-5
        sigma = img["psf_header"]["PSFSIGMA"]
        # second moment of a pixel-integrated Gaussian: σ² + 1/12 (truncated at 4σ)
        m2 = np.sum(k * c[None, :] ** 2)
        assert m2 == pytest.approx(sigma**2 + 1 / 12, rel=0.01)
        # the frames' PSF (truth: 1.3 px) broadened by resampling and PSF matching
        assert SIM.psf_sigma <= sigma <= 1.35 * SIM.psf_sigma


def test_fitted_wcs_maps_the_true_stars(exported, night):
    night_dir, _ = night
    ref = exported.details["reference"]
    fit = exported.details["wcs_fit"]
    assert fit["status"] == "fitted" and fit["n_stars"] >= 20 and fit["rms_px"] < 0.2
    wu = _read_like_kbmod(exported.details["workunit"])
    rms = _rms(wu["wcs"], *_truth_sky(night_dir, ref))
    print(f"\nfitted WCS: {fit['n_stars']} stars, fit rms {fit['rms_px']:.3f} px; true stars "
          f"mapped with rms {rms:.3f} px")
    assert rms <= 0.1
    assert wu["header"]["WCSNSTAR"] == fit["n_stars"]
    # each image's own WCS maps the stars onto its own (unregistered) grid
    for w, r in zip(wu["per_image"], exported.frames, strict=True):
        assert _rms(w, *_truth_sky(night_dir, r["stem"])) <= 0.15
    manifest = json.loads((exported.out_dir / "kbmod.json").read_text())
    assert manifest["wcs_fit"]["n_stars"] == fit["n_stars"]


def test_a_big_night_is_sharded(exported, night, client):
    """Above ``workunit_shard_mb`` the WorkUnit is KBMOD's sharded layout: a metadata file
    and one file per image, holding what the single file holds."""
    night_dir, cat = night
    settings = Settings().replace(cluster={"dashboard_address": ":0"},
                                  astrometry=_guess(str(cat)),
                                  kbmod={"workunit_shard_mb": 0.5})
    again = export_night(night_dir, client, settings, out=exported.details["test_out"])
    assert again.counts["skipped"] == SIM.n_science and again.details["workunit_sharded"]
    primary = again.details["workunit"]
    assert primary.parent.name == "workunit" and primary.name == exported.details[
        "workunit"].name
    with fits.open(primary) as meta, fits.open(exported.details["workunit"]) as single:
        assert meta[0].header["NUMIMG"] == SIM.n_science and "SCI_0" not in meta
        assert {h.name for h in meta} == {"PRIMARY", "KBMOD_CONFIG", "IMG_META"}
        for i in range(SIM.n_science):
            with fits.open(primary.parent / f"{i}_{primary.name}") as shard:
                for kind in ("SCI", "VAR", "MSK", "PSF"):
                    assert np.array_equal(shard[f"{kind}_{i}"].data, single[f"{kind}_{i}"].data,
                                          equal_nan=kind in ("SCI", "VAR"))
                assert shard[f"SCI_{i}"].header["MJD"] == single[f"SCI_{i}"].header["MJD"]


def test_default_kbmod_masking_keeps_the_frame(exported):
    """KBMOD's ImageCollection masking (BAD, EDGE, NO_DATA, SUSPECT grown 10×10) on the
    per-frame files: away from the registration edges at most 5 % is lost."""
    for r in exported.frames:
        with fits.open(exported.out_dir / r["output"]) as kb:
            mask, h = kb[2].data, kb[0].header
        grown = convolve2d((mask & KBMOD_DEFAULT) != 0, np.ones((10, 10)), mode="same") > 0
        e = int(np.ceil(max(abs(h["REGDX"]), abs(h["REGDY"])))) + 10
        assert grown[e:-e, e:-e].mean() <= 0.05, (r["stem"], grown[e:-e, e:-e].mean())


def test_wcs_fit_from_a_guess_and_its_failures(night):
    night_dir, cat_path = night
    cat = read_catalog(cat_path)
    truth = load_truth(night_dir)
    shape = (SIM.size, SIM.size)
    tw = true_wcs(SIM.size)
    x, y = tw.all_world2pix(cat.ra, cat.dec, 0)
    inside = (x > 3) & (x < SIM.size - 4) & (y > 3) & (y < SIM.size - 4)
    bright = np.argsort(cat.mag[inside])[:80]
    stars = np.zeros(bright.size, [("x", "f8"), ("y", "f8"), ("snr", "f8")])
    rng = np.random.default_rng(1)
    stars["x"] = x[inside][bright] + rng.normal(0, 0.03, bright.size)
    stars["y"] = y[inside][bright] + rng.normal(0, 0.03, bright.size)
    stars["snr"] = -cat.mag[inside][bright]
    ast = AstrometrySettings(**_guess(str(cat_path)))
    guess = guess_wcs(ast.ra, ast.dec, ast.pixel_scale, ast.rotation, shape)
    fit = fit_wcs(stars, cat.ra, cat.dec, cat.mag, guess, shape, ast)
    assert fit.n_stars >= 70 and fit.rms < 0.1
    ra, dec = tw.all_pix2world(truth.stars[:, 0], truth.stars[:, 1], 0)
    assert _rms(fit.wcs, ra, dec, truth.stars[:, 0], truth.stars[:, 1]) < 0.05
    # the first guess has the orientation of the truth: east left, +y at PA 25°
    g = guess_wcs(SKY["ra"], SKY["dec"], SKY["scale"], SKY["rotation"], shape)
    assert np.allclose(g.wcs.cd, tw.wcs.cd) and np.allclose(g.wcs.crval, tw.wcs.crval)
    with pytest.raises(AstrometryError, match="at least"):
        fit_wcs(stars[:3], cat.ra, cat.dec, cat.mag, guess, shape, ast)
    assert pointing(fits.Header({"RA": "14:21:00", "DEC": "-62:24:00", "PIXSCALE": 1.3})
                    ) == pytest.approx({"ra": 215.25, "dec": -62.4, "scale": 1.3,
                                        "rotation": None})


def test_search_candidates_carry_sky_positions(exported, night, client):
    night_dir, _ = night
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    res = search_night(night_dir, client, settings, out=exported.details["test_out"])
    rows = read_candidates(res.details["candidates"])
    assert res.details["summary"]["sky"] is True
    true_ref = frame_true_wcs(night_dir, exported.details["reference"])
    for tr in _fast_tracks(night_dir, exported):
        near = [r for r in rows if np.hypot(r["x"] - tr["start"][0],
                                            r["y"] - tr["start"][1]) <= 2.0]
        assert near, tr["start"]
        best = max(near, key=lambda r: r["snr"])
        # the candidate's sky position is its pixel position through the true WCS
        for x, y, ra, dec in ((best["x"], best["y"], best["ra"], best["dec"]),
                              (best["x_end"], best["y_end"], best["ra_end"], best["dec_end"])):
            px, py = true_ref.all_world2pix(ra, dec, 0)
            assert np.hypot(px - x, py - y) <= 0.1
        tx, ty = tr["start"]
        px, py = true_ref.all_world2pix(best["ra"], best["dec"], 0)
        assert np.hypot(px - tx, py - ty) <= 2.0


def test_the_command_line_takes_a_catalog(exported, night, client, capsys):
    night_dir, cat = night
    args = build_parser().parse_args(["kbmod", str(night_dir), "--out",
                                      str(exported.details["test_out"]), "--catalog", str(cat)])
    settings = _settings(args)
    assert settings.astrometry.catalog == str(cat)
    # the pointing from the settings file of this test (no RA/DEC in the raw headers)
    settings = settings.replace(astrometry={k: v for k, v in _guess(str(cat)).items()},
                                cluster={"dashboard_address": ":0"})
    assert _kbmod(night_dir, client, settings, args) == "complete"
    out = capsys.readouterr().out
    # the line says what kbmod.json records of the fit (its accuracy against the true sky:
    # test_fitted_wcs_maps_the_true_stars)
    fit = json.loads((exported.details["test_out"] / night_dir.name / "kbmod"
                      / "kbmod.json").read_text())["wcs_fit"]
    assert "WorkUnit:" in out
    assert f"WCS fitted to catalog.csv: {fit['n_stars']} stars, rms" in out
    assert fit["n_stars"] >= 20 and fit["rms_px"] < 0.2, fit
    no_pointing = settings.replace(astrometry={"ra": -1.0, "dec": -100.0})
    args.force = True
    assert _kbmod(night_dir, client, no_pointing, args) == "complete"
    assert "no WCS: no pointing" in capsys.readouterr().out
    assert fits.getheader(exported.details["workunit"])["REPRJCTD"] is False
    args.force = False  # back to the fitted WCS for the tests that follow
    assert _kbmod(night_dir, client, settings, args) == "complete"
    assert fits.getheader(exported.details["workunit"])["REPRJCTD"] is True


def test_catalog_errors_name_the_file(tmp_path):
    bad = tmp_path / "cat.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=r"cat\.csv: no RA column"):
        read_catalog(bad)
    with pytest.raises(ValueError, match=r"missing\.fits: catalog not found"):
        read_catalog(tmp_path / "missing.fits")


def test_psf_kernel_is_a_sampled_gaussian():
    k = psf_kernel(1.5)
    assert k.shape == (13, 13) and k.sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        psf_kernel(float("nan"))


# --------------------------------------------------------------------------- with KBMOD


def _fast_tracks(night_dir, exported) -> list[dict]:
    with fits.open(exported.details["workunit"]) as hdul:
        files = [str(n) for n in hdul["IMG_META"].data["data_loc"]]
    stems = [f.removesuffix("_KBMOD.fits") for f in files]
    return [t for t in mover_tracks(night_dir, stems, exported.details["reference"])
            if t["per_frame"] > FAST]


def test_kbmod_loads_the_workunit_and_finds_both_fast_movers(exported, night):
    pytest.importorskip("kbmod.search")
    from kbmod.configuration import SearchConfiguration
    from kbmod.run_search import SearchRunner
    from kbmod.work_unit import WorkUnit

    night_dir, _ = night
    wu = WorkUnit.from_fits(str(exported.details["workunit"]))
    assert wu.reprojected and wu.wcs is not None and len(wu) == SIM.n_science
    assert wu.observatory.lat.deg == pytest.approx(-75.1, abs=0.01)
    assert wu.config["num_obs"] == 10 and wu.config["psf_val"] > 1.0
    shard_dir = exported.out_dir / "workunit"
    if shard_dir.is_dir():  # written by test_a_big_night_is_sharded
        name = exported.details["workunit"].name
        sharded = WorkUnit.from_sharded_fits(name, str(shard_dir))
        assert len(sharded) == len(wu) and sharded.reprojected
        assert np.allclose(sharded.get_all_obstimes(), wu.get_all_obstimes())
    # KBMOD rounds a trajectory's predicted positions to whole pixels, so velocities that
    # differ by less than ~1 px over the night (0.0127 d: ~79 px/day) are one; the grid
    # step is that
    step = 1600.0 / 20
    cfg = SearchConfiguration()
    cfg.set("generator_config", {"name": "VelocityGridSearch", "vx_steps": 21,
                                 "min_vx": -800.0, "max_vx": 800.0, "vy_steps": 21,
                                 "min_vy": -800.0, "max_vy": 800.0})
    cfg.set("num_obs", 8)
    cfg.set("lh_level", 7.0)
    wu.config = cfg
    res = SearchRunner().run_search_from_work_unit(wu)
    tab = res.table
    tracks = _fast_tracks(night_dir, exported)
    assert len(tracks) == 2
    sky = WCS(fits.getheader(exported.details["workunit"], 0))
    true_ref = frame_true_wcs(night_dir, exported.details["reference"])
    for tr in tracks:
        d = np.hypot(tab["x"] - tr["start"][0], tab["y"] - tr["start"][1])
        dv = np.hypot(*(np.column_stack([tab["vx"], tab["vy"]]) - tr["v"]).T)
        ok = np.nonzero((d <= 2.0) & (np.abs(tab["vx"] - tr["v"][0]) <= step)
                        & (np.abs(tab["vy"] - tr["v"][1]) <= step))[0]
        assert ok.size, (tr["start"], tr["v"])
        best = ok[np.argmax(np.asarray(tab["likelihood"])[ok])]
        print(f"\nKBMOD: mover at {tr['start']} ({tr['v']} px/day): start off by "
              f"{d[best]:.2f} px, velocity off by {dv[best]:.0f} px/day (step {step:.0f}), "
              f"likelihood {tab['likelihood'][best]:.1f}, {tab['obs_count'][best]} frames")
        # global RA/Dec of the start within one pixel of the mover's true sky position
        ra0, dec0 = true_ref.all_pix2world(tr["start"][0], tr["start"][1], 0)
        gx, gy = sky.all_world2pix(np.ravel(tab["global_ra"][best])[0],
                                   np.ravel(tab["global_dec"][best])[0], 0)
        tx, ty = sky.all_world2pix(ra0, dec0, 0)
        print(f"  global RA/Dec off the true start by {np.hypot(gx - tx, gy - ty):.2f} px")
        assert np.hypot(gx - tx, gy - ty) <= 1.0


def test_kbmod_image_collection_reads_the_frames(exported):
    pytest.importorskip("kbmod.search")
    from kbmod import ImageCollection

    paths = [str(exported.out_dir / r["output"]) for r in exported.frames]
    ic = ImageCollection.fromTargets(paths, force="KBMODV0_5")
    masked = []
    for std, r in zip(ic.get_standardizers(), exported.frames, strict=True):
        m = next(iter(std["std"].standardizeMaskImage()))
        h = fits.getheader(exported.out_dir / r["output"], 0)
        e = int(np.ceil(max(abs(h["REGDX"]), abs(h["REGDY"])))) + 10
        masked.append((float(np.mean(m)), float(np.mean(m[e:-e, e:-e]))))
    print(f"\nImageCollection default masking (whole, inside the registration edges): "
          f"{np.round(masked, 3).tolist()}")
    assert len(masked) == len(paths) and max(i for _, i in masked) <= 0.05


def _flip(path, hdu: int = 1) -> None:
    """Flip one bit in the data of ``hdu`` (a damaged disk or copy; the header intact)."""
    with fits.open(path) as hdul:
        at = hdul.fileinfo(hdu)["datLoc"] + 17
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_damaged_night_products_are_remade_and_force_remakes_them(exported, night, client):
    """The template, the stack and the WorkUnit are reused only when they verify
    (DATASUM/CHECKSUM), whatever their provenance card says; ``force`` remakes them."""
    night_dir, cat = night
    settings = Settings().replace(cluster={"dashboard_address": ":0"},
                                  astrometry=_guess(str(cat)))
    out = exported.details["test_out"]
    first = export_night(night_dir, client, settings, out=out)
    products = [first.details["template"]["file"], first.details["stack"],
                first.details["workunit"]]
    for p in products:
        assert verify_file(p) is None, p
        _flip(p)
        assert verify_file(p) is not None, p
    again = export_night(night_dir, client, settings, out=out)
    assert again.status == "complete", again.error
    for p in products:
        assert verify_file(p) is None, p  # remade, not trusted on its card
    before = {p: p.stat().st_mtime_ns for p in products}
    kept = export_night(night_dir, client, settings, out=out)
    assert {p: p.stat().st_mtime_ns for p in products} == before  # intact: kept
    forced = export_night(night_dir, client, settings, out=out, force=True)
    assert forced.status == "complete", forced.error
    assert all(p.stat().st_mtime_ns != before[p] for p in products), kept.details


def test_values_kbmod_refuses_are_masked_not_passed_on():
    # KBMOD's ImageStackPy.validate warns of unmasked variance or science above 1e8
    sci = np.array([[1.0, 2.0, 3e8, np.nan]], np.float32)
    var = np.array([[4.0, 2e8, 4.0, 4.0]], np.float32)
    mask = np.array([[0, 0, 0, 0]], np.int32)
    out = workunit_search_mask(mask, sci, var)
    assert out[0, 0] == 0
    assert out[0, 1] == flag(Bit.SUSPECT) and out[0, 2] == flag(Bit.SUSPECT)
    assert out[0, 3] == flag(Bit.NO_DATA)
