"""The KBMOD export of a night, run on the dask cluster: the stage's driver.

:func:`export_night` runs the export's steps in order, each as worker tasks submitted a
window at a time (:func:`astep_dask.run.tasks.map_bounded`):

1. **measure**: background, stars and PSF of every calibrated frame
   (:func:`~astep_dask.kbmod.export.measure_task`), unless the recorded reference is still
   valid;
2. **reference**: the frame whose grid every product shares
   (:func:`~astep_dask.kbmod.export.choose_reference`), recorded in
   ``DATE_REFERENCE.fits``;
3. **register**: offset to the reference, sky subtraction and resampling of every frame
   (:func:`~astep_dask.kbmod.export.export_task`): the KBMOD files themselves, or with a
   template the registered frames of ``registered/``;
4. **template** (:func:`~astep_dask.kbmod.subtract.run_template_stage`): frames of the
   night or of neighbouring nights (registered onto this night's grid first), PSF-matched
   and combined in strips
   (:func:`~astep_dask.kbmod.template.strip_task`);
5. **differences**: one KBMOD file per frame, frame − template
   (:func:`~astep_dask.kbmod.difference.difference_task`);

then the night's products: stack file, WorkUnit (:mod:`astep_dask.kbmod.workunit`),
offsets table and ``kbmod.json``
(:mod:`astep_dask.kbmod.products`). The output folder is locked for the run; a re-run
skips every file whose provenance has not changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from astropy.io import fits

from astep_dask.config import AstrometrySettings, KbmodSettings, Settings, TemplateSettings
from astep_dask.errors import RunError
from astep_dask.io.fitsio import remove_stale_temps
from astep_dask.io.products import (
    CAL_SUFFIX,
    KBMOD_MANIFEST,
    KBMOD_NEIGHBOUR_FOLDER,
    KBMOD_REG_SUFFIX,
    KBMOD_REGISTERED_FOLDER,
    KBMOD_SUFFIX,
    KBMOD_WORKUNIT_SUFFIX,
    check_writable,
    night_lock,
    output_dir,
)
from astep_dask.kbmod.dispatch import Dispatch
from astep_dask.kbmod.export import (
    ExportJob,
    FrameMeasure,
    MeasureJob,
    choose_reference,
    export_provenance,
    export_task,
    measure_task,
)
from astep_dask.kbmod.products import (
    CalFrame,
    Reference,
    export_frames,
    header_value,
    read_reference,
    reference_path,
    reference_wcs,
    stack_provenance,
    trusted,
    write_manifest,
    write_offsets,
    write_reference,
    write_stack,
)
from astep_dask.kbmod.skyfit import fitted_wcs
from astep_dask.kbmod.subtract import run_template_stage
from astep_dask.kbmod.workunit import (
    WORKUNIT_PROV,
    WORKUNIT_SHARD_FOLDER,
    workunit_bytes,
    workunit_provenance,
    write_workunit,
)
from astep_dask.run.results import Progress, StageResult
from astep_dask.run.tasks import cluster_window

__all__ = ["Dispatch", "export_night", "run_template_stage"]


def export_night(
    night_dir: str | Path,
    client,
    settings: Settings | None = None,
    out: Path | None = None,
    force: bool = False,
    progress: Progress | None = None,
    *,
    kbmod_settings: KbmodSettings | None = None,
    template: TemplateSettings | None = None,
) -> StageResult:
    """Export a calibrated night for KBMOD on the given dask client.

    Reads ``*_CAL.fits`` from the night's output folder
    (:func:`~astep_dask.io.products.output_dir`), chooses (or re-uses) a reference frame,
    then runs one task per frame: background, stars and PSF; offset to the reference; sky
    subtraction; resampling onto the reference grid. With a template (the default, issue
    11) the registered frames go to ``registered/``, the static-sky template is combined
    (strip tasks) and each KBMOD file is a difference frame (one task per frame; see
    :mod:`astep_dask.kbmod.template`); without, the KBMOD file is the registered frame
    itself. Then writes the stack file, the offsets table and ``kbmod.json``.

    Parameters
    ----------
    night_dir
        The raw night folder (``ROOT/DATE``), as given to ``calibrate``.
    client
        A ``distributed.Client``.
    settings
        The run's settings (cluster: retries, frames in flight; ``kbmod`` and
        ``template`` groups); defaults when None.
    out
        The ``--out`` of the calibration (None: beside the raw night).
    force
        Redo every frame and choose the reference again.
    progress
        Called as ``progress(done, total, row)`` after every frame of each stage (rows
        have ``file``, ``status`` and ``stage``: ``measure``, ``export``, ``template
        frame``, ``template`` or ``difference``).
    kbmod_settings
        Export settings; None: ``settings.kbmod``.
    template
        Template and difference options; None: ``settings.template`` (difference frames
        by default).

    Returns
    -------
    StageResult
        Stage ``kbmod``, ``out_dir`` the export folder. ``frames``: a row per frame in
        time order, ``status`` ``done``, ``skipped`` or ``failed`` (with ``reason``; a
        frame whose pixels cannot be read or measured, or that cannot be registered).
        ``unusable``: the calibrated files whose header cannot be read (``path``,
        ``reason``). ``error``: what stopped the export (no frame with enough stars for
        a reference, template, a write). ``details``: ``reference`` (its stem),
        ``reference_file``, ``stack``, ``offsets``, ``manifest`` (``kbmod.json``),
        ``template`` (summary of the template stage, or None), ``template_settings`` and
        ``registered_dir`` (None when the KBMOD files are the registered frames).
        ``status``: failed when there is an error or no KBMOD file, partial when a frame
        failed or a file is unusable, else complete; ``kbmod.json`` holds the same
        status, with the unusable files among its failed rows.

    Raises
    ------
    RunError
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
    out = Path(out) if out is not None else None
    cal_dir = output_dir(night_dir, out)
    frames, problems = export_frames(cal_dir) if cal_dir.is_dir() else ([], [])
    if not frames:
        raise RunError(f"{cal_dir}: no calibrated frame (*{CAL_SUFFIX}); "
                       f"run astep-dask calibrate first")
    kdir = cal_dir / ks.folder
    check_writable(kdir)
    run = Dispatch(client, night, cluster_window(client, settings.cluster),
                   settings.cluster.retries, progress)
    reg_dir = kdir / KBMOD_REGISTERED_FOLDER if ts.enabled else kdir
    result: dict = {"night": night, "kbmod_dir": kdir, "error": None, "reference": None,
                    "stack": None, "offsets": None, "reference_file": None, "manifest": None,
                    "template": None, "workunit": None, "wcs_fit": None,
                    "registered_dir": reg_dir if ts.enabled else None}
    result["template_settings"] = dataclasses.asdict(ts)
    failed: list[dict] = list(problems)
    with night_lock(kdir):
        for folder in _temp_folders(kdir, reg_dir):
            remove_stale_temps(folder)
        ref_file = reference_path(kdir, night)
        reference, measures = _reference(run, frames, ks, ref_file, force, failed,
                                         settings.astrometry, result)
        if reference is None:
            result["error"] = (f"no frame has {ks.min_matches} measurable stars: "
                               "cannot choose a reference")
            return _unusable_apart(_finish(result, [], failed, ks, started), problems, cal_dir)
        result["reference"] = reference.stem
        result["reference_file"] = ref_file
        reg_suffix = KBMOD_REG_SUFFIX if ts.enabled else KBMOD_SUFFIX
        failed_stems = {r.get("stem") for r in failed}
        jobs = [
            ExportJob(frame=f, output=reg_dir / f"{f.stem}{reg_suffix}",
                      provenance=export_provenance(f, reference, ks), reference=reference,
                      settings=ks, measure=measures.get(f.stem), force=force)
            for f in frames if f.stem not in failed_stems
        ]
        rows, result["error"] = _register_frames(run, jobs, kdir)
        if ts.enabled and result["error"] is None:
            rows = _difference_stage(run, result, rows, frames, reference, night_dir=night_dir,
                                     out=out, ks=ks, ts=ts, force=force)
        return _unusable_apart(_finish(result, rows, failed, ks, started, reference, force),
                               problems, cal_dir)


