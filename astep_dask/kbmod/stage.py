"""kbmod.stage: TODO docstring."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

from astep_dask.config import KbmodSettings, Settings, TemplateSettings
from astep_dask.errors import RunError
from astep_dask.io.fitsio import (
    remove_stale_temps,
)
from astep_dask.io.products import check_writable, night_lock, output_dir
from astep_dask.io.provenance import digest_of
from astep_dask.kbmod.difference import DifferenceJob, difference_task
from astep_dask.kbmod.export import (
    ExportJob,
    FrameMeasure,
    MeasureJob,
    Progress,
    _measure_row,
    choose_reference,
    export_task,
    frame_provenance,
    measure_task,
)
from astep_dask.kbmod.kernels import (
    effective_psf_variance,
    halo,
    matching_variances,
)
from astep_dask.kbmod.products import (
    CAL_SUFFIX,
    MANIFEST,
    SUFFIX,
    Reference,
    _f,
    _header_value,
    _write_manifest,
    calibrated_frames,
    read_reference,
    reference_path,
    reference_wcs,
    stack_provenance,
    write_offsets,
    write_reference,
    write_stack,
)
from astep_dask.kbmod.template import (
    NEIGHBOUR_FOLDER,
    REG_SUFFIX,
    REGISTERED_FOLDER,
    StripJob,
    TemplateFrame,
    assemble,
    neighbour_nights,
    spread,
    strip_task,
    strips,
    template_cards,
    template_path,
    template_provenance,
    write_template,
)
from astep_dask.run.tasks import cluster_window, map_bounded
from astep_dask.version import __version__


def export_night(
    night_dir: str | Path,
    client,
    settings: Settings | None = None,
    kbmod_settings: KbmodSettings | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    template: TemplateSettings | None = None,
) -> dict:
    """Export a calibrated night for KBMOD on the given dask client.

    Reads ``*_CAL.fits`` from the night's output folder (``pipeline.output_dir``), chooses
    (or re-uses) a reference frame, then runs one task per frame: background, stars and
    PSF; offset to the reference; sky subtraction; resampling onto the reference grid.
    With a template (the default, issue 11) the registered frames go to ``registered/``,
    the static-sky template is combined (strip tasks) and each KBMOD file is a difference
    frame (one task per frame; see :mod:`astep_dask.template`); without, the KBMOD file is
    the registered frame itself. Then writes the stack file, the offsets table and
    ``kbmod.json``.

    Parameters
    ----------
    night_dir
        The raw night folder (``ROOT/DATE``), as given to ``calibrate``.
    client
        A ``distributed.Client``.
    settings
        The run's settings (cluster: retries, frames in flight).
    kbmod_settings
        Export settings; defaults when None.
    out
        The ``--out`` of the calibration (None: beside the raw night).
    force
        Redo every frame and choose the reference again.
    progress
        Called as ``progress(done, total, row)`` after every frame of each stage (rows
        have ``file``, ``status`` and ``stage``: ``measure``, ``export``, ``template
        frame``, ``template`` or ``difference``).
    template
        Template and difference options; None: ``settings.template`` (difference frames
        by default).

    Returns
    -------
    dict
        ``night``, ``status`` (complete, partial, failed), ``error``, ``kbmod_dir``,
        ``reference``, ``counts`` (done, skipped, failed), ``frames`` (rows in time
        order), ``stack``, ``offsets``, ``reference_file``, ``manifest``,
        ``wall_seconds``, ``template`` (summary of the template stage, or None) and
        ``registered_dir`` (None when the KBMOD files are the registered frames).

    Raises
    ------
    pipeline.RunError
        Before any work: no calibrated frame, output not writable, or locked.
    """
    started = time.time()
    settings = settings or Settings()
    ks = kbmod_settings or settings.kbmod
    ts = template or settings.template
    if ks.variance not in ("area", "pixel"):
        raise RunError(f"kbmod variance must be 'area' or 'pixel', not {ks.variance!r}")
    night_dir = Path(night_dir)
    night = night_dir.name
    cal_dir = output_dir(night_dir, Path(out) if out is not None else None)
    frames, problems = calibrated_frames(cal_dir) if cal_dir.is_dir() else ([], [])
    if not frames:
        raise RunError(f"{cal_dir}: no calibrated frame (*{CAL_SUFFIX}); "
                       f"run astep-dask calibrate first")
    kdir = cal_dir / ks.folder
    check_writable(kdir)
    window = cluster_window(client, settings.cluster)
    retries = settings.cluster.retries
    reg_dir = kdir / REGISTERED_FOLDER if ts.enabled else kdir
    reg_suffix = REG_SUFFIX if ts.enabled else SUFFIX
    result: dict = {"night": night, "kbmod_dir": kdir, "error": None, "reference": None,
                    "stack": None, "offsets": None, "reference_file": None, "manifest": None,
                    "template": None, "registered_dir": reg_dir if ts.enabled else None}
    result["template_settings"] = dataclasses.asdict(ts)
    failed: list[dict] = list(problems)
    with night_lock(kdir):
        for folder in (kdir, reg_dir, kdir / "template_frames"):
            remove_stale_temps(folder)
        ref_file = reference_path(kdir, night)
        reference = None if force else read_reference(ref_file, frames, ks)
        measures: dict[str, FrameMeasure] = {}
        if reference is None:
            done = [0]

            def measured(job: MeasureJob, res: object) -> None:
                frame = job.frame
                done[0] += 1
                if isinstance(res, FrameMeasure):
                    measures[frame.stem] = res
                    row = {"file": frame.path.name, "status": "measured", "stage": "measure"}
                else:
                    failed.append(res)  # type: ignore[arg-type]
                    row = res  # type: ignore[assignment]
                if progress:
                    progress(done[0], len(frames), row)

            map_bounded(client, measure_task, [MeasureJob(f, ks) for f in frames], measured,
                        window=window, retries=retries,
                        key=lambda i, _: f"kbmod-measure-{night}-{i}")
            candidates = [f for f in frames if f.stem in measures
                          and measures[f.stem].stars.size >= ks.min_matches]
            if not candidates:
                result["error"] = (f"no frame has {ks.min_matches} measurable stars: "
                                   "cannot choose a reference")
                return _finish(result, [], failed, ks, started)
            rows = [_measure_row(f, measures[f.stem]) for f in candidates]
            try:
                idx = choose_reference(rows, ks.reference)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            ref_frame = candidates[idx]
            m = measures[ref_frame.stem]
            ref_header = fits.getheader(ref_frame.path, 0)
            reference = Reference(stem=ref_frame.stem, adprov=ref_frame.adprov, shape=m.shape,
                                  stars=m.stars, psf_sigma=m.psf_sigma, mjd=ref_frame.mjd,
                                  wcs=reference_wcs(ref_header))
            write_reference(ref_file, reference, ks)
        result["reference"] = reference.stem
        result["reference_file"] = ref_file
        failed_stems = {r.get("stem") for r in failed}
        jobs = [
            ExportJob(frame=f, output=reg_dir / f"{f.stem}{reg_suffix}",
                      provenance=frame_provenance(f, reference, ks), reference=reference,
                      settings=ks, measure=measures.get(f.stem), force=force)
            for f in frames if f.stem not in failed_stems
        ]
        rows_out: list[dict] = []

        def exported(job: ExportJob, row: object) -> None:
            rows_out.append(row)  # type: ignore[arg-type]
            if progress:
                progress(len(rows_out), len(jobs), row)  # type: ignore[arg-type]

        try:
            map_bounded(client, export_task, jobs, exported,
                        window=window, retries=retries,
                        key=lambda i, _: f"kbmod-export-{night}-{i}")
        except OSError as exc:
            result["error"] = str(exc)
            remove_stale_temps(kdir)
        rows_out.sort(key=lambda r: (r["mjd"], r["file"]))
        if ts.enabled and result["error"] is None:
            ref_frame = next(f for f in frames if f.stem == reference.stem)
            field = str(fits.getheader(ref_frame.path, 0).get("OBJECT", "") or "").strip()
            try:
                diff_rows, info = run_template_stage(
                    client, night_dir=night_dir, out=Path(out) if out is not None else None,
                    kdir=kdir, night=night, reference=reference, field=field,
                    filt=ref_frame.filter, rows=rows_out, ks=ks, ts=ts, force=force,
                    window=window, retries=retries, progress=progress)
            except OSError as exc:
                diff_rows, info = [], {"error": str(exc)}
                remove_stale_temps(kdir)
                remove_stale_temps(reg_dir)
            result["template"] = info
            result["error"] = info.get("error")
            by_stem = {r["stem"]: r for r in diff_rows}
            rows_out = [by_stem.get(r["stem"], r) if r["status"] != "failed" else r
                        for r in rows_out] if diff_rows else rows_out
        return _finish(result, rows_out, failed, ks, started, reference)


def _finish(result: dict, rows: list[dict], failed: list[dict], ks: KbmodSettings,
            started: float, reference: Reference | None = None) -> dict:
    """Write the stack, offsets table and manifest (when there is something to write) and
    complete the summary."""
    kdir: Path = result["kbmod_dir"]
    night = result["night"]
    all_rows = sorted([*rows, *[r for r in failed if r not in rows]],
                      key=lambda r: (r.get("mjd") or 0.0, r.get("file", "")))
    good = [r for r in rows if r["status"] in ("done", "skipped")]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    for r in all_rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if good and reference is not None and result["error"] is None:
        try:
            result["offsets"] = write_offsets(kdir / f"{night}_OFFSETS.csv", all_rows)
            stack = kdir / f"{night}_STACK.fits"
            prov = stack_provenance(good, ks)
            if counts["done"] or _header_value(stack, "STKPROV") != prov:
                write_stack(stack, good, kdir, reference, ks, prov)
            result["stack"] = stack
        except OSError as exc:
            result["error"] = f"night products not written: {exc}"
            remove_stale_temps(kdir)
    if result["error"] or not good:
        status = "failed"
    elif counts["failed"]:
        status = "partial"
    else:
        status = "complete"
    result.update(status=status, counts=counts, frames=all_rows,
                  wall_seconds=time.time() - started)
    try:
        result["manifest"] = _write_manifest(kdir / MANIFEST, result, ks)
    except OSError as exc:
        result["error"] = f"{result['error'] or ''}; manifest not written: {exc}".lstrip("; ")
    return result


def _as_written(row: dict) -> dict:
    """A registration row with the figures the template uses rounded as the file's header
    holds them, so a re-run that reads them back (skipped frames) makes the same template."""
    out = dict(row)
    for key, digits in (("sky_rms", 3), ("psf_sigma_cal", 4), ("dx", 6), ("dy", 6)):
        if out.get(key) is not None:
            out[key] = _f(out[key], digits)
    return out


def _weight(row: dict) -> float:
    rms = row.get("sky_rms")
    try:
        rms = float(rms)
    except (TypeError, ValueError):
        return 1.0
    return 1.0 / rms**2 if np.isfinite(rms) and rms > 0 else 1.0


def _sigma0(row: dict, fallback: float) -> float:
    try:
        s = float(row.get("psf_sigma_cal"))
    except (TypeError, ValueError):
        return fallback
    return s if np.isfinite(s) and s > 0 else fallback


def run_template_stage(client, *, night_dir: Path, out: Path | None, kdir: Path, night: str,
                       reference, field: str, filt: str, rows: list[dict], ks, ts:
                       TemplateSettings, force: bool, window: Callable[[], int], retries: int,
                       progress=None) -> tuple[list[dict], dict]:
    """Template, then one difference task per registered frame of the night.

    ``rows`` are the registration rows (``output`` a file of ``registered/``). Returns the
    rows of the KBMOD files (registration figures plus the difference's ``output``,
    ``status``, ``provenance``, ``psf_sigma``) and a summary of the template (``file``,
    ``mode``, ``frames``, ``nights``, ``skipped_nights``, ``failed_frames``, ``psf_sigma``,
    ``provenance``, ``error``).
    """
    reg_dir = kdir / REGISTERED_FOLDER
    good = [_as_written(r) for r in rows if r.get("status") in ("done", "skipped")]
    info: dict = {"file": None, "mode": None, "frames": 0, "nights": [], "skipped_nights": [],
                  "failed_frames": [], "psf_sigma": None, "provenance": None, "error": None,
                  "seconds": 0.0}
    t0 = time.perf_counter()
    sig_med = float(np.median([_sigma0(r, np.nan) for r in good] or [np.nan]))
    sig_med = sig_med if np.isfinite(sig_med) else ks.psf_sigma_guess

    def tframe(r: dict, path: Path, night_name: str, own: bool) -> TemplateFrame:
        return TemplateFrame(stem=r["stem"], night=night_name, path=path, mjd=float(r["mjd"]),
                             weight=_weight(r), kernel_var=(0.0, 0.0), own=own,
                             provenance=str(r.get("provenance", "")))

    tframes: list[TemplateFrame] = []
    effective: dict[str, tuple[float, float]] = {}
    if ts.nights <= 0:
        info["mode"] = "night, leave-one-out"
        tframes = [tframe(r, reg_dir / r["output"], night, True)
                   for r in spread(good, ts.max_frames)]
    else:
        nights, skipped = neighbour_nights(night_dir, out, ts.nights, field, filt)
        info["skipped_nights"] = skipped
        info["nights"] = [n for n, _ in nights]
        info["mode"] = "nights " + ",".join(info["nights"])
        per_night = (ts.max_frames // max(len(nights), 1)) if ts.max_frames > 0 else 0
        ndir = kdir / NEIGHBOUR_FOLDER
        jobs = []
        for _, frames in nights:
            for f in spread(frames, per_night):
                jobs.append(ExportJob(frame=f, output=ndir / f"{f.stem}{REG_SUFFIX}",
                                      provenance=frame_provenance(f, reference, ks),
                                      reference=reference, settings=ks, force=force))
        night_of = {f.stem: n for n, frames in nights for f in frames}
        done_rows: list[dict] = []

        def registered(job, row) -> None:
            done_rows.append(row)
            if progress:
                progress(len(done_rows), len(jobs), {**row, "stage": "template frame"})

        map_bounded(client, export_task, jobs, registered,
                    window=window, retries=retries,
                    key=lambda i, _: f"kbmod-tframe-{night}-{i}")
        for r in sorted(done_rows, key=lambda r: (r["mjd"], r["stem"])):
            if r["status"] in ("done", "skipped"):
                r = _as_written(r)
                tframes.append(tframe(r, ndir / r["output"], night_of.get(r["stem"], ""),
                                      False))
                effective[r["stem"]] = effective_psf_variance(
                    _sigma0(r, sig_med), float(r["dx"]), float(r["dy"]))
            else:
                info["failed_frames"].append({k: r.get(k) for k in ("file", "reason")})
    for r in good:
        effective[r["stem"]] = effective_psf_variance(_sigma0(r, sig_med), float(r["dx"]),
                                                      float(r["dy"]))
    need = max(ts.min_frames, 1) + (1 if ts.nights <= 0 else 0)
    if len(tframes) < need:
        where = "this night" if ts.nights <= 0 else f"{ts.nights} neighbouring night(s)"
        info["error"] = (f"template: {len(tframes)} usable frame(s) from {where}, at least "
                         f"{need} needed (use the sky-only export or other nights)")
        return [], info
    if ts.psf_match:
        target, kvars = matching_variances(effective)
    else:
        target, kvars = float(np.mean([max(v) for v in effective.values()])), {}
    mean_w = float(np.mean([f.weight for f in tframes]))
    tframes = [dataclasses.replace(f, weight=f.weight / mean_w,
                                   kernel_var=kvars.get(f.stem, (0.0, 0.0)))
               for f in tframes]
    grow = round(ts.grow * float(np.sqrt(target)))
    sat_halo = round(ts.saturation_halo * 2.354820045 * float(np.sqrt(target)))
    tprov = template_provenance(tframes, target, ts)
    tpath = template_path(kdir, night)
    info.update(file=tpath, frames=len(tframes), provenance=tprov,
                psf_sigma=float(np.sqrt(target)))
    if force or _card(tpath, "TPLPROV") != tprov:
        ny, nx = reference.shape
        # a row's result depends on rows within the kernel's half-width, then on the
        # rejections grown by ``grow`` px at each clipping iteration
        pad = max([halo(f.kernel_var) for f in tframes] + [0]) + max(
            (ts.iterations + 1) * grow, sat_halo)
        jobs = [StripJob(frames=tuple(tframes), y0=a, y1=b, ny=ny, pad=pad, settings=ts,
                         grow=grow, sat_halo=sat_halo)
                for a, b in strips(ny, nx, len(tframes), ts.memory_mb)]
        parts: list = []

        def combined(job, res) -> None:
            parts.append(res[:3])
            if progress:
                progress(len(parts), len(jobs), {"file": f"rows {job.y0}-{job.y1}",
                                                 "status": "combined", "stage": "template"})

        map_bounded(client, strip_task, jobs, combined,
                    window=window, retries=retries,
                    key=lambda i, _: f"kbmod-template-{night}-{i}")
        cards = template_cards(night, info["mode"], tframes, target, tprov, reference.stem, ts)
        write_template(tpath, assemble(parts, ny, nx), tframes, cards, reference.wcs)
    weights = {f.stem: f.weight for f in tframes if f.own}
    by_stem = {r["stem"]: r for r in good}
    djobs = [
        DifferenceJob(
            stem=r["stem"], registered=reg_dir / r["output"],
            output=kdir / r["output"].replace(REG_SUFFIX, "_KBMOD.fits"), template=tpath,
            kernel_var=kvars.get(r["stem"], (0.0, 0.0)), weight=weights.get(r["stem"]),
            provenance=digest_of(r.get("provenance"), tprov, ts.digest(), __version__),
            template_provenance=tprov, target_sigma=float(np.sqrt(target)), settings=ts,
            wcs=reference.wcs, mode=info["mode"], force=force, grow=grow)
        for r in good
    ]
    out_rows: list[dict] = []

    def differenced(job, row) -> None:
        merged = {**by_stem[job.stem], **{k: v for k, v in row.items() if v is not None}}
        merged["registered"] = by_stem[job.stem]["output"]
        merged["provenance_registered"] = by_stem[job.stem].get("provenance")
        out_rows.append(merged)
        if progress:
            progress(len(out_rows), len(djobs), {**merged, "file": job.output.name})

    map_bounded(client, difference_task, djobs, differenced,
                window=window, retries=retries,
                key=lambda i, _: f"kbmod-diff-{night}-{i}")
    info["seconds"] = time.perf_counter() - t0
    return out_rows, info


def _card(path: Path, key: str) -> str | None:
    try:
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            value = hdul[0].header.get(key)
            return None if value is None else str(value)
    except (OSError, ValueError, TypeError, IndexError):
        return None
