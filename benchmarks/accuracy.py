"""Calibration accuracy against the simulator's truth, as figures for a report.

    python benchmarks/accuracy.py [--size 512] [--science 8] [--workdir DIR]

Simulates a night, calibrates it on a LocalCluster, and prints: master flat vs true flat
(robust scatter against the photon-noise limit of the flats used), master dark bias,
hot/dead pixel recall and false mask fraction, SCI/model ratio, normalised residual
scatter, VAR against the expected variance, cosmic-ray recall and star-core false flags.
The tests assert the same quantities on small nights; this script reports them at any size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std
from distributed import Client, LocalCluster
from scipy import ndimage

from astep_dask.config import Settings
from astep_dask.core.bits import Bit
from astep_dask.masters.store import read_master
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import SimConfig, load_frame_truth, load_truth, simulate_night


def master_figures(night: Path, paths: dict) -> dict:
    """Flat, dark and mask figures of a calibrated night's masters against the truth."""
    truth = load_truth(night)
    cfg = truth.config
    flat_path = Path(next(iter(paths["flats"].values())))
    flat = read_master(flat_path)
    mask = read_master(Path(paths["mask"])).data
    good = (mask == 0) & ~truth.dead
    expected = truth.flat * truth.illumination
    ratio = flat.data / (expected / np.median(expected[good]))
    levels_e = np.asarray(fits.getdata(flat_path, "INPUTS")["LEVEL"]) * cfg.gain
    rel_var = (levels_e + cfg.read_noise**2) / levels_e**2
    limit = float(np.sqrt(1.0 / np.sum(1.0 / rel_var)))
    dark = read_master(Path(paths["darks"][f"{cfg.science_exptime:g}"]))
    dark_err = (dark.data - truth.bias) * cfg.gain - truth.dark_rate * cfg.science_exptime
    hot = (mask & (1 << Bit.HOT)) != 0
    dead = (mask & (1 << Bit.DEAD)) != 0
    sigma_sci = np.sqrt(cfg.sky + cfg.read_noise**2)
    significant = truth.hot & ((truth.dark_rate - cfg.dark_rate) * 90 > 5 * sigma_sci)
    return {
        "flat_scatter": float(mad_std(ratio[good])),
        "flat_photon_limit": limit,
        "flat_scatter_over_limit": float(mad_std(ratio[good]) / limit),
        "dark_bias_e": float(np.mean(dark_err[~truth.hot])),
        "dark_bias_sem_e": float(np.std(dark_err[~truth.hot]) / np.sqrt((~truth.hot).sum())),
        "hot_recall_5sigma": float((hot & significant).sum() / max(significant.sum(), 1)),
        "dead_recall": float((dead & truth.dead).sum() / truth.dead.sum()),
        "false_mask_fraction": float(((mask != 0) & ~truth.hot & ~truth.dead).mean()),
    }


def frame_figures(night: Path, folder: Path) -> dict:
    """SCI, VAR and cosmic-ray figures over every calibrated frame of the night."""
    truth = load_truth(night)
    cfg = truth.config
    ratios, zstd, varr = [], [], []
    n_cr = n_ok = n_core = n_false = 0
    for path in sorted(folder.glob("*_CAL.fits")):
        with fits.open(path) as h:
            sci, var, mask = h["SCI"].data, h["VAR"].data, h["MASK"].data
            stem = h[0].header["RAWFILE"].removesuffix(".fits")
        ft = load_frame_truth(night, stem)
        model, cr = ft["model"], ft["cr"] > 0
        clean = (mask == 0) & ~cr
        ratios.append(np.median(sci[clean] / model[clean]) - 1)
        z = (sci - model) / np.sqrt(var)
        zstd.append(mad_std(z[clean]))
        expected = (model * truth.flat + truth.dark_rate * cfg.science_exptime
                    + cfg.read_noise**2) / truth.flat**2
        varr.append(np.median(var[clean] / expected[clean]))
        flagged = (mask & (1 << Bit.CR)) != 0
        n_cr += cr.sum()
        n_ok += (cr & (flagged | (mask != 0) | (np.abs(z) < 5))).sum()
        core = (model - cfg.sky) > 20 * np.sqrt(cfg.sky)
        near = ndimage.binary_dilation(cr, structure=np.ones((3, 3)))
        n_core += core.sum()
        n_false += (flagged & core & ~near).sum()
    return {
        "sci_ratio_minus_1": [float(np.min(ratios)), float(np.max(ratios))],
        "z_robust_std": [float(np.min(zstd)), float(np.max(zstd))],
        "var_over_expected": [float(np.min(varr)), float(np.max(varr))],
        "cr_pixels": int(n_cr),
        "cr_recall": float(n_ok / max(n_cr, 1)),
        "star_core_false_cr": float(n_false / max(n_core, 1)),
    }


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--science", type=int, default=8)
    ap.add_argument("--cr-per-mpix", type=float, default=SimConfig.cr_per_mpix)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="astep-accuracy-"))
    cfg = SimConfig(size=args.size, n_science=args.science, cr_per_mpix=args.cr_per_mpix,
                    seed=args.seed)
    night = simulate_night(work / "raw", cfg)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        result = calibrate_night(night, client, Settings(), out=work / "out")
    figures = {**master_figures(night, result.details["masters"]["paths"]),
               **frame_figures(night, result.out_dir)}
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
