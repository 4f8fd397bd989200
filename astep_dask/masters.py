"""Master bias, darks, flats and the bad-pixel mask of a night, built as dask reductions.

Each master is a robust combination (:mod:`astep_dask.combine`) of a lazy row-strip stack,
computed on whatever dask scheduler is active (the distributed cluster in a run). Masters
are written once per night, atomically, with their provenance and a hash of their inputs
and settings; a master whose file already holds the same hash is read back, not rebuilt.

Dark handling, in order of preference, for an exposure time ``t``:

1. a bias exists: bias + (bias-subtracted dark of time ``t``), or of the nearest time
   scaled by exposure;
2. no bias, a dark of time ``t``: subtract it whole (it carries the bias);
3. no bias, darks of two other times: a per-pixel fit ``offset + rate · t`` through the
   shortest and longest (offset = bias, rate = dark current), evaluated at ``t``;
4. otherwise the frame cannot be calibrated, and says so.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.table import Table

from . import __version__
from .calibrate import FrameMasters, overscan_level
from .combine import Combined, NoiseModel, combine_blocks, compute_blocks, median
from .config import Settings
from .fitsio import atomic_write, stamp
from .layout import FrameRecord, FrameType, Inventory
from .mask import MASK_DTYPE, Bit, bad_pixel_mask, header_cards, robust_sigma
from .stack import frame_section, open_strips, read_section


class CalibrationError(Exception):
    """A frame or master cannot be made from what the night holds; says why."""


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


def master_name(night: str, role: str, exptime: float | None = None, filter: str = "",
                science_exptime: float | None = None, flat_exptime: float | None = None) -> str:
    """File name of a master, as DESIGN.md names them."""
    if role == "bias":
        return f"{night}_MASTERBIAS.fits"
    if role == "dark":
        if science_exptime is not None and np.isclose(exptime, science_exptime):
            return f"{night}_MASTERDARK.fits"
        if flat_exptime is not None and np.isclose(exptime, flat_exptime):
            return f"{night}_MASTERDARK_FLAT.fits"
        return f"{night}_MASTERDARK_{exptime:g}S.fits"
    if role == "flat":
        return f"{night}_MASTERFLAT_{filter}.fits" if filter else f"{night}_MASTERFLAT.fits"
    if role == "mask":
        return f"{night}_MASK.fits"
    raise ValueError(role)


def input_identity(records: Sequence[FrameRecord]) -> list[str]:
    """Stable identities of input files: name, size, start time and exposure."""
    out = []
    for r in records:
        size = r.path.stat().st_size
        out.append(f"{r.path.name}|{size}|{r.date_obs}|{r.exptime:g}")
    return sorted(out)


def digest_of(*parts: object) -> str:
    """Short hash of JSON-able parts."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def _strip_chunked(image: np.ndarray | xr.DataArray, stack: xr.DataArray) -> xr.DataArray:
    """An in-memory image (``(y, x)`` or ``(frame, y, x)``) as a dask array in the row
    strips of ``stack``: each strip task then gets its own slice, instead of the whole
    image being one object of the graph that every task depends on."""
    arr = image if isinstance(image, xr.DataArray) else xr.DataArray(image, dims=("y", "x"))
    rows = stack.data.chunks[1]
    chunks = tuple(rows if d == "y" else -1 for d in arr.dims)
    return arr.copy(data=da.from_array(np.asarray(arr.data), chunks=chunks))


def compute_combined(*lazy: da.Array) -> list[Combined]:
    """Compute several lazy combinations (:func:`astep_dask.combine.combine_blocks`) in one
    graph: their strips share the workers, instead of each master waiting for the
    stragglers of the one before."""
    return compute_blocks(*lazy)


def _combine_cards(settings: Settings, n: int, result: Combined) -> dict[str, tuple]:
    c = settings.combine
    return {
        "NCOMBINE": (n, "number of frames combined"),
        "COMBMETH": (c.method, "sigclip: clipped mean around the median, MAD scale"),
        "CLIPLO": (c.sigma_low, "lower clipping threshold (sigma)"),
        "CLIPHI": (c.sigma_high, "upper clipping threshold (sigma)"),
        "CLIPITER": (c.iterations, "maximum clipping iterations"),
        "NOISE": (result.noise, "median standard error of a master pixel"),
    }


