"""Trends across the nights of a season: what ran, what failed, what drifted.

:func:`season_rows` reads a season's ``season.json`` (written by
:func:`astep_dask.run.season.write_season_report`) and, for each night that has output,
its manifest and masters: one row per night with its status, frames calibrated and
failed, the median level of every frame, the master dark levels, the master flats, and the
hot and dead pixels of its mask. :func:`fig_season` draws those rows night by night;
:func:`flat_ratios` and :func:`fig_flat_ratios` divide each night's master flat by the
first night's, where moving dust or a new defect stands out. Only files are read: the
season's nights are not re-measured.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

from astep_dask.config import QaSettings
from astep_dask.core.stats import robust_sigma
from astep_dask.io.fitsio import read_image
from astep_dask.io.products import master_files, read_manifest
from astep_dask.report.figures import (
    illum_profiles,
    master_figures,
    new_figure,
    shrink_for_display,
    zscale_limits,
)

__all__ = ["STATUS_COLOURS", "fig_flat_ratios", "fig_illum_season", "fig_season", "flat_ratios",
           "season_rows"]


def season_rows(folder: str | Path) -> list[dict]:
    """One row per night of a season, from ``season.json`` in ``folder`` and each night's
    manifest and masters: status, frames calibrated and failed, per-frame median levels,
    master dark levels (ADU, per exposure time), flat files, hot and dead pixel counts.

    A night without output (failed before its masters) keeps its status and reason only.
    """
    folder = Path(folder)
    season = json.loads((folder / "season.json").read_text())
    rows = []
    for n in season.get("nights", []):
        row = {"night": n["night"], "status": n["status"], "frames": n.get("done", 0),
               "failed": n.get("failed", 0), "reason": n.get("reason", ""),
               "seconds": n.get("seconds"), "output": n.get("output", "")}
        out_dir = Path(row["output"]) if row["output"] else None
        manifest = read_manifest(out_dir) if out_dir and out_dir.is_dir() else {}
        if manifest:
            frames = manifest.get("frames", [])
            row["frames"] = sum(f.get("status") in ("done", "skipped") for f in frames)
            row["failed"] = sum(f.get("status") == "failed" for f in frames)
            # The median of each frame's unmasked pixels ("sky" in earlier manifests).
            level = [f.get("median", f.get("sky")) for f in frames]
            row["median"] = [v for v in level if v is not None]
            row["mjd"] = [f["mjd"] for f, v in zip(frames, level, strict=True) if v is not None]
            masters = master_files(out_dir, manifest)
            row["dark_levels"] = {}
            for label, path in masters.items():
                if label.startswith("dark"):
                    et = label.split()[1].removesuffix("s")
                    row["dark_levels"][et] = float(np.median(read_image(path)[1]))
                elif label.startswith("flat"):
                    row.setdefault("flats", {})[label.split(" ", 1)[1]] = str(path)
                elif label == "mask":
                    m = master_figures("mask", path)
                    row.update(n_hot=m["n_hot"], n_dead=m["n_dead"])
                elif label.startswith("illum"):
                    filt = label.split(" ", 1)[1] if " " in label else ""
                    row.setdefault("illums", {})[filt] = str(path)
                    row.setdefault("illum_amplitude", {})[filt] = float(
                        fits.getval(path, "ILLAMP", default=np.nan))
        rows.append(row)
    return rows


STATUS_COLOURS = {"complete": "#2ca02c", "skipped": "#98df8a", "partial": "#ff7f0e",
                  "failed": "#d62728"}


def fig_season(rows: Sequence[dict]):
    """Season overview: frames per night coloured by status, frame medians, master dark
    levels and hot/dead pixel counts, night by night."""
    fig = new_figure(10.0, 10.0)
    axes = fig.subplots(4, 1, sharex=True)
    x = np.arange(len(rows))
    names = [r["night"] for r in rows]
    ax = axes[0]
    ax.bar(x, [r["frames"] for r in rows], color=[STATUS_COLOURS.get(r["status"], "grey")
                                                 for r in rows], label="calibrated")
    ax.bar(x, [r["failed"] for r in rows], bottom=[r["frames"] for r in rows],
           color="#d62728", alpha=0.5, label="failed frames")
    for i, r in enumerate(rows):
        ax.annotate(r["status"], (i, r["frames"] + r["failed"]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8,
                    color=STATUS_COLOURS.get(r["status"], "black"))
    ax.set_ylabel("frames")
    ax.set_title("frames per night (bar colour: night status)", fontsize=10)
    ax.set_ylim(0, 1.25 * max([r["frames"] + r["failed"] for r in rows] + [1]))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax = axes[1]
    for i, r in enumerate(rows):
        sky = np.asarray(r.get("median", []), float)
        if sky.size:
            jitter = np.linspace(-0.2, 0.2, sky.size)
            ax.plot(i + jitter, sky, "o", ms=3, color="#1f77b4", alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [np.median(sky)] * 2, color="k", lw=1.5)
    ax.set_ylabel("frame median [e-]")
    ax.set_title("median of each frame's unmasked pixels (line: night median)", fontsize=10)
    ax = axes[2]
    exptimes = sorted({et for r in rows for et in r.get("dark_levels", {})}, key=float)
    for et in exptimes:
        v = [r.get("dark_levels", {}).get(et, np.nan) for r in rows]
        ax.plot(x, v, "o-", label=f"{et} s")
    ax.set_ylabel("master dark\nmedian [ADU]")
    ax.set_title("master dark level (bias + dark current)", fontsize=10)
    if exptimes:
        ax.legend(fontsize=8, title="exposure", title_fontsize=8, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0))
    ax = axes[3]
    for key, name, colour in (("n_hot", "hot", "#d62728"), ("n_dead", "dead", "#1f77b4")):
        ax.plot(x, [r.get(key, np.nan) for r in rows], "o-", color=colour, label=name)
    ax.set_ylabel("pixels")
    ax.set_title("bad pixels in each night's mask", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xticks(x, names, rotation=30, ha="right")
    axes[-1].set_xlabel("night")
    for a in axes:
        a.grid(alpha=0.3)
    return fig


def flat_ratios(rows: Sequence[dict], filter: str | None = None
                ) -> tuple[str, list[tuple[str, np.ndarray]], list[str]]:
    """Each night's master flat divided by a reference night's (same filter): 1 where the
    response did not change; dust moving or a new flat-field defect shows up.

    The reference is the first night of the most common flat shape; nights whose flat has
    another shape (another binning or window) cannot be divided by it and are left out.

    Returns
    -------
    reference, ratios, left_out
        The reference night, ``[(night, ratio image)]`` for the other nights of its
        shape, and ``["night (ny x nx)"]`` for the nights left out.
    """
    with_flats = [r for r in rows if r.get("flats")]
    if not with_flats:
        return "", [], []
    filt = filter or sorted(with_flats[0]["flats"])[0]
    have = [(r["night"], np.asarray(read_image(r["flats"][filt])[1], np.float32))
            for r in with_flats if filt in r["flats"]]
    shapes = Counter(flat.shape for _, flat in have)
    common = shapes.most_common(1)[0][0]  # on a tie, the shape met first
    same = [(n, f) for n, f in have if f.shape == common]
    left_out = [f"{n} ({f.shape[0]} x {f.shape[1]})" for n, f in have if f.shape != common]
    ref_night, ref = same[0]
    out = []
    for night, flat in same[1:]:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ref > 0.05, flat / ref, np.nan)
        out.append((night, ratio))
    return ref_night, out, left_out


def fig_flat_ratios(rows: Sequence[dict], filter: str | None = None,
                    settings: QaSettings | None = None):
    """Master-flat stability: each night's flat over the first night's, one panel per
    night, on a common stretch (the widest z-scale of the ratios) with a colour bar."""
    settings = settings or QaSettings()
    ref, ratios, left_out = flat_ratios(rows, filter)
    other = (f"; left out, flats of another size: {', '.join(left_out)}" if left_out else "")
    if not ratios:
        fig = new_figure(6.0, 2.0)
        fig.text(0.5, 0.5, "fewer than two nights with a master flat of one size: no ratio "
                 f"to show{other}", ha="center", va="center", wrap=True)
        return fig
    limits = [zscale_limits(r) for _, r in ratios]
    lo, hi = min(a for a, _ in limits), max(b for _, b in limits)
    half = max(abs(1 - lo), abs(hi - 1), 1e-4)
    ncol = min(3, len(ratios))
    nrow = int(np.ceil(len(ratios) / ncol))
    fig = new_figure(4.2 * ncol + 1.0, 4.0 * nrow + 0.4)
    axes = np.atleast_1d(fig.subplots(nrow, ncol)).ravel()
    im = None
    for ax, (night, ratio) in zip(axes, ratios, strict=False):
        shown, _ = shrink_for_display(ratio, settings.thumbnail)
        ny, nx = ratio.shape
        im = ax.imshow(shown, origin="lower", cmap="RdBu_r", vmin=1 - half, vmax=1 + half,
                       interpolation="nearest", extent=(-0.5, nx - 0.5, -0.5, ny - 0.5))
        ax.set_title(f"{night} / {ref}\nrobust scatter {robust_sigma(ratio):.2e}", fontsize=9)
        ax.set_xlabel("x [px]")
        ax.set_ylabel("y [px]")
    for ax in axes[len(ratios):]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[: len(ratios)]), shrink=0.85).set_label(
        "flat ratio (1 = unchanged)")
    fig.suptitle(f"master-flat stability across nights{other}", fontsize=10)
    return fig


def fig_illum_season(rows: Sequence[dict], filter: str | None = None):
    """Illumination-correction stability: its peak-to-peak amplitude night by night, and
    each night's profiles along x and y (medians over the other axis) overlaid."""
    have = [r for r in rows if r.get("illums")]
    if not have:
        fig = new_figure(6.0, 2.0)
        fig.text(0.5, 0.5, "no night has an illumination correction (too few science "
                 "frames, or [illum] switched off)", ha="center", va="center", wrap=True)
        return fig
    filt = filter or sorted(have[0]["illums"])[0]
    fig = new_figure(11.0, 4.2)
    ax_amp, ax_x, ax_y = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])
    x = np.arange(len(rows))
    amp = [100 * r.get("illum_amplitude", {}).get(filt, np.nan) for r in rows]
    ax_amp.plot(x, amp, "o-")
    ax_amp.set_xticks(x, [r["night"] for r in rows], rotation=30, ha="right")
    ax_amp.set_ylabel("peak to peak [%]")
    ax_amp.set_title(f"illumination correction {filt}: amplitude", fontsize=10)
    for r in have:
        if filt not in r["illums"]:
            continue
        _, _, along_x, along_y = illum_profiles(Path(r["illums"][filt]))
        ax_x.plot(along_x, label=r["night"])
        ax_y.plot(along_y, label=r["night"])
    for ax, axis in ((ax_x, "x"), (ax_y, "y")):
        ax.set_xlabel(f"{axis} [px]")
        ax.set_ylabel("correction [% of median]")
        ax.set_title(f"profile along {axis}, night by night", fontsize=10)
        ax.grid(alpha=0.3)
    ax_amp.grid(alpha=0.3)
    ax_y.legend(fontsize=7)
    return fig
