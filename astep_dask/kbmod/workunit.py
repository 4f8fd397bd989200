"""The night as one KBMOD **WorkUnit** file: ``kbmod/DATE_WORKUNIT.fits``.

KBMOD's documentation calls the WorkUnit its standard input. Its reader is
``WorkUnit.from_fits`` in ``src/kbmod/work_unit.py`` of dirac-institute/kbmod (read at
commit 617cd33), with the helpers ``read_image_data_from_hdul`` (same file) and
``extract_wcs_from_hdu_header`` / ``deserialize_wcs`` (``src/kbmod/wcs_utils.py``). It
reads:

- PRIMARY: ``NUMIMG`` (images), ``NCON`` (constituent images; ``NUMIMG`` when absent),
  ``REPRJCTD`` (required: True when every image is on the one grid of the global WCS,
  which KBMOD then requires), ``REPFRAME`` (``"original"``: reprojected in the images' own
  sky frame, no parallax correction), ``BARY`` (only for "ebd" reprojections; left out
  here, so KBMOD takes None), ``OBS_LAT``/``OBS_LON``/``OBS_ELEV`` (observatory; KBMOD
  assumes Rubin without them), and the global WCS from the header's WCS cards (with
  ``DIMM1``/``DIMM2``, the grid's shape);
- ``IMG_META`` (optional BinTable, one row per constituent image): a column
  ``_WCSSTR_per_image_wcs`` holds each image's own WCS as a JSON dict of its header cards
  plus ``NAXIS1``/``NAXIS2``; other columns are kept as they are (``data_loc``);
- ``KBMOD_CONFIG`` (optional; KBMOD's default search configuration without it);
- per image ``i``: ``SCI_i`` (science, with ``MJD`` = mid-exposure MJD UTC, ``NIND``
  and ``IND_0``... the constituent images it comes from), ``VAR_i``, ``MSK_i`` (a pixel
  is masked, science and variance set to NaN, where the value is > 0) and ``PSF_i``
  (the PSF kernel; KBMOD's writer puts a 1×1 identity kernel there when it has none).

We write that layout with astropy ourselves (KBMOD stays an optional dependency), one
frame at a time (memory: one frame): the difference frames of the export, their variance
times the file's ``FILTVARF`` (``VARSCALE``: the variance a PSF-matched sum of correlated
noise has, so that KBMOD's likelihood is a unit-variance SNR on blank sky, issue 31),
their mask with only the bits that make a pixel unusable (``MSK_i`` keeps those bits'
values; the diagnostic bits HOT and DEAD, set on pixels the calibration repaired, are
dropped so that KBMOD uses those pixels where they have a value; pixels without a value
get NO_DATA), a PSF kernel per frame (a pixel-integrated
Gaussian of the frame's own PSF σ, measured on its stars after registration and PSF
matching, normalised to unit sum), the observatory (the site the frames were calibrated
with: :func:`~astep_dask.kbmod.products.observatory_cards`), the reference grid's WCS
with ``REPRJCTD = T`` when there is one, and each frame's own WCS (the global one shifted
by the frame's registration offset, or the frame's own header WCS when it has one).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from astep_dask.core.bits import SEARCH_IGNORED, Bit, flag
from astep_dask.core.psf import gaussian_images
from astep_dask.io.fitsio import add_checksums, atomic_path, header_cards, image_hdu
from astep_dask.io.provenance import digest_of, stamp
from astep_dask.kbmod.products import (
    Reference,
    card_float,
    observatory_cards,
    reference_wcs,
    wcs_signature,
)
from astep_dask.version import __version__

__all__ = [
    "KBMOD_LIMIT",
    "PSF_HALF_WIDTH",
    "WORKUNIT_PROV",
    "WORKUNIT_SHARD_FOLDER",
    "frame_wcs",
    "psf_kernel",
    "workunit_bytes",
    "workunit_provenance",
    "workunit_search_mask",
    "write_workunit",
]

PSF_HALF_WIDTH = 4.0  # the PSF kernel reaches this many σ from its centre
# KBMOD's ImageStackPy.validate (src/kbmod/core/image_stack_py.py at 617cd33) warns of an
# image whose unmasked science or variance exceeds 1e8: such pixels are masked here.
KBMOD_LIMIT = 1e8
WORKUNIT_PROV = "WUPROV"  # provenance card of the WorkUnit file
WORKUNIT_SHARD_FOLDER = "workunit"  # a sharded WorkUnit's folder, in the export folder


def psf_kernel(sigma: float) -> np.ndarray:
    """A PSF kernel for KBMOD: a pixel-integrated circular Gaussian of σ ``sigma`` px on an
    odd square of side ``2·ceil(4σ) + 1``, centred on its middle pixel, summing to 1."""
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"PSF sigma must be finite and positive, not {sigma!r}")
    half = int(np.ceil(PSF_HALF_WIDTH * sigma))
    size = 2 * half + 1
    c = np.array([[float(half)]])
    img = gaussian_images(c, c, np.array([float(sigma)]), size)[0, 0]
    return (img / img.sum()).astype(np.float32)


def workunit_search_mask(mask: np.ndarray, sci: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``MSK_i``: the mask bits that make a pixel unusable for KBMOD (int32, > 0 masks);
    the diagnostic bits (:data:`~astep_dask.core.bits.SEARCH_IGNORED`) are dropped, a
    pixel without a value (science or variance not finite, variance not positive: e.g. a
    repaired pixel the PSF matching left out) gets NO_DATA, and one whose values KBMOD
    refuses (:data:`KBMOD_LIMIT`: the core of a bright star, whose template residual
    floor gives it a variance above 1e8 e-², and so no weight) gets SUSPECT."""
    out = np.asarray(mask).astype(np.int32) & ~np.int32(SEARCH_IGNORED)
    with np.errstate(invalid="ignore"):
        empty = ~np.isfinite(sci) | ~np.isfinite(var) | ~(var > 0)
        refused = ~empty & ((var > KBMOD_LIMIT) | (np.abs(sci) > KBMOD_LIMIT))
    out[empty] |= np.int32(flag(Bit.NO_DATA))
    out[refused] |= np.int32(flag(Bit.SUSPECT))
    return out.astype(np.int32)