def _reference(run: Dispatch, frames: list[CalFrame], ks: KbmodSettings, ref_file: Path,
               force: bool, failed: list[dict], ast: AstrometrySettings, result: dict
               ) -> tuple[Reference | None, dict[str, FrameMeasure]]:
    """The night's reference: the recorded one while it is valid (and not ``force``; with
    a catalog, fitted with the same astrometry settings), else one chosen among the
    measured frames and recorded; None when no frame has enough stars. Also the measures
    (empty when the recorded reference was used); frames that cannot be read are appended
    to ``failed``. The WCS fit's summary goes in ``result["wcs_fit"]``."""
    reference = None if force else read_reference(ref_file, frames, ks)
    if reference is not None and (not ast.catalog
                                  or header_value(ref_file, "ASTHASH") == ast.digest()):
        result["wcs_fit"] = _recorded_fit(reference)
        return reference, {}
    measures = _measure_frames(run, frames, ks, failed)
    reference = _new_reference(frames, measures, ks)
    if reference is not None and reference.wcs is None and ast.catalog:
        ref_header = fits.getheader(next(f for f in frames if f.stem == reference.stem).path)
        try:
            wcs, result["wcs_fit"] = fitted_wcs(ref_header, reference.stars, reference.shape,
                                                ast)
        except ValueError as exc:
            raise RunError(str(exc)) from None
        reference = dataclasses.replace(reference, wcs=wcs)
    if reference is not None:
        write_reference(ref_file, reference, ks,
                        {"ASTHASH": (ast.digest(), "hash of the astrometry settings")})
    return reference, measures


