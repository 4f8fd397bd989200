"""The calibrated frames' VAR against their real scatter (issue 29, acceptance).

Small simulated nights with bias frames, calibrated by the run: one whose darks are of
another exposure time (bias + dark scaled by 3), one with darks of the science exposure
(matched), one without bias (ASTEP's case). The sky is faint and the calibration frames
few, so that the masters' noise is a good part of every pixel's: the variance as it was
before issue 29 (the master bias counted twice when matched, not scaled by (1 - k)^2 when
scaled) gives 0.966 and 1.080 for the single frames, against 1.010 and 1.009 now. On pixels
free of stars and cosmic rays, against the simulator's noiseless sky:

- one frame: scatter / sqrt(VAR) = 1.00 +/- 0.02 (the masters' noise included: each
  pixel's master error is independent of its neighbours');
- consecutive-frame differences: scatter / sqrt(VAR1 + VAR2 - 2 C) = 1.00 +/- 0.02, where
  C is the masters' noise common to both frames (the dark's and the flat's, from the
  planes the frames were calibrated with), which the difference cancels.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from astropy.io import fits
from distributed import Client, LocalCluster

from astep_dask.config import Settings
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import scan_night
from astep_dask.io.products import output_dir
from astep_dask.masters.builder import MasterBuilder
from astep_dask.masters.store import frame_masters
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night

SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"},
                              cosmics={"enabled": False}, illum={"enabled": False})
NIGHT = SimConfig(size=128, n_science=4, n_darks=5, n_flats=5, n_bias=5, sky=50.0,
                  dark_rate=0.5, hot_fraction=2e-4, cr_per_mpix=30.0, seed=29)
CASES = {
    "scaled": ({"science_darks": False, "extra_dark_exptimes": (30.0,)},
               "bias + dark 30s scaled x3"),
    "matched": ({}, "bias + dark 90s"),
    "no bias": ({"n_bias": 0}, "dark 90s (carries the bias)"),
}


@pytest.fixture(scope="module")
def client():
    """A cluster of threads in this process: nothing to start (the numbers are the
    same on any cluster)."""
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module", params=list(CASES))
def night(request, client, tmp_path_factory):
    """A calibrated night of the case, its products by frame and the planes they used."""
    changes, how = CASES[request.param]
    raw = simulate_night(tmp_path_factory.mktemp("raw"), SimConfig(**{**NIGHT.__dict__,
                                                                      **changes}))
    out = tmp_path_factory.mktemp("cal")
    calibrate_night(raw, client, SETTINGS, out=out)
    folder = output_dir(raw, out)
    inv = scan_night(raw)
    paths = MasterBuilder(inv, folder, SETTINGS).build()  # reused: the run's masters
    science = inv.select(FrameType.SCIENCE)
    planes, _ = frame_masters(paths, science[0].exptime, science[0].filter, cache=False)
    frames = []
    for rec in science:
        with fits.open(folder / f"{rec.path.stem}_CAL.fits") as hdul:
            assert hdul[0].header["DARKMETH"] == how
            frames.append((rec.path.stem, hdul["SCI"].data.astype(np.float64),
                           hdul["VAR"].data.astype(np.float64), hdul["MASK"].data))
    return raw, frames, planes


def _sky(raw, stem: str, sci: np.ndarray, good: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The frame's noiseless calibrated sky (the simulator's model over the twilight
    flats' mean illumination, which the master flat holds, scaled to the frame) and the
    pixels where it is sky alone (no star within 1 e- and no cosmic ray)."""
    truth = load_truth(raw)
    model = load_frame_truth(raw, stem)
    clean = good & (model["model"] < truth.config.sky + 1.0) & (model["cr"] == 0)
    expected = model["model"] / truth.illumination
    scale = np.median(sci[clean] / expected[clean])
    return scale * expected, clean


def _chi_scatter(chi: np.ndarray) -> float:
    """Standard deviation of normalised residuals, past 6 sigma left out (a hot pixel
    the mask missed)."""
    return float(np.std(chi[np.abs(chi) < 6]))


def test_single_frames_scatter_matches_var(night):
    raw, frames, _ = night
    chis = []
    for stem, sci, var, mask in frames:
        sky, clean = _sky(raw, stem, sci, mask == 0)
        chis.append(((sci - sky) / np.sqrt(var))[clean])
    chi = np.concatenate(chis)
    assert chi.size > 30_000
    assert _chi_scatter(chi) == pytest.approx(1.0, abs=0.02)


def test_pair_differences_scatter_matches_var(night):
    raw, frames, planes = night
    gain = load_truth(raw).config.gain
    flat = planes.flat.astype(np.float64)
    chis = []
    for (s1, sci1, var1, m1), (s2, sci2, var2, m2) in itertools.pairwise(frames):
        _, clean1 = _sky(raw, s1, sci1, m1 == 0)
        _, clean2 = _sky(raw, s2, sci2, m2 == 0)
        clean = clean1 & clean2
        # the masters' noise both frames share: the dark (x gain) and the flat, / flat²
        common = (gain**2 * planes.dark_var + sci1 * sci2 * planes.flat_var) / flat**2
        chis.append(((sci1 - sci2) / np.sqrt(var1 + var2 - 2 * common))[clean])
    chi = np.concatenate(chis)
    assert chi.size > 20_000
    assert _chi_scatter(chi) == pytest.approx(1.0, abs=0.02)
