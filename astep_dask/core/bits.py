"""Mask bits: the meaning of every bit of a MASK plane, shared by all layers.

Bits follow the LSST/KBMOD convention (value = 1 << bit). Hot and dead pixels get the
extra bits HOT and DEAD (above 15, as DESIGN.md allows): a hot pixel is repaired by the
dark subtraction and a low-response pixel by the flat (their noise is in VAR), so they are
BAD too only when really unusable (a response below ``mask.bad_response``). KBMOD's readers
mask BAD, EDGE, NO_DATA, SUSPECT (and grow them); they ignore HOT and DEAD
(:data:`SEARCH_IGNORED`). Our own measurements still leave out every flagged pixel.
WARM marks a warm pixel the bad-pixel mask missed: one that astroscrappy flags as a cosmic
ray in many of a night's science frames (:func:`astep_dask.core.cosmics.warm_pixels`). Its
excess is not in the dark, so nothing repairs it: KBMOD's readers do not know the bit, and
our KBMOD export masks it (it is not in :data:`SEARCH_IGNORED`); it is never counted as a
cosmic ray. :data:`UNUSABLE` is the set of bits whose pixels astroscrappy must not see as
data.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["MASK_DTYPE", "SEARCH_IGNORED", "UNUSABLE", "Bit", "flag"]

MASK_DTYPE = np.int32


class Bit(enum.IntEnum):
    """Mask bit numbers; a flag's value is ``1 << bit``."""

    BAD = 0
    SAT = 1
    INTRP = 2
    CR = 3
    EDGE = 4
    SUSPECT = 7
    NO_DATA = 8
    HOT = 16
    DEAD = 17
    WARM = 18


def flag(*bits: Bit) -> int:
    """Combined flag value of several bits."""
    out = 0
    for b in bits:
        out |= 1 << int(b)
    return out


# Pixels that astroscrappy must not see as data: filled from their neighbours first.
UNUSABLE = flag(Bit.BAD, Bit.NO_DATA, Bit.SAT, Bit.HOT, Bit.DEAD, Bit.WARM)

# Diagnostic bits: pixels the calibration repaired; a moving-object search may use them.
SEARCH_IGNORED = flag(Bit.HOT, Bit.DEAD)