def _recorded_fit(reference: Reference) -> dict | None:
    """The summary of a recorded reference's fitted WCS (None: not fitted)."""
    h = reference.wcs
    if h is None or "WCSNSTAR" not in h:
        return None
    return {"status": "fitted", "catalog": h.get("WCSCAT"), "n_stars": h["WCSNSTAR"],
            "rms_px": h.get("WCSRMS"), "reason": None}


def _measure_frames(run: Dispatch, frames: list[CalFrame], ks: KbmodSettings,
                    failed: list[dict]) -> dict[str, FrameMeasure]:
    """Measure every frame (one task each): the measures by stem; the rows of frames that
    cannot be read are appended to ``failed``."""
    measures: dict[str, FrameMeasure] = {}
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
        run.report(done[0], len(frames), row)

    run.map("measure", measure_task, [MeasureJob(f, ks) for f in frames], measured)
    return measures


def _measure_row(frame: CalFrame, m: FrameMeasure) -> dict:
    """What :func:`~astep_dask.kbmod.export.choose_reference` knows of a measured frame."""
    return {"stem": frame.stem, "file": frame.path.name, "raw": frame.raw, "mjd": frame.mjd,
            "n_stars": int(m.stars.size), "psf_sigma": m.psf_sigma}


def _new_reference(frames: list[CalFrame], measures: dict[str, FrameMeasure],
                   ks: KbmodSettings) -> Reference | None:
    """The reference chosen among the frames with enough stars; None when there is none.

    Raises
    ------
    RunError
        When the requested reference frame is not among them.
    """
    candidates = [f for f in frames if f.stem in measures
                  and measures[f.stem].stars.size >= ks.min_matches]
    if not candidates:
        return None
    rows = [_measure_row(f, measures[f.stem]) for f in candidates]
    try:
        idx = choose_reference(rows, ks.reference)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    ref_frame = candidates[idx]
    m = measures[ref_frame.stem]
    ref_header = fits.getheader(ref_frame.path, 0)
    return Reference(stem=ref_frame.stem, adprov=ref_frame.adprov, shape=m.shape,
                     stars=m.stars, psf_sigma=m.psf_sigma, mjd=ref_frame.mjd,
                     wcs=reference_wcs(ref_header))


def _register_frames(run: Dispatch, jobs: list[ExportJob], kdir: Path
                     ) -> tuple[list[dict], str | None]:
    """Register every frame (one export task each): the rows in time order, and the write
    error that stopped the stage (None when none did)."""
    rows: list[dict] = []
    error = None

    def exported(job: ExportJob, row: object) -> None:
        rows.append(row)  # type: ignore[arg-type]
        run.report(len(rows), len(jobs), row)  # type: ignore[arg-type]

    try:
        run.map("export", export_task, jobs, exported)
    except OSError as exc:
        error = str(exc)
        remove_stale_temps(kdir)
    rows.sort(key=lambda r: (r["mjd"], r["file"]))
    return rows, error


