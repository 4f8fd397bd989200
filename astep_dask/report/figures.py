"""The report's figures: the masters, the bad-pixel mask, per-frame time series, one
calibrated frame with its mask overlays, thumbnails of the flagged frames.

Each ``fig_*`` function returns a matplotlib :class:`~matplotlib.figure.Figure` (not
pyplot's: nothing global, safe in threads and on a headless machine; a notebook shows it as
is), drawn with a z-scale stretch and pixel axes; :func:`write_plots` draws the whole set
of a night's report and writes each as PNG (:func:`save_figure`, atomically).
:func:`master_figures` measures a master file (level, scatter, noise, hot and dead pixels,
a flat's gradient) for ``qa.json``.

Images larger than the figure are binned by whole blocks before drawing
(:func:`shrink_for_display`), and matplotlib is imported only when a figure is drawn, so
that importing the report (on a worker, in the command line) stays light.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy import ndimage

from astep_dask.config import QaSettings
from astep_dask.core.bits import Bit, flag
from astep_dask.core.stats import robust_sigma
from astep_dask.io.fitsio import atomic_open, image_of, read_calibrated, read_image
from astep_dask.io.headers import exposure_time
from astep_dask.io.products import CAL_SUFFIX, safe_part
from astep_dask.io.stack import read_section
from astep_dask.report.metrics import block_reduce, plane_gradient

__all__ = [
    "MASK_COLOURS",
    "OVERLAYS",
    "TIMESERIES",
    "draw_image",
    "fig_flagged",
    "fig_frame",
    "fig_mask",
    "fig_master",
    "fig_raw_vs_calibrated",
    "fig_timeseries",
    "master_figures",
    "new_figure",
    "overlay_rgba",
    "save_figure",
    "shrink_for_display",
    "write_plots",
    "zscale_limits",
]


def zscale_limits(image: np.ndarray, max_samples: int = 100_000) -> tuple[float, float]:
    """Display limits of the z-scale stretch (IRAF's, via astropy) over finite pixels."""
    from astropy.visualization import ZScaleInterval

    v = np.asarray(image)[np.isfinite(image)]
    if v.size == 0:
        return 0.0, 1.0
    if v.size > max_samples:
        v = v[:: v.size // max_samples]
    lo, hi = ZScaleInterval().get_limits(v)
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max()) + 1e-6
    return float(lo), float(hi)


def master_figures(label: str, path: Path, mask: np.ndarray | None = None) -> dict:
    """Level, spatial scatter and noise of a master; hot/dead counts of the mask; the
    large-scale gradient of a flat."""
    with fits.open(path, memmap=False) as hdul:
        header, data = image_of(hdul)
        names = [h.name for h in hdul]
        inputs = (np.asarray(hdul["INPUTS"].data["LEVEL"], float)
                  if "INPUTS" in names and "LEVEL" in hdul["INPUTS"].columns.names else None)
    role = label.split()[0]
    row: dict = {"label": label, "file": path.name, "role": role,
                 "shape": list(data.shape), "ncombine": header.get("NCOMBINE")}
    if role == "mask":
        m = data.astype(np.int64)
        row.update(n_hot=int(np.count_nonzero(m & flag(Bit.HOT))),
                   n_dead=int(np.count_nonzero(m & flag(Bit.DEAD))),
                   n_bad=int(np.count_nonzero(m & flag(Bit.BAD))),
                   frac_bad=float(np.count_nonzero(m) / max(m.size, 1)))
        return row
    good = np.isfinite(data) if mask is None else (np.isfinite(data) & (mask == 0))
    values = data[good].astype(np.float64)
    row.update(
        unit="relative" if role in ("flat", "illum") else "adu",
        level=float(np.median(values)) if values.size else float("nan"),
        scatter=robust_sigma(values),
        noise=float(header["NOISE"]) if "NOISE" in header else None,
        p01=float(np.percentile(values, 1)) if values.size else float("nan"),
        p99=float(np.percentile(values, 99)) if values.size else float("nan"),
    )
    if role == "dark":
        row["exptime"] = exposure_time(header)
    if role == "illum":
        row.update(amplitude=float(header.get("ILLAMP", np.nan)),
                   correction_noise=float(header.get("ILLNOISE", np.nan)),
                   nreject=header.get("NREJECT"), fallback=header.get("FALLBACK"))
    if role in ("flat", "illum"):
        row["filter"] = str(header.get("FILTER", ""))
        b = max(1, min(data.shape) // 16)
        grid = block_reduce(np.where(good, data, np.nan), b, np.nanmedian)
        ey = np.minimum(np.arange(grid.shape[0] + 1) * b, data.shape[0])
        ex = np.minimum(np.arange(grid.shape[1] + 1) * b, data.shape[1])
        ok = np.isfinite(grid)
        if ok.all():
            ptp, angle = plane_gradient(grid, ey, ex)
            row.update(gradient=ptp / row["level"], gradient_angle=angle)
        if inputs is not None and inputs.size:
            row.update(input_level_min=float(inputs.min()), input_level_max=float(inputs.max()))
    return row


# --------------------------------------------------------------------------- figures


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A matplotlib Figure of ``width`` x ``height`` inches at 100 dpi, not pyplot's (so
    nothing global), with matplotlib's ``constrained`` layout unless told otherwise."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def shrink_for_display(image: np.ndarray, limit: int, func: Callable = np.nanmean
                       ) -> tuple[np.ndarray, int]:
    """An image reduced by whole blocks (``func`` over each, by :func:`block_reduce`) to
    at most ``limit`` px a side, and the factor; the image itself when small enough."""
    b = max(1, int(np.ceil(max(image.shape) / max(limit, 1))))
    if b == 1:
        return image, 1
    return block_reduce(image, b, func), b


