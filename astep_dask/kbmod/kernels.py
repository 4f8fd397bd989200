"""The small 1-D kernels of the KBMOD export and search, and what they do to the noise.

Three things share them: the search's matched filter (:func:`psf_1d`, the pixel-integrated
Gaussian PSF of σ ``PSFSIGMA``, as KBMOD takes it); the template's PSF matching
(:func:`kernel_1d`, a kernel of a given variance, and :func:`effective_psf_variance`,
:func:`template_target`, :func:`matching_variances`, :func:`template_kernels`,
:func:`halo`, which choose the template's PSF and those variances per frame); and the
factor ``FILTVARF`` written in every KBMOD file (:func:`filter_factor`), by which VAR is
multiplied so that the matched filter's SNR of pure noise has unit variance after the
resampling and matching kernels have correlated the noise
(:func:`filter_variance_factor`). Numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq
from scipy.special import erf

from astep_dask.core.register import axis_weights, kernel_moment, shift_weights

__all__ = [
    "effective_psf_variance",
    "filter_factor",
    "filter_variance_factor",
    "halo",
    "kernel_1d",
    "matching_variances",
    "psf_1d",
    "snr2_kept",
    "template_kernels",
    "template_target",
]

# --------------------------------------------------------------------------- matched filter


def psf_1d(sigma: float) -> np.ndarray:
    """Pixel-integrated 1-D Gaussian of σ (sums to 1), half-width ``ceil(4σ)``."""
    half = int(np.ceil(4 * sigma))
    edges = np.arange(-half, half + 2) - 0.5
    p = np.diff(0.5 * erf(edges / (sigma * np.sqrt(2.0))))
    return p / p.sum()


def filter_variance_factor(kernels_x: list[np.ndarray], kernels_y: list[np.ndarray],
                           sigma: float) -> float:
    """``Var(psi) / phi`` of the matched filter of σ ``sigma`` on a frame whose noise,
    white on the camera's pixels, went through the 1-D kernels ``kernels_x`` (along x, in
    turn) and ``kernels_y`` (along y), each summing to 1, with the variance carried in the
    "area" convention (``Σ w·var``).

    The area convention is exact for a sum over an area much wider than the kernels; a
    PSF-sized filter averages fewer independent pixels, and the true variance of
    ``psi = Σ P·sci / var`` is ``Σ (P ⋆ g)² / v`` for a noise kernel ``g``, against
    ``phi = Σ P² / v``: smaller, by the factor returned (separable: x times y). Multiplying
    VAR by it (so dividing psi and phi by it) keeps the flux ``psi / phi`` and makes
    ``psi / √phi`` a true SNR: without it, after a 2 × 2 overlap resampling and PSF
    matching (about 0.25 px² per axis added to a σ ≈ 1.4 px PSF), the SNR reads about
    5–6 % low. 1 for no kernel."""
    p = psf_1d(sigma)
    total = float(np.sum(p * p)) ** 2
    out = 1.0
    for kernels in (kernels_x, kernels_y):
        g = np.ones(1)
        for k in kernels:
            g = np.convolve(g, np.asarray(k, np.float64))
        pg = np.convolve(p, g[::-1])
        out *= float(np.sum(pg * pg))
    return out / total


def filter_factor(dx: float, dy: float, kernel_var: tuple[float, float], sigma: float,
                  var_pixel_factor: float = 1.0, variance: str = "area",
                  kind: str = "overlap") -> float:
    """FILTVARF of a frame registered with offset ``(dx, dy)`` by the resampling kernel
    ``kind`` (:func:`~astep_dask.core.register.axis_weights`), then PSF-matched with
    kernels of variance ``kernel_var``: what its VAR is multiplied by for the variance of a
    matched filter of σ ``sigma`` (:func:`filter_variance_factor`; with the "pixel"
    convention, VAR is ``var_pixel_factor`` times the area one, so that is divided out).
    1 when σ is not known."""
    if not (np.isfinite(sigma) and sigma > 0):
        return 1.0
    _, fx, fy = shift_weights(dx, dy, kind=kind)
    kx = [axis_weights(fx, kind)[1], kernel_1d(kernel_var[0])]
    ky = [axis_weights(fy, kind)[1], kernel_1d(kernel_var[1])]
    c = filter_variance_factor(kx, ky, sigma)
    return c / var_pixel_factor if variance == "pixel" and var_pixel_factor > 0 else c


# --------------------------------------------------------------------------- PSF matching


def _discrete_gaussian(s: float) -> np.ndarray:
    """Sampled Gaussian of σ ``s`` (half-width ``ceil(4s)``), summing to 1."""
    half = int(np.ceil(4 * s))
    x = np.arange(-half, half + 1)
    k = np.exp(-0.5 * (x / s) ** 2)
    return k / k.sum()


def _variance(k: np.ndarray) -> float:
    """Variance (px²) of a centred 1-D kernel summing to 1."""
    x = np.arange(k.size) - k.size // 2
    return float(np.sum(k * x * x))


def kernel_1d(variance: float) -> np.ndarray:
    """A symmetric 1-D kernel summing to 1 whose variance is ``variance`` px².

    Below 0.5 px², ``[a/2, 1−a, a/2]``; from 0.5 px², a sampled Gaussian whose σ is chosen
    so that the *discrete* variance is exact. 0 (or less) gives the identity ``[1]``.
    """
    a = float(variance)
    if a <= 1e-6:
        return np.ones(1)
    if a < 0.5:
        return np.array([a / 2, 1 - a, a / 2])
    s = brentq(lambda s: _variance(_discrete_gaussian(s)) - a, 0.3, 50.0, xtol=1e-10)
    return _discrete_gaussian(s)


def effective_psf_variance(sigma0: float, dx: float, dy: float, kind: str = "overlap"
                           ) -> tuple[float, float]:
    """PSF variance (x, y) of a registered frame: σ² before resampling plus what the
    resampling kernel ``kind`` of its offset adds (its second moment: ``f(1−f)`` for the
    overlap kernel, 0 for the cubic one)."""
    _, fx, fy = shift_weights(dx, dy, kind=kind)
    s2 = float(sigma0) ** 2
    return s2 + kernel_moment(fx, kind), s2 + kernel_moment(fy, kind)


def matching_variances(effective: dict[str, tuple[float, float]], target: float | None = None
                       ) -> tuple[float, dict[str, tuple[float, float]]]:
    """Target PSF variance (``target``, or the largest effective variance of the set, both
    axes) and, per frame, the kernel variances (x, y) that bring it there (0 along an axis
    where the frame is already wider: see :func:`template_kernels`)."""
    if not effective:
        return float("nan"), {}
    if target is None:
        target = max(max(v) for v in effective.values())
    return target, {k: (max(target - vx, 0.0), max(target - vy, 0.0))
                    for k, (vx, vy) in effective.items()}


def template_kernels(effective: dict[str, tuple[float, float]], target: float
                     ) -> dict[str, tuple[float, float]]:
    """Per frame, the kernel variances (x, y) that bring a template of PSF variance
    ``target`` to the frame's own PSF where the frame is wider (0 elsewhere)."""
    return {k: (max(vx - target, 0.0), max(vy - target, 0.0))
            for k, (vx, vy) in effective.items()}


