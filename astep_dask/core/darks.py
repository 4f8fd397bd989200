"""The dark (+ bias) to subtract from a frame of a given exposure time, and its variance.

Dark handling, in order of preference, for an exposure time ``t`` (exposure times are
the same within ``[combine] exptime_rtol``/``exptime_atol``, :mod:`astep_dask.core.exptimes`):

1. a bias exists: bias + (bias-subtracted dark of time ``t``), or of the nearest time
   scaled by exposure;
2. no bias, a dark of time ``t``: subtract it whole (it carries the bias);
3. no bias, darks of two other times: a per-pixel fit ``offset + rate · t`` through the
   shortest and longest (offset = bias, rate = dark current), evaluated at ``t``;
4. otherwise the frame cannot be calibrated, and says so.

The noise model of the masters
------------------------------
This is the one place that defines what each master's ``VAR`` plane holds and how the
variance of what is subtracted from a frame follows from it.

A master's ``VAR`` is the variance of its combined value caused by the frames it
combines, and by nothing else: the noise model's Σσᵢ²/n² over the frames kept
(:func:`astep_dask.core.combine.clip_combine`; without ``[combine] noise_clip``, their
sample variance over n, × π/2 for a median). Whatever was subtracted from every frame
before combining (the master bias from the darks, the dark from the flats) is the same in
all of them: it shifts the combination without adding scatter, so its noise is **not** in
the ``VAR`` plane. (Clipping around the median of a few frames rejects some values of the
noise's own tail, and the mean of the rest then scatters a few per cent more than Σσᵢ²/n²:
+4 % in variance with 4 frames, +2 % with 8; ``VAR`` does not count it.) Hence:

- master bias ``B``: the mean of the bias frames; ``var(B)`` = read noise² / n (ADU²);
- master dark ``D`` of time ``t_d``, night with bias frames (``DARKBIAS = T``): its image is
  ``D̄ − B``, the mean of the raw darks ``D̄`` less the master bias, but its ``VAR`` is
  ``var(D̄)`` (read noise and dark-current Poisson noise of the darks, / n), not
  ``var(D̄ − B) = var(D̄) + var(B)``. Its card ``BIASHASH`` names the bias subtracted;
- master dark without bias frames (``DARKBIAS = F``): its image is ``D̄`` (it carries the
  bias), ``VAR`` = ``var(D̄)``;
- master flat: the mean of the dark-subtracted flats each divided by its level, then
  normalised; ``VAR`` is their Poisson + read noise / level² / n, normalised alike (the
  dark subtracted from every flat adds var(dark) / level² ≈ 1e-7, left out).

The bias, the raw darks of each exposure time and the flats are different frames, so
``B`` and each ``D̄`` are independent. What is subtracted from a frame of time ``t``, and
its variance (:attr:`DarkSolution.var`):

- bias + dark of time ``t``: ``B + (D̄ − B) = D̄``, variance ``var(D̄)``;
- bias + dark of ``t_d`` scaled by ``k = t / t_d``: ``B + k(D̄ − B) = (1 − k)B + kD̄``,
  variance ``(1 − k)² var(B) + k² var(D̄)``;
- bias only (no dark): ``B``, variance ``var(B)``;
- no bias, dark of time ``t``: ``D̄``, variance ``var(D̄)``;
- no bias, fit through the darks of ``t₁`` and ``t₂``: ``a D̄₁ + b D̄₂``, variance
  ``a² var(D̄₁) + b² var(D̄₂)``,

with ``a = (t₂ − t)/(t₂ − t₁)``, ``b = (t − t₁)/(t₂ − t₁)`` (the fit's offset and rate at
``t``; extrapolated, one of them is negative). A bias-subtracted dark made with another
bias (a dark taken from another night, ``FALLBACK``, or whose ``BIASHASH`` is not this
bias's) holds that bias's noise, independent of this one's: ``B + k(D̄′ − B′)`` has
variance ``var(B) + k² var(D̄′) + k² var(B′)``, with ``var(B′)`` taken as ``var(B)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from astep_dask.core.exptimes import ExptimeTolerance, matching_exptime
from astep_dask.core.stats import median
from astep_dask.errors import CalibrationError

__all__ = [
    "DarkSolution",
    "MasterPlanes",
    "bias_level",
    "dark_fit",
    "dark_for_exptime",
    "dark_how",
    "darks_needed",
    "nearest_exptime",
    "variance_of",
]


class MasterPlanes(Protocol):
    """A master's planes, as this module reads them (a master of :mod:`astep_dask.masters`)."""

    data: np.ndarray
    var: np.ndarray | None