def draw_image(ax, image: np.ndarray, unit: str, title: str, limit: int = 800,
               cmap: str = "gray", colorbar: bool = True):
    """Draw an image with a z-scale stretch, pixel axes and a colour bar in ``unit``."""
    shown, _ = shrink_for_display(np.asarray(image, np.float32), limit)
    lo, hi = zscale_limits(shown)
    ny, nx = image.shape
    im = ax.imshow(shown, origin="lower", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest",
                   extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(title, fontsize=10)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.02)
        cb.set_label(unit)
    return im


def fig_master(path: Path, label: str, settings: QaSettings | None = None):
    """A master frame with a z-scale stretch and a colour bar (ADU, or relative response
    for a flat)."""
    settings = settings or QaSettings()
    data = np.asarray(read_image(path)[1], np.float32)
    unit = "relative response (median 1)" if label.startswith("flat") else "ADU"
    fig = new_figure(6.4, 5.4)
    ax = fig.add_subplot()
    draw_image(ax, data, unit, f"{label}: {path.name}\nz-scale stretch", settings.thumbnail,
               cmap="viridis" if label.startswith("flat") else "gray")
    return fig


def illum_profiles(path: Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]:
    """An illumination correction in per cent of its median, and its profiles along x and
    y (medians over the other axis); with its header."""
    header, data = read_image(path)
    pct = 100 * (np.asarray(data, np.float32) / np.nanmedian(data) - 1)
    return header, pct, np.nanmedian(pct, axis=0), np.nanmedian(pct, axis=1)


def fig_illum(path: Path, label: str, settings: QaSettings | None = None):
    """The illumination correction: its image and its profiles along x and y (medians
    over the other axis), in per cent of its median."""
    settings = settings or QaSettings()
    header, pct, along_x, along_y = illum_profiles(path)
    fig = new_figure(11.0, 4.6)
    ax_img, ax_prof = fig.subplots(1, 2, width_ratios=[1.1, 1])
    amp = 100 * float(header.get("ILLAMP", np.nan))
    draw_image(ax_img, pct, "% of median", f"{label}: {path.name}\npeak to peak {amp:.2f} %",
               settings.thumbnail, cmap="viridis")
    ax_prof.plot(np.arange(pct.shape[1]), along_x, label="along x")
    ax_prof.plot(np.arange(pct.shape[0]), along_y, label="along y")
    ax_prof.set_xlabel("x or y [px]")
    ax_prof.set_ylabel("correction [% of median]")
    used = header.get("NCOMBINE", "?")
    note = f", fallback {header['FALLBACK']}" if "FALLBACK" in header else ""
    ax_prof.set_title(f"profiles ({used} frames, {header.get('NREJECT', 0)} rejected{note})",
                      fontsize=10)
    ax_prof.legend()
    ax_prof.grid(alpha=0.3)
    return fig


MASK_COLOURS = {"hot": "#d62728", "dead": "#1f77b4", "bad (other)": "#ff7f0e"}


