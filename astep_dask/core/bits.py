"""core.bits: TODO docstring."""

from __future__ import annotations

import enum

import numpy as np

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


def flag(*bits: Bit) -> int:
    """Combined flag value of several bits."""
    out = 0
    for b in bits:
        out |= 1 << int(b)
    return out


# Pixels that astroscrappy must not see as data: filled from their neighbours first.
UNUSABLE = flag(Bit.BAD, Bit.NO_DATA, Bit.SAT)