@dataclass(frozen=True)
class DarkSolution:
    """What to subtract from a raw frame of one exposure time, and how it was made.

    ``total``: ADU to subtract (bias + dark); ``var``: its variance (ADU²); ``current``:
    the dark-current part of ``total`` (ADU, for its Poisson noise); ``how``: a short
    description for the header; ``used``: exposure times of the darks used.
    """

    total: np.ndarray
    var: np.ndarray
    current: np.ndarray
    how: str
    used: tuple[float, ...]
    bias_used: bool


def variance_of(m: MasterPlanes) -> np.ndarray:
    """The master's variance plane, zeros when it has none."""
    return m.var if m.var is not None else np.zeros_like(m.data)


def nearest_exptime(t: float, exptimes: Iterable[float]) -> float:
    """The exposure time nearest ``t`` in ratio (the longer one on a tie): the dark that is
    scaled to ``t`` when a bias exists and no dark has exposure ``t``."""
    return min(exptimes, key=lambda e: (abs(np.log(max(e, 1e-3) / max(t, 1e-3))), -e))


def _match(t: float, exptimes: Iterable[float], tol: ExptimeTolerance | None) -> float | None:
    """The dark exposure time that is ``t`` within the tolerance (default: the settings'
    default), or None."""
    return matching_exptime(t, exptimes, tol or ExptimeTolerance())


def _own_bias(dark: MasterPlanes, bias: MasterPlanes) -> bool:
    """Whether a bias-subtracted ``dark`` was made with this ``bias`` (so that bias + dark
    is the mean of the raw darks): not when it comes from another night (``FALLBACK``) or
    its ``BIASHASH`` names another bias. Planes without cards (tests) are taken as made
    with it."""
    cards = getattr(dark, "cards", None) or {}
    if "FALLBACK" in cards:
        return False
    made_with = cards.get("BIASHASH", (None,))[0]
    return made_with is None or made_with == getattr(bias, "digest", made_with)


def darks_needed(t: float, exptimes: Iterable[float], bias: bool,
                 tol: ExptimeTolerance | None = None) -> tuple[float, ...] | None:
    """Exposure times of the master darks that :func:`dark_for_exptime` reads for a frame
    of exposure ``t``, given the darks' exposure times and whether a bias exists; None
    when it cannot make a dark for ``t``. The recipe and the flow chart ask this, so that
    their dependencies are the calibration's own. ``tol``: when two exposure times are
    the same (default: the ``[combine]`` settings' default)."""
    ets = sorted(exptimes)
    match = _match(t, ets, tol)
    if bias:
        if match is not None:
            return (match,)
        return (nearest_exptime(t, ets),) if ets else ()
    fit = (ets[0], ets[-1]) if len(ets) >= 2 else ()  # offset + rate through these two
    if match is not None:
        return tuple(sorted({match, *fit}))  # the fit's offset gives the dark current
    return fit or None


def dark_how(t: float, exptimes: Iterable[float], bias: bool,
             tol: ExptimeTolerance | None = None) -> str:
    """How :func:`dark_for_exptime` makes the dark of exposure ``t`` (its ``how``), from
    the darks' exposure times and whether a bias exists, without their pixels: a recipe
    can name it (and hash it) before deciding to read the masters.

    Raises
    ------
    CalibrationError
        When no dark can be made for ``t`` (the same cases as :func:`dark_for_exptime`).
    """
    ets = sorted(exptimes)
    match = _match(t, ets, tol)
    if bias:
        if match is not None:
            return f"bias + dark {match:g}s"
        if not ets:
            return "bias only (no dark)"
        et = nearest_exptime(t, ets)
        return f"bias + dark {et:g}s scaled x{float(np.float32(t / et)):.4g}"
    if match is not None:
        return f"dark {match:g}s (carries the bias)"
    if len(ets) < 2:
        raise CalibrationError(
            f"no dark of {t:g}s and none can be scaled: no bias frames and "
            f"{'no darks' if not ets else 'only one dark exposure time'}"
        )
    return f"dark fit offset+rate*t from {ets[0]:g}s and {ets[-1]:g}s darks"


