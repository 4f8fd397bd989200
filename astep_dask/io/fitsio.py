"""Our files: the one atomic writer (FITS, JSON, text, figures), the header cards of a
calibrated frame, and the one reader of a calibrated frame with its mid-exposure time.

Every file we write goes to a hidden temporary name in the destination folder and is
renamed into place only once complete and flushed to disk, so a killed run never leaves
a half-written file under a real name, and a re-run finds either a whole file or none.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning
from erfa import ErfaWarning

from astep_dask.core.bits import MASK_DTYPE, Bit
from astep_dask.core.calibrate import Section
from astep_dask.io.headers import exposure_time
from astep_dask.io.provenance import stamp
from astep_dask.io.times import frame_start, product_follow

__all__ = [
    "FRAME_KEYS",
    "IMAGETYP_FRAME",
    "IMAGETYP_MASTER",
    "TMP_PREFIX",
    "UTYPE_VARIANCE",
    "add_checksums",
    "ascii_text",
    "atomic_open",
    "atomic_path",
    "atomic_write",
    "atomic_write_digest",
    "atomic_write_text",
    "big_endian",
    "calibrated_hdul",
    "copy_header",
    "extension_header",
    "header_cards",
    "image_hdu",
    "image_header",
    "image_of",
    "mark_long_strings",
    "mid_exposure",
    "read_calibrated",
    "read_image",
    "remove_stale_temps",
    "verify_file",
    "wcs_cards",
    "write_json",
]


def header_cards(header: fits.Header) -> fits.Header:
    """Write the ``MP_<NAME> = bit`` keywords that name the mask bits."""
    for b in Bit:
        key = f"MP_{b.name}"
        key = key if len(key) <= 8 else f"HIERARCH {key}"  # LSST writes these as HIERARCH
        header[key] = (int(b), f"mask bit: value 1<<{int(b)}")
    return header


TMP_PREFIX = ".tmp-"

# A temporary file of atomic_path: TMP_PREFIX, the final name, "." and mkstemp's 8 random
# characters. A raw frame named ".tmp-….fits" (and its product) is none of them.
_TEMP_RE = re.compile(re.escape(TMP_PREFIX) + r".+\.[a-z0-9_]{8}")


def ascii_text(value: str) -> str:
    """A text as a FITS header value may hold it: printable ASCII unchanged, any other
    character percent-encoded as its UTF-8 bytes (``Dôme`` → ``D%C3%B4me``; read back
    with :func:`urllib.parse.unquote`). File names go into headers this way, so that a
    frame whose name is not ASCII is calibrated like any other."""
    if value.isascii() and value.isprintable():
        return value
    return urllib.parse.quote(value, safe="".join(
        chr(c) for c in range(32, 127) if chr(c) != "%"))


# Structural keywords of a raw primary header that must not be copied onto other HDUs.
STRUCTURAL = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE",
    "XTENSION", "PCOUNT", "GCOUNT", "CHECKSUM", "DATASUM", "EXTNAME", "END",
    "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2", "ZCMPTYPE",
    "ZQUANTIZ", "ZDITHER0", "ZSIMPLE", "ZEXTEND", "ZBLANK", "ZTENSION",
}


def process_umask() -> int:
    """The process's file-mode creation mask, read from ``/proc`` (setting the mask to
    read it back is not thread-safe); where there is no ``/proc``, set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


