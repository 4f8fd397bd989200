"""The master files of a night: the :class:`Master` record, writing and reading it, and
what a worker needs to calibrate one frame (:func:`frame_masters`).

Workers read the masters from their files, once per process (:func:`load_cached`), rather
than receiving the arrays with every task: a frame task carries only paths
(:class:`MasterPaths`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from astep_dask.core.bits import MASK_DTYPE
from astep_dask.core.calibrate import FrameMasters
from astep_dask.core.darks import dark_for_exptime, variance_of
from astep_dask.core.exptimes import ExptimeTolerance
from astep_dask.errors import CalibrationError, RunError
from astep_dask.io.fitsio import (
    IMAGETYP_MASTER,
    UTYPE_VARIANCE,
    ascii_text,
    atomic_write_digest,
    extension_header,
    header_cards,
    image_hdu,
    image_header,
    image_of,
    verify_file,
)
from astep_dask.io.headers import FILTER_KEYS, filter_label
from astep_dask.io.index import FileIndex
from astep_dask.io.products import inside
from astep_dask.io.provenance import file_digest, stamp

__all__ = [
    "Master",
    "MasterPaths",
    "MasterReport",
    "MasterStore",
    "StoredMaster",
    "corrected_flat",
    "frame_masters",
    "is_current_layout",
    "load_cached",
    "no_flat_reason",
    "open_master",
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
    file_digest: str = ""  # content digest of the file written (taken as it was written)

    @property
    def exptime(self) -> float:
        """Exposure time of a dark (from its cards)."""
        return float(self.cards.get("EXPTIME", (np.nan,))[0])


# A dimensionless image's BUNIT: astropy writes none for a dimensionless CCDData, and then
# cannot read it back (``CCDData.read`` needs a unit), nor can ccdproc without ``unit=``;
# ``adu/adu`` is a valid FITS unit string that astropy reads as dimensionless.
DIMENSIONLESS = "adu/adu"

# Units of a master's image and of its VAR: ADU for a bias or dark; a flat and an
# illumination correction (relative responses) and a bad-pixel mask (bits) are
# dimensionless. Every kind carries BUNIT, so ``CCDData.read(f, hdu="SCI",
# hdu_uncertainty="VAR")`` reads each without a ``unit`` argument.
MASTER_UNITS = {"bias": ("adu", "adu2"), "dark": ("adu", "adu2")}
DIMENSIONLESS_UNITS = (DIMENSIONLESS, DIMENSIONLESS)

# Masters whose image is mask bits: the bad-pixel mask and the warm pixels.
BIT_ROLES = ("mask", "warm")

# Cards of a master's primary header that its image extensions repeat (ccdproc's
# ImageFileCollection(ext="SCI") reads that extension's header only).
MASTER_KEYS = ("MASTTYPE", "EXPTIME", "FILTER", "NCOMBINE", "COMBMETH", "NOISE", "ADHASH",
               "FALLBACK", "PIPEVERS", "DATE")


def write_master(master: Master, path: Path) -> Path:
    """Write a master FITS file atomically, in the calibrated frames' layout: PRIMARY
    (header only: role, provenance, how it was combined), ``SCI`` (the image: ADU for a
    bias or dark, relative response for a flat, bits for the bad-pixel mask), ``VAR``
    (its variance, ``UTYPE = 'VarianceUncertainty'``), ``COUNT`` (frames kept per pixel)
    and ``INPUTS`` (the raw frames). ``IMAGETYP`` names the master (``MASTER BIAS``,
    ``MASTER DARK``, ``MASTER FLAT``, ``BAD PIXEL MASK``) in PRIMARY and SCI, so
    ``ccdproc.ImageFileCollection(out, ext="SCI")`` lists masters and frames together."""
    imagetyp = IMAGETYP_MASTER.get(master.role, f"MASTER {master.role.upper()}")
    unit, var_unit = MASTER_UNITS.get(master.role, DIMENSIONLESS_UNITS)
    what = "unit of the SCI extension" if unit != DIMENSIONLESS else "dimensionless"
    header = fits.Header()
    header["MASTTYPE"] = (master.role.upper(), "kind of master frame")
    header["IMAGETYP"] = (imagetyp, "type of image (astep-dask product)")
    header["ADHASH"] = (master.digest, "hash of inputs and settings (astep-dask)")
    for key, value in master.cards.items():
        header[key] = value
    header["BUNIT"] = (unit, what)
    if master.role in BIT_ROLES:
        header_cards(header)
    stamp(header)
    common = extension_header(header, imagetyp, keys=MASTER_KEYS)
    sci = image_hdu(master.data, "SCI")
    sci.header.extend(common)
    sci.header["BUNIT"] = (unit, what)
    if master.role in BIT_ROLES:
        header_cards(sci.header)
    hdus: list[fits.hdu.base.ExtensionHDU] = [fits.PrimaryHDU(header=header), sci]
    if master.var is not None:
        var = image_hdu(master.var, "VAR", dtype=np.float32)
        var.header.extend(common)
        var.header["BUNIT"] = (var_unit, "variance of SCI")
        var.header["UTYPE"] = (UTYPE_VARIANCE, "VAR is the variance of SCI")
        hdus.append(var)
    if master.count is not None:
        hdus.append(image_hdu(master.count, "COUNT", dtype=np.int16))
    if master.inputs:
        hdus.append(fits.BinTableHDU(Table(rows=master.inputs), name="INPUTS"))
    try:
        master.file_digest = atomic_write_digest(fits.HDUList(hdus), path)
    except OSError as exc:  # a full disk: name the file
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    master.path = Path(path)
    return master.path


# Cards of a master's header that are the file's structure, not its provenance.
_NOT_CARDS = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT",
              "HISTORY", "", "CHECKSUM", "DATASUM", "EXTNAME", "INHERIT", "IMAGETYP", "BUNIT",
              "DATE-AVG", "MJD-AVG", "LONGSTRN")


def read_master(path: Path, role: str | None = None, expect: str | None = None) -> Master:
    """Read a master written by :func:`write_master`; also one of an earlier version or
    another tool, whose image is in PRIMARY (see :func:`is_current_layout`).

    With ``expect`` (the file digest, :func:`~astep_dask.io.provenance.file_digest`, the
    run planned with), the bytes read are the bytes checked: a master replaced or
    rewritten since is refused.

    Raises
    ------
    CalibrationError
        When the file's digest is not ``expect``.
    """
    source: Path | io.BytesIO = path
    if expect:
        data = Path(path).read_bytes()
        got = hashlib.sha256(data).hexdigest()[:16]
        if got != expect:
            raise CalibrationError(
                f"master {Path(path).name} changed since the run planned with it (file "
                f"digest {got}, planned {expect}): re-run to calibrate with it")
        source = io.BytesIO(data)
    with fits.open(source, memmap=False) as hdul:
        header, data = image_of(hdul)
        names = [h.name for h in hdul]
        var = np.asarray(hdul["VAR"].data, np.float32) if "VAR" in names else None
        count = np.asarray(hdul["COUNT"].data) if "COUNT" in names else None
    role, digest, cards = _described(header, role)
    dtype = MASK_DTYPE if role in BIT_ROLES else np.float32
    return Master(role=role, data=data.astype(dtype), var=var, count=count, digest=digest,
                  cards=cards, path=Path(path))


def _described(header: fits.Header, role: str | None) -> tuple[str, str, dict[str, tuple]]:
    """A master's role, provenance hash and provenance cards, from its image's header."""
    # By card, not by keyword: looking up a HIERARCH keyword (MP_SUSPECT) by its bare name
    # makes astropy warn on the console of every worker.
    cards = {c.keyword: (c.value, c.comment) for c in header.cards
             if c.keyword not in _NOT_CARDS}
    role = role or str(header.get("MASTTYPE", "")).lower()
    return role, str(header.get("ADHASH", "")), cards


_UNREAD = object()


class StoredMaster(Master):
    """A master in its file, read by its headers (:func:`open_master`): its images are
    read the first time they are used, so that a run that reuses it and needs none of its
    pixels (every frame already done) reads none of them."""

    def expecting(self, digest: str | None) -> StoredMaster:
        """Check the file against this digest when its images are read (:func:`read_master`
        ``expect``); returns itself."""
        self.__dict__["_expect"] = digest
        return self

    def _image(self, name: str) -> np.ndarray | None:
        if self.__dict__.get(name, _UNREAD) is _UNREAD:
            full = read_master(self.path, self.role, self.__dict__.get("_expect"))
            self.__dict__.update(_data=full.data, _var=full.var, _count=full.count)
        return self.__dict__[name]

    def _set(self, name: str, value: object) -> None:
        self.__dict__[name] = value

    data = property(lambda self: self._image("_data"), lambda self, v: self._set("_data", v))
    var = property(lambda self: self._image("_var"), lambda self, v: self._set("_var", v))
    count = property(lambda self: self._image("_count"),
                     lambda self, v: self._set("_count", v))


def open_master(path: Path, role: str | None = None) -> Master:
    """A master by its headers only (:class:`StoredMaster`; the images on first use)."""
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        header = image_header(hdul)
    role, digest, cards = _described(header, role)
    return StoredMaster(role=role, data=_UNREAD, var=_UNREAD, count=_UNREAD,  # type: ignore[arg-type]
                        digest=digest, cards=cards, path=Path(path))


def is_current_layout(path: Path) -> bool:
    """True when a master file has this version's layout (its image in ``SCI``); one
    written by an earlier version (image in PRIMARY) is rebuilt rather than reused."""
    try:
        with fits.open(path, memmap=False) as hdul:
            return "SCI" in hdul
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class MasterPaths:
    """Where a night's masters are: all a worker needs to calibrate a frame."""

    bias: Path | None
    darks: tuple[tuple[float, Path], ...]
    flats: tuple[tuple[str, Path], ...]
    mask: Path
    illums: tuple[tuple[str, Path], ...] = ()  # illumination correction per filter
    warm: Path | None = None  # warm pixels (bit WARM) from cosmic-ray flags (masters.warm)
    # The file digest of each master (by file name) the run planned with: a master read
    # for a frame is checked against it (read_master's ``expect``). Empty: not checked.
    expect: tuple[tuple[str, str], ...] = ()
    # When a frame's exposure time is a dark's ([combine] exptime_rtol, exptime_atol): the
    # tolerance the masters were planned with, so that frames match darks as they did.
    tol: ExptimeTolerance = field(default_factory=ExptimeTolerance)

    def digests(self, index: FileIndex | None = None) -> dict[str, str]:
        """File digests of every master, named by file: the provenance of a frame. With the
        night's ``index``, a master it knows unchanged is not read (one that is read is
        recorded there)."""
        paths = [self.bias, *(p for _, p in self.darks), *(p for _, p in self.flats), self.mask,
                 *(p for _, p in self.illums), self.warm]
        out = {}
        for p in paths:
            if p is None:
                continue
            known = index.known(p) if index is not None else None
            if known is None:
                st = os.stat(p)
                digest = file_digest(p)
                if index is not None:
                    index.record(p, st, digest, written=True)
            out[p.name] = known.digest if known is not None else digest
        return out


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, expect: str | None) -> Master:
    return read_master(Path(path), expect=expect)