def dark_for_exptime(t: float, bias: MasterPlanes | None,
                     darks: dict[float, MasterPlanes],
                     tol: ExptimeTolerance | None = None) -> DarkSolution:
    """The dark (+ bias) to subtract from a raw frame of exposure ``t``, and its variance.

    See the module docstring for the order of preference and for the variance of each
    case, from the masters' ``VAR`` planes as they are defined there. ``tol``: when two
    exposure times are the same (default: the ``[combine]`` settings' default).

    Raises
    ------
    CalibrationError
        When no dark can be made for ``t``.
    """
    how = dark_how(t, darks, bias is not None, tol)  # raises when none can be made
    match = _match(t, darks, tol)
    if bias is not None:
        var_b = variance_of(bias)
        if not darks:
            zero = np.zeros_like(bias.data)
            return DarkSolution(bias.data, var_b, zero, how, (), True)
        et = match if match is not None else nearest_exptime(t, darks)
        d = darks[et]
        k = np.float32(1) if match is not None else np.float32(t / et)
        # bias + k (D̄ − B) = (1 − k) B + k D̄: independent terms
        if _own_bias(d, bias):
            var = np.float32((1 - k) ** 2) * var_b + (k * k) * variance_of(d)
        else:  # the dark's own bias B′ is another: var(B) + k² (var(D̄′) + var(B′ ≈ B))
            var = var_b + (k * k) * (variance_of(d) + var_b)
        total = bias.data + d.data if match is not None else bias.data + k * d.data
        return DarkSolution(total, var.astype(np.float32, copy=False),
                            d.data if match is not None else k * d.data, how, (et,), True)
    if match is not None:
        d = darks[match]
        fit = dark_fit(darks)
        if fit is not None:
            current = d.data - fit[0]
        else:
            current = np.maximum(d.data - np.float32(median(d.data)), 0)
        return DarkSolution(d.data, variance_of(d), current, how, (match,), False)
    offset, rate, (t1, t2), (v1, v2) = dark_fit(darks)
    # offset + rate t = a D̄₁ + b D̄₂, two independent sets of darks
    a, b = (t2 - t) / (t2 - t1), (t - t1) / (t2 - t1)
    var = np.float32(a * a) * v1 + np.float32(b * b) * v2
    return DarkSolution(offset + rate * np.float32(t), var, rate * np.float32(t), how,
                        (t1, t2), False)


def bias_level(levels: dict[float, float]) -> float:
    """The bias level (ADU) of darks that carry the bias, from their typical levels by
    exposure time: the line through the shortest and longest, at zero exposure.

    The noise model of a combination needs it as the zero of its Poisson term: without
    it (a dark's own median level) the dark current of a typical pixel counts as no
    signal, so the darks are clipped with too small a noise and their ``VAR`` leaves that
    noise out. Needs two exposure times.
    """
    (t1, l1), (t2, l2) = min(levels.items()), max(levels.items())
    if t2 <= t1:
        raise ValueError("the bias level needs darks of two exposure times")
    return float(l1 - (l2 - l1) / (t2 - t1) * t1)


def dark_fit(darks: dict[float, MasterPlanes]):
    """Per-pixel offset (bias) and rate (dark current / s) through the shortest and
    longest darks (of darks that carry the bias), or None when there are fewer than two
    exposure times.

    Returns
    -------
    offset, rate, (t1, t2), (var1, var2)
        The planes, the two exposure times and the two darks' ``VAR`` planes.
    """
    if len(darks) < 2:
        return None
    t1, t2 = min(darks), max(darks)
    d1, d2 = darks[t1], darks[t2]
    rate = (d2.data - d1.data) / np.float32(t2 - t1)
    offset = d1.data - rate * np.float32(t1)
    return offset, rate, (t1, t2), (variance_of(d1), variance_of(d2))
