"""The template's PSF and each frame's (issue 31): no frame blurred to the worst seeing.

``[template] psf_target = "snr"`` chooses the template's PSF variance to maximise the
night's summed matched-filter SNR² (:func:`astep_dask.kbmod.kernels.template_target`);
frames of bad seeing are left out of the template, which is convolved to their PSF
instead. First the choice itself against a hand calculation, then end to end on a
simulated night whose seeing changes from frame to frame (``SimConfig.seeing_scatter``):
the movers' matched-filter SNR at their true tracks against the ideal, the noise-only SNR
and the static stars' residuals, compared with ``psf_target = "widest"`` (every frame
blurred to the widest PSF, as before).
"""

from __future__ import annotations

import numpy as np
import pytest

from astep_dask.config import Settings
from astep_dask.kbmod.kernels import snr2_kept, template_kernels, template_target
from astep_dask.kbmod.products import read_layers
from astep_dask.kbmod.stage import export_night
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import (
    SimConfig,
    load_truth,
    mover_tracks,
    psf_stamp,
    simulate_night,
)


def test_steady_seeing_keeps_every_frame_in_the_template():
    # overlap-kernel widening only (up to 0.25 px² on 1.12 px²): blurring to the widest
    # costs less than a template of fewer frames
    rng = np.random.default_rng(2)
    eff = {f"f{i}": (1.12 + rng.uniform(0, 0.25), 1.12 + rng.uniform(0, 0.25))
           for i in range(20)}
    widest = max(max(v) for v in eff.values())
    assert template_target(eff, eff, need=3) == widest
    assert all(k == (0.0, 0.0) for k in template_kernels(eff, widest).values())


def test_bad_seeing_frames_are_left_out_and_not_blurred_to():
    # ten frames at σ 1.0 px, ten at 1.5 px. Hand calculation: T = 1.0 keeps, per sharp
    # frame, 1 / (1 + 1/9) and per wide frame 1 / (1 + 1/10): 18.09 in all; T = 2.25
    # keeps (snr2_kept(1, 1.25))² / (1 + 1/19) = 0.657 per sharp frame and 0.95 per wide
    # one: 16.07. So T = 1.0, and the wide frames get the template convolved by 1.25 px².
    eff = {**{f"s{i}": (1.0, 1.0) for i in range(10)},
           **{f"w{i}": (2.25, 2.25) for i in range(10)}}
    assert snr2_kept(1.0, 1.25) == pytest.approx(np.sqrt(3.5) / 2.25)
    assert template_target(eff, eff, need=3) == 1.0
    kern = template_kernels(eff, 1.0)
    assert kern["w3"] == (1.25, 1.25) and kern["s3"] == (0.0, 0.0)
    # too few sharp frames for a template: the widest is the only choice
    few = {**{f"s{i}": (1.0, 1.0) for i in range(2)},
           **{f"w{i}": (2.25, 2.25) for i in range(10)}}
    assert template_target(few, few, need=3) == 2.25
    # a template from other nights, chosen for this night's frames: for a wide frame the
    # deepest template (all twenty, no blur either way); for a sharp one the sharp ten
    assert template_target(eff, {"a": (2.25, 2.25)}, need=3) == 2.25
    assert template_target(eff, {"a": (1.0, 1.0)}, need=3) == 1.0


# --------------------------------------------------------------------------- end to end

SIM = SimConfig(size=192, n_science=16, n_darks=5, n_flats=7, seed=21, psf_sigma=1.1,
                seeing_scatter=0.2, drift=(0.9, -0.6),
                movers=((1.2, 0.9, 2500.0), (-0.9, 1.2, 2500.0), (1.5, -0.4, 2000.0)))


@pytest.fixture(scope="module")
def exports(tmp_path_factory, client):
    night = simulate_night(tmp_path_factory.mktemp("psf_archive"), SIM)
    out = tmp_path_factory.mktemp("psf_out")
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    assert calibrate_night(night, client, settings, out=out).status == "complete"
    res = {}
    for target in ("snr", "widest"):
        s = settings.replace(kbmod={"folder": f"kbmod_{target}"},
                             template={"psf_target": target})
        exp = export_night(night, client, s, out=out)
        assert exp.status == "complete", exp.error
        res[target] = exp
    return night, res


def _frames(exp) -> list[tuple]:
    out = []
    for r in exp.frames:
        header, f = read_layers(exp.out_dir / r["output"])
        out.append((header, f.sci.astype(float), f.var.astype(float) * header["FILTVARF"],
                    f.mask))
    return out