def frame_wcs(global_wcs: fits.Header | None, frame_header: fits.Header, dx: float,
              dy: float, shape: tuple[int, int]) -> WCS | None:
    """A frame's own WCS (on its own pixel grid, before registration): its header's WCS
    when it has one, else the global WCS moved by the registration offset (a point at
    ``(x, y)`` of the reference grid is at ``(x + dx, y + dy)`` in the frame); None when
    there is neither."""
    own = reference_wcs(frame_header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        if own is not None:
            w = WCS(own)
        elif global_wcs is not None:
            w = WCS(global_wcs)
            w.wcs.crpix = w.wcs.crpix + np.array([dx, dy])
        else:
            return None
    w.pixel_shape = (shape[1], shape[0])
    return w


def _wcs_json(w: WCS) -> str:
    """A WCS as KBMOD's ``serialize_wcs`` writes it: its header cards and NAXIS1/2, JSON."""
    h = dict(w.to_header(relax=True))
    h["NAXIS1"], h["NAXIS2"] = (int(n) for n in w.pixel_shape)
    return json.dumps(h)


def workunit_provenance(rows: list[dict], reference: Reference) -> str:
    """Hash of the KBMOD files (their provenance, in order) and of the global WCS."""
    return digest_of([r["provenance"] for r in rows], wcs_signature(reference.wcs),
                     "workunit-2", __version__)  # 2: VAR x FILTVARF


def _primary(night: str, n: int, reference: Reference, provenance: str, plane: str,
             site: fits.Header | None = None) -> fits.PrimaryHDU:
    """The WorkUnit's primary HDU: sizes, reprojection, observatory (from the header
    ``site``, a KBMOD file's), global WCS."""
    pri = fits.PrimaryHDU()
    h = pri.header
    h["NUMIMG"] = (n, "images in the WorkUnit")
    h["NCON"] = (n, "constituent images (one per image)")
    has_wcs = reference.wcs is not None
    h["REPRJCTD"] = (has_wcs, "T: every image on the grid of the global WCS")
    h["REPFRAME"] = ("original", "grid in the images' sky frame, no parallax")
    obs = observatory_cards(site)
    h["OBS_LAT"] = (obs["OBS-LAT"][0], "[deg] observatory latitude (north +)")
    h["OBS_LON"] = (obs["OBS-LONG"][0], "[deg] observatory longitude (east +)")
    h["OBS_ELEV"] = (obs["OBS-ELEV"][0], "[m] observatory elevation")
    if "OBSERVAT" in obs:
        h["OBSERVAT"] = obs["OBSERVAT"]
    h["NIGHT"] = (night, "night of the frames")
    h["REFFRAME"] = (reference.stem, "reference frame: grid of every image")
    h["KBPLANE"] = (plane, "SCI_i: difference or registered frames")
    h["TIMESYS"] = ("UTC", "MJD of SCI_i: mid-exposure, UTC")
    h[WORKUNIT_PROV] = (provenance, "hash of the KBMOD files and the WCS")
    h["MSKBITS"] = (int(~np.int32(SEARCH_IGNORED)) & 0x7FFFFFFF,
                    "MSK_i = frame mask AND this (drops HOT, DEAD)")
    if has_wcs:
        h.update(reference.wcs)
        h["DIMM1"], h["DIMM2"] = reference.shape[1], reference.shape[0]
    header_cards(h)
    stamp(h)
    return pri


def _meta_table(files: list[str], wcses: list[WCS | None]) -> fits.BinTableHDU:
    """``IMG_META``: per constituent image its file and (when known) its own WCS."""
    cols = [fits.Column("data_loc", f"{max(len(f) for f in files)}A", array=files)]
    if all(w is not None for w in wcses):
        strs = [_wcs_json(w) for w in wcses]  # type: ignore[arg-type]
        cols.append(fits.Column("_WCSSTR_per_image_wcs", f"{max(len(s) for s in strs)}A",
                                array=strs))
    return fits.BinTableHDU.from_columns(cols, name="IMG_META")


def _image_hdus(i: int, primary: fits.Header, sci: np.ndarray, var: np.ndarray,
                mask: np.ndarray, global_wcs: fits.Header | None, shape: tuple[int, int],
                ) -> list[fits.ImageHDU]:
    """``SCI_i``, ``VAR_i``, ``MSK_i``, ``PSF_i`` of one KBMOD file."""
    mjd = float(primary["MJD"])
    sigma = float(primary["PSFSIGMA"])
    scale = _var_scale(primary)
    var = var * np.float32(scale)  # VAR_i, and what KBMOD's limits are checked on
    hdus = [image_hdu(sci, f"SCI_{i}", dtype=np.float32),
            image_hdu(var, f"VAR_{i}", dtype=np.float32),
            image_hdu(workunit_search_mask(mask, sci, var), f"MSK_{i}"),
            fits.ImageHDU(psf_kernel(sigma), name=f"PSF_{i}")]
    for hdu in hdus[:3]:
        hdu.header["MJD"] = (mjd, "[d] mid-exposure MJD (UTC)")
        if global_wcs is not None:
            hdu.header.update(global_wcs)
            hdu.header["DIMM1"], hdu.header["DIMM2"] = shape[1], shape[0]
    s = hdus[0].header
    s["NIND"] = (1, "constituent images of this image")
    s["IND_0"] = (i, "its constituent image (IMG_META row)")
    s["BUNIT"] = ("electron", "difference signal")
    for key in ("CALFILE", "DATE-AVG", "EXPTIME", "FILTER", "REGDX", "REGDY", "FILTVARF"):
        if key in primary:
            s[key] = (primary[key], primary.comments[key])
    hdus[1].header["BUNIT"] = ("electron2", "variance of SCI for PSF-matched sums")
    hdus[1].header["VARSCALE"] = (card_float(scale, 5), "VAR_i = KBMOD file's VAR x FILTVARF")
    hdus[2].header["BUNIT"] = ("", "mask bits that make a pixel unusable (> 0: masked)")
    hdus[3].header["PSFSIGMA"] = (card_float(sigma, 4), "[px] Gaussian sigma of the kernel")
    hdus[3].header["PSFMODEL"] = ("pixel-integrated Gaussian", "kernel sums to 1")
    return hdus


def _var_scale(header: fits.Header) -> float:
    """What a KBMOD file's VAR is multiplied by in the WorkUnit: its ``FILTVARF``, so that
    KBMOD's likelihood (a matched filter of the PSF over VAR) is a unit-variance SNR on
    noise that resampling and PSF matching correlated (1 when the file has none)."""
    try:
        f = float(header.get("FILTVARF", 1.0))
    except (TypeError, ValueError):
        return 1.0
    return f if np.isfinite(f) and f > 0 else 1.0


def _config_table(headers: list[fits.Header]) -> fits.BinTableHDU:
    """``KBMOD_CONFIG``: one row, one column per search parameter, each a YAML scalar (as
    KBMOD's ``SearchConfiguration.to_hdu``); only what the night knows is set: ``psf_val``
    (median PSF σ of the frames) and ``num_obs`` (at most 10, KBMOD's default, and never
    more than the frames); KBMOD's defaults hold for the rest."""
    sigmas = [float(h.get("PSFSIGMA", -1.0)) for h in headers]
    sigma = float(np.median([s for s in sigmas if s > 0] or [1.4]))
    cols = [fits.Column("psf_val", "20A", array=[f"{sigma:.4f}"]),
            fits.Column("num_obs", "20A", array=[str(min(10, max(len(headers), 1)))])]
    return fits.BinTableHDU.from_columns(cols, name="KBMOD_CONFIG")


def write_workunit(path: Path, rows: list[dict], kdir: Path, reference: Reference,
                   night: str, provenance: str, sharded: bool = False) -> Path:
    """Write the night's WorkUnit from its KBMOD files (``rows``, time order), one frame at
    a time, atomically; returns the (primary) file.

    Parameters
    ----------
    path
        ``kbmod/DATE_WORKUNIT.fits``; when ``sharded``, the folder ``kbmod/workunit/`` holds
        ``DATE_WORKUNIT.fits`` (metadata only) and ``i_DATE_WORKUNIT.fits`` (image ``i``),
        the layout of KBMOD's ``WorkUnit.to_sharded_fits`` (read back by
        ``WorkUnit.from_sharded_fits(name, folder)``).
    rows
        The export's rows of the frames to include (``output``: the KBMOD file in
        ``kdir``; ``dx``/``dy``: registration offsets), in time order.
    kdir
        The export folder.
    reference
        The night's reference (grid shape, global WCS or None).
    night
        The night (a primary card).
    provenance
        :func:`workunit_provenance` of the rows, written as ``WUPROV``.
    sharded
        Write one file per image.
    """
    headers, wcses = [], []
    for r in rows:
        h = fits.getheader(kdir / r["output"], 0)
        headers.append(h)
        wcses.append(frame_wcs(reference.wcs, h, float(h.get("REGDX", r.get("dx", 0.0))),
                               float(h.get("REGDY", r.get("dy", 0.0))), reference.shape))
    plane = str(headers[0].get("KBPLANE", "registered")) if headers else "registered"
    meta = [_primary(night, len(rows), reference, provenance, plane,
                     headers[0] if headers else None),
            _config_table(headers), _meta_table([r["output"] for r in rows], wcses)]
    if sharded:
        folder = path.parent / WORKUNIT_SHARD_FOLDER
        path = folder / path.name
        for i, (r, h) in enumerate(zip(rows, headers, strict=True)):
            with fits.open(kdir / r["output"], memmap=False) as hdul:
                hdus = _image_hdus(i, h, hdul[1].data, hdul[3].data, hdul[2].data,
                                   reference.wcs, reference.shape)
            with atomic_path(folder / f"{i}_{path.name}") as tmp:
                fits.HDUList([fits.PrimaryHDU(), *hdus]).writeto(tmp, checksum=True)
        # the primary last: its WUPROV says the shards are complete
        with atomic_path(path) as tmp:
            fits.HDUList(meta).writeto(tmp, checksum=True)
        return path
    with atomic_path(path) as tmp:
        fits.HDUList(meta).writeto(tmp)
        for i, (r, h) in enumerate(zip(rows, headers, strict=True)):
            with fits.open(kdir / r["output"], memmap=False) as hdul:
                hdus = _image_hdus(i, h, hdul[1].data, hdul[3].data, hdul[2].data,
                                   reference.wcs, reference.shape)
            with fits.open(tmp, mode="append") as out:
                for hdu in hdus:
                    out.append(hdu)
        add_checksums(tmp)  # a re-run verifies the WorkUnit before it reuses it
    return path


def workunit_bytes(n_frames: int, shape: tuple[int, int]) -> int:
    """Size of a WorkUnit's images: SCI, VAR and MSK, 4 bytes a pixel each."""
    return 12 * n_frames * int(shape[0]) * int(shape[1])