@contextmanager
def atomic_path(path: str | Path, sync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file to; renamed to ``path`` when done.

    The one way this package writes a file: the caller writes the temporary file (by its
    own means: astropy, matplotlib, a subprocess); when the block ends without error the
    file is flushed to disk (fsync; not with ``sync=False``, for a scratch file that a
    crash may lose), given the mode the user's umask allows (as :func:`open` would) and
    renamed into place, atomically. On any error it is removed, and nothing appears at
    ``path``.

    Examples
    --------
    >>> with atomic_path(folder / "flow.svg") as tmp:  # doctest: +SKIP
    ...     subprocess.run(["dot", "-Tsvg", "-o", str(tmp), dot_file], check=True)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent.is_symlink():  # planted in our output tree: it would steer the write
        raise OSError(errno.ELOOP, "refusing to write through a symbolic link (not made by "
                      "astep-dask; remove it)", str(path.parent))
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o666 & ~process_umask())  # as open() would have made it
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb", sync: bool = True,
                **kwargs: Any) -> Iterator[IO]:
    """Open a file to write ``path`` atomically (:func:`atomic_path`, ``sync`` as there);
    ``mode`` and ``kwargs`` as :func:`open` (``"w", encoding="utf-8"`` for text)."""
    with atomic_path(path, sync) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file (JSON, CSV, HTML) atomically, UTF-8; return its path."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def _plain(obj: object) -> object:
    """JSON for numpy scalars and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite(obj: object) -> object:
    """A copy of nested dicts and lists with every non-finite float replaced by None."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: object, finite: bool = False,
               compact: bool = False) -> Path:
    """Write ``obj`` as indented JSON atomically (:func:`atomic_write_text`): numpy scalars
    and paths as plain values and, with ``finite``, NaN and infinities as ``null`` (strict
    JSON, which browsers and ``jq`` read). ``compact``: one line, no indentation, for
    large files (Python's JSON encoder is ~10x slower when it indents; ``jq .`` shows
    them indented)."""
    value = _finite(obj) if finite else obj
    text = (json.dumps(value, separators=(",", ":"), default=_plain) if compact
            else json.dumps(value, indent=1, default=_plain))
    return atomic_write_text(path, text)


LONGSTRN = ("OGIP 1.0", "long strings continue on CONTINUE cards")


def mark_long_strings(hdul: fits.HDUList) -> fits.HDUList:
    """Declare the long-string convention in every header that uses it.

    A string value longer than a card holds (68 characters; less after a long or
    ``HIERARCH`` keyword) is written whole by astropy over ``CONTINUE`` cards (the OGIP
    long-string convention), never cut; FITS readers that follow the convention (astropy,
    CFITSIO) read it back whole. The convention asks for a ``LONGSTRN`` card in such a
    header (``fitsverify`` warns without it): added here, in place, where needed."""
    for hdu in hdul:
        h = hdu.header
        if "LONGSTRN" in h:
            continue
        if any(isinstance(c.value, str) and len(c.image) > fits.Card.length
               for c in h.cards if c.keyword not in ("COMMENT", "HISTORY", "")):
            h["LONGSTRN"] = LONGSTRN
    return hdul


def atomic_write(hdul: fits.HDUList, path: str | Path, checksum: bool = True) -> Path:
    """Write an HDUList to ``path`` atomically (:func:`atomic_path`), with CHECKSUM and
    DATASUM cards unless ``checksum`` is false; string cards longer than a card are
    written whole (:func:`mark_long_strings`).

    Raises
    ------
    OSError
        On any write error (disk full, permissions); the temporary file is removed and
        nothing appears at ``path``.
    """
    with atomic_open(path) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        mark_long_strings(hdul).writeto(fh, checksum=checksum, output_verify="fix")
    return Path(path)


class _Hashing(io.RawIOBase):
    """A write-only file that passes every byte on to ``fh`` and hashes it on the way
    (SHA-256): the digest of a file costs no read of it. Not seekable, so that a writer
    cannot go back and make the running hash wrong."""

    def __init__(self, fh: IO[bytes]):
        self._fh = fh
        self._sha = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        n = self._fh.write(data)
        self._sha.update(memoryview(data).cast("B")[:n])
        self._size += n
        return n

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        self._fh.flush()

    def digest(self) -> str:
        return self._sha.hexdigest()[:16]


