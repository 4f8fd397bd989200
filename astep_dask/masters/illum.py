"""The illumination correction of a night as a dask reduction over its science frames.

One task per science frame (at most ``[illum] max_frames`` of them, evenly spread in
time) reads every ``row_step``-th row of the raw frame (the only extra read of a frame,
a fraction of its bytes), subtracts overscan and dark, applies gain and the master flat in
memory, and reduces it to a small grid of star-free block sky levels
(:func:`astep_dask.core.illumination.sky_grid`). Only the grids come back; the masters'
sampled rows reach the workers once, as graph objects shared by every task. The grids are
then screened and combined into the correction
(:func:`astep_dask.core.illumination.illumination_correction`). Memory is bounded by one
frame's sampled rows per worker thread, whatever the length of the night.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask
import numpy as np

from astep_dask.config import Settings
from astep_dask.core.calibrate import overscan_level
from astep_dask.core.illumination import IllumResult, SkyGrid, illumination_correction, sky_grid
from astep_dask.io.layout import FrameRecord, detector_values
from astep_dask.io.stack import frame_section, read_section

__all__ = ["choose_frames", "compute_illumination", "frame_sky_grid", "illum_cards",
           "illum_inputs", "sampled_rows"]


def choose_frames(records: Sequence[FrameRecord], max_frames: int) -> list[FrameRecord]:
    """At most ``max_frames`` (0: all) of the records, evenly spread in time."""
    recs = sorted(records, key=lambda r: (r.mjd, r.path.name))
    if max_frames <= 0 or len(recs) <= max_frames:
        return recs
    idx = np.unique(np.linspace(0, len(recs) - 1, max_frames).round().astype(int))
    return [recs[i] for i in idx]


def sampled_rows(ny: int, step: int) -> np.ndarray:
    """The rows (of the data section) that are read: every ``step``-th, centred."""
    return np.arange(min(step // 2, ny - 1), ny, step)


def frame_sky_grid(rec: FrameRecord, dark: np.ndarray, flat: np.ndarray, bad: np.ndarray,
                   rows: np.ndarray, gain: float, saturation: float, overscan: bool,
                   settings: Settings) -> SkyGrid:
    """One science frame's sky grid: its sampled ``rows`` read, overscan- and
    dark-subtracted (``dark``: the same rows, ADU), times ``gain``, divided by the flat's
    same rows; ``bad`` (the mask's rows) and saturated pixels left out."""
    sec = frame_section(rec)
    ny = sec.shape[0]
    step = int(rows[1] - rows[0]) if len(rows) > 1 else 1
    raw = read_section(rec.path, rec.hdu, slice(sec.y0 + int(rows[0]), sec.y0 + ny, step),
                       slice(sec.x0, sec.x1))
    saturated = raw >= saturation
    if overscan and rec.overscan is not None:
        raw = raw - np.float32(overscan_level(read_section(rec.path, rec.hdu,
                                                           *rec.overscan.slices)))
    with np.errstate(invalid="ignore", divide="ignore"):
        sky = (raw - dark) * np.float32(gain) / flat
    return sky_grid(sky, bad | saturated, rows, sec.shape, settings.illum)


def compute_illumination(records: Sequence[FrameRecord], darks: dict[float, np.ndarray],
                         flat: np.ndarray, mask: np.ndarray,
                         settings: Settings) -> tuple[IllumResult, list[FrameRecord]]:
    """The correction from the science ``records`` of one filter (on the active dask
    scheduler).

    Parameters
    ----------
    records
        The night's science frames of the flat's filter.
    darks
        Everything subtracted before the gain (bias + dark, ADU, full frame) per exposure
        time; frames of another exposure time are not used.
    flat, mask
        The normalised master flat and the bad-pixel mask.
    settings
        ``[illum]`` and ``[detector]`` (gain, saturation, overscan fallbacks).

    Returns
    -------
    result, used
        The correction (``result.correction`` None when too few frames are usable) and the
        frames it was computed from, in the order of ``result.reasons``.
    """
    il, det = settings.illum, settings.detector
    chosen = choose_frames([r for r in records if r.exptime in darks], il.max_frames)
    ny, nx = flat.shape
    rows = sampled_rows(ny, il.row_step)
    bad = (mask[rows] != 0) | ~np.isfinite(flat[rows]) | (flat[rows] <= 1e-3)
    shared_flat = dask.delayed(np.ascontiguousarray(flat[rows]), pure=True)
    shared_bad = dask.delayed(bad, pure=True)
    shared_dark = {et: dask.delayed(np.ascontiguousarray(d[rows], dtype=np.float32), pure=True)
                   for et, d in darks.items()}
    overscan = det.overscan == "auto"
    tasks = [
        dask.delayed(frame_sky_grid, pure=True)(
            r, shared_dark[r.exptime], shared_flat, shared_bad, rows,
            detector_values(r, det).gain, detector_values(r, det).saturation, overscan,
            settings)
        for r in chosen
    ]
    grids: Sequence[SkyGrid] = dask.compute(*tasks) if tasks else ()
    if not grids:
        return IllumResult(None), chosen
    result = illumination_correction(
        np.stack([g.grid for g in grids]), np.array([g.level for g in grids]),
        np.array([r.exptime for r in chosen]), (ny, nx), flat, mask == 0, il)
    return result, chosen


def illum_cards(result: IllumResult, settings: Settings, filt: str,
                flat_name: str) -> dict[str, tuple]:
    """Header cards of an illumination master: method, frames, amplitude, noise."""
    il = settings.illum
    return {
        "FILTER": (filt, "filter"),
        "ILLFLAT": (flat_name[:68], "master flat this corrects (divide it by this)"),
        "ILLMETH": (il.method, "poly: 2-D polynomial; smooth: Gaussian on the grid"),
        "ILLORDER": (il.order, "polynomial degree"),
        "ILLBLOCK": (il.block, "[px] block of the sky grid"),
        "ILLSTEP": (il.row_step, "every n-th row of each frame read"),
        "NCOMBINE": (result.n_used, "science frames combined"),
        "NREJECT": (len(result.reasons) - result.n_used, "frames rejected (see INPUTS)"),
        "ILLAMP": (round(result.amplitude, 6), "peak-to-peak of the correction"),
        "ILLRESID": (round(result.residual, 6), "rms of sky grid - fitted surface"),
        "ILLNOISE": (round(result.noise, 6), "median standard error of a block"),
    }


def illum_inputs(records: Sequence[FrameRecord], result: IllumResult) -> list[dict]:
    """The INPUTS rows of an illumination master: file, exposure, time, used or why not."""
    return [{"FILE": r.path.name, "EXPTIME": float(r.exptime), "DATE_OBS": r.date_obs,
             "USED": why is None, "REASON": (why or "")[:60]}
            for r, why in zip(records, result.reasons, strict=True)]
