"""A real night of a small telescope through ``astep-dask``, checked independently (issue 29).

Give it a folder of raw FITS files as a camera or an archive wrote them (any arrangement,
searched recursively; ``.fits``, ``.fit``, ``.fts``, optionally ``.gz``) or an archive night
``ROOT/YYYY-MM-DD``. It

1. reads every header and says what ``astep-dask`` would make of it (frame type, exposure
   time, filter, time, GAIN/RDNOISE) and which files it could not use as they are;
2. arranges the files as an archive night under ``--work`` with the installed
   ``astep-dask arrange`` (links; the raw files are only read) unless the input already is
   a night;
3. measures gain and read noise from the raw frames alone (read noise from consecutive
   bias pairs, else the shortest darks; gain from consecutive flat pairs of one filter and
   exposure, photon transfer with the second flat scaled to the first's level);
4. runs the installed console script, ``astep-dask inspect`` and ``astep-dask calibrate``,
   with a settings file that gives ``[detector] gain`` and ``read_noise`` when the headers
   lack them and ``--gain``/``--read-noise`` are given (e.g. the camera's data sheet; not
   given: left to astep-dask, whose ``GAINSRC``/``RDNSRC`` cards say what it did), and
   times them;
5. measures chi on consecutive science frames of one filter and exposure: the scatter of
   ``SCI_i - SCI_j`` (star-free, unmasked pixels, large-scale sky difference removed,
   sigma-clipped) over ``sqrt(VAR_i + VAR_j - 2 C)``, where ``C`` is the noise the two
   frames share because the same masters were subtracted and divided, computed from the raw
   calibration frames (per-pixel sample variance of the frames over their number, for the
   dark or bias + scaled dark that ``DARKMETH`` names, and the flat's); against the same
   scatter over an independent variance from the raw frames (measured gain and read noise,
   dark current from the raw darks): ``chi_pipe / chi_indep`` is 1 when VAR is right;
6. calibrates the same frames the slow way with ccdproc (bias, darks scaled by exposure,
   flats divided by their median and median-combined, the master flat normalised by its
   median, electrons with the gain used) and compares the master flat and each science
   frame with ours (median ratio and its robust scatter; ours also with the illumination
   correction taken out, since ccdproc has none).

Where no real night can be had, ``--stand-in SIZE`` simulates one written as a small
telescope's camera writes it (one folder, SBIG-style types, no GAIN/RDNOISE/MJD-OBS, bias +
darks of other exposures; truth gain 1.5 e-/ADU, read noise 10 e-) and runs on that.

Everything it writes goes under ``--work`` (default: a new folder in ``$TMPDIR``); nothing is
written next to the raw files. It prints the figures and, as the last line, one JSON object::

    python benchmarks/real_night.py /path/to/raw/files --gain 2.3 --read-noise 15 \\
        --gain-source "SBIG ST-7XE data sheet"
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.stats import mad_std, sigma_clipped_stats
from astropy.utils.exceptions import AstropyWarning
from scipy import ndimage

from astep_dask.io.headers import GAIN_KEYS, RDNOISE_KEYS, header_float

SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz")


@dataclass
class Raw:
    """One raw file as the headers describe it (what the package itself would read)."""

    path: Path
    kind: str
    note: str
    exptime: float
    filter: str
    date_obs: str
    mjd: float
    shape: tuple[int, int]
    gain: float | None
    read_noise: float | None
    problem: str = ""


@dataclass
class Report:
    """What the run found: what was done by hand, the figures, and what went wrong."""

    source: str
    night: str = ""
    counts: dict = field(default_factory=dict)
    by_hand: list[str] = field(default_factory=list)
    detector: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)
    products: dict = field(default_factory=dict)
    chi: dict = field(default_factory=dict)
    ccdproc: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- raw headers


def is_raw_name(path: Path) -> bool:
    """True for a FITS file name that is not one of our products."""
    low = path.name.lower()
    return low.endswith(SUFFIXES) and "_cal" not in path.parent.name.lower()


def header_of(path: Path) -> tuple[fits.Header, tuple[int, int]]:
    """Merged primary + first image header of a file, and the image shape."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.header.get("NAXIS", 0) == 2:
                    merged = hdul[0].header.copy()
                    if hdu is not hdul[0]:
                        merged.update(hdu.header)
                    return merged, (int(hdu.header["NAXIS2"]), int(hdu.header["NAXIS1"]))
    raise ValueError("no 2-D image")


