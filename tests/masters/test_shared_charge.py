"""The note on flat pairs whose differences correlate between neighbouring pixels
(masters.detector.shared_charge_note), on pair figures made by core.ptc."""

from __future__ import annotations

import numpy as np

from astep_dask.core.ptc import pair_stat
from astep_dask.masters.detector import shared_charge_note


def _pair(smear: float, seed: int):
    """Two flats of 20,000 e- (gain 1), each pixel's charge moved by ``smear`` into the
    next one along its row."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(2):
        e = rng.poisson(20000.0, (192, 192)).astype(np.float64)
        frames.append((1 - smear) * e + smear * np.roll(e, 1, axis=1))
    return pair_stat(*frames)


def test_shared_charge_note():
    white = [_pair(0.0, s) for s in (1, 2)]
    assert shared_charge_note(white) == ""
    assert all(abs(p.rho_x) < 0.02 and abs(p.rho_y) < 0.02 for p in white)  # noise 0.005
    smeared = [_pair(0.04, s) for s in (3, 4)]  # rho_x = 0.04 x 0.96 / 0.923 = 0.042
    note = shared_charge_note(smeared)
    assert "rho_x +0.04" in note and "+8." in note  # 2 (rho_x + rho_y) = 8.3 %
    assert shared_charge_note([]) == ""
