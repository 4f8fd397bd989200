"""The dask reductions behind the masters: lazy stacks of prepared frames, robust
combination strip by strip, and the level of each flat.

A stack is opened in row strips that each hold every frame (:func:`prepared_stack`,
memory bounded by ``CombineSettings.memory_budget_mb``); :func:`combine_blocks` maps
:func:`astep_dask.core.combine.clip_combine` over the strips, and :func:`compute_blocks`
computes several masters in one graph, each strip's result coming straight back to the
caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask
import dask.array as da
import numpy as np
import xarray as xr

from astep_dask.config import CombineSettings, Settings
from astep_dask.core.calibrate import overscan_level
from astep_dask.core.combine import Combined, NoiseModel, clip_combine
from astep_dask.io.fitsio import ascii_text
from astep_dask.io.layout import FrameRecord
from astep_dask.io.stack import frame_section, open_strips, read_section

__all__ = [
    "combine",
    "combine_blocks",
    "combine_cards",
    "combine_lazy",
    "compute_blocks",
    "compute_combined",
    "flat_level",
    "inputs_table",
    "lazy_overscan_levels",
    "prepared_stack",
    "strip_chunked",
]



def lazy_overscan_levels(records: Sequence[FrameRecord]) -> xr.DataArray | None:
    """Per-frame overscan levels as a lazy ``frame`` vector (None when frames have none)."""
    if all(r.overscan is None for r in records):
        return None

    def level(rec: FrameRecord) -> np.float32:
        if rec.overscan is None:
            return np.float32(0)
        return np.float32(overscan_level(read_section(rec.path, rec.hdu, *rec.overscan.slices)))

    values = da.stack(
        [da.from_delayed(dask.delayed(level)(r), (), np.float32) for r in records]
    )
    return xr.DataArray(values, dims="frame")


def prepared_stack(records: Sequence[FrameRecord], settings: Settings) -> xr.DataArray:
    """Lazy strip stack of raw frames, overscan-subtracted and trimmed."""
    stack = open_strips(records, settings.combine.memory_budget_mb)
    levels = lazy_overscan_levels(records) if settings.detector.overscan == "auto" else None
    return stack if levels is None else stack - levels


def strip_chunked(image: np.ndarray | xr.DataArray, stack: xr.DataArray) -> xr.DataArray:
    """An in-memory image (``(y, x)`` or ``(frame, y, x)``) as a dask array in the row
    strips of ``stack``: each strip task then gets its own slice, instead of the whole
    image being one object of the graph that every task depends on.

    On a distributed cluster each strip is scattered to the workers first and the graph
    holds only their futures: embedded in the graph, a 2048² dark (16 MB, 64 MB at 4096²)
    went through the scheduler with the graph, and dask warned of a large graph on every
    night.
    """
    arr = image if isinstance(image, xr.DataArray) else xr.DataArray(image, dims=("y", "x"))
    rows = stack.data.chunks[1]
    data = np.asarray(arr.data)
    client = _distributed_client()
    if client is None:
        chunks = tuple(rows if d == "y" else -1 for d in arr.dims)
        return arr.copy(data=da.from_array(data, chunks=chunks))
    axis = arr.dims.index("y")
    parts = np.split(data, np.cumsum(rows)[:-1], axis=axis)
    futures = client.scatter(parts)
    return arr.copy(data=da.concatenate(
        [da.from_delayed(f, p.shape, p.dtype) for f, p in zip(futures, parts, strict=True)],
        axis=axis))


def _distributed_client():
    """The distributed client that computes dask collections here, or None (a local
    scheduler, or none)."""
    try:
        from distributed import get_client

        client = get_client()
    except (ImportError, ValueError):
        return None
    return client if dask.config.get("scheduler", None) in (None, "dask.distributed") else None


def compute_combined(*lazy: da.Array) -> list[Combined]:
    """Compute several lazy combinations (:func:`combine_blocks`) in one
    graph: their strips share the workers, instead of each master waiting for the
    stragglers of the one before."""
    return compute_blocks(*lazy)


def combine_cards(settings: Settings, n: int, result: Combined) -> dict[str, tuple]:
    """Header cards that say how a master was combined: frames, method, clipping."""
    c = settings.combine
    return {
        "NCOMBINE": (n, "number of frames combined"),
        "COMBMETH": (c.method, "sigclip: clipped mean around the median, MAD scale"),
        "CLIPLO": (c.sigma_low, "lower clipping threshold (sigma)"),
        "CLIPHI": (c.sigma_high, "upper clipping threshold (sigma)"),
        "CLIPITER": (c.iterations, "maximum clipping iterations"),
        "NOISE": (result.noise, "median standard error of a master pixel"),
    }


def inputs_table(records: Sequence[FrameRecord], levels: Sequence[float] | None = None):
    """The master's INPUTS table rows: file (non-ASCII %-encoded,
    :func:`~astep_dask.io.fitsio.ascii_text`), exposure, start time (and level, for
    flats)."""
    rows = []
    for i, r in enumerate(records):
        row = {"FILE": ascii_text(r.path.name), "EXPTIME": float(r.exptime), "DATE_OBS": r.date_obs}
        if levels is not None:
            row["LEVEL"] = float(levels[i])
        rows.append(row)
    return rows


def flat_level(rec: FrameRecord, box: tuple[slice, slice], dark_box: np.ndarray,
               overscan: bool) -> float:
    """Median of a flat's central ``box`` (rows, columns of its data section), overscan-
    (when ``overscan`` and the frame has one) and dark-subtracted; ``dark_box`` is the
    dark's same box, so only it, not the whole dark, goes to the worker."""
    rows, cols = box
    sec = frame_section(rec)
    raw = read_section(rec.path, rec.hdu,
                       slice(sec.y0 + rows.start, sec.y0 + rows.stop, rows.step),
                       slice(sec.x0 + cols.start, sec.x0 + cols.stop))
    if rec.overscan is not None and overscan:
        region = read_section(rec.path, rec.hdu, *rec.overscan.slices)
        raw = raw - np.float32(overscan_level(region))
    raw -= dark_box
    return float(np.nanmedian(raw))