def read_raw(path: Path) -> Raw:
    """What the package makes of one raw file's header (its own classifier is used)."""
    from astep_dask.io.headers import classify, exposure_time, frame_filter
    from astep_dask.io.times import frame_start

    try:
        header, shape = header_of(path)
    except (OSError, ValueError) as exc:
        return Raw(path, "unknown", "", float("nan"), "", "", float("nan"), (0, 0), None,
                   None, problem=f"unreadable: {exc}")
    kind, note = classify(header, path)
    date_obs = str(header.get("DATE-OBS", "") or "").strip()
    start = frame_start(header)  # the package's one reader of a frame's time
    mjd = start.mjd if start.time is not None else None
    raw = Raw(path, str(kind), note, exposure_time(header), frame_filter(header).name,
              date_obs, float("nan") if mjd is None else mjd, shape,
              header_float(header, *GAIN_KEYS), header_float(header, *RDNOISE_KEYS))
    if raw.kind == "unknown":
        raw.problem = "frame type not understood (IMAGETYP/OBSTYPE/ACQTYPE, file name)"
    elif not np.isfinite(raw.exptime):
        raw.problem = "no exposure time"
    elif raw.kind == "science" and not np.isfinite(raw.mjd):
        raw.problem = "science frame without DATE-OBS/MJD-OBS"
    return raw


def build_layout(source: Path, root: Path, report: Report) -> Path:
    """The installed ``astep-dask arrange SOURCE ROOT`` (links, read-only source): the
    archive layout the package makes itself from the camera's folder."""
    res = run([console_script(), "arrange", str(source), str(root)])
    if res["rc"] not in (0, 3):
        raise SystemExit(f"astep-dask arrange failed: {res['stderr'] or res['stdout']}")
    night = Path(res["stdout"].rsplit("next: astep-dask calibrate ", 1)[1].strip())
    report.by_hand.append("none: `astep-dask arrange` made the archive layout "
                          f"({night.name}, {res['seconds']:.1f} s)")
    return night


# --------------------------------------------------------------------------- raw noise


def load(path: Path) -> np.ndarray:
    """The image of a FITS file as float64 (BZERO applied)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if hdu.header.get("NAXIS", 0) == 2 and hdu.data is not None:
                    return np.asarray(hdu.data, dtype=np.float64)
    raise ValueError(f"{path}: no image")


def centre(a: np.ndarray, frac: float = 0.8) -> np.ndarray:
    """The central ``frac`` of an image in each axis (edges and vignetted corners out)."""
    ny, nx = a.shape
    dy, dx = int(ny * (1 - frac) / 2), int(nx * (1 - frac) / 2)
    return a[dy:ny - dy, dx:nx - dx]


def clipped_std(a: np.ndarray, sigma: float = 4.0) -> float:
    """Sigma-clipped standard deviation of the finite values."""
    a = a[np.isfinite(a)]
    return float(sigma_clipped_stats(a, sigma=sigma, maxiters=10)[2])


def by_time(raws: list[Raw]) -> list[Raw]:
    """Frames sorted by time, then name."""
    return sorted(raws, key=lambda r: (r.mjd if np.isfinite(r.mjd) else 0.0, r.path.name))


def read_noise_adu(bias: list[Raw], darks: list[Raw]) -> tuple[float, str]:
    """Read noise (ADU) from consecutive pairs: std(B1 - B2) / sqrt 2, median over pairs."""
    source, frames = "bias pairs", by_time(bias)
    if len(frames) < 2:
        shortest = min((d.exptime for d in darks), default=None)
        frames = by_time([d for d in darks if d.exptime == shortest])
        source = f"pairs of the shortest darks ({shortest:g} s)" if shortest is not None else ""
    values = []
    for a, b in zip(frames[:-1:2], frames[1::2], strict=False):
        values.append(clipped_std(centre(load(a.path) - load(b.path))) / np.sqrt(2))
    if not values:
        return float("nan"), "no pairs"
    return float(np.median(values)), f"{len(values)} {source}"


def choose_dark(t: float, times: list[float], hint: float | None = None) -> float:
    """The dark exposure to use for a frame of ``t`` s: ``hint`` (the one our run used) when
    there is one, else the same exposure, else the shortest longer one, else the longest."""
    if hint is not None and hint in times:
        return hint
    if t in times:
        return t
    longer = [x for x in times if x > t]
    return min(longer) if longer else max(times)


def level_frame(bias: list[Raw], darks: list[Raw], t: float) -> np.ndarray | float:
    """What a raw frame of exposure ``t`` holds without light: mean bias + dark current."""
    b = np.mean([load(r.path) for r in bias], axis=0) if bias else None
    if not darks:
        return b if b is not None else 0.0
    td = choose_dark(t, sorted({d.exptime for d in darks}))
    d = np.mean([load(r.path) for r in darks if r.exptime == td], axis=0)
    if b is None:
        return d  # the darks carry the bias; the nearest exposure is taken as it is
    return b + (d - b) * (t / td if td > 0 else 0.0)


def gain_from_flats(flats: list[Raw], bias: list[Raw], darks: list[Raw], rn_adu: float
                    ) -> tuple[float, str, list[float]]:
    """Gain (e-/ADU) from consecutive flat pairs of one filter and exposure.

    With ``m1``, ``m2`` the clipped means of the two flats less the dark level and
    ``r = m1 / m2``, ``D = F1 - r F2`` keeps no flat-field structure and
    ``var(D) = (m1 + r m1) / g + (1 + r²) rn²``.
    """
    groups: dict[tuple[str, float], list[Raw]] = defaultdict(list)
    for f in flats:
        groups[(f.filter, round(f.exptime, 2))].append(f)
    gains = []
    for (_, t), members in groups.items():
        dark = level_frame(bias, darks, t)
        members = by_time(members)
        for a, b in zip(members[:-1:2], members[1::2], strict=False):
            fa, fb = centre(load(a.path) - dark), centre(load(b.path) - dark)
            m1 = float(sigma_clipped_stats(fa, sigma=4)[0])
            m2 = float(sigma_clipped_stats(fb, sigma=4)[0])
            if not (m1 > 0 and m2 > 0) or not 0.5 < m1 / m2 < 2 or max(m1, m2) > 50000:
                continue
            r = m1 / m2
            d = fa - r * fb  # no flat-field structure left; a changing twilight gradient
            d = d - block_background(d, np.isfinite(d), 32)  # ... is taken out here
            var = float(mad_std(d[~moving_stars(d)])) ** 2 - (1 + r * r) * rn_adu**2
            if var > 0:
                gains.append((m1 + r * m1) / var)
    if not gains:
        return float("nan"), "no usable flat pairs", []
    return float(np.median(gains)), f"{len(gains)} flat pairs", gains


def moving_stars(d: np.ndarray) -> np.ndarray:
    """Pixels of a flat-pair difference touched by stars (twilight flats catch stars that
    move between exposures): 4 sigma above or below in the 3x3-smoothed difference, grown by
    4 px; the noise itself is too weak to pass this in the smoothed image."""
    sm = ndimage.uniform_filter(np.nan_to_num(d), 3)
    bad = np.abs(sm - np.median(sm)) > 4 * mad_std(sm)
    return ndimage.binary_dilation(bad, iterations=4) | ~np.isfinite(d)


def sample_var_of_mean(frames: list[Raw], scale_by_median: bool = False) -> float:
    """Typical per-pixel variance of the mean of ``frames`` (ADU², or relative when the
    frames are each divided by their median first): sample variance over their number."""
    if len(frames) < 2:
        return float("nan")
    stack = np.array([centre(load(r.path)) for r in frames])
    if scale_by_median:
        stack /= np.median(stack, axis=(1, 2))[:, None, None]
    s2 = stack.var(axis=0, ddof=1)
    return float(sigma_clipped_stats(s2, sigma=5, maxiters=10)[0]) / len(frames)


# --------------------------------------------------------------------------- commands


def console_script() -> str:
    """The installed ``astep-dask`` next to this interpreter, else the one on PATH."""
    here = Path(sys.executable).with_name("astep-dask")
    return str(here) if here.exists() else (shutil.which("astep-dask") or "astep-dask")


def run(cmd: list[str]) -> dict:
    """Run a command; its exit code, wall time and output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return {"cmd": " ".join(cmd), "rc": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "stdout": proc.stdout, "stderr": proc.stderr}


