"""Per-night quality assessment: figures per frame and per master, outlier flags, plots,
and a one-page HTML report.

``night_report`` reads a calibrated night's output (``manifest.json``, the masters, every
``*_CAL.fits``) and writes ``OUTPUT/report/``:

``qa.json``
    Per frame: mid-exposure time, sky level and noise (e-), PSF FWHM (px), number of
    stars, relative star flux (transparency), masked / saturated / cosmic-ray pixel
    fractions, background gradient, the strongest linear streak found, and flags. Per
    master: level, noise, frames combined; hot and dead pixel counts from the mask.
``*.png``
    Each master with a z-scale stretch and a colour bar, the bad-pixel mask, the per-frame
    time series with flagged frames marked, one calibrated frame with its cosmic-ray and
    mask overlays, and thumbnails of the flagged frames.
``index.html``
    All of it on one page.

Flags say why a frame looks wrong; they never delete or move anything. The reasons:

``cloud``
    The frame's stars are fainter than the night's median by more than ``cloud_drop``
    (fluxes of the same stars, matched to a reference frame), or too few stars are found
    to measure it while the PSF is normal.
``sky``
    The sky level jumps by more than ``sky_jump`` against its neighbours in time while the
    stars keep their flux (moon, twilight, a light).
``trail``
    A straight streak (satellite, aircraft, meteor) covers at least ``trail_coverage`` of
    its path across the frame and ``trail_min_length`` of the frame's side.
``defocus``
    The PSF FWHM is ``defocus_jump`` times the night's median or more (and far outside
    its scatter).

Star finding and the sky background are those of the KBMOD export
(:func:`astep_dask.core.register.find_stars`,
:func:`astep_dask.core.background.estimate_background`).
The per-frame measures are pure functions of the calibrated planes; reading files,
drawing and writing sit at the edges. With a dask client, each frame is measured in one
task on the cluster, which returns a small row (no image).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from distributed import as_completed

from astep_dask.config import QaSettings, Settings
from astep_dask.errors import RunError
from astep_dask.io.fitsio import atomic_write_text, read_image, write_json
from astep_dask.io.products import (
    CAL_SUFFIX,
    QA_JSON,
    REPORT_FOLDER,
    REPORT_INDEX,
    master_files,
    output_dir,
    read_manifest,
)
from astep_dask.report.figures import master_figures, write_plots
from astep_dask.report.html import fmt_value, render_html
from astep_dask.report.metrics import REASONS, flag_frames, measure_file, relative_fluxes
from astep_dask.run.results import Progress, StageResult

__all__ = [
    "assemble_report",
    "calibrated_paths",
    "load_report",
    "night_report",
    "report_summary",
    "submit_measures",
]


def submit_measures(paths: Sequence[str | Path], client,
                    settings: QaSettings | None = None) -> list:
    """Submit one measuring task per calibrated frame to the cluster; returns the futures
    (e.g. for ``distributed.progress``), whose results are :func:`measure_file` rows."""
    settings = settings or QaSettings()
    paths = [Path(p) for p in paths]
    return client.map(measure_file, [str(p) for p in paths], settings=settings, pure=False,
                      key=[f"qa-measure-{p.stem}-{time.time_ns()}" for p in paths])


def calibrated_paths(out_dir: str | Path) -> list[Path]:
    """The calibrated frames (``*_CAL.fits``) of a night's output folder."""
    return sorted(Path(out_dir).glob(f"*{CAL_SUFFIX}"))


def _measure_all(paths: list[Path], settings: QaSettings, client=None,
                 progress: Progress | None = None) -> list[dict]:
    """The :func:`measure_file` rows of ``paths``: on the cluster with a client, else
    here one after the other; ``progress(done, total, row)`` after each."""
    if client is None:
        measured = (measure_file(p, settings) for p in paths)
    else:
        measured = (f.result() for f in as_completed(submit_measures(paths, client, settings)))
    rows = []
    for row in measured:
        rows.append(row)
        if progress:
            progress(len(rows), len(paths), _status_row(row))
    return rows


def _status_row(row: dict) -> dict:
    """A measured row as the stage reports it: file, status and, on a failure, reason."""
    name = Path(row["file"]).name
    if "error" in row:
        return {"file": name, "status": "failed", "reason": row["error"]}
    return {"file": name, "status": "done"}


