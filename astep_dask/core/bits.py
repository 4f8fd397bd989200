"""Mask bits: the meaning of every bit of a MASK plane, shared by all layers.

Bits follow the LSST/KBMOD convention (value = 1 << bit). Hot and dead pixels are BAD;
the extra bits HOT and DEAD (above 15, as DESIGN.md allows) say which, for diagnosis.
:data:`UNUSABLE` is the set of bits that take a pixel out of every measurement.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["MASK_DTYPE", "UNUSABLE", "Bit", "flag"]

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
