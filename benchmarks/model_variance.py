"""Benchmark of the difference frames' variance model (issue 31): a Monte Carlo of one
frame's matched-filter flux over its predicted sigma (KBMOD's per-frame ψ/√φ) at a source
of known flux, with the frame's variance as the calibration makes it (Poisson term from
each pixel's own electrons), from the scene (:func:`astep_dask.kbmod.difference.
model_variance`, at each ``--clip``), and the true variance (the expected electrons): the
ideal against which the others are read.

Each trial: Poisson-like electrons of sky + a Gaussian source (``--psf`` σ) + read noise,
the calibration's variance ``max(e, 0) + read²``, a registration shift (``--shift``, the
area convention), minus a template of ``--template-frames`` frames' noise; the matched
filter at the source's true place. Prints, per flux and variance, the mean and standard
deviation of ψ/√φ over the trials, and the mean's ratio to the true variance's.

    python benchmarks/model_variance.py --flux 0 300 2500 10000 --clip 3 2 1.5
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from astep_dask.core.register import resample
from astep_dask.kbmod.difference import model_variance
from astep_dask.kbmod.products import Layers, science_plane

SIZE = 41  # px, side of a trial's stamp
EDGE = 8  # px left out at each side (the resampling's edge)


def _gaussian(size: int, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - size // 2
    g = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    return g / g.sum()


def _registered(sci: np.ndarray, var: np.ndarray, shift: tuple[float, float]) -> Layers:
    r = resample(sci.astype(np.float32), var.astype(np.float32),
                 np.zeros(sci.shape, np.uint16), *shift)
    return Layers(r.sci, r.var, r.mask)


def _z(diff: Layers, psf: np.ndarray) -> float:
    cut = (slice(EDGE, -EDGE), slice(EDGE, -EDGE))
    sci, var, p = diff.sci[cut].astype(float), diff.var[cut].astype(float), psf[cut]
    return float((sci * p / var).sum() / math.sqrt((p * p / var).sum()))


def trial(rng: np.random.Generator, flux: float, args, clips: list[float],
          light: np.ndarray, psf: np.ndarray) -> dict[str, float]:
    """One frame: ψ/√φ with each variance."""
    expected = args.sky + flux * light
    electrons = rng.normal(expected, np.sqrt(expected + args.read**2))
    frame = _registered(electrons - args.sky, np.maximum(electrons, 0) + args.read**2,
                        args.shift)
    truth = _registered(electrons - args.sky, expected + args.read**2, args.shift)
    tvar = np.full(light.shape, (args.sky + args.read**2) / args.template_frames)
    template = _registered(rng.normal(0.0, np.sqrt(tvar)), tvar, args.shift)
    out = {"true": _z(science_plane(truth, template), psf),
           "own": _z(science_plane(frame, template), psf)}
    for clip in clips:
        modelled = Layers(frame.sci, model_variance(frame, template, 1.0, clip).astype(
            np.float32), frame.mask)
        out[f"model {clip:g}"] = _z(science_plane(modelled, template), psf)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flux", type=float, nargs="+", default=[0, 300, 2500, 10000],
                    help="e- per frame of the source (0: blank sky)")
    ap.add_argument("--clip", type=float, nargs="+", default=[3.0, 2.0, 1.5],
                    help="model_variance's clip, in the frame's sigma")
    ap.add_argument("--sky", type=float, default=600.0, help="e- per pixel")
    ap.add_argument("--read", type=float, default=10.0, help="e- read noise")
    ap.add_argument("--psf", type=float, default=1.1, help="px, Gaussian sigma")
    ap.add_argument("--shift", type=float, nargs=2, default=[0.5, 0.3],
                    help="px, the registration's shift (0 0: none)")
    ap.add_argument("--template-frames", type=int, default=16)
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    args.shift = tuple(args.shift)
    rng = np.random.default_rng(args.seed)
    light = _gaussian(SIZE, args.psf)
    psf = _registered(light, np.zeros_like(light), args.shift).sci.astype(float)
    psf = np.nan_to_num(psf) / np.nansum(psf)
    print(f"sky {args.sky:g} e-, read {args.read:g} e-, PSF σ {args.psf:g} px, shift "
          f"{args.shift}, template of {args.template_frames} frames, {args.trials} trials")
    print(f"{'flux':>7}  {'variance':<11} {'mean z':>8} {'std z':>6}  {'mean / true':>11}")
    for flux in args.flux:
        rows = [trial(rng, flux, args, args.clip, light, psf) for _ in range(args.trials)]
        true_mean = float(np.mean([r["true"] for r in rows]))
        for name in rows[0]:
            z = np.array([r[name] for r in rows])
            ratio = f"{z.mean() / true_mean:11.3f}" if flux > 0 else f"{'':>11}"
            print(f"{flux:7.0f}  {name:<11} {z.mean():8.3f} {z.std():6.3f}  {ratio}")
        print(f"         (error of a mean: {1 / math.sqrt(args.trials):.3f})")


if __name__ == "__main__":
    main()