def _inputs_table(records: Sequence[FrameRecord], levels: Sequence[float] | None = None):
    rows = []
    for i, r in enumerate(records):
        row = {"FILE": r.path.name, "EXPTIME": float(r.exptime), "DATE_OBS": r.date_obs}
        if levels is not None:
            row["LEVEL"] = float(levels[i])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class DarkSolution:
    """What to subtract from a raw frame of one exposure time, and how it was made.

    ``total``: ADU to subtract (bias + dark); ``var``: its variance (ADU²); ``current``:
    the dark-current part of ``total`` (ADU, for its Poisson noise); ``how``: a short
    description for the header; ``used``: exposure times of the darks used.
    """

    total: np.ndarray
    var: np.ndarray
    current: np.ndarray
    how: str
    used: tuple[float, ...]
    bias_used: bool


def _var(m: Master) -> np.ndarray:
    return m.var if m.var is not None else np.zeros_like(m.data)


def dark_for_exptime(t: float, bias: Master | None, darks: dict[float, Master]) -> DarkSolution:
    """The dark (+ bias) to subtract from a raw frame of exposure ``t``.

    See the module docstring for the order of preference.

    Raises
    ------
    CalibrationError
        When no dark can be made for ``t``.
    """
    match = next((et for et in darks if np.isclose(et, t)), None)
    if bias is not None:
        if match is not None:
            d = darks[match]
            return DarkSolution(bias.data + d.data, _var(bias) + _var(d), d.data,
                                f"bias + dark {t:g}s", (match,), True)
        if not darks:
            zero = np.zeros_like(bias.data)
            return DarkSolution(bias.data, _var(bias), zero, "bias only (no dark)", (), True)
        et = min(darks, key=lambda e: (abs(np.log(max(e, 1e-3) / max(t, 1e-3))), -e))
        k = np.float32(t / et)
        d = darks[et]
        return DarkSolution(bias.data + k * d.data, _var(bias) + k * k * _var(d), k * d.data,
                            f"bias + dark {et:g}s scaled x{float(k):.4g}", (et,), True)
    if match is not None:
        d = darks[match]
        fit = _dark_fit(darks)
        if fit is not None:
            current = d.data - fit[0]
        else:
            current = np.maximum(d.data - np.float32(median(d.data)), 0)
        return DarkSolution(d.data, _var(d), current, f"dark {t:g}s (carries the bias)",
                            (match,), False)
    fit = _dark_fit(darks)
    if fit is None:
        raise CalibrationError(
            f"no dark of {t:g}s and none can be scaled: no bias frames and "
            f"{'no darks' if not darks else 'only one dark exposure time'}"
        )
    offset, rate, (t1, t2), (v1, v2) = fit
    a, b = (t2 - t) / (t2 - t1), (t - t1) / (t2 - t1)
    var = np.float32(a * a) * v1 + np.float32(b * b) * v2
    return DarkSolution(offset + rate * np.float32(t), var, rate * np.float32(t),
                        f"dark fit offset+rate*t from {t1:g}s and {t2:g}s darks", (t1, t2),
                        False)


def _dark_fit(darks: dict[float, Master]):
    """Per-pixel offset (bias) and rate (dark current / s) through the shortest and
    longest darks, or None when there are fewer than two exposure times."""
    if len(darks) < 2:
        return None
    t1, t2 = min(darks), max(darks)
    d1, d2 = darks[t1], darks[t2]
    rate = (d2.data - d1.data) / np.float32(t2 - t1)
    offset = d1.data - rate * np.float32(t1)
    return offset, rate, (t1, t2), (_var(d1), _var(d2))


@dataclass(frozen=True)
class MasterPaths:
    """Where a night's masters are: all a worker needs to calibrate a frame."""

    bias: Path | None
    darks: tuple[tuple[float, Path], ...]
    flats: tuple[tuple[str, Path], ...]
    mask: Path

    def digests(self) -> dict[str, str]:
        """File digests of every master, named by file: the provenance of a frame."""
        from .fitsio import file_digest

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
                      flat=flat.data, flat_var=_var(flat), mask=mask.data)
    return fm, cards


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