def load_cached(path: Path, expect: str | None = None) -> Master:
    """A master read once per process (cached by path and modification time; ``expect``
    as :func:`read_master`)."""
    return _load(str(path), path.stat().st_mtime_ns, expect)


def no_flat_reason(paths: MasterPaths, filter: str, unfiltered: int | None = None) -> str:
    """Why a frame of this filter cannot be flat-fielded: the filters that have a master
    flat (``(no filter)`` for the flats whose header names none), and why the flats
    without a filter are not used for a frame that has one.

    A flat is used for the science frames of its own filter only: flats whose header
    names no filter (none of :data:`~astep_dask.io.headers.FILTER_KEYS`) are never taken
    for a filtered frame, nor filtered flats for a frame without a filter; the message
    says so, naming the keywords read. ``unfiltered`` is how many of the night's usable
    flats name no filter, when the caller knows it (None: only the master flats are
    known, from ``paths``).
    """
    have = sorted(f for f, _ in paths.flats)
    names = ", ".join(map(filter_label, have)) or "none"
    what = f"filter {filter_label(filter)}" if filter else "a frame with no filter"
    out = f"no master flat for {what} (flats for: {names})"
    keys = ", ".join(FILTER_KEYS)
    if filter and unfiltered:
        out += (f"; {unfiltered} flat{'s have' if unfiltered > 1 else ' has'} no filter "
                f"keyword ({keys}): {'they are' if unfiltered > 1 else 'it is'} not used "
                f"for filter {filter_label(filter)}")
    elif filter and unfiltered is None and "" in have:
        out += (f"; flats with no filter keyword ({keys}) are not used for filter "
                f"{filter_label(filter)}")
    elif not filter and have:
        out += (f"; its header has no filter keyword ({keys}): the flats of a filter are "
                "not used for it")
    return out


