"""Lazy image stacks: raw FITS frames as a chunked, dask-backed ``xarray.DataArray``.

Each frame is wrapped in a :class:`FitsImage`, a small array-like object that reads only
the rows it is asked for (through a memory map for plain FITS files), converting unsigned
16-bit data straight to float32. ``dask.array.from_array`` turns it into chunks, so opening
a stack of thousands of frames reads no pixel data, and a stack opened in row strips reads
every byte of every file exactly once when it is reduced over ``frame``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits

from astep_dask.core.calibrate import Section
from astep_dask.io.layout import FrameRecord

__all__ = [
    "FitsImage",
    "RawRead",
    "frame_coords",
    "frame_section",
    "open_stack",
    "open_strips",
    "read_frame",
    "read_raw",
    "read_section",
    "read_strip",
    "strip_rows",
]

FLOAT = np.float32


_BYTES = np.dtype(FLOAT).itemsize


# Copies of a strip alive at the peak of a master's strip task: the strip read, up to two
# results of the subtraction and scaling before the combination, and the combination's
# own working set (at most 2.5x the strip, measured with tracemalloc on clip_combine;
# benchmarks/masters_memory.py measures the whole build).
STRIP_COPIES = 5


# At least this many strips per stack, when the budget would allow fewer: a master is
# then shared evenly by a few workers instead of waiting for one last large strip.
MIN_STRIPS = 8


def read_section(path: Path, hdu: int, rows: slice, cols: slice,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Read ``data[rows, cols]`` of one image HDU as float32, exactly.

    Unsigned 16-bit data (BITPIX=16, BZERO=32768, BSCALE=1) is converted in one pass, the
    stored int16 plus 32768 in float32 (exact: every value fits the 24-bit mantissa), with
    no temporary. Other encodings go through astropy's own scaling. ``out``, a float32
    array of the section's shape, receives the values (and is returned): a strip reader
    fills its block in place instead of copying each frame's piece into it.
    """
    if path.name.lower().endswith((".gz", ".fz")):
        return _into(_read_compressed(path, hdu, rows, cols), out)
    with fits.open(path, memmap=True, do_not_scale_image_data=True, mode="readonly") as hdul:
        h = hdul[hdu]
        if isinstance(h, fits.CompImageHDU):
            return _into(_read_compressed(path, hdu, rows, cols), out)
        return _float32(h, rows, cols, out)


def _float32(h: fits.ImageHDU | fits.PrimaryHDU, rows: slice, cols: slice,
             out: np.ndarray | None = None) -> np.ndarray:
    """``h.data[rows, cols]`` (opened with ``do_not_scale_image_data``) as float32,
    scaled as its header says (unsigned 16-bit in one exact pass)."""
    header = h.header
    raw = h.data[rows, cols]
    bzero = header.get("BZERO", 0)
    bscale = header.get("BSCALE", 1)
    if header["BITPIX"] == 16 and bzero == 32768 and bscale == 1:
        if out is None:
            out = np.empty(raw.shape, FLOAT)
        return np.add(raw, FLOAT(32768), out=out)
    if bzero == 0 and bscale == 1:
        return _into(np.asarray(raw, dtype=FLOAT), out)
    return _into((np.asarray(raw, dtype=np.float64) * bscale + bzero).astype(FLOAT), out)


@dataclass(frozen=True)
class RawRead:
    """A raw frame read whole, once: its pixels, its headers, and the digest of its bytes.

    ``stat`` is the file's status before the read, or None when the file changed while it
    was read (its digest then vouches for nothing).
    """

    data: np.ndarray  # float32, the whole image HDU
    header: fits.Header  # the primary header, updated with the image HDU's own cards
    digest: str  # SHA-256 of the file's bytes, first 16 hex digits (content_digest's)
    stat: os.stat_result | None
    checked_ns: int  # when the read began (epoch ns)
    gz_size: int | None = None  # a gzip file: the size of its inflated stream