def distinct_notes(text: str) -> list[str]:
    """The distinct lines of a command's output that read as notes, problems or warnings,
    with how many times each came (file names and numbers folded)."""
    keys = Counter()
    for line in text.splitlines():
        low = line.lower()
        if any(w in low for w in ("note", "warn", "unusable", "no gain", "setting", "problem",
                                  "fail", "error")):
            keys[re.sub(r"\S+\.(fits?|fts)(\.gz)?|\d+(\.\d+)?", "#", line.strip())] += 1
    return [f"{n}x {k}" for k, n in keys.most_common()]


# --------------------------------------------------------------------------- products


def product(path: Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None,
                                  fits.Header]:
    """SCI, VAR, MASK and the primary header of one of our products."""
    with fits.open(path, memmap=False) as hdul:
        names = [h.name for h in hdul]
        sci = hdul["SCI"].data if "SCI" in names else hdul[0].data
        var = hdul["VAR"].data if "VAR" in names else None
        mask = hdul["MASK"].data if "MASK" in names else None
        head = hdul[0].header.copy()
        return (np.asarray(sci, np.float64),
                None if var is None else np.asarray(var, np.float64),
                None if mask is None else np.asarray(mask), head)


def block_background(a: np.ndarray, good: np.ndarray, box: int = 32) -> np.ndarray:
    """Large-scale background: the median of good pixels in ``box``-px blocks, bilinear."""
    ny, nx = a.shape
    gy, gx = -(-ny // box), -(-nx // box)
    grid = np.full((gy, gx), np.nan)
    for j in range(gy):
        for i in range(gx):
            sl = (slice(j * box, (j + 1) * box), slice(i * box, (i + 1) * box))
            vals = a[sl][good[sl]]
            if vals.size > box:
                grid[j, i] = np.median(vals)
    if np.isnan(grid).all():
        return np.zeros_like(a)
    grid[np.isnan(grid)] = np.nanmedian(grid)
    yy = (np.arange(ny) + 0.5) / box - 0.5
    xx = (np.arange(nx) + 0.5) / box - 0.5
    coords = np.meshgrid(yy, xx, indexing="ij")
    return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")


def star_free(sci: np.ndarray, var: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Pixels well clear of stars: the 3x3-smoothed frame less its sky above 4 sigma (of
    the smoothed noise, so that noise alone almost never passes and no tail of the noise is
    cut), grown by 4 px."""
    sky = block_background(sci, good, 64)
    sm = ndimage.uniform_filter(np.where(good, sci - sky, 0.0), 3)
    hot = sm > 4 * np.sqrt(np.clip(var, 1e-12, None)) / 3
    return ~ndimage.binary_dilation(hot, iterations=4)


def parse_darkmeth(text: str) -> tuple[str, float | None, float | None]:
    """``DARKMETH`` as (kind, dark exposure, scale): 'matched', 'scaled', 'bias', 'fit'."""
    m = re.search(r"dark ([\d.]+)s scaled x([\d.eE+-]+)", text)
    if m:
        return "scaled", float(m.group(1)), float(m.group(2))
    m = re.search(r"dark ([\d.]+)s", text)
    if m:
        return "matched", float(m.group(1)), 1.0
    if text.strip().lower().startswith("bias"):
        return "bias", None, 0.0
    return "fit", None, None


def flat_divisor(out_night: Path, head: fits.Header | dict, shape: tuple[int, int]
                 ) -> np.ndarray:
    """The flat a frame was divided by: MFLAT / MILLUM, normalised to median 1."""
    flat = product(out_night / str(head["MFLAT"]))[0]
    if head.get("MILLUM"):
        illum_path = out_night / str(head["MILLUM"])
        if illum_path.exists():
            flat = flat / product(illum_path)[0]
    good = np.isfinite(flat) & (flat > 0.1)
    flat = flat / np.median(flat[good])
    return flat if flat.shape == shape else np.ones(shape)


def chi_pairs(cal: list[Path], out_night: Path, cal_frames: dict[str, list[Raw]],
              rn_adu: float, g_meas: float, max_pairs: int) -> dict:
    """chi of consecutive science frames (see the module docstring)."""
    heads = [(p, fits.getheader(p)) for p in cal]
    groups: dict[tuple[str, float], list[tuple[Path, fits.Header]]] = defaultdict(list)
    for p, h in heads:
        groups[(str(h.get("FILTER", "")), float(h.get("EXPTIME", np.nan)))].append((p, h))
    bias, darks, flats = cal_frames["bias"], cal_frames["dark"], cal_frames["flat"]
    var_b = sample_var_of_mean(bias)
    var_d = {t: sample_var_of_mean([d for d in darks if d.exptime == t])
             for t in {d.exptime for d in darks}}
    rows = []
    for (filt, t), members in groups.items():
        members.sort(key=lambda ph: float(ph[1].get("MJD-OBS", 0.0)))
        rel_f = sample_var_of_mean([f for f in flats if f.filter == filt],
                                   scale_by_median=True)
        for (pa, ha), (pb, _) in itertools.islice(itertools.pairwise(members), max_pairs):
            sa, va, ma, _ = product(pa)
            sb, vb, mb, _ = product(pb)
            if va is None or vb is None:
                continue
            g_p = float(ha.get("GAIN", np.nan))
            kind, td, k = parse_darkmeth(str(ha.get("DARKMETH", "")))
            c_adu = {"matched": var_d.get(td, np.nan), "bias": var_b}.get(kind, np.nan)
            if kind == "scaled":
                c_adu = (1 - k) ** 2 * (var_b if np.isfinite(var_b) else 0.0) \
                    + k * k * var_d.get(td, np.nan)
            f = flat_divisor(out_night, ha, sa.shape)
            good = (np.isfinite(sa) & np.isfinite(sb) & np.isfinite(va) & np.isfinite(vb)
                    & (f > 0.5))
            if ma is not None:
                good &= ma == 0
            if mb is not None:
                good &= mb == 0
            good &= star_free(sa, va, good) & star_free(sb, vb, good)
            d = sa - sb
            d = d - block_background(d, good, 32)
            c_e = c_adu * g_p**2 / f**2 + sa * sb * (rel_f if np.isfinite(rel_f) else 0.0)
            # independent: Poisson of what the pixel collected (sky and dark current, in
            # ADU from our S and the raw darks) with the measured gain, read noise measured
            dark_adu = 0.0
            if darks:
                lvl = level_frame(bias, darks, t)
                base = level_frame(bias, [], t) if bias else np.nan
                if bias and isinstance(lvl, np.ndarray):
                    dark_adu = float(np.median(centre(lvl - base)))
            def v_ind(s: np.ndarray, f=f, g_p=g_p, dark_adu=dark_adu) -> np.ndarray:
                adu = np.clip(s * f / g_p, 0, None) + dark_adu
                return (adu / g_meas + rn_adu**2) * g_p**2 / f**2
            z_pipe = d / np.sqrt(np.clip(va + vb - 2 * c_e, 1e-12, None))
            z_ind = d / np.sqrt(v_ind(sa) + v_ind(sb))
            z_raw = d / np.sqrt(va + vb)
            zp, zi, zr = z_pipe[good], z_ind[good], z_raw[good]
            rows.append({
                "pair": f"{pa.name} - {pb.name}", "filter": filt, "exptime": t,
                "pixels": int(good.sum()), "darkmeth": str(ha.get("DARKMETH", "")),
                "chi_pipe": clipped_std(zp), "chi_indep": clipped_std(zi),
                "chi_pipe_no_common": clipped_std(zr),
                "chi_pipe_mad": float(mad_std(zp)), "chi_indep_mad": float(mad_std(zi)),
                "common_share": float(np.median((2 * c_e / (va + vb))[good])),
            })
    if not rows:
        return {"pairs": 0}
    cp = [r["chi_pipe"] for r in rows]
    ci = [r["chi_indep"] for r in rows]
    return {"pairs": len(rows), "chi_pipe": float(np.median(cp)),
            "chi_indep": float(np.median(ci)),
            "ratio": float(np.median(np.array(cp) / np.array(ci))),
            "chi_pipe_no_common": float(np.median([r["chi_pipe_no_common"] for r in rows])),
            "rows": rows}


# --------------------------------------------------------------------------- ccdproc


def ccdproc_compare(cal_frames: dict[str, list[Raw]], science: list[Raw], out_night: Path,
                    cal: list[Path], max_frames: int) -> dict:
    """Master flat and science frames the slow way with ccdproc, against ours."""
    import astropy.units as u
    import ccdproc
    from astropy.modeling import models
    from astropy.nddata import CCDData

    from astep_dask.io.rawfiles import stem

    def ccd(r: Raw) -> CCDData:
        c = CCDData(load(r.path).astype(np.float32), unit="adu")
        c.header["EXPTIME"] = r.exptime
        head = header_of(r.path)[0]
        if head.get("BIASSEC"):  # ccdproc's own overscan (a constant level) and trim
            c = ccdproc.subtract_overscan(c, fits_section=str(head["BIASSEC"]),
                                          overscan_axis=1, median=True,
                                          model=models.Polynomial1D(0))
        if head.get("TRIMSEC") or head.get("DATASEC"):
            c = ccdproc.trim_image(c, fits_section=str(head.get("TRIMSEC")
                                                        or head["DATASEC"]))
        c.header["EXPTIME"] = r.exptime
        return c

    def combine(frames: list[CCDData], method: str) -> CCDData:
        return ccdproc.combine(frames, method=method, sigma_clip=True,
                               sigma_clip_low_thresh=3, sigma_clip_high_thresh=3,
                               sigma_clip_func=np.ma.median, sigma_clip_dev_func=mad_std,
                               mem_limit=2e9)

    bias, darks, flats = cal_frames["bias"], cal_frames["dark"], cal_frames["flat"]
    mbias = combine([ccd(r) for r in bias], "average") if len(bias) > 1 else None
    mdark: dict[float, CCDData] = {}
    for t in sorted({d.exptime for d in darks}):
        frames = [ccd(d) for d in darks if d.exptime == t]
        if mbias is not None:
            frames = [ccdproc.subtract_bias(f, mbias) for f in frames]
        m = combine(frames, "average") if len(frames) > 1 else frames[0]
        m.header["EXPTIME"] = t
        mdark[t] = m

    def reduce(c: CCDData, t: float, hint: float | None = None) -> CCDData:
        if mbias is not None:
            c = ccdproc.subtract_bias(c, mbias)
        if mdark:
            td = choose_dark(t, list(mdark), hint)
            scale = mbias is not None  # a dark carrying its bias is subtracted as it is
            c = ccdproc.subtract_dark(c, mdark[td], exposure_time="EXPTIME",
                                      exposure_unit=u.s, scale=scale)
        return c

    out: dict = {"flat": {}, "science": []}
    mflat: dict[str, CCDData] = {}
    for filt in sorted({f.filter for f in flats}):
        frames = []
        for f in [x for x in flats if x.filter == filt]:
            c = reduce(ccd(f), f.exptime)
            frames.append(c.divide(np.median(c.data)))
        m = combine(frames, "median") if len(frames) > 1 else frames[0]
        mflat[filt] = m.divide(np.median(m.data[np.isfinite(m.data)]))
        ours_path = next((p for p in sorted(out_night.glob("*MASTERFLAT*.fits"))
                          if str(fits.getheader(p).get("FILTER", "")).strip() == filt), None)
        if ours_path is None:
            continue
        ours = product(ours_path)[0]
        if ours.shape != mflat[filt].shape:
            out["flat"][filt] = {"note": f"shapes differ {ours.shape} {mflat[filt].shape}"}
            continue
        ratio = ours / mflat[filt].data
        good = np.isfinite(ratio) & (mflat[filt].data > 0.5)
        out["flat"][filt] = {"file": ours_path.name, "median": float(np.median(ratio[good])),
                             "scatter": float(mad_std(ratio[good]))}
    by_stem = {stem(r.path): r for r in science}  # the package's own product names
    for p in cal[:max_frames]:
        sci, var, mask, head = product(p)
        raw = by_stem.get(p.name.replace("_CAL.fits", ""))
        if raw is None or raw.filter not in mflat:
            continue
        c = reduce(ccd(raw), raw.exptime, parse_darkmeth(str(head.get("DARKMETH", "")))[1])
        c = ccdproc.flat_correct(c, mflat[raw.filter], norm_value=1.0)
        g = float(head.get("GAIN", 1.0))
        theirs = ccdproc.gain_correct(c, g * u.electron / u.adu).data
        if theirs.shape != sci.shape:
            out["science"].append({"frame": p.name, "note": "shapes differ"})
            continue
        good = np.isfinite(sci) & np.isfinite(theirs) & (mflat[raw.filter].data > 0.5)
        if mask is not None:
            good &= mask == 0
        sigma = np.sqrt(np.clip(var, 1e-12, None)) if var is not None else np.ones_like(sci)
        bright = good & (theirs > 10 * sigma)
        f_eff = flat_divisor(out_night, head, sci.shape)
        flat_only = flat_divisor(out_night, {"MFLAT": head["MFLAT"]}, sci.shape)
        no_illum = sci * f_eff / flat_only  # ours divided by our master flat alone
        same_flat = sci * f_eff / mflat[raw.filter].data  # ... and by ccdproc's flat
        row = {"frame": p.name, "bright_pixels": int(bright.sum()),
               "sky_ours": float(np.median(sci[good])),
               "sky_ccdproc": float(np.median(theirs[good])),
               "diff_in_sigma_median": float(np.median(((sci - theirs) / sigma)[good])),
               "diff_in_sigma_scatter": float(mad_std(((sci - theirs) / sigma)[good]))}
        if bright.sum() > 20:
            row["ratio_median"] = float(np.median((sci / theirs)[bright]))
            row["ratio_scatter"] = float(mad_std((sci / theirs)[bright]))
            row["ratio_no_illum_median"] = float(np.median((no_illum / theirs)[bright]))
            row["ratio_no_illum_scatter"] = float(mad_std((no_illum / theirs)[bright]))
            row["ratio_same_flat_median"] = float(np.median((same_flat / theirs)[bright]))
            row["ratio_same_flat_scatter"] = float(mad_std((same_flat / theirs)[bright]))
        out["science"].append(row)
    return out


# --------------------------------------------------------------------------- stand-in


SBIG_TYPES = {"LIGHT": "Light Frame", "BIAS": "Bias Frame", "DARK": "Dark Frame",
              "FLAT": "Flat Field"}


def write_stand_in(folder: Path, size: int, seed: int) -> Path:
    """A simulated night written as a small telescope's camera writes one, to try this
    script where no real night can be had: one folder, SBIG-style ``IMAGETYP`` values, no
    ``ACQTYPE``, ``GAIN``, ``RDNOISE`` or ``MJD-OBS``, bias frames and darks of 10 and 300 s
    only (science 90 s: bias + scaled dark). The truth is gain 1.5 e-/ADU, read noise 10 e-.
    """
    from astep_dask.testing.simulate import SimConfig, simulate_night

    cfg = SimConfig(size=size, n_science=6, n_bias=5, n_darks=5, n_flats=7,
                    extra_dark_exptimes=(300.0,), seed=seed)
    night = simulate_night(folder / "simulated", cfg)
    raw = folder / "camera"
    raw.mkdir(parents=True, exist_ok=True)
    for path in sorted(night.rglob("*.fits")):
        if "truth" in path.parts:
            continue
        with fits.open(path) as hdul:
            head = hdul[0].header
            if head["IMAGETYP"] == "DARK" and head["EXPTIME"] == cfg.science_exptime:
                continue
            for key in ("GAIN", "RDNOISE", "ACQTYPE", "MJD-OBS"):
                head.remove(key, ignore_missing=True)
            head["IMAGETYP"] = SBIG_TYPES[head["IMAGETYP"]]
            stem = re.sub(r"_(SCIENCE|SKYFLAT|DARK|BIAS)$", "", path.name.split(".")[0])
            hdul.writeto(raw / f"{stem}.fit")
    return raw


# --------------------------------------------------------------------------- main


def summarise_raws(raws: list[Raw], report: Report) -> None:
    """Counts by kind and every file the package could not use as it is."""
    report.counts = dict(Counter(r.kind for r in raws if not r.problem))
    report.counts["unusable"] = sum(1 for r in raws if r.problem)
    shapes = Counter(r.shape for r in raws if not r.problem)
    report.counts["shapes"] = {f"{s[1]}x{s[0]}": n for s, n in shapes.items()}
    for r in raws:
        if r.problem:
            report.problems.append(f"{r.path}: {r.problem}")
    notes = Counter(re.sub(r"'[^']*'", "'…'", r.note) for r in raws if r.note)
    for note, n in notes.items():
        report.problems.append(f"{n} files: {note}")


def detector_settings(raws: list[Raw], args: argparse.Namespace, report: Report) -> dict:
    """GAIN and RDNOISE as the run gets them: the header, else a value given here (written as
    a setting), else whatever astep-dask does without one (the products' cards say)."""
    out = {}
    for name, attr, given in (("gain", "gain", args.gain),
                              ("read_noise", "read_noise", args.read_noise)):
        values = {getattr(r, attr) for r in raws if not r.problem}
        if None not in values:
            out[name] = {"value": sorted(values)[0], "source": "header", "setting": False}
        elif given is not None:
            out[name] = {"value": given, "source": args.gain_source, "setting": True}
        else:  # left to astep-dask (its own measurement or default; its card says which)
            out[name] = {"value": float("nan"), "source": "not given: left to astep-dask",
                         "setting": False}
    if any(v["setting"] for v in out.values()):
        report.by_hand.append(
            "wrote a settings file with [detector] "
            + ", ".join(f"{k} = {v['value']:.4g} ({v['source']})"
                        for k, v in out.items() if v["setting"])
            + ": the headers have no GAIN/RDNOISE")
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, nargs="?",
                   help="folder of raw FITS files, or ROOT/DATE night")
    p.add_argument("--stand-in", type=int, metavar="SIZE",
                   help="no real night: simulate one of SIZE² px as a small telescope's camera "
                        "writes it (under --work) and run on that")
    p.add_argument("--work", type=Path, help="where the layout and products go (new)")
    p.add_argument("--gain", type=float, help="e-/ADU when the headers have none")
    p.add_argument("--read-noise", type=float, help="e- when the headers have none")
    p.add_argument("--gain-source", default="given on the command line",
                   help="where --gain/--read-noise come from (data sheet, ...)")
    p.add_argument("--pairs", type=int, default=20, help="science pairs for chi per group")
    p.add_argument("--ccdproc-frames", type=int, default=10, help="science frames compared")
    p.add_argument("--no-ccdproc", action="store_true")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for astep-dask calibrate (after --extra)")
    args = p.parse_args(argv)

    work = (args.work or Path(tempfile.mkdtemp(prefix="real-night-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.stand_in:
        args.source = write_stand_in(work / "stand-in", args.stand_in, seed=3)
    elif args.source is None:
        p.error("give a SOURCE folder or --stand-in SIZE")
    src = args.source.resolve()
    report = Report(source=str(src) + (" (simulated stand-in)" if args.stand_in else ""))
    is_night = any(src.glob(f"{src.name}-CAMS*"))
    files = sorted(q for q in (src.rglob("*") if src.is_dir() else [src])
                   if q.is_file() and is_raw_name(q)
                   and not {work / "archive", work / "out"} & set(q.parents))
    raws = [read_raw(q) for q in files]
    summarise_raws(raws, report)
    usable = [r for r in raws if not r.problem]
    science = [r for r in usable if r.kind == "science"]
    if not science:
        # what the package itself says of the folder, as a user would see it
        said = run([console_script(), "arrange", str(src), str(work / "archive")])
        print("no usable science frame by this benchmark's reading; `astep-dask arrange` "
              f"says (exit {said['rc']}):\n{said['stderr'] or said['stdout']}",
              file=sys.stderr)
        print(json.dumps(asdict(report), default=str))
        return 1
    if is_night:
        night = src
    else:
        night = build_layout(src, work / "archive", report)
    report.night = night.name
    cal_frames = {k: [r for r in usable if r.kind == k] for k in ("bias", "dark", "flat")}

    rn_adu, rn_src = read_noise_adu(cal_frames["bias"], cal_frames["dark"])
    g, g_src, g_all = gain_from_flats(cal_frames["flat"], cal_frames["bias"],
                                      cal_frames["dark"], rn_adu)
    report.measured = {"read_noise_adu": rn_adu, "read_noise_source": rn_src, "gain": g,
                       "gain_source": g_src, "gain_pairs": g_all,
                       "read_noise_e": rn_adu * g if np.isfinite(g) else float("nan")}
    det = detector_settings(raws, args, report)
    report.detector = det
    settings = work / "settings.toml"
    lines = ["[detector]"]
    for name in ("gain", "read_noise"):
        if det[name]["setting"]:
            lines.append(f"{name} = {det[name]['value']!r}")
    settings.write_text("\n".join(lines) + "\n")

    exe, out = console_script(), work / "out"
    inspect = run([exe, "inspect", str(night)])
    calib = run([exe, "calibrate", str(night), "--out", str(out), "--config", str(settings),
                 "-q", *args.extra])
    for name, res in (("inspect", inspect), ("calibrate", calib)):
        report.commands[name] = {"cmd": res["cmd"], "rc": res["rc"], "seconds": res["seconds"],
                                 "notes": distinct_notes(res["stdout"] + res["stderr"]),
                                 "tail": (res["stdout"] + res["stderr"]).strip()[-1500:]}
    out_night = out / night.name
    cal = sorted(out_night.glob("*_CAL.fits"))
    report.products = {"calibrated": len(cal), "science": len(science),
                       "masters": sorted(q.name for q in out_night.glob(f"{night.name}_*.fits"))}
    if cal:
        h = fits.getheader(cal[0])
        report.products["cards"] = {k: h.get(k) for k in ("GAIN", "GAINSRC", "RDNOISE", "RDNSRC",
                                                          "BUNIT", "DARKMETH", "MILLUM")
                                    if k in h}
    if len(cal) < len(science):
        report.problems.append(f"{len(science) - len(cal)} of {len(science)} science frames "
                               "have no calibrated product")
    if cal:
        report.chi = chi_pairs(cal, out_night, cal_frames, rn_adu, g, args.pairs)
        if not args.no_ccdproc:
            report.ccdproc = ccdproc_compare(cal_frames, science, out_night, cal,
                                             args.ccdproc_frames)
    print_report(report)
    print(json.dumps(asdict(report), default=str))
    return 0 if cal else 1


def print_report(r: Report) -> None:
    """The figures in words."""
    print(f"source: {r.source}\nnight: {r.night}\nframes: {r.counts}")
    print("by hand:")
    for line in r.by_hand or ["nothing"]:
        print(f"  - {line}")
    m = r.measured
    print(f"measured from the raw frames: read noise {m['read_noise_adu']:.3f} ADU "
          f"({m['read_noise_source']}), gain {m['gain']:.3f} e-/ADU ({m['gain_source']}), "
          f"read noise {m['read_noise_e']:.2f} e-")
    cards = r.products.get("cards", {})
    for k, v in r.detector.items():
        got = f"{v['value']:.4g}" if np.isfinite(v["value"]) else "-"
        print(f"  {k} given: {got} ({v['source']})")
    print(f"  in the products: GAIN {cards.get('GAIN')} ({cards.get('GAINSRC')}), "
          f"RDNOISE {cards.get('RDNOISE')} ({cards.get('RDNSRC')})")
    for name, c in r.commands.items():
        print(f"{name}: exit {c['rc']} in {c['seconds']} s; {len(c['notes'])} distinct notes")
        for n in c["notes"][:8]:
            print(f"    {n}")
    print(f"products: { {k: v for k, v in r.products.items() if k != 'cards'} }")
    if r.chi.get("pairs"):
        c = r.chi
        print(f"chi over {c['pairs']} pairs: pipeline VAR (common master noise out) "
              f"{c['chi_pipe']:.3f}, independent {c['chi_indep']:.3f}, ratio {c['ratio']:.3f} "
              f"(pipeline VAR with nothing taken out: {c['chi_pipe_no_common']:.3f})")
    for filt, f in r.ccdproc.get("flat", {}).items():
        print(f"master flat {filt} ours/ccdproc: {f}")
    sci = [s for s in r.ccdproc.get("science", []) if "ratio_median" in s]
    if sci:
        print("science ours/ccdproc (pixels > 10 sigma): median "
              f"{np.median([s['ratio_median'] for s in sci]):.5f}, scatter "
              f"{np.median([s['ratio_scatter'] for s in sci]):.5f}; illumination taken out: "
              f"{np.median([s['ratio_no_illum_median'] for s in sci]):.5f} / "
              f"{np.median([s['ratio_no_illum_scatter'] for s in sci]):.5f}; same flat: "
              f"{np.median([s['ratio_same_flat_median'] for s in sci]):.7f} / "
              f"{np.median([s['ratio_same_flat_scatter'] for s in sci]):.2e}; "
              f"(ours - ccdproc)/sigma: median "
              f"{np.median([s['diff_in_sigma_median'] for s in sci]):.3f}, scatter "
              f"{np.median([s['diff_in_sigma_scatter'] for s in sci]):.3f}")
    print("problems:")
    for line in r.problems or ["none"]:
        print(f"  - {line}")


if __name__ == "__main__":
    sys.exit(main())