@dataclass
class MasterReport:
    """What was built, reused or could not be made, for the manifest."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


class MasterBuilder:
    """Builds (or reuses) every master of one night into ``out_dir``."""

    def __init__(self, inventory: Inventory, out_dir: Path, settings: Settings,
                 reuse_foreign: bool = False, fallbacks: Sequence[Path] = ()):
        self.inv = inventory
        self.out = Path(out_dir)
        self.settings = settings
        self.reuse_foreign = reuse_foreign
        self.fallbacks = list(fallbacks)
        self.report = MasterReport()
        sci = inventory.exptimes(FrameType.SCIENCE)
        flat = inventory.exptimes(FrameType.FLAT)
        self.science_exptime = sci[0] if sci else None
        self.flat_exptime = flat[0] if flat else None
        self._writer: ThreadPoolExecutor | None = None  # set while build() runs
        self._writes: list[Future] = []

    def _write(self, master: Master, path: Path) -> None:
        """Write a master: at once, or (inside :meth:`build`) on a background thread, so
        the FITS encoding and fsync overlap the next master's computation. The master's
        ``path`` is set either way; :meth:`build` waits for every write before returning."""
        if self._writer is None:
            write_master(master, path)
            return
        master.path = Path(path)
        self._writes.append(self._writer.submit(write_master, master, path))

    # -- helpers ---------------------------------------------------------------------
    def _name(self, role: str, exptime: float | None = None, filter: str = "") -> str:
        return master_name(self.inv.night, role, exptime, filter, self.science_exptime,
                           self.flat_exptime)

    def _existing(self, path: Path, digest: str) -> Master | None:
        if not path.exists():
            return None
        try:
            m = read_master(path)
        except (OSError, ValueError) as exc:
            self.report.notes.append(f"{path.name}: unreadable ({exc}); rebuilt")
            return None
        if m.digest == digest:
            self.report.reused.append(path.name)
            return m
        if not m.digest and self.reuse_foreign:
            self.report.reused.append(f"{path.name} (written by another tool)")
            m.digest = digest
            return m
        return None

    def _fallback(self, name_suffix: str, role: str, why: str) -> Master | None:
        """The same master from the nearest other night's output, if any."""
        night = np.datetime64(self.inv.night)
        candidates = []
        for folder in self.fallbacks:
            for p in folder.glob(f"*_{name_suffix}"):
                date = p.name.split("_", 1)[0]
                if date == self.inv.night:
                    continue
                try:
                    gap = abs((np.datetime64(date) - night).astype(int))
                except ValueError:
                    continue
                candidates.append((gap, p))
        if not candidates:
            return None
        _, path = min(candidates)
        m = read_master(path, role)
        m.cards["FALLBACK"] = (path.name, "master taken from another night")
        self.report.notes.append(f"{role} {name_suffix}: {why}; using {path}")
        return m

    def _enough(self, records: Sequence[FrameRecord], what: str) -> bool:
        need = self.settings.combine.min_frames
        if len(records) >= need:
            return True
        self.report.notes.append(f"{what}: {len(records)} usable frame(s), need {need}")
        return False

    def _combine(self, records: Sequence[FrameRecord], subtract=None, levels=None) -> Combined:
        return compute_combined(self._combine_lazy(records, subtract, levels))[0]

    def _combine_lazy(self, records: Sequence[FrameRecord], subtract=None,
                      levels=None) -> da.Array:
        """The lazy robust combination of ``records`` (see :func:`compute_combined`)."""
        stack = prepared_stack(records, self.settings)
        if subtract is not None:
            stack = stack - _strip_chunked(subtract, stack)
        if levels is not None:
            stack = stack / xr.DataArray(np.asarray(levels, np.float32), dims="frame")
        noise = None
        if self.settings.combine.noise_clip:
            det = self.settings.detector
            noise = NoiseModel(
                gain=records[0].gain or det.gain,
                read_noise=records[0].read_noise or det.read_noise,
                levels=tuple(float(v) for v in levels) if levels is not None else (),
                pedestal=0.0 if (levels is not None or subtract is not None) else None,
            )
        return combine_blocks(stack, self.settings.combine, noise)

    def _settings_digest(self) -> str:
        return self.settings.digest("combine", "flat", "mask", "detector")

    # -- masters ---------------------------------------------------------------------
    def bias(self) -> Master | None:
        """Master bias, when the night has enough bias frames."""
        recs = self.inv.select(FrameType.BIAS)
        if not recs or not self._enough(recs, "bias"):
            return None
        digest = digest_of("bias", input_identity(recs), self._settings_digest(), __version__)
        path = self.out / self._name("bias")
        if (m := self._existing(path, digest)) is not None:
            return m
        res = self._combine(recs)
        m = Master("bias", res.data, res.var, res.count, digest,
                   _combine_cards(self.settings, len(recs), res), _inputs_table(recs))
        self._write(m, path)
        self.report.built.append(path.name)
        return m

    def darks(self, bias: Master | None) -> dict[float, Master]:
        """Master dark per exposure time (bias-subtracted when there is a bias)."""
        out: dict[float, Master] = {}
        todo = []  # darks to build, all in one graph
        for et in self.inv.exptimes(FrameType.DARK):
            recs = self.inv.select(FrameType.DARK, exptime=et)
            name = self._name("dark", et)
            if not self._enough(recs, f"dark {et:g}s"):
                fb = self._fallback(name.split("_", 1)[1], "dark", "too few frames")
                if fb is not None:
                    out[et] = fb
                continue
            digest = digest_of("dark", et, input_identity(recs), bias.digest if bias else None,
                               self._settings_digest(), __version__)
            path = self.out / name
            if (m := self._existing(path, digest)) is None:
                todo.append((et, recs, digest, path))
            else:
                out[et] = m
        lazy = [self._combine_lazy(recs, subtract=bias.data if bias is not None else None)
                for _, recs, _, _ in todo]
        for (et, recs, digest, path), res in zip(todo, compute_combined(*lazy), strict=True):
            cards = _combine_cards(self.settings, len(recs), res)
            cards["EXPTIME"] = (float(et), "[s] exposure time of the darks")
            cards["DARKBIAS"] = (bias is not None,
                                 "bias subtracted (F: the dark carries the bias)")
            m = Master("dark", res.data, res.var, res.count, digest, cards,
                       _inputs_table(recs))
            self._write(m, path)
            self.report.built.append(path.name)
            out[et] = m
        out = dict(sorted(out.items()))
        if not out and self.science_exptime is not None:
            fb = self._fallback(self._name("dark", self.science_exptime).split("_", 1)[1],
                                "dark", "no usable darks")
            if fb is not None:
                out[self.science_exptime] = fb
        return out

    def _central_box(self, rec: FrameRecord) -> tuple[slice, slice]:
        """Rows and columns (of the data section) where a flat's level is measured: every
        ``level_row_step``-th row of the central box, so that measuring the levels reads
        a small fraction of each flat before the combination reads it whole."""
        fs = self.settings.flat
        ny, nx = frame_section(rec).shape
        hy, hx = int(ny * fs.central_fraction / 2), int(nx * fs.central_fraction / 2)
        cy, cx = ny // 2, nx // 2
        step = max(1, min(fs.level_row_step, hy))
        return slice(cy - hy, cy + hy, step), slice(cx - hx, cx + hx)

    def flats(self, bias: Master | None, darks: dict[float, Master]) -> dict[str, Master]:
        """Master flat per filter: dark-subtracted, level-scaled, clipped, median 1."""
        out: dict[str, Master] = {}
        fs = self.settings.flat
        for filt in self.inv.filters(FrameType.FLAT):
            recs = self.inv.select(FrameType.FLAT, filter=filt)
            name = self._name("flat", filter=filt)
            suffix = name.split("_", 1)[1]
            exptimes = sorted({r.exptime for r in recs})
            try:
                dark_info = {et: dark_for_exptime(et, bias, darks) for et in exptimes}
            except CalibrationError as exc:
                self.report.notes.append(f"flat {filt}: {exc}")
                fb = self._fallback(suffix, "flat", str(exc))
                if fb is not None:
                    out[filt] = fb
                continue
            dark_digest = sorted(
                [bias.digest if bias else ""] + [d.digest for d in darks.values()]
            )
            digest = digest_of("flat", filt, input_identity(recs), dark_digest,
                               self._settings_digest(), __version__)
            path = self.out / name
            if (m := self._existing(path, digest)) is not None:
                out[filt] = m
                continue
            box = self._central_box(recs[0])
            dark_boxes = {et: dask.delayed(np.ascontiguousarray(d.total[box]))
                          for et, d in dark_info.items()}
            overscan = self.settings.detector.overscan == "auto"
            levels = dask.compute(*[
                dask.delayed(flat_level)(r, box, dark_boxes[r.exptime], overscan)
                for r in recs
            ])
            keep, kept_levels = [], []
            dark_levels = {et: median(d.total) for et, d in dark_info.items()}
            for r, level in zip(recs, levels, strict=True):
                dark_level = dark_levels[r.exptime]
                sat = r.saturation or self.settings.detector.saturation_adu
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
                self.report.rejected.append({"path": str(r.path), "reason": reason})
            if not self._enough(keep, f"flat {filt}"):
                fb = self._fallback(suffix, "flat", "too few usable flats")
                if fb is not None:
                    out[filt] = fb
                continue
            how = {dark_info[et].how for et in {r.exptime for r in keep}}
            dark_stack = xr.DataArray(
                np.stack([dark_info[r.exptime].total for r in keep]) if len(how) > 1
                else dark_info[keep[0].exptime].total,
                dims=("frame", "y", "x") if len(how) > 1 else ("y", "x"),
            )
            res = self._combine(keep, subtract=dark_stack, levels=kept_levels)
            cards = _combine_cards(self.settings, len(keep), res)
            cards["FILTER"] = (filt, "filter")
            cards["DARKMODE"] = ("; ".join(sorted(how))[:68], "dark subtracted from the flats")
            cards["NREJECT"] = (len(recs) - len(keep), "flats rejected (see manifest)")
            m = Master("flat", res.data, res.var, res.count, digest, cards,
                       _inputs_table(keep, kept_levels))
            out[filt] = m
        return out

    def mask(self, bias: Master | None, darks: dict[float, Master],
             flats: dict[str, Master]) -> Master:
        """Bad-pixel mask; also renormalises new flats to median 1 over good pixels and
        writes them."""
        hot_source = None
        if darks:
            et = max(darks)
            hot_source = darks[et].data
        digest = digest_of("mask", sorted(m.digest for m in flats.values()),
                           sorted(d.digest for d in darks.values()),
                           self._settings_digest(), __version__)
        path = self.out / self._name("mask")
        existing = self._existing(path, digest)
        if existing is not None:
            mask = existing
        else:
            masks = [
                bad_pixel_mask(f.data / np.float32(median(f.data, skip_nan=True)), hot_source,
                               self.settings.mask)
                for f in flats.values()
            ]
            if not masks:
                if hot_source is None:
                    raise CalibrationError("neither darks nor flats: no bad-pixel mask")
                masks.append(bad_pixel_mask(None, hot_source, self.settings.mask))
            data = np.bitwise_or.reduce(masks)
            ms = self.settings.mask
            cards = {
                "HOTSIG": (ms.hot_sigma, "hot: dark excess above this many sigma"),
                "DEADSIG": (ms.dead_sigma, "dead: flat deficit above this many sigma"),
                "DEADFLR": (ms.dead_floor, "dead: minimum fractional deficit"),
                "NHOT": (int(((data >> Bit.HOT) & 1).sum()), "hot pixels"),
                "NDEAD": (int(((data >> Bit.DEAD) & 1).sum()), "dead pixels (incl. columns)"),
            }
            if hot_source is not None:
                cards["HOTNOISE"] = (robust_sigma(hot_source), "[adu] robust sigma of dark")
            mask = Master("mask", data.astype(MASK_DTYPE), None, None, digest, cards)
            self._write(mask, path)
            self.report.built.append(path.name)
        for filt, f in flats.items():
            if f.path is not None:
                continue  # reused or fallback: already normalised
            good = (mask.data == 0) & np.isfinite(f.data)
            norm = np.float32(median(f.data[good]))
            f.data = f.data / norm
            if f.var is not None:
                f.var = f.var / (norm * norm)
            f.cards["FLATNORM"] = (float(norm), "divided by the median of good pixels")
            f.cards["NORMMETH"] = ("median of unmasked pixels", "flat normalisation")
            self._write(f, self.out / self._name("flat", filter=filt))
            self.report.built.append(f.path.name)
        return mask

    def build(self) -> MasterPaths:
        """Build or reuse every master; return their paths (once all are written)."""
        with ThreadPoolExecutor(1, thread_name_prefix="master-writer") as writer:
            self._writer, self._writes = writer, []
            try:
                paths = self._build()
            finally:
                self._writer = None
        for w in self._writes:
            w.result()  # re-raise a failed write
        return paths

    def _build(self) -> MasterPaths:
        self.out.mkdir(parents=True, exist_ok=True)
        bias = self.bias()
        darks = self.darks(bias)
        if not darks and bias is None:
            why = "; ".join(self.report.notes) or "none in the night"
            raise CalibrationError(f"no usable dark frames and no bias frames ({why})")
        flats = self.flats(bias, darks)
        mask = self.mask(bias, darks, flats)
        for m in [*darks.values(), *flats.values()]:
            if m.path is None or m.path.parent != self.out:
                # fallback masters are copied beside the night's own, under this night's name
                role = m.role
                name = self._name(role, m.exptime if role == "dark" else None,
                                  str(m.cards.get("FILTER", ("",))[0]) if role == "flat" else "")
                self._write(m, self.out / name)
        return MasterPaths(
            bias=bias.path if bias else None,
            darks=tuple(sorted((et, m.path) for et, m in darks.items())),
            flats=tuple(sorted((f, m.path) for f, m in flats.items())),
            mask=mask.path,
        )