def read_raw(path: str | Path, hdu: int) -> RawRead:
    """Read a raw file's bytes once (one ``read``), hash them, and decode the image HDU
    ``hdu`` from them: the frame's content digest costs no second pass over the file.

    Plain, gzip and tile-compressed FITS files are read. Raises ``OSError`` or
    ``ValueError`` (astropy's) for a file that cannot be read or decoded.
    """
    path = Path(path)
    started = time.time_ns()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        data = fh.read()
        after = os.fstat(fh.fileno())
    same = (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == \
        (after.st_size, after.st_mtime_ns, after.st_ctime_ns)
    digest = hashlib.sha256(data).hexdigest()[:16]
    gz_size = None
    if data[:2] == b"\x1f\x8b":  # gzip: inflated in memory (only the image is kept)
        data = gzip.decompress(data)
        gz_size = len(data)
    with fits.open(io.BytesIO(data), memmap=False, do_not_scale_image_data=True) as hdul:
        compressed = isinstance(hdul[hdu], fits.CompImageHDU)
        if not compressed:
            pixels, header = _float32(hdul[hdu], slice(None), slice(None)), _merged(hdul, hdu)
    if compressed:  # astropy scales tile-compressed data as it decompresses it
        with fits.open(io.BytesIO(data), memmap=False) as hdul:
            pixels = np.asarray(hdul[hdu].section[:, :], dtype=FLOAT)
            header = _merged(hdul, hdu)
    return RawRead(pixels, header, digest, before if same else None, started, gz_size)


def _merged(hdul: fits.HDUList, hdu: int) -> fits.Header:
    """The primary header updated with image HDU ``hdu``'s own cards."""
    header = hdul[0].header.copy()
    if hdu:
        header.update(hdul[hdu].header)
    return header


def _into(values: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    if out is None:
        return values
    out[...] = values
    return out


def _read_compressed(path: Path, hdu: int, rows: slice, cols: slice) -> np.ndarray:
    """Gzip or tile-compressed files: astropy decompresses (only the tiles needed)."""
    with fits.open(path, mode="readonly") as hdul:
        return np.asarray(hdul[hdu].section[rows, cols], dtype=FLOAT)


def read_frame(record: FrameRecord, trim: bool = True) -> np.ndarray:
    """The whole frame (its data section only when ``trim``) as float32."""
    return read_section(record.path, record.hdu, *frame_section(record, trim).slices)


class FitsImage:
    """Array-like view of one FITS image (optionally a section of it), read on demand.

    Supports the subset of the numpy interface that ``dask.array.from_array`` needs:
    ``shape``, ``dtype``, ``ndim`` and basic slicing.
    """

    def __init__(self, path: Path, hdu: int, section: Section):
        self.path = Path(path)
        self.hdu = hdu
        self.section = section
        self.shape = section.shape
        self.dtype = np.dtype(FLOAT)
        self.ndim = 2

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = (*key, slice(None), slice(None))[:2]
        y0, y1, _ = rows.indices(self.shape[0])
        x0, x1, _ = cols.indices(self.shape[1])
        s = self.section
        return read_section(
            self.path, self.hdu, slice(s.y0 + y0, s.y0 + y1), slice(s.x0 + x0, s.x0 + x1)
        )

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return (str(self.path), st.st_size, st.st_mtime_ns, self.hdu, self.section)


def frame_section(record: FrameRecord, trim: bool = True) -> Section:
    """The section of a raw frame that a stack exposes."""
    if trim and record.trim is not None:
        return record.trim
    return Section(0, record.shape[0], 0, record.shape[1])


def _common_shape(records: Sequence[FrameRecord], trim: bool) -> list[Section]:
    if not records:
        raise ValueError("a stack needs at least one frame")
    sections = [frame_section(r, trim) for r in records]
    shapes = {sec.shape for sec in sections}
    if len(shapes) != 1:
        raise ValueError(f"frames differ in shape: {sorted(shapes)}")
    return sections


def frame_coords(mjd: Sequence[float], exptime: Sequence[float], filter: Sequence[str],
                 path: Sequence[str | Path], kind: Sequence[str]) -> dict:
    """The per-frame coordinates of a stack (raw or calibrated): ``frame`` (0..n-1),
    ``time`` (start of exposure, UTC, datetime64; NaT when unknown), ``mjd`` (the same as
    an MJD), ``exptime`` (s), ``filter``, ``path`` (the file) and ``kind`` (frame type)."""
    mjd = np.asarray(mjd, dtype=float)
    time = (
        np.datetime64("1858-11-17T00:00:00", "ns")
        + np.round(np.nan_to_num(mjd, nan=0.0) * 86400e9).astype("timedelta64[ns]")
    )
    time = np.where(np.isfinite(mjd), time, np.datetime64("NaT"))
    return {
        "frame": np.arange(len(mjd)),
        "time": ("frame", time),
        "mjd": ("frame", mjd),
        "exptime": ("frame", np.asarray(exptime, dtype=float)),
        "filter": ("frame", np.array([str(f) for f in filter], dtype=object)),
        "path": ("frame", np.array([str(p) for p in path], dtype=object)),
        "kind": ("frame", np.array([str(k) for k in kind], dtype=object)),
    }


def _as_stack(data: da.Array, records: Sequence[FrameRecord]) -> xr.DataArray:
    """Wrap a ``(frame, y, x)`` dask array with the per-frame coordinates."""
    coords = frame_coords([r.mjd for r in records], [r.exptime for r in records],
                          [r.filter for r in records], [r.path for r in records],
                          [r.kind for r in records])
    return xr.DataArray(data, dims=("frame", "y", "x"), coords=coords, name="raw",
                        attrs={"units": "adu"})


def open_stack(
    records: Sequence[FrameRecord], rows: int | None = None, trim: bool = True
) -> xr.DataArray:
    """Open frames lazily as a ``(frame, y, x)`` float32 DataArray.

    Parameters
    ----------
    records
        Inventory records of the frames, in the order wanted along ``frame``.
    rows
        Rows per chunk. ``None`` gives one chunk per frame and row range.
    trim
        Expose only each frame's data section (TRIMSEC/DATASEC) when it has one.

    Returns
    -------
    xarray.DataArray
        Dask-backed; coordinates on ``frame``: time, mjd, exptime, filter, path, kind.
        Nothing is read until the array is computed.
    """
    sections = _common_shape(records, trim)
    ny, nx = sections[0].shape
    chunk_rows = ny if rows is None else max(1, min(rows, ny))
    arrays = [
        da.from_array(
            FitsImage(r.path, r.hdu, sec),
            chunks=(chunk_rows, nx),
            name=f"raw-{r.path.name}-{chunk_rows}-" + da.core.tokenize(FitsImage(r.path, r.hdu,
                                                                                 sec)),
            asarray=False,
            meta=np.empty((0, 0), FLOAT),
        )
        for r, sec in zip(records, sections, strict=True)
    ]
    return _as_stack(da.stack(arrays, axis=0), records)


def strip_rows(n_frames: int, shape: tuple[int, int], budget_mb: float,
               copies: int = STRIP_COPIES, min_strips: int = MIN_STRIPS) -> int:
    """Rows per strip so that one strip of every frame, and ``copies`` working copies of
    it, fit within ``budget_mb`` megabytes (at least one row), and the frame is cut into
    at least ``min_strips`` strips."""
    per_row = n_frames * shape[1] * _BYTES * copies
    rows = min(shape[0], math.floor(budget_mb * 1e6 / per_row), -(-shape[0] // min_strips))
    return int(max(1, rows))


def read_strip(frames: tuple[tuple[Path, int, Section], ...], y0: int, y1: int) -> np.ndarray:
    """Rows ``y0:y1`` (of each frame's section) of every frame, as one ``(frame, rows, x)``
    float32 block: one task reads a whole strip, so no piece of it crosses the network."""
    nx = frames[0][2].shape[1]
    out = np.empty((len(frames), y1 - y0, nx), FLOAT)
    for i, (path, hdu, sec) in enumerate(frames):
        read_section(path, hdu, slice(sec.y0 + y0, sec.y0 + y1), slice(sec.x0, sec.x1),
                     out=out[i])
    return out


def open_strips(
    records: Sequence[FrameRecord], budget_mb: float, trim: bool = True
) -> xr.DataArray:
    """Open frames as row strips ``(-1, band, x)``: every chunk holds all frames.

    This is the layout reductions over ``frame`` need. The band is chosen from the memory
    budget (per worker thread), so memory is bounded by the budget, not by the number of
    frames, and each byte of each file is read once. Each strip is read by one task.
    """
    sections = _common_shape(records, trim)
    ny, nx = sections[0].shape
    band = strip_rows(len(records), (ny, nx), budget_mb)
    frames = tuple((r.path, r.hdu, sec) for r, sec in zip(records, sections, strict=True))
    token = da.core.tokenize([FitsImage(*f) for f in frames], band)
    blocks = [
        da.from_delayed(
            dask.delayed(read_strip, pure=True)(frames, y0, min(y0 + band, ny),
                                                dask_key_name=f"strip-{token}-{y0}"),
            shape=(len(frames), min(y0 + band, ny) - y0, nx), dtype=FLOAT,
            meta=np.empty((0, 0, 0), FLOAT),
        )
        for y0 in range(0, ny, band)
    ]
    return _as_stack(da.concatenate(blocks, axis=1), records)
