"""The survey's serial ccdproc recipe, as a reference for benchmarks.

This is an independent, single-process rendering of the recipe the ASTEP survey runs with
ccdproc today. It reads one night laid out as::

    NIGHT_DIR = ROOT/DATE/
        DATE-CAMS/          science frames (ACQTYPE='SCIENCE') and their darks (90 s)
        DATE-CAMS_SKYFLAT/  twilight flats (ACQTYPE='SKYFLAT') and their darks (10 s)

and runs, one step after the other, timing each:

1. ``master_dark``: one master dark per exposure time, an average combine with 3-sigma
   clipping around the median (deviation from ``mad_std``);
2. ``master_flat``: per filter, each flat minus the master dark of its exposure time,
   scaled by 1/median and median-combined;
3. ``bad_pixel_mask``: ``ccdproc.ccdmask`` on the master flat;
4. ``science``: per science frame, dark subtraction, flat correction, gain (to electrons),
   the bad-pixel mask attached, L.A.Cosmic (``cosmicray_lacosmic``), written to
   ``OUTDIR/<raw stem>_CAL.fits`` with its mask and uncertainty extensions.

Masters are written to ``OUTDIR`` as well. The last line of stdout is a JSON object with the
time of each step in seconds (``steps``) and the number of frames of each kind (``counts``)::

    python benchmarks/ccdproc_recipe.py NIGHT_DIR --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import astropy.units as u
import ccdproc
import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.stats import mad_std
from astropy.utils.exceptions import AstropyWarning

SCIENCE_SUFFIX = "CAMS"
FLAT_SUFFIX = "CAMS_SKYFLAT"
ADU = u.adu


@dataclass
class NightFiles:
    """Raw files of one night, sorted by kind.

    Attributes
    ----------
    darks : dict
        Dark file paths keyed by exposure time in seconds (both folders together).
    flats : dict
        Sky-flat file paths keyed by filter name.
    science : list
        Science frame paths, in name order.
    """

    darks: dict[float, list[Path]] = field(default_factory=lambda: defaultdict(list))
    flats: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    science: list[Path] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Number of files of each kind."""
        return {
            "darks": sum(len(v) for v in self.darks.values()),
            "flats": sum(len(v) for v in self.flats.values()),
            "science": len(self.science),
        }