def _snr(frames: list[tuple], positions) -> float:
    """Matched-filter SNR of a track (each frame's own PSFSIGMA, VAR x FILTVARF)."""
    psi = phi = 0.0
    for (h, sci, var, mask), (x, y) in zip(frames, positions, strict=True):
        p, ys, xs = psf_stamp(x, y, h["PSFSIGMA"], sci.shape)
        good = mask[np.ix_(ys, xs)] == 0
        v = var[np.ix_(ys, xs)]
        psi += float(np.sum((p * sci[np.ix_(ys, xs)] / v)[good]))
        phi += float(np.sum((p * p / v)[good]))
    return psi / np.sqrt(phi)


def test_bad_seeing_frames_keep_their_own_psf_and_the_movers_gain(exports):
    night, res = exports
    seeing = [fr["psf_sigma"] for fr in load_truth(night).frames]
    assert max(seeing) / min(seeing) > 1.5
    snr = {}
    for target, exp in res.items():
        frames = _frames(exp)
        stems = [h["CALFILE"].removesuffix("_CAL.fits") for h, *_ in frames]
        tracks = mover_tracks(night, stems, exp.details["reference"])
        snr[target] = np.array([_snr(frames, tr["positions"]) / tr["ideal"]
                                for tr in tracks])
        sig = np.array([h["PSFSIGMA"] for h, *_ in frames])
        print(f"\npsf_target {target}: SNR/ideal {np.round(snr[target], 3)}, difference "
              f"PSF σ {sig.min():.2f}-{sig.max():.2f}, frames left out of the template "
              f"{exp.details['template'].get('frames_left_out', 0)}")
        if target == "widest":
            assert np.ptp(sig) < 1e-3  # every frame at one PSF
        else:
            assert np.ptp(sig) > 0.2  # each frame at its own (or the template's) PSF
            assert exp.details["template"]["frames_left_out"] >= 2
    assert np.all(snr["snr"] > 0.8)
    assert np.mean(snr["snr"]) > np.mean(snr["widest"]) + 0.02


@pytest.mark.parametrize("target", ["snr", "widest"])
def test_noise_and_star_residuals_stay_honest(exports, target):
    # blank sky away from the movers: unit SNR; at the stars, where the template was
    # convolved to a frame's PSF, no residual beyond a few sigma on average
    night, res = exports
    exp = res[target]
    frames = _frames(exp)
    truth = load_truth(night)
    stems = [h["CALFILE"].removesuffix("_CAL.fits") for h, *_ in frames]
    tracks = mover_tracks(night, stems, exp.details["reference"])
    rng = np.random.default_rng(4)
    z, star_chi = [], []
    shape = frames[0][1].shape
    ref = np.array({fr["file"].removesuffix(".fits"): fr for fr in truth.frames}[
        exp.details["reference"]]["offset"])
    for i, (h, sci, var, mask) in enumerate(frames):
        near = np.zeros(shape, bool)
        for tr in tracks:
            x, y = tr["positions"][i]
            near[max(int(y) - 8, 0):int(y) + 9, max(int(x) - 8, 0):int(x) + 9] = True
        for _ in range(150):
            x, y = rng.uniform(10, shape[1] - 10, 2)
            p, ys, xs = psf_stamp(x, y, h["PSFSIGMA"], shape)
            if (mask[np.ix_(ys, xs)] != 0).any() or near[np.ix_(ys, xs)].any():
                continue
            v = var[np.ix_(ys, xs)]
            z.append(np.sum(p * sci[np.ix_(ys, xs)] / v) / np.sqrt(np.sum(p * p / v)))
        for sx, sy, flux in truth.stars:
            x, y = sx - ref[0], sy - ref[1]
            if not (10 < x < shape[1] - 10 and 10 < y < shape[0] - 10) or flux < 3e3:
                continue
            p, ys, xs = psf_stamp(x, y, h["PSFSIGMA"], shape)
            if (mask[np.ix_(ys, xs)] != 0).any():
                continue
            v = var[np.ix_(ys, xs)]
            star_chi.append(np.sum(p * sci[np.ix_(ys, xs)] / v) / np.sqrt(np.sum(p * p / v)))
    z, star_chi = np.array(z), np.array(star_chi)
    print(f"\npsf_target {target}: noise-only SNR std {z.std():.3f} ({z.size}), star "
          f"residual SNR rms {np.sqrt(np.mean(star_chi**2)):.2f} ({star_chi.size} stars)")
    assert z.size > 800 and abs(z.std() - 1.0) < 0.07 and abs(z.mean()) < 0.2
    assert star_chi.size > 20 and np.sqrt(np.mean(star_chi**2)) < 3.0