def combine_blocks(
    stack: xr.DataArray, settings: CombineSettings, noise: NoiseModel | None = None
) -> da.Array:
    """Lazy robust combination over ``frame`` of a strip-chunked stack, as one dask array
    ``(3, y, x)`` (combined value, its variance, count) chunked in the stack's strips.

    The stack must hold every frame in each chunk (see :func:`astep_dask.io.stack.open_strips`);
    it is rechunked if not.
    """
    arr = stack.data
    if len(arr.chunks[0]) != 1:
        arr = arr.rechunk({0: -1})
    return da.map_blocks(
        clip_combine,
        arr,
        method=settings.method,
        sigma_low=settings.sigma_low,
        sigma_high=settings.sigma_high,
        iterations=settings.iterations,
        noise=noise,
        chunks=((3,), *arr.chunks[1:]),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), np.float32),
    )


def combine_lazy(
    stack: xr.DataArray, settings: CombineSettings, noise: NoiseModel | None = None
) -> xr.Dataset:
    """Lazy robust combination over ``frame`` of a strip-chunked stack
    (:func:`combine_blocks`), as a Dataset with ``data``, ``var`` and ``count``."""
    out = combine_blocks(stack, settings, noise)
    dims = stack.dims[1:]
    return xr.Dataset(
        {"data": (dims, out[0]), "var": (dims, out[1]), "count": (dims, out[2])},
        attrs={"n_frames": stack.sizes["frame"]},
    )


def compute_blocks(*lazy: da.Array) -> list[Combined]:
    """Compute several :func:`combine_blocks` results in one graph.

    Each strip's result comes straight to the caller, which joins them: no task first
    gathers a whole master on one worker (one network copy less, and no worker holding
    the whole image).
    """
    parts = [arr.to_delayed().ravel().tolist() for arr in lazy]
    values = dask.compute(*[d for p in parts for d in p])
    out, i = [], 0
    for p in parts:
        planes = np.concatenate(values[i : i + len(p)], axis=1)
        i += len(p)
        out.append(Combined(data=planes[0], var=planes[1], count=planes[2].astype(np.int32)))
    return out


def combine(
    stack: xr.DataArray, settings: CombineSettings, noise: NoiseModel | None = None
) -> Combined:
    """Compute the robust combination of a stack (on the active dask scheduler)."""
    return compute_blocks(combine_blocks(stack, settings, noise))[0]