def atomic_write_digest(hdul: fits.HDUList, path: str | Path) -> str:
    """:func:`atomic_write`, returning the written file's content digest (SHA-256, first
    16 hex digits, as :func:`~astep_dask.io.rawfiles.content_digest` of the file), taken
    from the bytes as they are written: a product's digest costs no read.

    Raises
    ------
    OSError
        As :func:`atomic_write`.
    """
    with atomic_open(path) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        sink = _Hashing(fh)
        mark_long_strings(hdul).writeto(sink, checksum=True, output_verify="fix")
        fh.flush()
        if sink.tell() != os.fstat(fh.fileno()).st_size:  # never seen: bytes went around
            raise OSError(f"{path}: {os.fstat(fh.fileno()).st_size} bytes written, "
                          f"{sink.tell()} hashed")
    return sink.digest()


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by a killed run; return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(TMP_PREFIX + "*"):
        if not _TEMP_RE.fullmatch(p.name):
            continue  # a product of a raw frame named ".tmp-…"
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def copy_header(source: fits.Header, skip: Iterable[str] = ()) -> fits.Header:
    """A copy of ``source`` without structural keywords (nor ``skip``), for a new HDU."""
    drop = STRUCTURAL | set(skip)
    out = fits.Header()
    for card in source.cards:
        if card.keyword in drop or card.keyword.startswith(("NAXIS", "TFORM", "TTYPE")):
            continue
        out.append(card, end=True)
    return out


def big_endian(a: np.ndarray, dtype: type | np.dtype | None = None) -> np.ndarray:
    """``a`` (as ``dtype``) in big-endian byte order, FITS's: a copy unless it already is.

    Give astropy big-endian arrays to write. It writes a native (little-endian) array by
    swapping its bytes in place and back afterwards, twice more for the checksum, and
    numpy's in-place ``byteswap`` holds the GIL: those swaps were 30 % of the samples in
    which a frame's task held the GIL (``py-spy record --gil``, 2 threads). A conversion
    (``astype``) releases it. The caller's array is left untouched, which also matters
    when another thread reads it while it is written (a master on the background writer).
    """
    dt = np.dtype(dtype or a.dtype)
    return np.asarray(a).astype(dt.newbyteorder(">"), copy=False)


def image_hdu(data: np.ndarray, name: str, quantize: float | None = None,
              dtype: type | np.dtype | None = None):
    """An image extension (of ``data`` as ``dtype``); tile-compressed (Rice) when
    ``quantize`` is given, else stored big-endian (:func:`big_endian`).

    Integer data compress losslessly. Float data are quantised to steps of
    ``noise / quantize`` (astropy's ``quantize_level``) with subtractive dithering that
    keeps exact zeros: at 16 the added noise is ~0.1 % of the pixel noise in quadrature.
    """
    if quantize is None:
        return fits.ImageHDU(big_endian(data, dtype), name=name)
    data = np.asarray(data, dtype=dtype)
    return fits.CompImageHDU(
        data, name=name, compression_type="RICE_1", quantize_level=quantize,
        quantize_method=2,  # SUBTRACTIVE_DITHER_2: dithered, zeros preserved
    )


# Cards of a frame's primary header that every image extension repeats, so that a reader
# of one extension (``CCDData.read(f, hdu="SCI")``, ``ImageFileCollection(ext="SCI")``)
# sees the frame's time, exposure, filter and gain without the primary (``INHERIT = T``
# says so to readers that do merge).
FRAME_KEYS = ("OBJECT", "TELESCOP", "INSTRUME", "EXPTIME", "DATE-OBS", "MJD-OBS", "TIMESYS",
              "FILTER", "GAIN", "RDNOISE", "RAWFILE", "MJD-MID", "BJD_TDB", "CENTALT",
              "AIRMASS")

# The world coordinate keywords of a header (primary and alternate descriptions), FITS WCS
# papers I-III and the SIP convention: copied verbatim to each image extension.
_WCS_KEY = re.compile(
    r"^(WCSAXES|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CTYPE\d|CROTA\d|PC\d_\d|CD\d_\d|PV\d_\d+"
    r"|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|EPOCH|WCSNAME|[AB]P?_ORDER|[AB]P?_\d+_\d+"
    r"|[AB]_DMAX)[A-Z]?$")
_CRPIX = re.compile(r"^CRPIX([12])([A-Z]?)$")

# IMAGETYP of our products (ccdproc's ImageFileCollection selects on it).
IMAGETYP_FRAME = "LIGHT"
IMAGETYP_MASTER = {"bias": "MASTER BIAS", "dark": "MASTER DARK", "flat": "MASTER FLAT",
                   "mask": "BAD PIXEL MASK"}
UTYPE_VARIANCE = "VarianceUncertainty"  # astropy's name of a variance plane (CCDData.read)