def _mask_classes(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels of each class of :data:`MASK_COLOURS`: hot, dead, other bad."""
    m = np.asarray(mask, np.int64)
    hot = (m & flag(Bit.HOT)) != 0
    dead = (m & flag(Bit.DEAD)) != 0
    other = ((m & flag(Bit.BAD)) != 0) & ~hot & ~dead
    return {"hot": hot, "dead": dead, "bad (other)": other}


def fig_mask(path: Path, settings: QaSettings | None = None):
    """The bad-pixel mask: hot, dead and other bad pixels, each with its count."""
    settings = settings or QaSettings()
    mask = read_image(path)[1]
    ny, nx = mask.shape
    fig = new_figure(6.4, 5.6)
    ax = fig.add_subplot()
    ax.set_facecolor("#f4f4f4")
    for name, where in _mask_classes(mask).items():
        ys, xs = np.nonzero(where)
        if ys.size > 200_000:
            sel = np.linspace(0, ys.size - 1, 200_000).astype(int)
            ys, xs = ys[sel], xs[sel]
        # squares of ~1.5 image pixels, never smaller than ~2 screen pixels
        size = max(2.0, (1.5 * 0.72 * 450 / max(ny, nx)) ** 2)
        ax.scatter(xs, ys, s=size, marker="s", linewidths=0,
                   color=MASK_COLOURS[name], label=f"{name}: {int(where.sum())} px")
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_aspect("equal")
    ax.set_xlabel("x [px]")
    ax.set_ylabel("y [px]")
    ax.set_title(f"bad-pixel mask: {path.name}", fontsize=10)
    ax.legend(loc="upper right", fontsize=8, markerscale=3, framealpha=0.9)
    return fig


def _times(frames: Sequence[dict]) -> list[dt.datetime]:
    """Each frame's mid-exposure as a datetime (UTC) from its MJD; the MJD epoch when it
    has none."""
    base = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
    return [base + dt.timedelta(days=f["mjd"]) if f.get("mjd") is not None
            and np.isfinite(f["mjd"]) else base for f in frames]


TIMESERIES = (  # key, axis label, scale, the reasons this figure flags
    ("sky", "sky [e-]", 1.0, ("sky", "cloud")),
    ("noise", "sky noise [e-]", 1.0, ()),
    ("fwhm", "PSF FWHM [px]", 1.0, ("defocus",)),
    ("transparency", "star flux\n[night median = 1]", 1.0, ("cloud",)),
    ("coverage", "longest streak\n[% of its path]", 100.0, ("trail",)),
    ("frac_masked", "pixels [%]", 100.0, ()),
    ("gradient", "sky gradient\nacross frame [%]", 100.0, ()),
)


def _series(frames: Sequence[dict], key: str) -> np.ndarray:
    """The frames' values of ``key`` (a streak's coverage for ``coverage``; NaN where
    missing)."""
    if key == "coverage":
        return np.array([(f.get("streak") or {}).get("coverage", 0.0) for f in frames], float)
    return np.array([np.nan if f.get(key) is None else f[key] for f in frames], float)


def fig_timeseries(frames: Sequence[dict], settings: QaSettings | None = None):
    """Per-frame figures against time (UTC): flagged frames shaded and named, the figure
    that flagged each marked with a cross, flag thresholds dashed."""
    from matplotlib.dates import DateFormatter

    s = settings or QaSettings()
    times = _times(frames)
    fig = new_figure(9.0, 12.5, layout=None)  # fixed margins: much faster than constrained
    fig.subplots_adjust(left=0.11, right=0.82, top=0.93, bottom=0.05, hspace=0.12)
    axes = fig.subplots(len(TIMESERIES), 1, sharex=True)
    flagged = [i for i, f in enumerate(frames) if f.get("flags")]
    fwhm = _series(frames, "fwhm")
    limits = {
        "fwhm": s.defocus_jump * np.nanmedian(fwhm) if np.isfinite(fwhm).any() else None,
        "transparency": 1.0 - s.cloud_drop,
        "coverage": s.trail_coverage,
    }
    for ax, (key, label, scale, reasons) in zip(axes, TIMESERIES, strict=True):
        if key == "frac_masked":
            for k, name, style in (("frac_masked", "masked (any bit)", "o-"),
                                   ("frac_saturated", "saturated", "s-"),
                                   ("frac_cr", "cosmic rays", "^-")):
                v = _series(frames, k) * scale
                ax.plot(times, np.where(v > 0, v, np.nan), style, ms=3, lw=0.8, label=name)
            ax.set_yscale("log")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.plot(times, _series(frames, key) * scale, "o-", ms=3, lw=0.8, color="#1f77b4")
        if limits.get(key) is not None:
            ax.axhline(limits[key] * scale, color="#d62728", ls="--", lw=0.8,
                       label="flag threshold")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        v = _series(frames, key)
        for i in flagged:
            ax.axvline(times[i], color="#d62728", alpha=0.2, lw=4)
            if any(fl["reason"] in reasons for fl in frames[i]["flags"]) and np.isfinite(v[i]):
                ax.plot([times[i]], [v[i] * scale], "x", color="#d62728", ms=9, mew=2)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    top = axes[0]
    for i in flagged[:40]:  # beyond that, names would only hide each other
        text = ", ".join(fl["reason"] for fl in frames[i]["flags"])
        top.annotate(text, (times[i], 1.0), xycoords=("data", "axes fraction"),
                     xytext=(0, 4), textcoords="offset points", ha="left", va="bottom",
                     fontsize=8, color="#d62728", rotation=30)
    axes[-1].set_xlabel("time [UTC], mid-exposure")
    axes[-1].xaxis.set_major_formatter(DateFormatter("%H:%M"))
    fig.suptitle("per-frame figures (red band: a flagged frame; x: the figure that flagged it; "
                 "dashed: flag threshold)", fontsize=10)
    return fig


OVERLAYS = (  # (name, bits, RGBA), drawn in this order: later wins
    ("bad", flag(Bit.BAD, Bit.HOT, Bit.DEAD), (0.1, 0.6, 1.0, 0.8)),
    ("no data", flag(Bit.NO_DATA), (0.6, 0.6, 0.6, 0.8)),
    ("saturated", flag(Bit.SAT), (1.0, 0.6, 0.0, 0.9)),
    ("cosmic ray", flag(Bit.CR), (1.0, 0.0, 1.0, 0.95)),
)


def overlay_rgba(mask: np.ndarray, factor: int = 1) -> np.ndarray:
    """RGBA image of mask classes (bad, no data, saturated, cosmic ray), binned by
    ``factor`` with a block maximum so that a single flagged pixel stays visible."""
    m = block_reduce(np.asarray(mask, np.int64), factor, np.bitwise_or.reduce) if factor > 1 \
        else np.asarray(mask, np.int64)
    rgba = np.zeros((*m.shape, 4), np.float32)
    for _, bits, colour in OVERLAYS:
        rgba[(m & bits) != 0] = colour
    return rgba


def _busiest(mask: np.ndarray, bits: int, size: int) -> tuple[slice, slice]:
    """The ``size`` x ``size`` window holding most pixels with ``bits``."""
    ny, nx = mask.shape
    size = min(size, ny, nx)
    hits = ((mask & bits) != 0).astype(np.float32)
    dens = ndimage.uniform_filter(hits, size, mode="constant")
    y, x = np.unravel_index(int(np.argmax(dens)), dens.shape)
    y0 = int(np.clip(y - size // 2, 0, ny - size))
    x0 = int(np.clip(x - size // 2, 0, nx - size))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def fig_frame(path: Path, settings: QaSettings | None = None, zoom: int = 96):
    """One calibrated frame (SCI, z-scale) with mask overlays, whole and zoomed on the
    area with most cosmic-ray pixels."""
    from matplotlib.patches import Patch, Rectangle

    settings = settings or QaSettings()
    _, sci, _, mask = read_calibrated(path)
    ny, nx = sci.shape
    fig = new_figure(12.0, 5.6)
    ax1, ax2 = fig.subplots(1, 2)
    draw_image(ax1, sci, "e-", f"{path.name}\nSCI, z-scale, mask overlays",
               settings.thumbnail, colorbar=False)
    _, b = shrink_for_display(sci, settings.thumbnail)
    ax1.imshow(overlay_rgba(mask, b), origin="lower", interpolation="nearest",
               extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
    rows, cols = _busiest(mask, flag(Bit.CR), zoom)
    ax1.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start,
                            rows.stop - rows.start, fill=False, ec="yellow", lw=1.2))
    lo, hi = zscale_limits(sci)
    sub = sci[rows, cols]
    im = ax2.imshow(sub, origin="lower", cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                    extent=(cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5))
    over = overlay_rgba(mask[rows, cols])
    over[..., 3] *= 0.55
    ax2.imshow(over, origin="lower", interpolation="nearest",
               extent=(cols.start - 0.5, cols.stop - 0.5, rows.start - 0.5, rows.stop - 0.5))
    ax2.set_xlabel("x [px]")
    ax2.set_ylabel("y [px]")
    ax2.set_title("zoom (yellow box): the area with most cosmic-ray pixels", fontsize=10)
    cb = fig.colorbar(im, ax=[ax1, ax2], shrink=0.85, pad=0.02)
    cb.set_label("SCI [e-]")
    counts = {name: int(np.count_nonzero(mask & bits)) for name, bits, _ in OVERLAYS}
    ax2.legend(handles=[Patch(color=c[:3], label=f"{n}: {counts[n]} px") for n, _, c in OVERLAYS],
               loc="upper right", fontsize=8, framealpha=0.85)
    return fig


def fig_flagged(frames: Sequence[dict], out_dir: Path, settings: QaSettings | None = None,
                limit: int = 8):
    """Thumbnails of the flagged frames (up to ``limit``), each titled with its reasons and
    with the streak drawn when there is one; None when no frame is flagged."""
    settings = settings or QaSettings()
    bad = [f for f in frames if f.get("flags")][:limit]
    if not bad:
        return None
    ncol = min(4, len(bad))
    nrow = int(np.ceil(len(bad) / ncol))
    fig = new_figure(3.6 * ncol + 0.8, 3.7 * nrow)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    im = None
    for ax, f in zip(axes, bad, strict=False):
        _, sci, _, _ = read_calibrated(out_dir / f["file"])
        ny, nx = sci.shape
        reasons = ", ".join(fl["reason"] for fl in f["flags"])
        im = draw_image(ax, sci, "e-", f"{f['file'].removesuffix(CAL_SUFFIX)}\n{reasons}",
                        min(settings.thumbnail, 400), colorbar=False)
        st = f.get("streak")
        if st and any(fl["reason"] == "trail" for fl in f["flags"]):
            ax.plot([st["x0"], st["x1"]], [st["y0"], st["y1"]], color="#d62728", lw=1.0,
                    alpha=0.6, ls="--")
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(-0.5, ny - 0.5)
    for ax in axes[len(bad):]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[: len(bad)]), shrink=0.8, pad=0.02).set_label(
            "SCI [e-] (each panel its own z-scale)")
    return fig


def fig_raw_vs_calibrated(raw_path: Path, cal_path: Path, settings: QaSettings | None = None):
    """A raw frame (ADU) next to its calibrated frame (e-), each with a z-scale stretch."""
    settings = settings or QaSettings()
    raw = read_section(raw_path, 0 if not raw_path.name.endswith(".fz") else 1,
                       slice(None), slice(None))
    _, sci, _, _ = read_calibrated(cal_path)
    fig = new_figure(12.0, 5.4)
    ax1, ax2 = fig.subplots(1, 2)
    draw_image(ax1, raw, "ADU", f"raw: {raw_path.name}", settings.thumbnail)
    draw_image(ax2, sci, "e-", f"calibrated: {cal_path.name}", settings.thumbnail)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG at 100 dpi, atomically (:func:`astep_dask.io.fitsio.
    atomic_open`), and return its path."""
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    return path


