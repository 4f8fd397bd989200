"""Exposure times that are the same exposure: grouping with a tolerance.

Cameras write exposure times with jitter (a flat series at 10.00 s and 10.01 s, darks at
89.98 s): frames whose times differ by less than the tolerance are one group, made into
one master, and a frame matches a master dark within it. The tolerance of a time ``t`` is
``max(rel · t, abs)`` (``[combine] exptime_rtol``, ``exptime_atol``: 1 % or 0.05 s,
whichever larger). A group is named by the median (the lower middle one) of its frames'
times, so a series of mostly 10 s frames with one at 10.01 s is the 10 s group.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from astep_dask.config import CombineSettings

__all__ = ["ExptimeTolerance", "exptime_groups", "format_exptimes", "matching_exptime"]


@dataclass(frozen=True)
class ExptimeTolerance:
    """How far apart two exposure times may be and still be the same exposure.

    ``rel`` is a fraction of the shorter time, ``abs`` seconds; the larger one applies.
    """

    rel: float = CombineSettings.exptime_rtol
    abs: float = CombineSettings.exptime_atol

    @classmethod
    def of(cls, settings: CombineSettings) -> ExptimeTolerance:
        """The tolerance of the ``[combine]`` settings."""
        return cls(settings.exptime_rtol, settings.exptime_atol)

    def width(self, t: float) -> float:
        """Seconds by which another time may differ from ``t``."""
        return max(self.rel * abs(t), self.abs)

    def same(self, a: float, b: float) -> bool:
        """Whether ``a`` and ``b`` are the same exposure (a float's last bits aside)."""
        return abs(a - b) <= self.width(min(a, b)) * (1 + 1e-9) + 1e-9


def exptime_groups(times: Iterable[float], tol: ExptimeTolerance) -> dict[float, float]:
    """Each of ``times`` (one per frame, repeats counted) mapped to its group's name.

    Sorted times are cut into groups: a group starts at its shortest time and takes every
    time within the tolerance of that start, so a group never spans more than one
    tolerance (no chain of 10.0, 10.04, 10.08 ... s drifting into one group). A group's
    name is the median of its frames' times (the lower middle one of an even count), an
    exposure time some frame really has.

    Returns
    -------
    dict
        ``{time: group name}`` for every distinct time.
    """
    ordered = sorted(float(t) for t in times)
    out: dict[float, float] = {}
    i = 0
    while i < len(ordered):
        start = ordered[i]
        j = i
        while j < len(ordered) and tol.same(start, ordered[j]):
            j += 1
        members = ordered[i:j]
        name = members[(len(members) - 1) // 2]
        for t in members:
            out[t] = name
        i = j
    return out


def matching_exptime(t: float, candidates: Iterable[float],
                     tol: ExptimeTolerance) -> float | None:
    """The candidate nearest ``t`` that is the same exposure within ``tol``, or None."""
    same = [c for c in candidates if tol.same(t, c)]
    return min(same, key=lambda c: (abs(c - t), c)) if same else None


def format_exptimes(times: Iterable[float], limit: int = 60) -> str:
    """The distinct ``times`` as a short text for a header card (``'10 10.01'``); when
    they do not fit ``limit`` characters, their range and count (``'10-10.4 (9 values)'``)."""
    values = sorted({float(t) for t in times})
    text = " ".join(f"{t:g}" for t in values)
    if len(text) <= limit:
        return text
    return f"{values[0]:g}-{values[-1]:g} ({len(values)} values)"