def wcs_cards(header: fits.Header, trim: Section | None = None) -> fits.Header:
    """The world coordinate cards of ``header``, verbatim, for the image of its data
    section ``trim`` (reference pixels ``CRPIX1``/``CRPIX2`` moved by the section's
    origin); empty when the header has none."""
    out = fits.Header()
    for card in header.cards:
        if not _WCS_KEY.match(card.keyword):
            continue
        if trim is not None and (m := _CRPIX.match(card.keyword)):
            shift = trim.x0 if m.group(1) == "1" else trim.y0
            out[card.keyword] = (float(card.value) - shift, card.comment)
        else:
            out.append(card, end=True)
    return out


def extension_header(primary: fits.Header, imagetyp: str, trim: Section | None = None,
                     keys: Iterable[str] = FRAME_KEYS) -> fits.Header:
    """Cards for an image extension of a frame or master whose primary header is
    ``primary``: ``INHERIT = T``, ``IMAGETYP``, the frame's own cards (``keys``, those
    present), mid-exposure ``DATE-AVG``/``MJD-AVG`` when the frame has a time, and its
    celestial WCS (:func:`wcs_cards`)."""
    h = fits.Header()
    h["INHERIT"] = (True, "primary header keywords apply to this extension")
    h["IMAGETYP"] = (imagetyp, "type of image (astep-dask product)")
    for key in keys:
        if key in primary:
            h[key] = (primary[key], primary.comments[key])
    if "DATE-OBS" in primary or "MJD-OBS" in primary:
        try:
            mjd, iso, _scale = mid_exposure(primary)
        except ValueError:
            pass
        else:
            h["DATE-AVG"] = (iso, "mid-exposure, in TIMESYS (UTC if none)")
            h["MJD-AVG"] = (mjd, "[d] MJD (UTC) at mid-exposure")
    h.extend(wcs_cards(primary, trim), update=True)
    return h


def calibrated_hdul(
    raw_header: fits.Header,
    sci: np.ndarray,
    var: np.ndarray,
    mask: np.ndarray,
    cards: dict[str, tuple],
    quantize: float | None = None,
    trim: Section | None = None,
) -> fits.HDUList:
    """The calibrated-frame file: PRIMARY (raw header + provenance), SCI, VAR, MASK.

    Each extension repeats the frame's time, exposure, filter and gain and carries its
    celestial WCS (the raw one, moved to the data section ``trim`` when the raw frame was
    trimmed), with ``INHERIT = T``, so that ``astropy.nddata.CCDData.read(f, hdu="SCI",
    hdu_uncertainty="VAR", hdu_mask="MASK")`` reads a frame whole: VAR is marked a
    variance (``UTYPE``), in electron². With ``quantize`` the three planes are
    tile-compressed (MASK losslessly).
    """
    primary = fits.PrimaryHDU(header=copy_header(raw_header))
    h = primary.header
    h["BUNIT"] = ("electron", "unit of the SCI extension")
    for key, value in cards.items():
        h[key] = value
    header_cards(h)
    stamp(h)
    common = extension_header(h, IMAGETYP_FRAME, trim)
    sci_hdu = image_hdu(sci, "SCI", quantize, np.float32)
    sci_hdu.header.extend(common)
    sci_hdu.header["BUNIT"] = ("electron", "calibrated signal")
    var_hdu = image_hdu(var, "VAR", quantize, np.float32)
    var_hdu.header.extend(common)
    var_hdu.header["BUNIT"] = ("electron2", "variance of SCI")
    var_hdu.header["UTYPE"] = (UTYPE_VARIANCE, "VAR is the variance of SCI")
    mask_hdu = image_hdu(mask, "MASK", quantize, np.int32)
    mask_hdu.header.extend(common)
    header_cards(mask_hdu.header)
    return fits.HDUList([primary, sci_hdu, var_hdu, mask_hdu])


def read_image(path: str | Path) -> tuple[fits.Header, np.ndarray]:
    """The image of a master (or any single-image product), read whole.

    Parameters
    ----------
    path
        A master file: this version's layout (image in ``SCI``), or one of an earlier
        version or another tool (image in PRIMARY).

    Returns
    -------
    header, data
        The primary header updated with the ``SCI`` extension's own cards (as
        ``INHERIT = T`` means), and the image as stored (no copy of another dtype).
    """
    with fits.open(path, memmap=False) as hdul:
        return image_of(hdul)


