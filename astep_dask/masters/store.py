"""The master files of a night: the :class:`Master` record, writing and reading it, and
what a worker needs to calibrate one frame (:func:`frame_masters`).

Workers read the masters from their files, once per process (:func:`load_cached`), rather
than receiving the arrays with every task: a frame task carries only paths
(:class:`MasterPaths`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from astep_dask.core.bits import MASK_DTYPE
from astep_dask.core.calibrate import FrameMasters
from astep_dask.core.darks import dark_for_exptime, variance_of
from astep_dask.errors import CalibrationError
from astep_dask.io.fitsio import atomic_write, header_cards
from astep_dask.io.provenance import file_digest, stamp

__all__ = [
    "Master",
    "MasterPaths",
    "frame_masters",
    "load_cached",
    "read_master",
    "write_master",
]


@dataclass
class Master:
    """A master frame in memory, with the provenance that goes into its header."""

    role: str  # "bias", "dark", "flat", "mask"
    data: np.ndarray
    var: np.ndarray | None = None
    count: np.ndarray | None = None
    digest: str = ""
    cards: dict[str, tuple] = field(default_factory=dict)
    inputs: list[dict] = field(default_factory=list)
    path: Path | None = None

    @property
    def exptime(self) -> float:
        """Exposure time of a dark (from its cards)."""
        return float(self.cards.get("EXPTIME", (np.nan,))[0])


def _big_endian(a: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """A big-endian copy of ``a`` (as ``dtype``), FITS's byte order.

    astropy writes a native (little-endian) array by swapping its bytes in place and back
    afterwards; a master is written on a background thread while other threads read it
    (the dark, while the flats are combined), and they saw the swapped bytes now and then.
    Writing a copy leaves the master untouched.
    """
    dt = np.dtype(dtype or a.dtype)
    return np.asarray(a).astype(dt.newbyteorder(">"))


def write_master(master: Master, path: Path) -> Path:
    """Write a master FITS file atomically: data in PRIMARY, then VAR, COUNT, INPUTS."""
    header = fits.Header()
    header["MASTTYPE"] = (master.role.upper(), "kind of master frame")
    header["ADHASH"] = (master.digest, "hash of inputs and settings (astep-dask)")
    for key, value in master.cards.items():
        header[key] = value
    if master.role == "mask":
        header_cards(header)
    stamp(header)
    hdus: list[fits.hdu.base.ExtensionHDU] = [
        fits.PrimaryHDU(_big_endian(master.data), header=header)]
    if master.var is not None:
        hdus.append(fits.ImageHDU(_big_endian(master.var, np.float32), name="VAR"))
    if master.count is not None:
        hdus.append(fits.ImageHDU(_big_endian(master.count, np.int16), name="COUNT"))
    if master.inputs:
        hdus.append(fits.BinTableHDU(Table(rows=master.inputs), name="INPUTS"))
    master.path = atomic_write(fits.HDUList(hdus), path)
    return master.path


def read_master(path: Path, role: str | None = None) -> Master:
    """Read a master written by :func:`write_master` (or by another tool: PRIMARY only)."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header
        data = np.asarray(hdul[0].data)
        names = [h.name for h in hdul]
        var = np.asarray(hdul["VAR"].data, np.float32) if "VAR" in names else None
        count = np.asarray(hdul["COUNT"].data) if "COUNT" in names else None
        cards = {
            k: (header[k], header.comments[k])
            for k in header
            if k not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT",
                         "HISTORY", "")
        }
    dtype = MASK_DTYPE if (role or str(header.get("MASTTYPE", "")).lower()) == "mask" else (
        np.float32)
    return Master(
        role=role or str(header.get("MASTTYPE", "")).lower(),
        data=data.astype(dtype),
        var=var,
        count=count,
        digest=str(header.get("ADHASH", "")),
        cards=cards,
        path=Path(path),
    )


@dataclass(frozen=True)
class MasterPaths:
    """Where a night's masters are: all a worker needs to calibrate a frame."""

    bias: Path | None
    darks: tuple[tuple[float, Path], ...]
    flats: tuple[tuple[str, Path], ...]
    mask: Path

    def digests(self) -> dict[str, str]:
        """File digests of every master, named by file: the provenance of a frame."""
        paths = [self.bias, *(p for _, p in self.darks), *(p for _, p in self.flats), self.mask]
        return {p.name: file_digest(p) for p in paths if p is not None}


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int) -> Master:
    return read_master(Path(path))


def load_cached(path: Path) -> Master:
    """A master read once per process (cached by path and modification time)."""
    return _load(str(path), path.stat().st_mtime_ns)


def frame_masters(
    paths: MasterPaths, exptime: float, filter: str
) -> tuple[FrameMasters, dict[str, tuple]]:
    """The masters one frame needs, loaded (once per worker process) from their files,
    and the header cards that name them (file and hash) and say how the dark was made.

    Raises
    ------
    CalibrationError
        When there is no flat for the filter or no way to make the dark.
    """
    bias = load_cached(paths.bias) if paths.bias else None
    dark_paths = dict(paths.darks)
    darks = {et: load_cached(p) for et, p in dark_paths.items()}
    flats = dict(paths.flats)
    if filter not in flats:
        have = ", ".join(sorted(flats)) or "none"
        raise CalibrationError(f"no master flat for filter {filter!r} (flats for: {have})")
    flat = load_cached(flats[filter])
    mask = load_cached(paths.mask)
    sol = dark_for_exptime(exptime, bias, darks)
    cards: dict[str, tuple] = {"DARKMETH": (sol.how[:68], "how the dark was subtracted")}
    if sol.bias_used and bias is not None:
        cards["MBIAS"] = (bias.path.name, "master bias used")
        cards["MBIASH"] = (bias.digest, "its ADHASH")
    for i, et in enumerate(sol.used, start=1):
        cards[f"MDARK{i}"] = (dark_paths[et].name, "master dark used")
        cards[f"MDARK{i}H"] = (darks[et].digest, "its ADHASH")
    cards["MFLAT"] = (flat.path.name, "master flat used")
    cards["MFLATH"] = (flat.digest, "its ADHASH")
    cards["MMASK"] = (mask.path.name, "bad-pixel mask used")
    cards["MMASKH"] = (mask.digest, "its ADHASH")
    fm = FrameMasters(dark=sol.total, dark_var=sol.var, dark_current=sol.current,
                      flat=flat.data, flat_var=variance_of(flat), mask=mask.data)
    return fm, cards
