"""A template that holds no movers (issue 31): a slow mover must not subtract itself.

With a template from the night's own frames, a mover that moves only a few PSF widths over
the night is, at its pixels, in many of the frames next to each frame in time; leaving one
frame out is not enough, and a faint one is not clipped. The template now leaves out, per
pixel, the runs of consecutive frames that hold an excursion (``[template] mover_sigma``,
:func:`astep_dask.kbmod.template.moving_runs`).

First on stacks of frames with Gaussian noise (fast, exact): the flux a mover takes into
the template used for each of its frames is measured as the difference of two templates
made from the *same* noise with and without the mover. Then end to end on a simulated
night (calibrate + ``export_night``): PSF-weighted photometry at the true positions in the
difference frames against the true fluxes, and the static stars' residuals.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.config import Settings, TemplateSettings
from astep_dask.kbmod.difference import leave_one_out, leave_out
from astep_dask.kbmod.products import Layers, read_layers
from astep_dask.kbmod.stage import export_night
from astep_dask.kbmod.template import (
    NO_TEMPLATE,
    combine_frames,
    homogenise,
    in_run,
    kept,
    mover_pad,
    read_rows,
    windows,
)
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import (
    SimConfig,
    add_sources,
    load_truth,
    mover_tracks,
    moving_light,
    psf_stamp,
    simulate_night,
)

SIGMA = 1.45  # px, the PSF of PSF-matched frames
VAR = 700.0  # e-², sky and read noise of a pixel
N = 20  # frames: 100 s apart, 32 minutes
GROW = 2


def _stack(seed: int, movers: list[tuple[float, float, float, float, float]], size: int = 64
           ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[float, float]]]]:
    """Static sky (one bright star) + noise, and the movers (x0, y0, vx, vy, flux) alone."""
    rng = np.random.default_rng(seed)
    static = np.zeros((size, size))
    add_sources(static, [45.0], [15.0], [40000.0], SIGMA)
    noisy = static + rng.normal(0, 1, (N, size, size)) * np.sqrt(VAR + static)
    light, tracks = moving_light(movers, N, size, SIGMA)
    return noisy, light, tracks


def _templates(sci: np.ndarray, ts: TemplateSettings) -> np.ndarray:
    """The template each frame is differenced against (leave-one-out, time ranks)."""
    var = np.full(sci.shape, VAR, np.float32)
    tpl = combine_frames(sci.astype(np.float32), var, np.ones(sci.shape, bool), np.ones(N),
                         ts, GROW, psf_sigma=SIGMA)
    zero = np.zeros(sci.shape[1:], np.int32)
    return np.array([leave_one_out(tpl, Layers(sci[i].astype(np.float32), var[i], zero), 1.0,
                                   ts, GROW, i).sci for i in range(N)])


def _taken(seed: int, movers: list, ts: TemplateSettings) -> list[float]:
    """Per mover: the mean fraction of its flux in the templates of its own frames (PSF
    photometry of template with the mover minus template without, same noise)."""
    noisy, light, tracks = _stack(seed, movers)
    with_m, without = _templates(noisy + light, ts), _templates(noisy, ts)
    out = []
    for (*_, flux), pos in zip(movers, tracks, strict=True):
        f = []
        for i, (x, y) in enumerate(pos):
            g, ys, xs = psf_stamp(x, y, SIGMA, noisy.shape[1:])
            d = (with_m[i] - without[i])[np.ix_(ys, xs)]
            assert np.isfinite(d).all()  # never masked: the clipping keeps what it can
            f.append(np.sum(g * d) / np.sum(g * g) / flux)
        out.append(float(np.mean(f)))
    return out


SLOW = 0.5  # px/frame: 432 px/day at 100 s a frame, 10 px (7 σ) over the night
MOVERS = [(12.0, 40.0, SLOW * 0.8, SLOW * 0.6, 1000.0),  # per frame: SNR 3.5, peak 2.8 σ
          (30.0, 12.0, SLOW * 0.6, SLOW * 0.8, 600.0),  # SNR 2.1, peak 1.7 σ
          (5.0, 55.0, 2.0, -0.5, 1000.0)]  # fast: 2 px a frame


def test_slow_movers_stay_out_of_their_own_template():
    ts = TemplateSettings()
    assert ts.mover_sigma > 0
    new = np.array([_taken(seed, MOVERS, ts) for seed in (1, 2, 3)])
    old = np.array([_taken(seed, MOVERS, TemplateSettings(mover_sigma=0)) for seed in (1, 2)])
    print(f"\nflux taken into the template, per mover (slow 1000, slow 600, fast 1000 e-): "
          f"plain clip {np.round(old.mean(0), 3)}, time-aware {np.round(new.mean(0), 3)}")
    # before: a slow mover gives 30-45 % of its flux to its own template (a matched
    # filter's overlap of a PSF with its neighbours in time, √(4π) σ / v frames of N − 1)
    assert old[:, 0].mean() > 0.25 and old[:, 1].mean() > 0.3
    assert new[:, 0].mean() < 0.05 and new[:, 1].mean() < 0.05
    assert new[:, :2].max() < 0.1
    assert abs(new[:, 2].mean()) < 0.02 and abs(old[:, 2].mean()) < 0.05


def _templates_near(sci: np.ndarray, ts: TemplateSettings, k: int) -> np.ndarray:
    """The template of each frame leaving out, besides itself, the frames within ``k`` of
    it in time (``[template] near_speed``), where that leaves ``min_frames``."""
    var = np.full(sci.shape, VAR, np.float32)
    tpl = combine_frames(sci.astype(np.float32), var, np.ones(sci.shape, bool), np.ones(N),
                         ts, GROW, psf_sigma=SIGMA)
    zero = np.zeros(sci.shape[1:], np.int32)

    def layers(j: int) -> Layers:
        return Layers(sci[j].astype(np.float32), var[j], zero)

    return np.array([leave_out(tpl, [(layers(i), 1.0, i)], ts, GROW,
                               [(layers(j), 1.0, j) for j in range(N)
                                if 0 < abs(j - i) <= k], i).sci for i in range(N)])


def test_faint_slow_movers_keep_their_light_with_the_near_frames_left_out():
    # 400 e- at 0.5 px a frame: per frame SNR 1.4, too faint for most runs of
    # mover_sigma; leaving one frame out, its neighbours in time put some of its light in
    # its template; leaving out the frames within the time it moves 2.5 σ (the rule of
    # [template] near_speed: 7 frames each side here), little
    faint = [(12.0, 40.0, SLOW * 0.8, SLOW * 0.6, 400.0)]
    k = int(2.5 * SIGMA / SLOW)
    ts = TemplateSettings()
    loo, near = [], []
    for seed in (1, 2, 3):
        noisy, light, tracks = _stack(seed, faint)
        for out, make in ((loo, lambda a: _templates(a, ts)),
                          (near, lambda a: _templates_near(a, ts, k))):
            d = make(noisy + light) - make(noisy)
            f = []
            for i, (x, y) in enumerate(tracks[0]):
                g, ys, xs = psf_stamp(x, y, SIGMA, noisy.shape[1:])
                f.append(np.sum(g * d[i][np.ix_(ys, xs)]) / np.sum(g * g) / 400.0)
            out.append(np.mean(f))
    print(f"\nfaint slow mover's flux in its template: leave-one-out {np.mean(loo):.3f}, "
          f"near frames left out {np.mean(near):.3f}")
    # measured: 0.136 and 0.051 (three noise draws)
    assert np.mean(loo) > 0.1
    assert np.mean(near) < 0.5 * np.mean(loo)


def test_mover_runs_cost_little_on_noise_and_are_left_out_exactly():
    rng = np.random.default_rng(7)
    size = 96
    sci = rng.normal(0, np.sqrt(VAR), (N, size, size)).astype(np.float32)
    var = np.full(sci.shape, VAR, np.float32)
    usable = np.ones(sci.shape, bool)
    weights = rng.uniform(0.8, 1.2, N)
    rank = rng.permutation(N)  # frames not in time order
    tpl = combine_frames(sci, var, usable, weights, TemplateSettings(), GROW, rank, SIGMA)
    plain = combine_frames(sci, var, usable, weights, TemplateSettings(mover_sigma=0), GROW)
    runs = in_run(rank, tpl.first, tpl.last)
    # pure noise: few runs, the template's noise barely above the plain clip's
    assert windows(N) == [0, 1, 3]
    assert runs.mean() < 0.03
    assert tpl.sci.std() < 1.03 * plain.sci.std()
    # each frame's template is exactly the weighted mean of the values the clipping kept,
    # less the frame itself and the runs
    keep = kept(sci, var, usable, tpl.centre, TemplateSettings().sigma, GROW,
                TemplateSettings().residual_floor) & ~runs
    for i in (0, 5):
        loo = leave_one_out(tpl, Layers(sci[i], var[i], np.zeros((size, size), np.int32)),
                            weights[i], TemplateSettings(), GROW, int(rank[i]))
        k = keep.copy()
        k[i] = False
        w = np.where(k, weights[:, None, None], 0.0)
        ok = loo.mask == 0
        np.testing.assert_allclose(loo.sci[ok], ((w * sci).sum(0) / w.sum(0))[ok],
                                   rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(loo.var[ok], ((w * w * var).sum(0) / w.sum(0) ** 2)[ok],
                                   rtol=1e-5)
    # leaving out near frames too: exactly the mean without them, where min_frames stay
    near = [j for j in range(N) if 0 < abs(int(rank[j]) - int(rank[5])) <= 3]
    zero = np.zeros((size, size), np.int32)
    lo = leave_out(tpl, [(Layers(sci[5], var[5], zero), weights[5], int(rank[5]))],
                   TemplateSettings(), GROW,
                   [(Layers(sci[j], var[j], zero), weights[j], int(rank[j])) for j in near],
                   int(rank[5]))
    k = keep.copy()
    k[5] = False
    k[near] = False
    w = np.where(k, weights[:, None, None], 0.0)
    ok = (lo.mask == 0) & ~in_run(int(rank[5]), tpl.first, tpl.last)
    assert ok.mean() > 0.9
    np.testing.assert_allclose(lo.sci[ok], ((w * sci).sum(0) / w.sum(0))[ok],
                               rtol=1e-5, atol=1e-3)


def test_strips_give_the_whole_frame_runs():
    # the template is combined in strips of rows, each read with extra rows: the mover
    # runs depend on rows within mover_pad (and the clipping's grown rejections)
    noisy, light, _ = _stack(4, MOVERS)
    sci = (noisy + light).astype(np.float32)
    var = np.full(sci.shape, VAR, np.float32)
    usable = np.ones(sci.shape, bool)
    ts = TemplateSettings()
    rank = np.arange(N)[::-1].copy()
    whole = combine_frames(sci, var, usable, np.ones(N), ts, GROW, rank, SIGMA)
    assert (whole.first >= 0).sum() > 100
    pad = (ts.iterations + 1) * GROW + mover_pad(ts, SIGMA)
    ny = sci.shape[1]
    for a in range(0, ny, 13):
        b = min(a + 13, ny)
        lo, hi = max(a - pad, 0), min(b + pad, ny)
        part = combine_frames(sci[:, lo:hi], var[:, lo:hi], usable[:, lo:hi], np.ones(N), ts,
                              GROW, rank, SIGMA)
        rows = slice(a - lo, a - lo + b - a)
        for name in ("sci", "var", "nkeep", "first", "last"):
            np.testing.assert_array_equal(getattr(part, name)[rows],
                                          getattr(whole, name)[a:b], err_msg=name)


# --------------------------------------------------------------------------- end to end

# five slow movers (0.5 px a frame, 700-1100 e-: peak 2-3 σ of a pixel) and two fast ones
SIM = SimConfig(size=192, n_science=N, n_darks=5, n_flats=7, seed=11,
                movers=((0.3824, 0.3221, 700.0), (-0.4996, 0.0208, 900.0),
                        (0.3543, -0.3528, 1100.0), (-0.1616, 0.4732, 800.0),
                        (-0.2004, -0.4581, 1000.0), (1.2, 0.9, 1500.0), (-0.9, 1.2, 1500.0)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, client):
    night = simulate_night(tmp_path_factory.mktemp("tm_archive"), SIM)
    out = tmp_path_factory.mktemp("tm_out")
    # with the near frames left out too ([template] near_speed, off by default): the
    # difference frames are made through that path end to end here
    settings = Settings().replace(cluster={"dashboard_address": ":0"},
                                  template={"near_speed": 400.0})
    assert calibrate_night(night, client, settings, out=out).status == "complete"
    exp = export_night(night, client, settings, out=out)
    assert exp.status == "complete", exp.error
    assert exp.details["template"]["mode"].startswith("night")
    return night, exp


def _difference_frames(exp) -> list[dict]:
    out = []
    for r in exp.frames:
        header, f = read_layers(exp.out_dir / r["output"])
        out.append({"header": header, "sci": f.sci.astype(float),
                    "mask": f.mask.astype(np.int64), "var": f.var.astype(float)})
    return out


def test_slow_movers_keep_their_flux_in_the_difference_frames(exported):
    night, exp = exported
    frames = _difference_frames(exp)
    assert all(f["header"]["TPLNEAR"] >= 1 for f in frames)  # near frames left out too
    stems = [f["header"]["CALFILE"].removesuffix("_CAL.fits") for f in frames]
    tracks = mover_tracks(night, stems, exp.details["reference"])
    kept_flux = {}
    for tr in tracks:
        num = den = 0.0
        used = 0
        for f, (x, y) in zip(frames, tr["positions"], strict=True):
            # PSF-weighted photometry: unbiased for the frames' Gaussian PSF (PSFSIGMA)
            g, ys, xs = psf_stamp(x, y, f["header"]["PSFSIGMA"], f["sci"].shape)
            good = f["mask"][np.ix_(ys, xs)] == 0
            # the template has a value under every mover (NO_TEMPLATE is NO_DATA)
            assert not f["mask"][round(y), round(x)] & NO_TEMPLATE
            if np.sum((g * g)[good]) < 0.8 * np.sum(g * g):
                continue  # on a dead column, a cosmic ray
            num += np.sum(np.where(good, g * f["sci"][np.ix_(ys, xs)], 0.0))
            den += np.sum((g * g)[good])
            used += 1
        assert used >= N // 2
        kept_flux[tr["k"]] = num / den / tr["flux"]
    slow = [kept_flux[t["k"]] for t in tracks if t["per_frame"] < 0.6]
    fast = [kept_flux[t["k"]] for t in tracks if t["per_frame"] > 1]
    print(f"\nflux kept in the difference frames: slow {np.round(slow, 3)}, "
          f"fast {np.round(fast, 3)}")
    # each slow mover's photometry over the night has ~4 % noise, their mean ~2 %; with
    # the plain clipped mean (mover_sigma = 0) this night's slow movers keep 0.46-0.61
    # (mean 0.54), with the time-aware rejection 0.86-1.01 (mean 0.92)
    assert len(slow) == 5 and np.mean(slow) >= 0.85 and min(slow) > 0.75
    assert len(fast) == 2 and all(0.9 < k < 1.1 for k in fast)


def test_static_stars_still_subtract_to_the_noise(exported):
    night, exp = exported
    truth = load_truth(night)
    frames = _difference_frames(exp)
    tf = {fr["file"].removesuffix(".fits"): fr for fr in truth.frames}
    ref = np.array(tf[exp.details["reference"]]["offset"])
    stems = [f["header"]["CALFILE"].removesuffix("_CAL.fits") for f in frames]
    tracks = mover_tracks(night, stems, exp.details["reference"])
    n = SIM.size
    yy, xx = np.mgrid[0:n, 0:n]
    near = np.zeros((n, n), bool)
    for x, y, flux in truth.stars:
        if flux > 2e4:
            near |= (xx - x - ref[0]) ** 2 + (yy - y - ref[1]) ** 2 <= 4
    chi, chi_sky = [], []
    for i, f in enumerate(frames):
        away = np.ones((n, n), bool)
        for tr in tracks:
            mx, my = tr["positions"][i]
            away &= (xx - mx) ** 2 + (yy - my) ** 2 > 64
        usable = (f["mask"] == 0) & away
        z = f["sci"] / np.sqrt(f["var"])
        chi.append(z[usable & near])
        chi_sky.append(z[usable & ~near])
    stars, sky = np.concatenate(chi), np.concatenate(chi_sky)
    rms = float(np.sqrt(np.mean(stars**2)))
    rms_sky = float(np.sqrt(np.mean(sky**2)))
    print(f"\nresidual rms / sqrt(VAR): star pixels {rms:.3f} ({stars.size}), "
          f"blank sky {rms_sky:.3f}")
    # VAR overstates a resampled pixel's scatter (correlated noise): the blank sky is the
    # yardstick; star pixels carry VAR's model-error floor too, so they may be lower
    assert stars.size > 2000
    assert rms < 1.2 * rms_sky and rms_sky < 1.1


def test_the_nights_template_takes_little_of_a_slow_mover(exported):
    # Without the photometric noise: the night's own registered, PSF-matched frames with
    # and without the slow movers (their true light, a Gaussian of the matched PSF at the
    # true positions, taken out), combined as the export does; the flux each frame's
    # template takes, from the difference of the two.
    night, exp = exported
    kdir = exp.out_dir
    with fits.open(kdir / f"{SIM.date}_TEMPLATE.fits") as hdul:
        h, table = hdul[0].header, hdul["FRAMES"].data
    sigma = float(np.sqrt(h["PSFVAR"]))
    grow = round(h["TPLGROW"] * sigma)
    frames = [homogenise(read_rows(kdir / f.strip(), 0, SIM.size), (kx, ky))
              for f, kx, ky in zip(table["FILE"], table["KVAR_X"], table["KVAR_Y"],
                                   strict=True)]
    sci = np.array([f.sci for f in frames])
    var = np.array([f.var for f in frames])
    usable = np.array([f.mask == 0 for f in frames])
    stems = [str(s).strip().removesuffix("_CAL") for s in table["STEM"]]
    tracks = [t for t in mover_tracks(night, stems, exp.details["reference"])
              if t["per_frame"] < 0.6]
    light = np.zeros_like(sci)
    for t in tracks:
        for i, (x, y) in enumerate(t["positions"]):
            g, ys, xs = psf_stamp(x, y, sigma, sci.shape[1:])
            light[i][np.ix_(ys, xs)] += t["flux"] * g

    def templates(stack, ts):
        tpl = combine_frames(stack, var, usable, table["WEIGHT"], ts, grow, table["RANK"],
                             sigma)
        return [leave_one_out(tpl, Layers(stack[i], var[i], frames[i].mask),
                              table["WEIGHT"][i], ts, grow, int(table["RANK"][i])).sci
                for i in range(len(frames))]

    taken = {}
    for name, ts in (("new", TemplateSettings()), ("old", TemplateSettings(mover_sigma=0))):
        with_m, without = templates(sci, ts), templates(sci - light, ts)
        taken[name] = []
        for t in tracks:
            f = []
            for i, (x, y) in enumerate(t["positions"]):
                g, ys, xs = psf_stamp(x, y, sigma, sci.shape[1:])
                d = (with_m[i] - without[i])[np.ix_(ys, xs)]
                f.append(np.nansum(g * d) / np.sum(g * g) / t["flux"])
            taken[name].append(float(np.mean(f)))
    print(f"\nflux of the slow movers taken into their templates: plain clip "
          f"{np.round(taken['old'], 3)}, time-aware {np.round(taken['new'], 3)}")
    assert np.mean(taken["old"]) > 0.3
    assert np.mean(taken["new"]) < 0.07 and max(taken["new"]) < 0.12