def snr2_kept(s2: float, a: float) -> float:
    """The fraction of a matched filter's SNR² that a 1-D Gaussian PSF of variance ``s2``
    keeps when signal and noise are convolved with a Gaussian kernel of variance ``a`` (the
    filter the widened PSF, its variance corrected for the correlated noise, as FILTVARF
    does): ``√(s2·(s2 + 2a)) / (s2 + a)``, from ``Σ G_v² ∝ v^(-1/2)``. 0.983 per axis for
    s2 = 1.12 px² (σ 1.06) and a = 0.25 px²; 0.94 for a = 0.57 px² (σ 1.06 to 1.3)."""
    if a <= 0 or s2 <= 0:
        return 1.0
    return float(np.sqrt(s2 * (s2 + 2 * a)) / (s2 + a))


def template_target(template: dict[str, tuple[float, float]],
                    frames: dict[str, tuple[float, float]], need: int) -> float:
    """The template's PSF variance that maximises the night's summed matched-filter SNR².

    ``template`` holds the effective PSF variances (x, y) of the frames that can go into the
    template, ``frames`` those of the night's frames to difference (a frame in both is
    left out of its own template). A target ``T`` takes the template frames no wider than
    ``T`` (at least ``need`` of them), matched up to ``T``; a night frame narrower than
    ``T`` is matched up to it and keeps :func:`snr2_kept` of its SNR² per axis, a wider
    one keeps all of it (the template is convolved to its PSF instead); and every frame
    keeps ``1 / (1 + 1/n)`` for the noise of a template of ``n`` frames (one fewer for its
    own). With seeing that hardly changes, every frame goes into the template (the
    largest ``T``: what blurring every frame to the worst costs is small against a
    noisier template); with frames of bad seeing, those are left out of the template and
    the others are not blurred to them.
    """
    if not template:
        return float("nan")
    widths = sorted({max(v) for v in template.values()})
    best, best_t = -1.0, widths[-1]
    for t in widths:
        members = {k for k, v in template.items() if max(v) <= t}
        if len(members) < need:
            continue
        total = 0.0
        for k, (vx, vy) in frames.items():
            n = len(members) - (k in members)
            kept = snr2_kept(vx, t - vx) * snr2_kept(vy, t - vy)
            total += kept / (1.0 + 1.0 / max(n, 1))
        if total > best * (1 + 1e-9):
            best, best_t = total, t
    return best_t


def halo(kernel_var: tuple[float, float]) -> int:
    """Half-width (px) of the larger of a frame's two matching kernels."""
    return max(kernel_1d(kernel_var[0]).size, kernel_1d(kernel_var[1]).size) // 2