def night_report(night_dir: str | Path, client=None, settings: Settings | None = None,
                 out: str | Path | None = None, force: bool = False,
                 progress: Progress | None = None, *,
                 rows: list[dict] | None = None) -> StageResult:
    """Write the QA report of a calibrated night.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/`` (its output is found as ``calibrate`` writes it).
    client
        A ``distributed.Client``: each frame is then measured in one task on the cluster.
        Without one, frames are measured here, one after the other.
    settings
        The run's settings (its ``qa`` group: measures and thresholds).
    out
        The ``--out`` root given to ``calibrate``, if any.
    force
        Accepted for the same call as every stage; a report is always measured and
        written anew (it is cheap, and reads the frames as they are now).
    progress
        ``progress(done, total, row)`` as each frame is measured.
    rows
        Rows already measured (from :func:`submit_measures`); measured here when None.

    Returns
    -------
    StageResult
        Stage ``report``, ``out_dir`` the report folder (``qa.json``, ``index.html``, the
        PNG plots); a row per frame (``failed`` with the reason when it could not be
        measured); ``details``: ``qa_json``, ``index``, ``flagged`` (frames flagged).

    Raises
    ------
    RunError
        When the night's output folder holds no calibrated frame.
    """
    qs = (settings or Settings()).qa
    night_dir = Path(night_dir)
    out_dir = output_dir(night_dir, Path(out) if out is not None else None)
    paths = calibrated_paths(out_dir)
    if not paths:
        raise RunError(f"{out_dir}: no calibrated frame (*{CAL_SUFFIX}); run "
                       f"`astep-dask calibrate` first")
    folder = out_dir / REPORT_FOLDER
    result = StageResult("report", night_dir.name, folder, started=time.time())
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    if rows is None:
        rows = _measure_all(paths, qs, client, progress)
    t_measure = time.perf_counter() - t0
    report = assemble_report(night_dir.name, out_dir, rows, manifest, qs)
    report["seconds"] = {"measure": t_measure}
    t1 = time.perf_counter()
    report["plots"] = write_plots(report, out_dir, folder, qs)
    report["seconds"]["plots"] = time.perf_counter() - t1
    report["seconds"]["total"] = time.perf_counter() - t0
    write_json(folder / QA_JSON, report, finite=True)  # strict JSON: NaN as null
    atomic_write_text(folder / REPORT_INDEX, render_html(report))
    result.frames = [_status_row(r) for r in rows]
    result.details = {"qa_json": folder / QA_JSON, "index": folder / REPORT_INDEX,
                      "flagged": sum(bool(f.get("flagged")) for f in report["frames"])}
    result.finished = time.time()
    return result


def assemble_report(night: str, out_dir: Path, rows: list[dict], manifest: dict,
                    settings: QaSettings) -> dict:
    """The content of ``qa.json`` from the measured rows: transparency, flags, masters."""
    ok = [r for r in rows if "error" not in r]
    ok.sort(key=lambda r: (np.nan_to_num(r.get("mjd", np.nan), nan=np.inf), r["file"]))
    ratio, n_match, ref_i = relative_fluxes([r["stars"] for r in ok], [r["fwhm"] for r in ok],
                                            settings)
    for r, t, m in zip(ok, ratio, n_match, strict=True):
        r["transparency"] = float(t)
        r["n_flux_stars"] = int(m)
    for r, fl in zip(ok, flag_frames(ok, settings), strict=True):
        r["flags"] = fl
        r["flagged"] = bool(fl)
    frames = [{k: v for k, v in r.items() if k != "stars"} for r in ok]
    errors = [r for r in rows if "error" in r]
    masters = master_files(out_dir, manifest)
    mask_data = None
    if "mask" in masters:
        mask_data = read_image(masters["mask"])[1]
    master_rows = [master_figures(label, p, mask_data) for label, p in masters.items()]
    counts = {reason: sum(any(f["reason"] == reason for f in r["flags"]) for r in frames)
              for reason in REASONS}
    failed = [{"file": r.get("file"), "reason": r.get("reason")}
              for r in manifest.get("frames", []) if r.get("status") == "failed"]
    return {
        "night": night,
        "output": str(out_dir),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": dataclasses.asdict(settings),
        "summary": {
            "frames": len(frames),
            "flagged": sum(r["flagged"] for r in frames),
            "flags": counts,
            "unreadable": len(errors),
            "failed_in_calibration": len(failed),
            "unusable_files": len(manifest.get("unusable", [])),
            "reference_frame": frames[ref_i]["file"] if ref_i >= 0 else None,
            "median_sky": _median(frames, "sky"),
            "median_noise": _median(frames, "noise"),
            "median_fwhm": _median(frames, "fwhm"),
            "calibration_status": manifest.get("status"),
            "illum_amplitude": {m["filter"]: m.get("amplitude") for m in master_rows
                                if m["role"] == "illum"},
        },
        "frames": frames,
        "unreadable": [{"file": r["file"], "reason": r["error"]} for r in errors],
        "failed": failed,
        "unusable": manifest.get("unusable", []),
        "masters": master_rows,
    }


def _median(rows: list[dict], key: str) -> float:
    """Median of ``key`` over the rows' finite values; NaN without any."""
    v = np.array([r.get(key, np.nan) for r in rows], float)
    return float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan")


def report_summary(report: dict, folder: str | Path | None = None) -> str:
    """A few lines for the terminal: counts, medians, each flagged frame with its reasons,
    files not measured, and where the page is."""
    s = report["summary"]
    flags = ", ".join(f"{k} {v}" for k, v in s["flags"].items() if v) or "none"
    lines = [f"night {report['night']}: {s['frames']} frames measured, {s['flagged']} flagged "
             f"({flags}); median sky {fmt_value(s['median_sky'], 4)} e-, noise "
             f"{fmt_value(s['median_noise'])} e-, FWHM {fmt_value(s['median_fwhm'])} px"]
    for f in report["frames"]:
        for fl in f["flags"]:
            lines.append(f"  flagged: {f['file']}: {fl['reason']}: {fl['detail']}")
    for r in report.get("unreadable", []):
        lines.append(f"  not measured: {r['file']}: {r['reason']}")
    if folder is not None:
        lines.append(f"  report: {Path(folder) / REPORT_INDEX}")
    return "\n".join(lines)


def load_report(folder: str | Path) -> dict:
    """Read ``qa.json`` from a report folder (or a night's output folder)."""
    folder = Path(folder)
    path = folder / QA_JSON if (folder / QA_JSON).exists() else folder / REPORT_FOLDER / QA_JSON
    return json.loads(path.read_text())
