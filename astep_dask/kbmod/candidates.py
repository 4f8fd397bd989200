"""The search's products: the candidates table and a postage stamp per candidate.

:func:`~astep_dask.kbmod.search.search_night` writes ``DATE_CANDIDATES.csv`` (one row per
candidate, :data:`CSV_COLUMNS`; :func:`write_candidates`, read back by
:func:`read_candidates`) and, for the best candidates, a PNG of the stamps along the
trajectory (:func:`stamp_mosaic`: the coadd and single frames in units of their noise;
:func:`stamp_png`, run as a worker task). Both are written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from astep_dask.io.fitsio import atomic_open, atomic_write_text

__all__ = ["CSV_COLUMNS", "SKY_COLUMNS", "read_candidates", "sky_positions", "stamp_mosaic",
           "stamp_png", "write_candidates"]

CSV_COLUMNS = ("x", "y", "vx", "vy", "flux", "snr", "n_frames", "flux_err", "x_end", "y_end",
               "ra", "dec", "ra_end", "dec_end", "stamp")
SKY_COLUMNS = ("ra", "dec", "ra_end", "dec_end")  # deg, ICRS; nan without a WCS


def stamp_mosaic(stamps: np.ndarray, n_show: int = 12) -> tuple[np.ndarray, list[int]]:
    """One image of a candidate's stamps ``(frame, sci/var/mask, y, x)`` in units of each
    one's noise: the inverse-variance weighted coadd along the trajectory, twice the size,
    on the left, then up to ``n_show`` single frames (evenly spread) in two rows; NaN where
    masked and between panels. Returns the mosaic and the frames shown."""
    sci, var, mask = stamps[:, 0], stamps[:, 1], stamps[:, 2]
    usable = (mask == 0) & np.isfinite(sci) & np.isfinite(var) & (var > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(usable, 1.0 / np.where(usable, var, 1.0), 0.0)
        wsum = w.sum(axis=0)
        # the weighted mean in units of its own noise: Σ w·sci / √Σ w
        coadd = np.where(wsum > 0, (np.where(usable, sci, 0) * w).sum(axis=0)
                         / np.sqrt(np.where(wsum > 0, wsum, 1.0)), np.nan)
        z = np.where(usable, sci / np.sqrt(np.where(usable, var, 1.0)), np.nan)
    show = list(np.unique(np.round(np.linspace(0, len(stamps) - 1,
                                               min(len(stamps), n_show))).astype(int)))
    size = stamps.shape[-1]
    cols = (len(show) + 1) // 2
    gap = 1
    height = 2 * size + gap
    width = 2 * size + gap + cols * (size + gap)
    out = np.full((height, width), np.nan, np.float32)
    out[: 2 * size, : 2 * size] = np.kron(coadd, np.ones((2, 2)))
    for j, i in enumerate(show):
        r = 0 if j % 2 == 0 else size + gap
        c = 2 * size + gap + (j // 2) * (size + gap)
        out[r: r + size, c: c + size] = z[i]
    return out, show


def stamp_png(path: Path, stamps: np.ndarray, row: dict, dt: np.ndarray) -> Path:
    """PNG of one candidate (:func:`stamp_mosaic`, in σ, grey from −3 to +8, masked pixels
    dark red), titled with its SNR, flux and velocity."""
    # matplotlib is slow to import: only when stamps are drawn (on the workers)
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    mosaic, show = stamp_mosaic(stamps)
    h, w = mosaic.shape
    fig = Figure(figsize=(max(w / 18, 3.0), h / 18 + 0.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, h / 18 / (h / 18 + 0.5)))
    cmap = mpl.colormaps["gray"].with_extremes(bad="#5a1010")
    ax.imshow(np.ma.masked_invalid(mosaic), origin="lower", cmap=cmap, vmin=-3, vmax=8,
              interpolation="nearest")
    ax.set_axis_off()
    hours = ", ".join(f"{dt[i] * 24:.2f}" for i in (show[0], show[-1]))
    fig.suptitle(f"#{row['rank']}  x {row['x']:.1f} y {row['y']:.1f}  v ({row['vx']:.0f}, "
                 f"{row['vy']:.0f}) px/d  SNR {row['snr']:.1f}  flux {row['flux']:.0f} e-  "
                 f"[coadd | frames {hours} h]", fontsize=6, y=0.99, va="top")
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png")
    return path


def sky_positions(rows: list[dict], wcs: fits.Header | None) -> list[dict]:
    """The rows with ``ra``, ``dec`` (at ``x``, ``y``: the first frame's time) and
    ``ra_end``, ``dec_end`` (at ``x_end``, ``y_end``) in degrees through the grid's WCS
    (0-based pixels); NaN when there is no WCS."""
    out = [dict(r) for r in rows]
    if wcs is None or not out:
        for r in out:
            r.update(dict.fromkeys(SKY_COLUMNS, float("nan")))
        return out
    w = WCS(wcs).celestial
    for a, b, x, y in (("ra", "dec", "x", "y"), ("ra_end", "dec_end", "x_end", "y_end")):
        ra, dec = w.all_pix2world([r[x] for r in out], [r[y] for r in out], 0)
        for r, u, v in zip(out, ra, dec, strict=True):
            r[a], r[b] = float(u), float(v)
    return out


def write_candidates(path: Path, rows: list[dict]) -> Path:
    """The candidates table as CSV (header line, one row per candidate), atomically; sky
    positions with 7 decimals (0.03"), other numbers with 3."""
    lines = [",".join(CSV_COLUMNS)]
    for r in rows:
        lines.append(",".join(
            (f"{r[c]:.7f}" if c in SKY_COLUMNS else f"{r[c]:.3f}") if isinstance(r[c], float)
            else str(r[c]) for c in CSV_COLUMNS))
    return atomic_write_text(path, "\n".join(lines) + "\n")


def read_candidates(path: Path) -> list[dict]:
    """Rows of a candidates CSV (numbers as int or float)."""
    lines = Path(path).read_text().splitlines()
    names = lines[0].split(",")
    rows = []
    for line in lines[1:]:
        row: dict = {}
        for name, value in zip(names, line.split(","), strict=True):
            if name in ("rank", "n_frames"):
                row[name] = int(value)
            elif name == "stamp":
                row[name] = value
            else:
                row[name] = float(value)
        rows.append(row)
    return rows

