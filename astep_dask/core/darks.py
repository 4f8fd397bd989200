"""The dark (+ bias) to subtract from a frame of a given exposure time.

Dark handling, in order of preference, for an exposure time ``t``:

1. a bias exists: bias + (bias-subtracted dark of time ``t``), or of the nearest time
   scaled by exposure;
2. no bias, a dark of time ``t``: subtract it whole (it carries the bias);
3. no bias, darks of two other times: a per-pixel fit ``offset + rate · t`` through the
   shortest and longest (offset = bias, rate = dark current), evaluated at ``t``;
4. otherwise the frame cannot be calibrated, and says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from astep_dask.core.stats import median
from astep_dask.errors import CalibrationError

__all__ = [
    "DarkSolution",
    "MasterPlanes",
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


def darks_needed(t: float, exptimes: Iterable[float], bias: bool) -> tuple[float, ...] | None:
    """Exposure times of the master darks that :func:`dark_for_exptime` reads for a frame
    of exposure ``t``, given the darks' exposure times and whether a bias exists; None
    when it cannot make a dark for ``t``. The recipe and the flow chart ask this, so that
    their dependencies are the calibration's own."""
    ets = sorted(exptimes)
    match = next((et for et in ets if np.isclose(et, t)), None)
    if bias:
        if match is not None:
            return (match,)
        return (nearest_exptime(t, ets),) if ets else ()
    fit = (ets[0], ets[-1]) if len(ets) >= 2 else ()  # offset + rate through these two
    if match is not None:
        return tuple(sorted({match, *fit}))  # the fit's offset gives the dark current
    return fit or None


def dark_how(t: float, exptimes: Iterable[float], bias: bool) -> str:
    """How :func:`dark_for_exptime` makes the dark of exposure ``t`` (its ``how``), from
    the darks' exposure times and whether a bias exists, without their pixels: a recipe
    can name it (and hash it) before deciding to read the masters.

    Raises
    ------
    CalibrationError
        When no dark can be made for ``t`` (the same cases as :func:`dark_for_exptime`).
    """
    ets = sorted(exptimes)
    match = next((et for et in ets if np.isclose(et, t)), None)
    if bias:
        if match is not None:
            return f"bias + dark {t:g}s"
        if not ets:
            return "bias only (no dark)"
        et = nearest_exptime(t, ets)
        return f"bias + dark {et:g}s scaled x{float(np.float32(t / et)):.4g}"
    if match is not None:
        return f"dark {t:g}s (carries the bias)"
    if len(ets) < 2:
        raise CalibrationError(
            f"no dark of {t:g}s and none can be scaled: no bias frames and "
            f"{'no darks' if not ets else 'only one dark exposure time'}"
        )
    return f"dark fit offset+rate*t from {ets[0]:g}s and {ets[-1]:g}s darks"


def dark_for_exptime(t: float, bias: MasterPlanes | None,
                     darks: dict[float, MasterPlanes]) -> DarkSolution:
    """The dark (+ bias) to subtract from a raw frame of exposure ``t``.

    See the module docstring for the order of preference.

    Raises
    ------
    CalibrationError
        When no dark can be made for ``t``.
    """
    how = dark_how(t, darks, bias is not None)  # raises when none can be made
    match = next((et for et in darks if np.isclose(et, t)), None)
    if bias is not None:
        if match is not None:
            d = darks[match]
            return DarkSolution(bias.data + d.data, variance_of(bias) + variance_of(d), d.data,
                                how, (match,), True)
        if not darks:
            zero = np.zeros_like(bias.data)
            return DarkSolution(bias.data, variance_of(bias), zero, how, (), True)
        et = nearest_exptime(t, darks)
        k = np.float32(t / et)
        d = darks[et]
        return DarkSolution(bias.data + k * d.data, variance_of(bias) + k * k * variance_of(d),
                            k * d.data, how, (et,), True)
    if match is not None:
        d = darks[match]
        fit = _dark_fit(darks)
        if fit is not None:
            current = d.data - fit[0]
        else:
            current = np.maximum(d.data - np.float32(median(d.data)), 0)
        return DarkSolution(d.data, variance_of(d), current, how, (match,), False)
    offset, rate, (t1, t2), (v1, v2) = _dark_fit(darks)
    a, b = (t2 - t) / (t2 - t1), (t - t1) / (t2 - t1)
    var = np.float32(a * a) * v1 + np.float32(b * b) * v2
    return DarkSolution(offset + rate * np.float32(t), var, rate * np.float32(t), how,
                        (t1, t2), False)


def _dark_fit(darks: dict[float, MasterPlanes]):
    """Per-pixel offset (bias) and rate (dark current / s) through the shortest and
    longest darks, or None when there are fewer than two exposure times."""
    if len(darks) < 2:
        return None
    t1, t2 = min(darks), max(darks)
    d1, d2 = darks[t1], darks[t2]
    rate = (d2.data - d1.data) / np.float32(t2 - t1)
    offset = d1.data - rate * np.float32(t1)
    return offset, rate, (t1, t2), (variance_of(d1), variance_of(d2))