class StepTimer:
    """Wall-clock times of named steps, accumulated over repeated entries."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the enclosed block and add its duration to ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def find_night_files(night_dir: Path) -> NightFiles:
    """Classify the raw frames of a night from their headers.

    Parameters
    ----------
    night_dir : Path
        The night folder ``ROOT/DATE``; its name is the date.

    Returns
    -------
    NightFiles
        Darks by exposure time, flats by filter, science frames; other frame types and
        unreadable files are skipped.
    """
    date = night_dir.name
    files = NightFiles()
    for folder_suffix in (SCIENCE_SUFFIX, FLAT_SUFFIX):
        folder = night_dir / f"{date}-{folder_suffix}"
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.fits")):
            try:
                header = fits.getheader(path)
            except (OSError, ValueError):
                print(f"skipped unreadable file {path}", file=sys.stderr)
                continue
            kind = str(header.get("ACQTYPE", "")).strip().upper()
            if kind == "DARK" and "EXPTIME" in header:
                files.darks[float(header["EXPTIME"])].append(path)
            elif kind == "SKYFLAT" and folder_suffix == FLAT_SUFFIX:
                files.flats[str(header.get("FILTER", "")).strip()].append(path)
            elif kind == "SCIENCE" and folder_suffix == SCIENCE_SUFFIX:
                files.science.append(path)
    return files


def make_master_dark(paths: Sequence[Path]) -> CCDData:
    """Average-combine darks with 3-sigma clipping around the median (MAD deviation).

    Parameters
    ----------
    paths : sequence of Path
        Dark frames of one exposure time.

    Returns
    -------
    CCDData
        The master dark in ADU, with the header of the first dark.
    """
    return ccdproc.combine(
        [str(p) for p in paths],
        method="average",
        sigma_clip=True,
        sigma_clip_low_thresh=3,
        sigma_clip_high_thresh=3,
        sigma_clip_func=np.ma.median,
        sigma_clip_dev_func=mad_std,
        unit=ADU,
    )


def nearest_dark(darks: dict[float, CCDData], exptime: float) -> CCDData:
    """The master dark whose exposure time is closest to ``exptime``."""
    return darks[min(darks, key=lambda t: abs(t - exptime))]


def _inverse_median(data: np.ndarray) -> float:
    return 1.0 / float(np.median(data))


def make_master_flat(paths: Sequence[Path], darks: dict[float, CCDData]) -> CCDData:
    """Dark-subtract each flat, scale it by 1/median and median-combine.

    Parameters
    ----------
    paths : sequence of Path
        Sky flats of one filter.
    darks : dict
        Master darks by exposure time; each flat uses the one closest to its EXPTIME.

    Returns
    -------
    CCDData
        The master flat (median close to 1).
    """
    corrected = []
    for path in paths:
        flat = CCDData.read(path, unit=ADU)
        dark = nearest_dark(darks, float(flat.header["EXPTIME"]))
        corrected.append(
            ccdproc.subtract_dark(flat, dark, exposure_time="EXPTIME", exposure_unit=u.s)
        )
    return ccdproc.combine(corrected, method="median", scale=_inverse_median)


def calibrate_science(
    path: Path,
    dark: CCDData,
    flat: CCDData,
    bad_pixels: np.ndarray,
    timer: StepTimer,
) -> CCDData:
    """Run the per-frame chain of the recipe on one raw science frame.

    Parameters
    ----------
    path : Path
        The raw science frame.
    dark : CCDData
        Master dark for its exposure time.
    flat : CCDData
        Master flat for its filter.
    bad_pixels : numpy.ndarray
        Boolean bad-pixel mask, attached to the frame before cosmic-ray detection (so
        L.A.Cosmic receives it as its input mask, as the survey recipe does).
    timer : StepTimer
        Receives the ``science_read``, ``science_reduce`` and ``science_cosmics`` times.

    Returns
    -------
    CCDData
        The calibrated frame in electrons, mask = bad pixels | cosmic rays.
    """
    with timer.step("science_read"):
        ccd = CCDData.read(path, unit=ADU)
    with timer.step("science_reduce"):
        ccd = ccdproc.subtract_dark(ccd, dark, exposure_time="EXPTIME", exposure_unit=u.s)
        ccd = ccdproc.flat_correct(ccd, flat)
        ccd = ccdproc.gain_correct(ccd, float(ccd.header["GAIN"]) * u.electron / u.adu)
        ccd.mask = bad_pixels.copy()
    with timer.step("science_cosmics"):
        ccd = ccdproc.cosmicray_lacosmic(
            ccd, sigclip=7, gain_apply=False, readnoise=float(ccd.header["RDNOISE"])
        )
    return ccd


def run_recipe(night_dir: Path, out_dir: Path) -> dict[str, object]:
    """Calibrate one night with the serial ccdproc recipe.

    Parameters
    ----------
    night_dir : Path
        The night folder ``ROOT/DATE``.
    out_dir : Path
        Where masters and calibrated frames are written (created if needed).

    Returns
    -------
    dict
        ``steps``: seconds per step (``discover``, ``master_dark``, ``master_flat``,
        ``bad_pixel_mask``, ``science`` and its parts ``science_read``,
        ``science_reduce``, ``science_cosmics``, ``science_write``; ``total``);
        ``counts``: frames of each kind and the number of calibrated frames written.

    Raises
    ------
    RuntimeError
        If the night has no darks, no flats or no science frames.
    """
    timer = StepTimer()
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    with timer.step("discover"):
        files = find_night_files(night_dir)
    missing = [k for k, n in files.counts().items() if n == 0]
    if missing:
        raise RuntimeError(f"{night_dir}: no {', '.join(missing)} frames found")

    with timer.step("master_dark"):
        darks: dict[float, CCDData] = {}
        for exptime, paths in sorted(files.darks.items()):
            darks[exptime] = make_master_dark(paths)
            darks[exptime].write(out_dir / f"MASTERDARK_{exptime:g}s.fits", overwrite=True)

    with timer.step("master_flat"):
        flats: dict[str, CCDData] = {}
        for filt, paths in sorted(files.flats.items()):
            flats[filt] = make_master_flat(paths, darks)
            flats[filt].write(out_dir / f"MASTERFLAT_{filt or 'NONE'}.fits", overwrite=True)

    with timer.step("bad_pixel_mask"):
        masks = {filt: ccdproc.ccdmask(flat) for filt, flat in flats.items()}
        for filt, mask in masks.items():
            fits.PrimaryHDU(mask.astype(np.uint8)).writeto(
                out_dir / f"MASK_{filt or 'NONE'}.fits", overwrite=True
            )

    written = 0
    with timer.step("science"):
        for path in files.science:
            header = fits.getheader(path)
            filt = str(header.get("FILTER", "")).strip()
            filt = filt if filt in flats else next(iter(flats))
            dark = nearest_dark(darks, float(header["EXPTIME"]))
            ccd = calibrate_science(path, dark, flats[filt], masks[filt], timer)
            with timer.step("science_write"):
                ccd.write(out_dir / f"{path.stem}_CAL.fits", overwrite=True)
            written += 1

    steps = dict(timer.seconds)
    steps["total"] = time.perf_counter() - t_start
    counts = {**files.counts(), "master_darks": len(darks), "master_flats": len(flats),
              "written": written}
    return {"steps": steps, "counts": counts}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the step times as JSON on the last line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 if the night could not be calibrated.
    """
    parser = argparse.ArgumentParser(
        description="Serial ccdproc calibration of one ASTEP night (the survey recipe).")
    parser.add_argument("night", type=Path, help="night folder ROOT/DATE")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", AstropyWarning)
    try:
        result = run_recipe(args.night, args.out)
    except (RuntimeError, OSError) as exc:
        print(f"ccdproc_recipe: error: {exc}", file=sys.stderr)
        return 1
    for name, seconds in result["steps"].items():
        print(f"{name:>16s} {seconds:9.2f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
