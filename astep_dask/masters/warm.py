"""Warm pixels: pixels flagged as cosmic rays frame after frame, which the bad-pixel mask
(made from the darks and flats) missed.

A warm pixel shows in the science frames only (it may be warm at the science frames'
temperature, or switch on and off), so it is found where it shows: once per night, with
the master files (once they are written), a sample of the science frames spread in time
(``[cosmics] warm_frames``) is calibrated in full, cosmic rays included, one task per frame
on the workers (which read the master files once per process, as the frames' tasks would
without the shared planes); each task returns only the flat indices of its pixels flagged
as cosmic rays. A pixel flagged in more than ``warm_fraction`` of the sample (and in at
least ``warm_min_count`` frames, more often than chance) is warm
(:func:`astep_dask.core.cosmics.warm_pixels`). The warm pixels are written as a master,
``DATE_WARM.fits`` (``SCI``: the bit WARM; ``COUNT``: in how many sampled frames each
pixel was flagged; ``INPUTS``: the frames), and every frame's mask takes them
(:func:`astep_dask.masters.store.frame_masters`): astroscrappy then fills them from their
neighbours like the other unusable pixels, and never counts them as cosmic rays.

Bounded: the driver holds the flags (a few hundred indices per sampled frame), never an
image per frame; each worker one frame at a time. The night is not read twice: only the
sample (30 frames by default) is read an extra time, whatever the night's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import dask
import numpy as np

from astep_dask.config import Settings
from astep_dask.core.bits import MASK_DTYPE, Bit, flag
from astep_dask.core.calibrate import Detector, calibrate_frame
from astep_dask.core.cosmics import warm_pixels, warm_threshold
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import FrameRecord, Inventory, detector_values
from astep_dask.io.provenance import digest_of, input_identity
from astep_dask.io.stack import read_raw
from astep_dask.masters.illum import choose_frames
from astep_dask.masters.store import Master, MasterPaths, MasterStore, frame_masters
from astep_dask.version import __version__

__all__ = ["WARM_FROM", "build_warm", "frame_cosmics", "make_warm", "warm_digest",
           "warm_name", "warm_records"]

# The masters a warm-pixel search calibrates its sample with (the illumination correction,
# a large-scale change of the flat, changes no cosmic-ray flag: left out).
WARM_FROM = ("bias", "dark", "flat", "mask")


def warm_name(night: str) -> str:
    """File name of a night's warm-pixel master."""
    return f"{night}_WARM.fits"


def warm_records(science: Sequence[FrameRecord], flat_filters: set[str],
                 settings: Settings) -> list[FrameRecord]:
    """The science frames searched for warm pixels: up to ``[cosmics] warm_frames`` of
    those with a flat, evenly spread in time; none when cosmic rays are not searched, the
    sample is 0 or the night has fewer than ``warm_min_frames`` such frames."""
    cs = settings.cosmics
    usable = [r for r in science if r.filter in flat_filters]
    if not cs.enabled or cs.warm_frames <= 0 or len(usable) < cs.warm_min_frames:
        return []
    return choose_frames(usable, cs.warm_frames)


def warm_digest(records: Sequence[FrameRecord], master_digests: Sequence[str],
                settings: Settings) -> str:
    """The provenance hash of the warm-pixel master: its sampled frames (by name, size,
    time and modification time: their content digests are taken only as the frames are
    calibrated), the masters it calibrated them with, the cosmic-ray and detector
    settings."""
    return digest_of("warm", input_identity(records, content=False), sorted(master_digests),
                     settings.digest("cosmics", "detector"), __version__)


def frame_cosmics(rec: FrameRecord, paths: MasterPaths, settings: Settings
                  ) -> tuple[tuple[int, ...], np.ndarray] | None:
    """One sampled frame, as a task on a worker: calibrated with the master files of
    ``paths`` (read once per worker process, :func:`frame_masters`) as a frame task would,
    cosmic rays included. Returns the image's shape and the flat indices of its pixels
    flagged as cosmic rays, or None when the frame cannot be read or calibrated (it is
    left out of the sample)."""
    try:
        masters, _ = frame_masters(paths, rec.exptime, rec.filter)
        raw = read_raw(rec.path, rec.hdu).data
        det = settings.detector
        values = detector_values(rec, det)
        detector = Detector(gain=values.gain, read_noise=values.read_noise,
                            saturation=values.saturation)
        auto = det.overscan == "auto"
        _, _, mask, _ = calibrate_frame(raw, masters, detector, settings.cosmics,
                                        rec.overscan if auto else None,
                                        rec.trim if auto else None)
    except Exception:  # a broken frame of the sample is not the night's problem
        return None
    return mask.shape, np.flatnonzero(mask & flag(Bit.CR)).astype(np.int64)


