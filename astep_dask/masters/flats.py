"""Sky flats: where a flat's level is measured, which flats are usable, and the final
normalisation of a master flat.

Twilight flats range from too dim to near saturation. Each flat's level is measured on
a sparse central box (a small fraction of its pixels, read before the combination reads
the flat whole); flats too dim or too close to saturation are rejected and named. After
the combination, the master flat is divided by the median of its good pixels (those the
bad-pixel mask leaves), so that it has median 1 where it matters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from astep_dask.config import DetectorSettings, FlatSettings
from astep_dask.core.stats import median
from astep_dask.io.layout import FrameRecord, detector_values
from astep_dask.io.stack import frame_section
from astep_dask.masters.store import Master

__all__ = ["central_box", "normalise_flat", "screen_flats"]


def central_box(rec: FrameRecord, fs: FlatSettings) -> tuple[slice, slice]:
    """Rows and columns (of the data section) where a flat's level is measured: every
    ``level_row_step``-th row of the central box, so that measuring the levels reads a
    small fraction of each flat before the combination reads it whole."""
    ny, nx = frame_section(rec).shape
    hy, hx = int(ny * fs.central_fraction / 2), int(nx * fs.central_fraction / 2)
    cy, cx = ny // 2, nx // 2
    step = max(1, min(fs.level_row_step, hy))
    return slice(cy - hy, cy + hy, step), slice(cx - hx, cx + hx)


def screen_flats(
    recs: Sequence[FrameRecord], levels: Sequence[float], dark_levels: dict[float, float],
    fs: FlatSettings, det: DetectorSettings,
) -> tuple[list[FrameRecord], list[float], list[dict]]:
    """Keep the flats whose dark-subtracted level is finite, at least ``min_level_adu`` and,
    with the dark added back, below ``max_level_fraction`` of saturation.

    Returns
    -------
    keep, kept_levels, rejected
        The usable flats and their levels; one ``{"path", "reason"}`` per rejected flat.
    """
    keep, kept_levels, rejected = [], [], []
    for r, level in zip(recs, levels, strict=True):
        dark_level = dark_levels[r.exptime]
        sat = detector_values(r, det).saturation
        if not np.isfinite(level):
            reason = "no finite pixels in the central region"
        elif level < fs.min_level_adu:
            reason = f"too little signal: level {level:.0f} ADU < {fs.min_level_adu:g}"
        elif level + dark_level > fs.max_level_fraction * sat:
            reason = (f"near saturation: level {level + dark_level:.0f} ADU > "
                      f"{fs.max_level_fraction:g} x {sat:g}")
        else:
            keep.append(r)
            kept_levels.append(level)
            continue
        rejected.append({"path": str(r.path), "reason": reason})
    return keep, kept_levels, rejected


def normalise_flat(flat: Master, mask: np.ndarray) -> None:
    """Divide a new master flat (and its variance) by the median of its good pixels
    (``mask == 0``, finite), in place, and record the factor in its cards."""
    good = (mask == 0) & np.isfinite(flat.data)
    norm = np.float32(median(flat.data[good]))
    flat.data = flat.data / norm
    if flat.var is not None:
        flat.var = flat.var / (norm * norm)
    flat.cards["FLATNORM"] = (float(norm), "divided by the median of good pixels")
    flat.cards["NORMMETH"] = ("median of unmasked pixels", "flat normalisation")
