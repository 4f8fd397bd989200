"""Issue 18's acceptance on a 1024² night of 60 science frames whose sky has its own 0.5 %
gradient turning through the night: the corrected flat's large-scale error, its
small-scale error against the flats' photon limit, and star photometry across the field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std
from distributed import Client, LocalCluster
from scipy import ndimage

from astep_dask.config import Settings
from astep_dask.io.fitsio import read_calibrated
from astep_dask.masters.store import corrected_flat, read_master
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night
from tests.masters.test_illum import plane_rms

CFG = SimConfig(size=1024, n_science=60, sky_gradient=0.005, sky_gradient_turns=1.0,
                seed=18)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    night = simulate_night(tmp_path_factory.mktemp("illum_1024"), CFG)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        result = calibrate_night(night, client, Settings())
    assert result.status == "complete", result.error
    return night, result


def _flats(result):
    p = result.details["masters"]["paths"]
    flat, mask, illum = p["flats"]["RC"], p["mask"], p["illums"]["RC"]
    corrected, _ = corrected_flat(Path(flat), Path(mask), Path(illum))
    return read_master(flat), read_master(mask).data, corrected


def _highpass_scatter(ratio: np.ndarray, good: np.ndarray, box: int = 33) -> float:
    """Robust scatter of ``ratio`` about its own local mean (box ``box`` px, good pixels
    only): the small-scale error."""
    num = ndimage.uniform_filter(np.where(good, ratio, 0), box)
    den = ndimage.uniform_filter(good.astype(float), box)
    return float(mad_std((ratio / (num / den))[good]))


@pytest.mark.slow
def test_corrected_flat_against_the_truth(calibrated):
    night, result = calibrated
    truth = load_truth(night)
    master, mask, corrected = _flats(result)
    good = (mask == 0) & ~truth.dead
    summary = result.details["masters"]["illum"]["RC"]
    assert summary["frames"] >= 55  # no frame is rejected for its own turning gradient
    before = plane_rms(master.data / truth.flat, good)
    after = plane_rms(corrected / truth.flat, good)
    print(f"large-scale error: master {100 * before:.3f} %, corrected {100 * after:.3f} %")
    assert before > 0.003
    assert after <= 0.001
    # Small scale: unchanged, within 1.1x the photon limit of the flats used.
    levels = np.asarray(master.inputs or fits.getdata(master.path, "INPUTS")["LEVEL"])
    levels = levels * CFG.gain
    rel_var = (levels + CFG.read_noise**2 * (1 + 1 / CFG.n_darks)) / levels**2
    limit = float(np.sqrt(1.0 / np.sum(1.0 / rel_var)))
    small_before = _highpass_scatter(master.data / truth.flat, good)
    small_after = _highpass_scatter(corrected / truth.flat, good)
    print(f"small-scale: master {100 * small_before:.4f} %, corrected "
          f"{100 * small_after:.4f} %, photon limit {100 * limit:.4f} %")
    assert small_after <= 1.1 * limit
    assert small_after <= small_before * 1.001


def _photometry(sci, mask, model, xy, r_ap=5.0, r_in=8.0, r_out=12.0):
    """Aperture sums of sky-subtracted ``sci`` and ``model`` (annulus medians) around the
    positions ``xy``; NaN where the aperture touches a masked pixel."""
    half = int(r_out) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    out = []
    for x, y in xy:
        ix, iy = int(np.rint(x)), int(np.rint(y))
        sl = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        r = np.hypot(xx + ix - x, yy + iy - y)
        ap, ann = r <= r_ap, (r >= r_in) & (r <= r_out)
        if mask[sl][ap].any():
            out.append((np.nan, np.nan))
            continue
        s, m = sci[sl], model[sl]
        out.append((np.sum(s[ap] - np.median(s[ann & (mask[sl] == 0)])),
                    np.sum(m[ap] - np.median(m[ann]))))
    return np.array(out)


def _trend(x, y, ratio):
    """Clipped fit ratio = a + b u + c v (u, v from -0.5 to 0.5 across the field): the
    change of the flux ratio across the field in x and y, relative to a."""
    u, v = x / CFG.size - 0.5, y / CFG.size - 0.5
    keep = np.isfinite(ratio)
    for _ in range(3):
        a = np.column_stack([np.ones(keep.sum()), u[keep], v[keep]])
        coef = np.linalg.lstsq(a, ratio[keep], rcond=None)[0]
        resid = ratio - (coef[0] + coef[1] * u + coef[2] * v)
        keep = np.isfinite(ratio) & (np.abs(resid) < 4 * mad_std(resid[np.isfinite(resid)]))
    return coef[1] / coef[0], coef[2] / coef[0]


@pytest.mark.slow
def test_star_photometry_has_no_trend_with_position(calibrated):
    night, result = calibrated
    truth = load_truth(night)
    master, _, corrected = _flats(result)
    to_master = corrected / master.data  # sci with the uncorrected flat: sci * this
    frames = {f["file"]: f for f in truth.frames}
    rows = [r for r in result.frames if r["status"] == "done"][::6]
    xs, ys, ratios, ratios_before = [], [], [], []
    bright = (truth.stars[:, 2] > 3e4) & (truth.stars[:, 2] < 4e5)
    for row in rows:
        _, sci, _, mask = read_calibrated(result.out_dir / row["output"])
        f = frames[row["file"]]
        model = load_frame_truth(night, row["file"].removesuffix(".fits"))["model"]
        xy = truth.stars[bright, :2] + np.array(f["offset"])
        inside = np.all((xy > 15) & (xy < CFG.size - 16), axis=1)
        xy = xy[inside]
        phot = _photometry(sci, mask, model, xy)
        before = _photometry(sci * to_master, mask, model, xy)
        xs.append(xy[:, 0])
        ys.append(xy[:, 1])
        ratios.append(phot[:, 0] / phot[:, 1])
        ratios_before.append(before[:, 0] / before[:, 1])
    x, y = np.concatenate(xs), np.concatenate(ys)
    bx, by = _trend(x, y, np.concatenate(ratios))
    bx0, by0 = _trend(x, y, np.concatenate(ratios_before))
    print(f"flux/true across the field: x {100 * bx:+.3f} %, y {100 * by:+.3f} % "
          f"(uncorrected flat: x {100 * bx0:+.3f} %, y {100 * by0:+.3f} %), "
          f"{np.isfinite(np.concatenate(ratios)).sum()} measures")
    assert max(abs(bx0), abs(by0)) > 0.003  # the trend the twilight gradient made ...
    assert abs(bx) <= 0.001 and abs(by) <= 0.001  # ... is gone