def write_plots(report: dict, out_dir: Path, folder: Path, settings: QaSettings) -> dict:
    """Draw every plot of the report into ``folder``; returns ``{name: file name}``."""
    plots: dict[str, str] = {}
    masters = {m["label"]: out_dir / m["file"] for m in report["masters"]}
    for label, path in masters.items():
        if not path.exists():
            continue
        name = "mask.png" if label == "mask" else f"master_{safe_part(label.replace(' ', '_'))}.png"
        fig = (fig_mask(path, settings) if label == "mask"
               else fig_illum(path, label, settings) if label.startswith("illum")
               else fig_master(path, label, settings))
        plots[label] = save_figure(fig, folder / name).name
    frames = report["frames"]
    if frames:
        plots["timeseries"] = save_figure(fig_timeseries(frames, settings),
                                          folder / "timeseries.png").name
        good = [f for f in frames if not f["flagged"]] or frames
        mids = np.array([f.get("mjd") or 0.0 for f in good])
        pick = good[int(np.argmin(np.abs(mids - np.median(mids))))]
        plots["frame"] = save_figure(fig_frame(out_dir / pick["file"], settings),
                                     folder / "frame.png").name
        report["summary"]["frame_shown"] = pick["file"]
        fig = fig_flagged(frames, out_dir, settings)
        if fig is not None:
            plots["flagged"] = save_figure(fig, folder / "flagged.png").name
    return plots
