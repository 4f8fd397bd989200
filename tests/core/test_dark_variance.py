"""Monte Carlo check of the variance of what is subtracted from a frame (dark + bias).

Raw bias and dark frames are drawn from a known truth (bias level, dark current, read
noise, gain), combined into masters exactly as the builder combines them
(:func:`~astep_dask.core.combine.clip_combine` with the frames' noise model, the darks
bias-subtracted when there is a bias), and :func:`~astep_dask.core.darks.dark_for_exptime`
makes the plane to subtract. Every pixel has the same truth, so the pixels are
independent realisations: the scatter of (plane − truth) over them is the plane's true
variance, which its ``var`` must match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from astep_dask.core.combine import NoiseModel, clip_combine
from astep_dask.core.darks import bias_level, dark_for_exptime

GAIN = 1.5  # e-/ADU
READ_NOISE = 10.0  # e-
BIAS = 1000.0  # ADU
RATE = 2.0  # e-/s: dark current large enough that its Poisson noise counts
SHAPE = (160, 160)  # 25,600 realisations: the variance to ±0.9 % (1 sigma)
N_FRAMES = 4
# Clipping around the median of four values makes their mean scatter ~4 % (in variance)
# more than the noise model's sigma^2 / n says; the bugs this guards against (the master
# bias counted twice, or not scaled by (1 - k)^2) are 25 % to 80 % off here.
CLIP = 0.06


@dataclass
class Planes:
    data: np.ndarray
    var: np.ndarray
    digest: str = ""
    cards: dict = field(default_factory=dict)
    count: np.ndarray | None = None


def _frames(rng: np.random.Generator, exptime: float, n: int = N_FRAMES) -> np.ndarray:
    electrons = rng.poisson(RATE * exptime, (n, *SHAPE)) + rng.normal(0, READ_NOISE,
                                                                     (n, *SHAPE))
    return np.rint(electrons / GAIN + BIAS).astype(np.float32)


def _master(frames: np.ndarray, subtract: np.ndarray | None = None,
            pedestal: float | None = None, **cards) -> Planes:
    """As the builder: clipped mean with the noise model, pedestal 0 once a bias is
    subtracted, else the bias level when known, else the median level (a bias)."""
    noise = NoiseModel(GAIN, READ_NOISE, pedestal=pedestal if subtract is None else 0.0)
    stack = frames if subtract is None else frames - subtract
    out = clip_combine(stack, noise=noise)
    return Planes(out[0], out[1], cards=cards, count=out[2])


def _ratio(sol, t: float) -> float:
    """Measured variance of the plane about its truth over the mean of its ``var``."""
    truth = BIAS + RATE * t / GAIN
    return float(np.var(sol.total - truth) / np.mean(sol.var))


@pytest.mark.parametrize("t, dark_t", [(30.0, 30.0), (90.0, 30.0), (10.0, 30.0)])
def test_bias_and_dark_matched_or_scaled(t, dark_t):
    """Bias + dark of the frame's time (the bias inside the dark's mean) and bias + dark
    of another time scaled by k = t / t_d (k = 3 and 1/3)."""
    rng = np.random.default_rng(11)
    bias = _master(_frames(rng, 0.0), BIASHASH=("b", ""))
    bias.digest = "b"
    dark = _master(_frames(rng, dark_t), subtract=bias.data, BIASHASH=("b", ""))
    sol = dark_for_exptime(t, bias, {dark_t: dark})
    assert sol.bias_used and sol.used == (dark_t,)
    assert _ratio(sol, t) == pytest.approx(1.0, abs=CLIP)


def test_dark_made_with_another_bias():
    """A bias-subtracted dark from another night holds that night's bias noise too."""
    rng = np.random.default_rng(12)
    bias = _master(_frames(rng, 0.0))
    bias.digest = "tonight"
    other = _master(_frames(rng, 0.0))
    dark = _master(_frames(rng, 30.0), subtract=other.data, FALLBACK=("x.fits", ""))
    sol = dark_for_exptime(90.0, bias, {30.0: dark})
    # the other night's bias level is the same here, so the truth is unchanged
    assert _ratio(sol, 90.0) == pytest.approx(1.0, abs=CLIP)


@pytest.mark.parametrize("t", [10.0, 40.0, 120.0])
def test_no_bias_dark_or_fit(t):
    """No bias: the dark of the frame's time whole, or the per-pixel fit through the
    shortest and longest darks, interpolated (40 s) or extrapolated (120 s)."""
    rng = np.random.default_rng(13)
    raw = {et: _frames(rng, et) for et in (10.0, 90.0)}
    # as the builder: the bias level from one frame of each time, the noise model's zero
    zero = bias_level({et: float(np.median(f[N_FRAMES // 2])) for et, f in raw.items()})
    assert zero == pytest.approx(BIAS, abs=0.5)
    darks = {et: _master(f, pedestal=zero) for et, f in raw.items()}
    sol = dark_for_exptime(t, None, darks)
    assert not sol.bias_used
    assert _ratio(sol, t) == pytest.approx(1.0, abs=CLIP)
