"""Benchmark of the template's mover rejection (issue 31): the flux a mover keeps in the
difference frames, slow movers included, and the static stars' residuals.

Simulates one night (default 256², 20 frames at 100 s, so 32 minutes) with slow movers
(``--slow`` px/frame, default 0.5 = 432 px/day: a few PSF widths over the night) at a range
of fluxes and fast ones (2 px/frame), calibrates it and writes its KBMOD export with a
template from the night itself (leave-one-out), with the time-aware rejection on
(``[template] mover_sigma``, default) and off (``--mover-sigma 0``, the plain clipped mean
of before). Prints, per mover, the fraction of its true flux kept in the difference frames
(PSF-weighted photometry at its true positions, summed over the frames: an unbiased flux
for the difference frames' Gaussian PSF of σ ``PSFSIGMA``), the residual rms at the static
stars in VAR units, and the time of the template stage (template and differences), for
each ``--mover-sigma`` with each ``--track-sigma`` (the track search for faint slow
movers, ``[template] track_sigma``; 0: off).

    python benchmarks/template_movers.py --size 256 --frames 20 --mover-sigma 4 0 \
        --track-sigma 5 0
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from astep_dask.config import Settings, TemplateSettings
from astep_dask.kbmod.products import read_layers
from astep_dask.kbmod.stage import export_night
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import (
    SimConfig,
    load_truth,
    mover_tracks,
    psf_stamp,
    simulate_night,
)


def movers(slow: float, fluxes: tuple[float, ...], fast: float, fast_flux: float
           ) -> tuple[tuple[float, float, float], ...]:
    """Slow movers in several directions at ``fluxes``, and two fast ones."""
    out = []
    for k, f in enumerate(fluxes):
        a = 0.7 + 2.4 * k
        out.append((slow * np.cos(a), slow * np.sin(a), f))
    out += [(fast * 0.8, fast * 0.6, fast_flux), (-fast * 0.6, fast * 0.8, fast_flux)]
    return tuple((round(float(vx), 4), round(float(vy), 4), float(f)) for vx, vy, f in out)


def difference_frames(export) -> list[dict]:
    """The KBMOD files of an export: header, SCI, VAR, MASK."""
    out = []
    for r in export.frames:
        header, f = read_layers(export.out_dir / r["output"])
        out.append({"header": header, "sci": f.sci.astype(float),
                    "mask": f.mask.astype(np.int64), "var": f.var.astype(float)})
    return out


def kept_fractions(night: Path, export) -> list[dict]:
    """Per mover: the fraction of its true flux in the difference frames, by PSF-weighted
    photometry at its true positions (frames where its PSF is mostly unmasked)."""
    frames = difference_frames(export)
    stems = [f["header"]["CALFILE"].removesuffix("_CAL.fits") for f in frames]
    tracks = mover_tracks(night, stems, export.details["reference"])
    rows = []
    for tr in tracks:
        num = den = 0.0
        used = 0
        for f, (x, y) in zip(frames, tr["positions"], strict=True):
            g, ys, xs = psf_stamp(x, y, f["header"]["PSFSIGMA"], f["sci"].shape)
            good = f["mask"][np.ix_(ys, xs)] == 0
            if np.sum((g * g)[good]) < 0.8 * np.sum(g * g):
                continue
            d = np.where(good, f["sci"][np.ix_(ys, xs)], 0.0)
            num += float(np.sum(g * d))
            den += float(np.sum((g * g)[good]))
            used += 1
        rows.append({"k": tr["k"], "per_frame": tr["per_frame"],
                     "px_day": float(np.hypot(*tr["v"])), "flux": tr["flux"],
                     "kept": num / (tr["flux"] * den) if den > 0 else np.nan,
                     "frames": used})
    return rows


def star_residuals(night: Path, export, min_flux: float = 3e4) -> float:
    """The rms of difference / √VAR on the pixels within 2 px of static stars brighter than
    ``min_flux`` e- (away from the movers)."""
    truth = load_truth(night)
    frames = difference_frames(export)
    tf = {fr["file"].removesuffix(".fits"): fr for fr in truth.frames}
    ref = np.array(tf[export.details["reference"]]["offset"])
    stars = truth.stars[truth.stars[:, 2] > min_flux]
    n = truth.config.size
    yy, xx = np.mgrid[0:n, 0:n]
    near = np.zeros((n, n), bool)
    for x, y, _ in stars:
        near |= (xx - (x + ref[0])) ** 2 + (yy - (y + ref[1])) ** 2 <= 4
    chi = []
    stems = [f["header"]["CALFILE"].removesuffix("_CAL.fits") for f in frames]
    tracks = mover_tracks(night, stems, export.details["reference"])
    for i, f in enumerate(frames):
        away = np.ones((n, n), bool)
        for tr in tracks:
            mx, my = tr["positions"][i]
            away &= (xx - mx) ** 2 + (yy - my) ** 2 > 64
        sel = near & away & (f["mask"] == 0)
        chi.append(f["sci"][sel] / np.sqrt(f["var"][sel]))
    c = np.concatenate(chi)
    return float(np.sqrt(np.mean(c * c)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--slow", type=float, default=0.5, help="px/frame of the slow movers")
    p.add_argument("--fluxes", default="500,800,1200,2000,4000",
                   help="e- per frame of the slow movers")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mover-sigma", type=float, nargs="+", default=[4.0, 0.0])
    p.add_argument("--track-sigma", type=float, nargs="+", default=[5.0],
                   help="[template] track_sigma values, each with every --mover-sigma "
                        "(0: no track search)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = p.parse_args()
    fluxes = tuple(float(f) for f in a.fluxes.split(","))
    cfg = SimConfig(size=a.size, n_science=a.frames, n_darks=5, n_flats=7, seed=a.seed,
                    movers=movers(a.slow, fluxes, 2.0, 2000.0))
    tmp = Path(tempfile.mkdtemp(prefix="tplmov_"))
    settings = Settings().replace(cluster={"dashboard_address": ":0"})
    try:
        night = simulate_night(tmp / "archive", cfg)
        out = tmp / "out"
        with LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            assert calibrate_night(night, client, settings, out=out).status == "complete"
            known = {f.name for f in dataclasses.fields(TemplateSettings)}
            for ms, tr in itertools.product(a.mover_sigma, a.track_sigma):
                s = settings.replace(kbmod={"folder": f"kbmod_ms{ms:g}_tr{tr:g}"})
                # (before issue 31: the plain clip; before December 2026: no tracks)
                given = {"mover_sigma": ms, "track_sigma": tr}
                ts = TemplateSettings(**{k: v for k, v in given.items() if k in known})
                exp = export_night(night, client, s, out=out, template=ts)
                assert exp.status == "complete", exp.error
                info = exp.details["template"]
                print(f"\nmover_sigma {ms:g}, track_sigma {tr:g}: template stage "
                      f"{info['seconds']:.2f} s ({info['frames']} frames, {a.size}², "
                      f"{a.workers} workers)")
                for r in kept_fractions(night, exp):
                    print(f"  mover {r['k']}: {r['px_day']:6.0f} px/day "
                          f"({r['per_frame']:.2f} px/frame), {r['flux']:6.0f} e-: "
                          f"kept {r['kept']:.3f} ({r['frames']} frames)")
                print(f"  static stars: residual rms {star_residuals(night, exp):.3f} "
                      f"(VAR units)")
    finally:
        if a.keep:
            print("kept", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