def _difference_stage(run: Dispatch, result: dict, rows: list[dict], frames: list[CalFrame],
                      reference: Reference, *, night_dir: Path, out: Path | None,
                      ks: KbmodSettings, ts: TemplateSettings, force: bool) -> list[dict]:
    """The template and difference frames (:func:`run_template_stage`) of the registered
    frames ``rows``: the rows with those of the KBMOD files in their place; the summary
    and any error go in ``result``."""
    kdir: Path = result["kbmod_dir"]
    ref_frame = next(f for f in frames if f.stem == reference.stem)
    field = str(fits.getheader(ref_frame.path, 0).get("OBJECT", "") or "").strip()
    try:
        diff_rows, info = run_template_stage(
            run, night_dir=night_dir, out=out, kdir=kdir, reference=reference, field=field,
            filt=ref_frame.filter, rows=rows, ks=ks, ts=ts, force=force)
    except OSError as exc:
        diff_rows, info = [], {"error": str(exc)}
        remove_stale_temps(kdir)
        remove_stale_temps(result["registered_dir"])
    result["template"] = info
    result["error"] = info.get("error")
    by_stem = {r["stem"]: r for r in diff_rows}
    return [by_stem.get(r["stem"], r) if r["status"] != "failed" else r
            for r in rows] if diff_rows else rows


def _recorded_status(manifest: Path) -> str | None:
    """The status a ``kbmod.json`` records, or None (no file, unreadable)."""
    try:
        return json.loads(manifest.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _finish(result: dict, rows: list[dict], failed: list[dict], ks: KbmodSettings,
            started: float, reference: Reference | None = None, force: bool = False
            ) -> StageResult:
    """Write the stack, offsets table and manifest (when there is something to write),
    complete the summary (what ``kbmod.json`` holds) and return it as the stage's result.
    The stack and the WorkUnit already there are kept when their provenance matches and
    they verify (:func:`~astep_dask.kbmod.products.trusted`), unless ``force``."""
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
            if force or counts["done"] or not trusted(stack, "STKPROV", prov):
                write_stack(stack, good, kdir, reference, ks, prov)
            result["stack"] = stack
            wu = kdir / f"{night}{KBMOD_WORKUNIT_SUFFIX}"
            shard = 0 < ks.workunit_shard_mb * 2**20 < workunit_bytes(len(good),
                                                                       reference.shape)
            wprov = workunit_provenance(good, reference)
            at = kdir / WORKUNIT_SHARD_FOLDER / wu.name if shard else wu
            shards = [at.parent / f"{i}_{at.name}" for i in range(len(good))] if shard else []
            if force or not trusted(at, WORKUNIT_PROV, wprov, *shards):
                write_workunit(wu, good, kdir, reference, night, wprov, sharded=shard)
            result["workunit"], result["workunit_sharded"] = at, shard
        except OSError as exc:
            result["error"] = f"night products not written: {exc}"
            for folder in _temp_folders(kdir):
                remove_stale_temps(folder)
    if result["error"] or not good:
        status = "failed"
    elif counts["failed"]:
        status = "partial"
    else:
        status = "complete"
    result.update(status=status, counts=counts, frames=all_rows,
                  wall_seconds=time.time() - started)
    manifest = kdir / KBMOD_MANIFEST
    if status == "failed" and _recorded_status(manifest) in ("complete", "partial"):
        # A failed attempt (e.g. a template from nights that are not there) must not hide
        # the export already on disk: its manifest stays, and search still finds it.
        why = result["error"] or "nothing exported"
        result["error"] = f"{why}; {manifest.name} of the previous export kept"
        result["manifest"] = manifest
    else:
        try:
            result["manifest"] = write_manifest(manifest, result, ks)
        except OSError as exc:
            result["error"] = (f"{result['error'] or ''}; manifest not written: "
                               f"{exc}").lstrip("; ")
    top = ("night", "kbmod_dir", "error", "status", "counts", "frames", "wall_seconds")
    return StageResult("kbmod", night, kdir, frames=all_rows, error=result["error"],
                       started=started, finished=started + result["wall_seconds"],
                       details={k: v for k, v in result.items() if k not in top})


def _temp_folders(kdir: Path, *more: Path) -> tuple[Path, ...]:
    """Every folder of the export where a killed run can leave a temporary file: the
    export's own, the sharded WorkUnit's and the neighbour nights' (and ``more``)."""
    return (kdir, *more, kdir / WORKUNIT_SHARD_FOLDER, kdir / KBMOD_NEIGHBOUR_FOLDER)


def _unusable_apart(res: StageResult, problems: list[dict], cal_dir: Path) -> StageResult:
    """The stage's result with the calibrated files that cannot be read (``problems``)
    moved from its frames to its unusable inputs, as ``calibrate`` reports its unreadable
    raw files. ``kbmod.json`` keeps them among its failed rows, as it always has."""
    listed = {id(p) for p in problems}
    res.frames = [r for r in res.frames if id(r) not in listed]
    res.unusable = [{"path": str(cal_dir / p["file"]), "reason": p["reason"]}
                    for p in problems]
    return res
