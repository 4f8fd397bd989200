"""The dark model: darks_needed names exactly the darks dark_for_exptime reads."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest

from astep_dask.core.darks import dark_for_exptime, darks_needed, nearest_exptime
from astep_dask.errors import CalibrationError


@dataclass
class Planes:
    data: np.ndarray
    var: np.ndarray | None = None


def _planes(rng, level: float) -> Planes:
    return Planes(rng.normal(level, 1.0, (4, 5)).astype(np.float32),
                  np.full((4, 5), 0.5, np.float32))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("exptimes", [(), (10.0,), (90.0,), (10.0, 90.0), (5.0, 10.0, 90.0)])
@pytest.mark.parametrize("t", [10.0, 30.0, 90.0, 120.0])
def test_darks_needed_is_what_dark_for_exptime_reads(bias, exptimes, t):
    rng = np.random.default_rng(7)
    b = _planes(rng, 100.0) if bias else None
    darks = {et: _planes(rng, 100.0 + et) for et in exptimes}
    needed = darks_needed(t, exptimes, bias)
    if needed is None:
        with pytest.raises(CalibrationError):
            dark_for_exptime(t, b, darks)
        return
    sol = dark_for_exptime(t, b, darks)
    assert set(sol.used) <= set(needed)
    # Darks it does not name may hold anything: the result is the same.
    others = {et: (Planes(np.full((4, 5), 1e6, np.float32), np.full((4, 5), 9e9, np.float32))
                   if et not in needed else d) for et, d in darks.items()}
    again = dark_for_exptime(t, b, others)
    for a, c in itertools.pairwise([sol, again]):
        np.testing.assert_array_equal(a.total, c.total)
        np.testing.assert_array_equal(a.var, c.var)
        np.testing.assert_array_equal(a.current, c.current)
    # and each dark it names matters
    for et in needed:
        changed = dict(darks)
        changed[et] = Planes(darks[et].data + 7.0, darks[et].var)
        assert not np.array_equal(dark_for_exptime(t, b, changed).total, sol.total) or \
            not np.array_equal(dark_for_exptime(t, b, changed).current, sol.current)


def test_nearest_exptime_in_ratio_longer_on_a_tie():
    assert nearest_exptime(30.0, [10.0, 90.0]) == 90.0  # 3x either way: the longer
    assert nearest_exptime(20.0, [10.0, 90.0]) == 10.0