def corrected_flat(flat_path: Path, mask_path: Path,
                   illum_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The master flat divided by its illumination correction, normalised again to median
    1 over the mask's good pixels, and its variance (once per process, cached)."""
    return _corrected(str(flat_path), str(mask_path), str(illum_path),
                      tuple(Path(p).stat().st_mtime_ns
                            for p in (flat_path, mask_path, illum_path)))


@functools.lru_cache(maxsize=4)
def _corrected(flat_path: str, mask_path: str, illum_path: str,
               mtimes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _divide_illum(*(load_cached(Path(p)) for p in (flat_path, mask_path, illum_path)))


def _divide_illum(flat: Master, mask: Master, illum_master: Master
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`corrected_flat` of masters in memory."""
    illum = illum_master.data.astype(np.float32)
    good = (mask.data == 0) & np.isfinite(flat.data) & (illum > 0)
    data = flat.data / illum
    norm = np.float32(np.median(data[good])) if good.any() else np.float32(1)
    data /= norm
    var = variance_of(flat) / (illum * norm) ** 2
    return data.astype(np.float32), var.astype(np.float32)


def frame_masters(
    paths: MasterPaths, exptime: float, filter: str, cache: bool = True,
    loaded: dict[str, Master] | None = None,
) -> tuple[FrameMasters, dict[str, tuple]]:
    """The masters one frame needs, loaded from their files (once per worker process,
    :func:`load_cached`; read afresh and not kept without ``cache``) unless ``loaded``
    holds them already (by path: the masters the night's builder has in memory), and the
    header cards that name them (file and hash) and say how the dark was made.

    Raises
    ------
    CalibrationError
        When there is no flat for the filter or no way to make the dark.
    """
    held = dict(loaded or {})
    expect = dict(paths.expect)

    def load(path: Path) -> Master:
        master = held.get(str(path))
        if isinstance(master, StoredMaster):  # its images not read yet, maybe
            return master.expecting(expect.get(path.name))
        if master is not None:  # made by this run, in memory
            return master
        digest = expect.get(path.name)
        return load_cached(path, digest) if cache else read_master(path, expect=digest)

    flats = dict(paths.flats)
    if filter not in flats:
        raise CalibrationError(no_flat_reason(paths, filter))
    bias = load(paths.bias) if paths.bias else None
    dark_paths = dict(paths.darks)
    darks = {et: load(p) for et, p in dark_paths.items()}
    flat = load(flats[filter])
    mask = load(paths.mask)
    illum_path = dict(paths.illums).get(filter)
    sol = dark_for_exptime(exptime, bias, darks, paths.tol)
    cards: dict[str, tuple] = {"DARKMETH": (sol.how, "how the dark was subtracted")}
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
    bits = mask.data
    if paths.warm is not None:
        warm = load(paths.warm)
        bits = mask.data | warm.data.astype(MASK_DTYPE, copy=False)
        cards["MWARM"] = (warm.path.name, "warm pixels (MASK bit WARM) used")
        cards["MWARMH"] = (warm.digest, "its ADHASH")
    flat_data, flat_var = flat.data, variance_of(flat)
    if illum_path is not None:
        illum = load(illum_path)
        flat_data, flat_var = _divide_illum(flat, mask, illum)  # the masters checked above
        cards["MILLUM"] = (illum.path.name, "illumination correction (flat divided by it)")
        cards["MILLUMH"] = (illum.digest, "its ADHASH")
    fm = FrameMasters(dark=sol.total, dark_var=sol.var, dark_current=sol.current,
                      flat=flat_data, flat_var=flat_var, mask=bits)
    return fm, cards


@dataclass
class MasterReport:
    """What was built, reused or could not be made, for the manifest."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)  # for people: "name (why)"
    reused_files: list[str] = field(default_factory=list)  # the same, file names only
    notes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    illum: dict[str, dict] = field(default_factory=dict)  # per filter: frames, amplitude
    # Masters that could not be made from their inputs, by provenance hash: why. A re-run
    # with the same inputs and settings says so again without trying (reading) again.
    failed: dict[str, str] = field(default_factory=dict)


class MasterStore:
    """A night's master files: which can be reused, which other night can stand in for a
    missing one, and writing new ones (on a background thread while :meth:`writing`).

    Parameters
    ----------
    out_dir
        The night's output folder.
    reuse_foreign
        Reuse master files written by other tools (no provenance hash of ours).
    fallbacks
        Output folders of other nights, searched (nearest date first) for a master this
        night cannot make.
    verify
        Check a master's data checksums before reusing it (a damaged one is rebuilt).
    index
        The night's :class:`~astep_dask.io.index.FileIndex`: a master it knows unchanged
        since it was written or verified is not verified again (not read).
    """

    def __init__(self, out_dir: Path, reuse_foreign: bool = False,
                 fallbacks: Sequence[Path] = (), verify: bool = True,
                 index: FileIndex | None = None):
        self.out = Path(out_dir)
        self.reuse_foreign = reuse_foreign
        self.verify = verify
        self.index = index
        # This night's masters the store wrote or reused, by path: what a frame's planes
        # are made from without reading the files back (fallbacks of other nights aside).
        self.loaded: dict[str, Master] = {}
        self.fallbacks = list(fallbacks)
        self.report = MasterReport()
        self._writer: ThreadPoolExecutor | None = None  # set while writing() is open
        self._writes: list[Future] = []

    def existing(self, path: Path, digest: str) -> Master | None:
        """The master at ``path`` when its recorded hash is ``digest`` (or it was written
        by another tool and those are reused); None when it must be built."""
        if not path.exists():
            return None
        try:
            m = open_master(path)
        except (OSError, ValueError) as exc:
            self.report.notes.append(f"{path.name}: unreadable ({exc}); rebuilt")
            return None
        if m.digest != digest and (m.digest or not self.reuse_foreign):
            return None
        if m.digest and not is_current_layout(path):  # ours, from an earlier version
            self.report.notes.append(f"{path.name}: written in an earlier layout (image in "
                                     "PRIMARY); rebuilt")
            return None
        unchanged = self.index is not None and self.index.known(path) is not None
        if self.verify and not unchanged and (damage := verify_file(path)):
            self.report.notes.append(f"{path.name}: damaged ({damage}); rebuilt")
            return None
        self.report.reused_files.append(path.name)
        if m.digest == digest:
            self.report.reused.append(path.name)
        else:
            self.report.reused.append(f"{path.name} (written by another tool)")
            m.digest = digest
        self.loaded[str(path)] = m
        return m

    def fallback(self, night: str, name_suffix: str, role: str, why: str) -> Master | None:
        """The same master (file name ending ``name_suffix``) from the output of the
        nearest other night than ``night``, marked FALLBACK; None when there is none."""
        day = np.datetime64(night)
        candidates = []
        for folder in self.fallbacks:
            for p in folder.glob(f"*_{name_suffix}"):
                date = p.name.split("_", 1)[0]
                if date == night:
                    continue
                try:
                    gap = abs((np.datetime64(date) - day).astype(int))
                except ValueError:
                    continue
                candidates.append((gap, p))
        if not candidates:
            return None
        _, path = min(candidates)
        m = read_master(path, role)
        m.cards["FALLBACK"] = (ascii_text(path.name), "master taken from another night")
        self.report.notes.append(f"{role} {name_suffix}: {why}; using {path}")
        return m

    def write(self, master: Master, path: Path) -> None:
        """Write a master: at once, or (inside :meth:`writing`) on a background thread, so
        the FITS encoding and fsync overlap the next master's computation. The master's
        ``path`` is set either way."""
        if Path(path).parent != self.out:  # a name from a header never climbs out
            raise RunError(f"{path}: refused: masters are written inside {self.out} only")
        path = inside(self.out, Path(path).name)
        self.loaded[str(path)] = master
        if self._writer is None:
            self._written(master, path)
            return
        master.path = Path(path)
        self._writes.append(self._writer.submit(self._written, master, path))

    def _written(self, master: Master, path: Path) -> None:
        """:func:`write_master`, and the file's digest and status recorded in the index
        (so that nothing reads it back to know its digest)."""
        write_master(master, path)
        if self.index is not None:
            self.index.record(path, os.stat(path), master.file_digest, written=True)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Write masters on a background thread while the block runs; wait for every
        write when it ends, and re-raise the first that failed."""
        with ThreadPoolExecutor(1, thread_name_prefix="master-writer") as writer:
            self._writer, self._writes = writer, []
            try:
                yield
            finally:
                self._writer = None
        for w in self._writes:
            w.result()
