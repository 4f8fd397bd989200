"""Faint slow movers found along their tracks and left out of the template (issue 31).

A mover at 0.5 px a frame stays on a pixel for about 7 of a night's 20 frames; too faint
for any window of frames at one pixel (``[template] mover_sigma``), it puts 15-25 % of its
light into its own template, and KBMOD then finds it with that much less likelihood.
Summed along its track over the night it is seen (``[template] track_sigma``,
:func:`astep_dask.kbmod.template.moving_tracks`), and its frames are left out there.

The light a template takes is measured without noise: the kept values of the combination
(its clipping from the stored centre, less the runs) applied to the mover's light alone,
each frame's own template leaving it out.
"""

from __future__ import annotations

import numpy as np

from astep_dask.config import TemplateSettings
from astep_dask.kbmod.template import (
    TRACK_MIN,
    TRACK_STEP,
    combine_frames,
    in_run,
    kept,
    mover_pad,
    track_displacements,
)
from astep_dask.testing.simulate import add_sources, moving_light, psf_stamp

SIGMA = 1.45  # px, PSF of the PSF-matched frames
SKY = 700.0  # e-², sky and read noise of a pixel
N = 20  # frames, 100 s apart
TIMES = np.arange(N) * 100.0 / 86400.0  # days
GROW = 2
SLOW = 0.5  # px a frame: 432 px/day, 9.5 px (6.6 σ) over the night
# (x0, y0, vx, vy, flux per frame): two faint slow movers (whole-night SNR ~11 and ~8 in
# independent frames; per frame 2.5 and 1.9) and a fast one
MOVERS = [(12.0, 40.0, SLOW * 0.8, SLOW * 0.6, 400.0),
          (30.0, 12.0, SLOW * 0.6, -SLOW * 0.8, 300.0),
          (5.0, 55.0, 1.0, -0.3, 400.0)]


def _stack(seed: int, movers: list, size: int = 64, star: bool = True
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Noisy frames (a static star, the movers), their true variance, the movers' light
    alone and their tracks."""
    rng = np.random.default_rng(seed)
    static = np.zeros((size, size))
    if star:
        add_sources(static, [45.0], [15.0], [40000.0], SIGMA)
    light, tracks = moving_light(movers, N, size, SIGMA)
    var = (SKY + static + light).astype(np.float32)
    sci = (static + light + rng.standard_normal(light.shape) * np.sqrt(var)).astype(np.float32)
    return sci, var, light, tracks


def _light_taken(seed: int, ts: TemplateSettings, times: np.ndarray | None) -> list[float]:
    """Per mover: the mean fraction of its flux in its own frames' templates."""
    sci, var, light, tracks = _stack(seed, MOVERS)
    usable = np.ones(sci.shape, bool)
    tpl = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA,
                         times=times)
    keep = kept(sci, var, usable, tpl.centre, ts.sigma, GROW, ts.residual_floor)
    keep &= ~in_run(np.arange(N), tpl.first, tpl.last)
    out = []
    for (*_, flux), pos in zip(MOVERS, tracks, strict=True):
        f = []
        for i, (x, y) in enumerate(pos):
            k = keep.copy()
            k[i] = False
            taken = (k * light).sum(axis=0) / np.maximum(k.sum(axis=0), 1)
            g, ys, xs = psf_stamp(x, y, SIGMA, sci.shape[1:])
            f.append(np.sum(g * taken[np.ix_(ys, xs)]) / np.sum(g * g) / flux)
        out.append(float(np.mean(f)))
    return out


def test_faint_slow_movers_found_along_their_tracks_leave_the_template():
    ts = TemplateSettings()
    assert ts.track_sigma > 0 and ts.mover_sigma > 0
    seeds = range(1, 7)
    windows = np.array([_light_taken(s, ts, None) for s in seeds])
    tracks = np.array([_light_taken(s, ts, TIMES) for s in seeds])
    print(f"\nlight taken into the template (slow 400, slow 300, fast 400 e-), mean over "
          f"{len(seeds)} nights: windows only {np.round(windows.mean(0), 3)}, with the "
          f"track search {np.round(tracks.mean(0), 3)}")
    # the windows alone leave the faint slow movers 15-25 % in their templates
    assert windows[:, 0].mean() > 0.12 and windows[:, 1].mean() > 0.15
    # along their tracks they are found: a few per cent (their wings beyond 2 σ)
    assert tracks[:, 0].mean() < 0.08 and tracks[:, 1].mean() < 0.09
    assert tracks[:, :2].mean() < 0.5 * windows[:, :2].mean()
    # a fast mover stays as it was: little in its template either way
    assert tracks[:, 2].mean() < 0.05 and windows[:, 2].mean() < 0.05


def test_noise_alone_rarely_makes_a_track():
    # 6 nights of 96 x 96 px, no source: the track search's threshold is far above the
    # noise of a residual from a centre (slow tracks' noise is below 1)
    ts = TemplateSettings()
    extra = []
    for seed in range(6):
        sci, var, _, _ = _stack(100 + seed, [], size=96, star=False)
        usable = np.ones(sci.shape, bool)
        plain = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA)
        both = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA,
                              times=TIMES)
        extra.append(int(((both.first >= 0) & (plain.first < 0)).sum()))
    print(f"\npixels marked by the track search on noise alone: {extra}")
    # a false track marks ~100 px (its length x its growth); at most one in six nights
    assert sum(extra) < 200