def make_warm(records: Sequence[FrameRecord], paths: MasterPaths, settings: Settings,
              digest: str) -> Master | str:
    """The warm-pixel master from ``records``, calibrated with the master files of
    ``paths`` (its illumination corrections aside), one dask task per frame that returns
    only its flags (:func:`frame_cosmics`), or why none could be made."""
    base = replace(paths, illums=(), warm=None)
    tasks = [dask.delayed(frame_cosmics, pure=False)(rec, base, settings) for rec in records]
    results = dask.compute(*tasks) if tasks else ()
    kept = [(r, res) for r, res in zip(records, results, strict=True) if res is not None]
    cs = settings.cosmics
    if len(kept) < cs.warm_min_count:
        return f"{len(kept)} of {len(records)} sampled frames could be calibrated"
    shape = kept[0][1][0]
    flagged = [f for _, (_, f) in kept]
    n, n_pixels = len(kept), int(np.prod(shape))
    pixels, _ = warm_pixels(flagged, n, cs, n_pixels)
    data = np.zeros(shape, MASK_DTYPE)
    data.flat[pixels] = flag(Bit.WARM)
    seen, times = np.unique(np.concatenate(flagged), return_counts=True)
    count = np.zeros(shape, np.int16)
    count.flat[seen] = np.minimum(times, np.iinfo(np.int16).max)
    rate = sum(int(np.unique(f).size) for f in flagged) / (n * n_pixels)
    threshold = warm_threshold(n, cs, rate, n_pixels)
    cards = {
        "NSAMPLE": (n, "science frames searched for cosmic rays"),
        "WARMFRAC": (cs.warm_fraction, "warm: flagged in more than this fraction"),
        "WARMMIN": (threshold, "... and at least this many (chance hits: fewer)"),
        "CRRATE": (float(rate), "cosmic-ray flags per pixel per sampled frame"),
        "NWARM": (int(pixels.size), "warm pixels (MASK bit WARM)"),
    }
    inputs = [{"file": r.path.name, "mjd": float(r.mjd), "n_cr": int(f.size)}
              for r, (_, f) in kept]
    return Master("warm", data, None, count, digest, cards, inputs)


def build_warm(store: MasterStore, inv: Inventory, settings: Settings, paths: MasterPaths,
               failed_before: dict[str, str] | None = None) -> MasterPaths:
    """``paths`` with the night's warm-pixel master: reused when its file in the store's
    folder holds the same provenance hash, else made (:func:`make_warm`, from the master
    files of ``paths``, written by then) and written by ``store``; ``paths`` unchanged
    when the night has no sample (:func:`warm_records`) or none could be made (a note;
    not tried again with the same inputs when ``failed_before``, an earlier run's
    :attr:`~astep_dask.masters.store.MasterReport.failed`, says so)."""
    records = warm_records(inv.select(FrameType.SCIENCE), {f for f, _ in paths.flats},
                           settings)
    if not records:
        return paths
    held = {str(m.path): m.digest for m in store.loaded.values() if m.path is not None}
    used = [paths.bias, *(p for _, p in paths.darks), *(p for _, p in paths.flats),
            paths.mask]
    digest = warm_digest(records, [held.get(str(p), "") for p in used if p is not None],
                         settings)
    path = store.out / warm_name(inv.night)
    report = store.report
    if store.existing(path, digest) is not None:
        return replace(paths, warm=path)
    why = (failed_before or {}).get(digest)
    if why is None:
        made = make_warm(records, paths, settings, digest)
        if isinstance(made, Master):
            store.write(made, path)
            report.built.append(path.name)
            return replace(paths, warm=path)
        why = made
    report.failed[digest] = why
    report.notes.append(f"warm pixels: {why}; none flagged")
    return paths
