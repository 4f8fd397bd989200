"""A night's calibrated frames as one lazy ``xarray.Dataset``: ``sci``, ``var`` and
``mask`` on ``(frame, y, x)``, one dask chunk per frame and plane, with the same per-frame
coordinates as a raw stack (:func:`astep_dask.io.stack.open_stack`).

Opening reads the headers only; a pixel is read when a computation asks for it (through
a memory map for plain files, tile by tile for compressed ones).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits

from astep_dask.core.bits import MASK_DTYPE, Bit
from astep_dask.io.headers import FrameType, exposure_time
from astep_dask.io.products import CAL_SUFFIX, output_dir
from astep_dask.io.stack import frame_coords
from astep_dask.io.times import frame_start, product_follow

__all__ = ["CalibratedFrame", "ExtensionImage", "calibrated_folder", "calibrated_frames",
           "open_calibrated"]

PLANES = {"sci": ("SCI", np.float32, "electron"), "var": ("VAR", np.float32, "electron2"),
          "mask": ("MASK", MASK_DTYPE, "")}


class ExtensionImage:
    """Array-like view of one image extension of a file, read on demand (the subset of
    the numpy interface ``dask.array.from_array`` needs)."""

    def __init__(self, path: Path, extname: str, shape: tuple[int, int], dtype: type):
        self.path = Path(path)
        self.extname = extname
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 2

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, cols = (*key, slice(None), slice(None))[:2]
        with fits.open(self.path, memmap=True, mode="readonly") as hdul:
            return np.array(hdul[self.extname].section[rows, cols], dtype=self.dtype)

    def __dask_tokenize__(self) -> tuple:
        st = os.stat(self.path)
        return (str(self.path), st.st_size, st.st_mtime_ns, self.extname)


@dataclass(frozen=True)
class CalibratedFrame:
    """What a calibrated file's headers say: its time, exposure, filter and shape."""

    path: Path
    mjd: float
    exptime: float
    filter: str
    raw: str
    shape: tuple[int, int]


def _start_mjd(header: fits.Header) -> float:
    """Start of exposure as an MJD (UTC), read as the inventory reads a raw frame's
    (:func:`astep_dask.io.times.frame_start`, following the product's ``TIMEFROM``); NaN
    when the header has no usable time."""
    return frame_start(header, follow=product_follow(header)).mjd


def _read_frame(path: Path) -> CalibratedFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
            h = hdul[0].header
            shape = tuple(int(n) for n in hdul["SCI"].shape)
            return CalibratedFrame(
                path=path, mjd=_start_mjd(h), exptime=exposure_time(h),
                filter=str(h.get("FILTER", "")).strip(), raw=str(h.get("RAWFILE", "")),
                shape=(shape[0], shape[1]),
            )


def calibrated_folder(night_or_folder: str | Path, out: str | Path | None = None) -> Path:
    """The folder of a night's calibrated frames: ``night_or_folder`` itself when it holds
    ``*_CAL.fits`` files, else the night's output folder
    (:func:`~astep_dask.io.products.output_dir`, under ``out`` when given).

    Raises
    ------
    FileNotFoundError
        When that folder holds no calibrated frame (the message names it).
    """
    # Absolute: the lazy arrays' tasks may run in worker processes started elsewhere.
    path = Path(night_or_folder).absolute()
    if path.is_dir() and any(path.glob(f"*{CAL_SUFFIX}")):
        return path
    folder = output_dir(path, Path(out).absolute() if out is not None else None)
    if not folder.is_dir() or not any(folder.glob(f"*{CAL_SUFFIX}")):
        raise FileNotFoundError(f"{folder}: no calibrated frame (*{CAL_SUFFIX}) there; "
                                f"calibrate the night first")
    return folder


def calibrated_frames(folder: Path) -> list[CalibratedFrame]:
    """The calibrated frames of an output folder, by start time (then name); headers only.

    Raises
    ------
    ValueError
        When a file is not a calibrated frame (no SCI extension) or is unreadable.
    """
    frames = []
    for p in sorted(Path(folder).glob(f"*{CAL_SUFFIX}")):
        try:
            frames.append(_read_frame(p))
        except (OSError, KeyError, ValueError, TypeError, IndexError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{p}: not a readable calibrated frame ({why})") from exc
    return sorted(frames, key=lambda f: (np.nan_to_num(f.mjd, nan=np.inf), f.path.name))


def open_calibrated(night_or_folder: str | Path, out: str | Path | None = None
                    ) -> xr.Dataset:
    """Open a night's calibrated frames lazily as one dataset.

    Parameters
    ----------
    night_or_folder
        A raw night folder ``ROOT/YYYY-MM-DD`` (its products are then looked for where
        ``astep-dask calibrate`` writes them, see ``out``) or an output folder holding
        ``*_CAL.fits`` files.
    out
        The ``--out`` folder the night was calibrated with, if any.

    Returns
    -------
    xarray.Dataset
        ``sci`` (float32, electron), ``var`` (float32, electron², the variance of ``sci``)
        and ``mask`` (int32 bits; its ``flag_masks`` and ``flag_meanings`` name them) on
        ``(frame, y, x)``, dask-backed, one chunk per frame and plane. Coordinates on
        ``frame``, as a raw stack's: ``time`` and ``mjd`` (start of exposure, UTC), ``exptime`` (s),
        ``filter``, ``path`` (the calibrated file) and ``kind``; plus ``raw`` (the raw
        file's name). Frames are in time order. No pixel is read until computed.
        Write ``ds["var"]``: ``ds.var`` is the Dataset's variance method.

    Raises
    ------
    FileNotFoundError
        When there is no calibrated frame where the night's products should be.
    ValueError
        When a file is unreadable or the frames differ in shape.

    Examples
    --------
    >>> ds = open_calibrated("archive/2026-06-15")  # doctest: +SKIP
    >>> good = ds.sci.where(ds.mask == 0)  # doctest: +SKIP
    >>> median = good.median("frame").compute()  # doctest: +SKIP
    """
    folder = calibrated_folder(night_or_folder, out)
    frames = calibrated_frames(folder)
    shapes = sorted({f.shape for f in frames})
    if len(shapes) != 1:
        raise ValueError(f"{folder}: calibrated frames differ in shape: {shapes}")
    shape = shapes[0]
    planes = {}
    for name, (ext, dtype, _unit) in PLANES.items():
        arrays = []
        for f in frames:
            image = ExtensionImage(f.path, ext, shape, dtype)
            arrays.append(da.from_array(
                image, chunks=shape, asarray=False, meta=np.empty((0, 0), dtype),
                name=f"cal-{name}-{f.path.name}-" + da.core.tokenize(image)))
        planes[name] = (("frame", "y", "x"), da.stack(arrays, axis=0))
    coords = frame_coords([f.mjd for f in frames], [f.exptime for f in frames],
                          [f.filter for f in frames], [f.path for f in frames],
                          [FrameType.SCIENCE] * len(frames))
    coords["raw"] = ("frame", np.array([f.raw for f in frames], dtype=object))
    ds = xr.Dataset(planes, coords=coords)
    for name, (_ext, _dtype, unit) in PLANES.items():
        if unit:
            ds[name].attrs["units"] = unit
    ds["var"].attrs["description"] = "variance of sci"
    ds["mask"].attrs.update(  # CF conventions' flags: value 1 << bit, 0 = good pixel
        flag_masks=np.array([1 << int(b) for b in Bit], np.int32),
        flag_meanings=" ".join(b.name for b in Bit))
    ds.attrs["folder"] = str(folder)
    return ds