def image_of(hdul: fits.HDUList) -> tuple[fits.Header, np.ndarray]:
    """:func:`read_image` of an open file."""
    header = image_header(hdul)
    return header, np.asarray(hdul["SCI" if "SCI" in hdul else 0].data)


def image_header(hdul: fits.HDUList) -> fits.Header:
    """The header of a product's image: PRIMARY's cards with its ``SCI`` extension's own
    (no pixel data is read)."""
    header = hdul[0].header.copy()
    if "SCI" in hdul:
        # Cards, not (keyword, value) pairs: a HIERARCH keyword (MP_SUSPECT) made anew from
        # its bare name makes astropy warn; the comments come along too.
        header.update([c for c in hdul["SCI"].header.cards
                       if c.keyword not in STRUCTURAL
                       and c.keyword not in ("COMMENT", "HISTORY", "")])
    return header


def add_checksums(path: str | Path) -> Path:
    """Add ``DATASUM`` and ``CHECKSUM`` to every HDU of a FITS file written by other means
    than :func:`atomic_write` (streamed cubes, HDUs appended one at a time), so that
    :func:`verify_file` checks it like any other product. Meant for the temporary file of
    :func:`atomic_path`, before it is renamed into place; reads the file once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VerifyWarning)
        # memory-mapped: a night's stacked cubes are summed through the page cache
        with fits.open(path, mode="update", memmap=True) as hdul:
            for hdu in hdul:
                hdu.add_checksum()
    return Path(path)


def verify_file(path: str | Path) -> str | None:
    """Why a FITS product of ours cannot be trusted, or None when it can.

    Checks that the file holds every byte its headers announce (a truncated file is
    damaged) and, for each HDU that carries them, its ``DATASUM`` and ``CHECKSUM`` (which
    :func:`atomic_write` writes): a bit flipped anywhere is found. Reads the whole file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=False,
                           disable_image_compression=True) as hdul:  # the bytes as stored
                for i, hdu in enumerate(hdul):
                    info = hdul.fileinfo(i)
                    end = info["datLoc"] + info["datSpan"]
                    if end > size:
                        return f"truncated: {size} bytes, HDU {i} needs {end}"
                    name = hdu.name or str(i)
                    if "DATASUM" in hdu.header and hdu.verify_datasum() == 0:
                        return f"HDU {name}: data checksum (DATASUM) does not match"
                    if "CHECKSUM" in hdu.header and hdu.verify_checksum() == 0:
                        return f"HDU {name}: CHECKSUM does not match"
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        return f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def read_calibrated(path: str | Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]:
    """The one reader of a calibrated frame (``*_CAL.fits``): its primary header and its
    SCI (float32, e-), VAR (float32, e-²) and MASK (int32 bits) planes, read whole."""
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header.copy()
        sci = np.asarray(hdul["SCI"].data, np.float32)
        var = np.asarray(hdul["VAR"].data, np.float32)
        mask = np.asarray(hdul["MASK"].data, MASK_DTYPE)
    return header, sci, var, mask


def mid_exposure(header: fits.Header) -> tuple[float, str, str]:
    """Mid-exposure time of a frame: (MJD in UTC, ISO date in the header's time scale,
    that scale), from its start (:func:`astep_dask.io.times.frame_start`, the one reader
    of ``DATE-OBS``, ``MJD-OBS`` and ``TIMESYS`` that the inventory uses too) +
    ``EXPTIME`` / 2.

    Raises
    ------
    ValueError
        When the header has neither ``DATE-OBS`` nor ``MJD-OBS``, or an unusable one
        (unreadable, implausible, or the two in conflict): the reason.
    """
    start = frame_start(header, follow=product_follow(header))
    exptime = exposure_time(header)  # none (never in our products): the start itself
    mid = start.mid(exptime)
    mid.precision = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)  # "dubious year" far from today
        return float(mid.utc.mjd), str(mid.isot), start.scale