def test_strips_give_the_whole_frame_tracks():
    # the template is combined in strips of rows, each read with mover_pad(..., True)
    # extra rows: with the track search, a strip gives the whole frame's result (a frame
    # of 240 rows, more than 2 x the pad, so that strips read less than all of it)
    more = [(20.0, 150.0, -0.4, 0.3, 400.0), (30.0, 200.0, 2.0, 1.5, 5000.0)]
    sci, var, _, _ = _stack(4, [*MOVERS, *more], size=240)
    sci, var = sci[:, :, :48].copy(), var[:, :, :48].copy()
    usable = np.ones(sci.shape, bool)
    ts = TemplateSettings()
    whole = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA,
                           times=TIMES)
    plain = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA)
    assert ((whole.first >= 0) & (plain.first < 0)).sum() > 50  # the tracks marked
    pad = (ts.iterations + 1) * GROW + mover_pad(ts, SIGMA, True)
    assert pad > (ts.iterations + 1) * GROW + mover_pad(ts, SIGMA)
    ny = sci.shape[1]
    assert ny > 2 * pad + 16

    def differing(pad: int) -> int:
        """Rows of 16 whose strip, read with ``pad`` extra rows, differs from the whole."""
        out = 0
        for a in range(0, ny, 16):
            b = min(a + 16, ny)
            lo, hi = max(a - pad, 0), min(b + pad, ny)
            part = combine_frames(sci[:, lo:hi], var[:, lo:hi], usable[:, lo:hi],
                                  np.ones(N), ts, GROW, psf_sigma=SIGMA, times=TIMES)
            rows = slice(a - lo, a - lo + b - a)
            out += any(not np.array_equal(getattr(part, name)[rows],
                                          getattr(whole, name)[a:b], equal_nan=True)
                       for name in ("sci", "var", "nkeep", "first", "last"))
        return out

    assert differing(pad) == 0
    assert differing(pad // 3) > 0  # the check can fail: too few rows give other runs


def test_track_grid():
    d = track_displacements(24.0, SIGMA)
    length = np.hypot(d[:, 0], d[:, 1]) / SIGMA
    assert length.min() >= TRACK_MIN - 1e-9 and length.max() <= 24.0 + 1e-9
    # every track from TRACK_MIN + a step to the reach less a step is at most half a step
    # from a node, per axis
    rng = np.random.default_rng(0)
    want = rng.uniform(-24, 24, (2000, 2)) * SIGMA
    r = np.hypot(*want.T) / SIGMA
    want = want[(r >= TRACK_MIN + TRACK_STEP) & (r <= 24.0 - TRACK_STEP)]
    near = np.abs(want[:, None, :] - d[None]).max(axis=2).min(axis=1)
    assert near.max() <= TRACK_STEP * SIGMA / 2 + 1e-9
    assert not track_displacements(0.0, SIGMA).size


def test_a_bright_fast_mover_makes_no_fan_of_tracks():
    # a bright mover crossing a slow track would alone lift it over the threshold; each
    # frame adds at most TRACK_CLIP σ, so the track search marks (almost) nothing the
    # windows have not marked already
    bright = [(4.0, 10.0, 2.5, 1.8, 5000.0), (60.0, 8.0, -1.5, 2.5, 3000.0)]
    sci, var, _, _ = _stack(7, bright, size=72, star=False)
    usable = np.ones(sci.shape, bool)
    ts = TemplateSettings()
    plain = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA)
    both = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA,
                          times=TIMES)
    extra = int(((both.first >= 0) & (plain.first < 0)).sum())
    wider = int(((both.last - both.first) > (plain.last - plain.first)).sum())
    print(f"\nbright fast movers: {int((plain.first >= 0).sum())} px marked by the windows, "
          f"{extra} more and {wider} with longer runs by the track search; fewest frames "
          f"kept {int(both.nkeep.min())} (windows only {int(plain.nkeep.min())})")
    assert extra < 60 and wider < 60


def test_frames_in_any_order_give_the_same_template():
    # the runs are in time order: with times and no ranks, the ranks come from the times
    sci, var, _, _ = _stack(5, MOVERS)
    usable = np.ones(sci.shape, bool)
    ts = TemplateSettings()
    ordered = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA,
                             times=TIMES)
    p = np.random.default_rng(0).permutation(N)
    shuffled = combine_frames(sci[p], var[p], usable[p], np.ones(N), ts, GROW,
                              psf_sigma=SIGMA, times=TIMES[p])
    for name in ("sci", "var", "nkeep", "first", "last"):
        np.testing.assert_array_equal(getattr(shuffled, name), getattr(ordered, name),
                                      err_msg=name)
    # a time that is not a number: no track search, no error
    bad = TIMES.copy()
    bad[3] = np.nan
    odd = combine_frames(sci, var, usable, np.ones(N), ts, GROW, rank=np.arange(N),
                         psf_sigma=SIGMA, times=bad)
    plain = combine_frames(sci, var, usable, np.ones(N), ts, GROW, psf_sigma=SIGMA)
    np.testing.assert_array_equal(odd.first, plain.first)
