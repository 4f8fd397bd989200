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
4. **template** (:func:`run_template_stage`): frames of the night or of neighbouring nights
   (registered onto this night's grid first), PSF-matched and combined in strips
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
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
from astep_dask.io.provenance import digest_of
from astep_dask.kbmod.difference import DifferenceJob, difference_task
from astep_dask.kbmod.export import (
    ExportJob,
    FrameMeasure,
    MeasureJob,
    choose_reference,
    export_provenance,
    export_task,
    measure_task,
)
from astep_dask.kbmod.kernels import effective_psf_variance, halo, matching_variances
from astep_dask.kbmod.products import (
    CalFrame,
    Reference,
    calibrated_frames,
    card_float,
    header_value,
    read_reference,
    reference_path,
    reference_wcs,
    stack_provenance,
    write_manifest,
    write_offsets,
    write_reference,
    write_stack,
)
from astep_dask.kbmod.skyfit import fitted_wcs
from astep_dask.kbmod.template import (
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
from astep_dask.kbmod.workunit import (
    WORKUNIT_PROV,
    WORKUNIT_SHARD_FOLDER,
    workunit_bytes,
    workunit_provenance,
    write_workunit,
)
from astep_dask.run.results import Progress, StageResult
from astep_dask.run.tasks import cluster_window, map_bounded
from astep_dask.version import __version__

__all__ = ["Dispatch", "export_night", "run_template_stage"]


@dataclass(frozen=True)
class Dispatch:
    """How the stage submits its tasks: the client, the night (in task names), the window
    of tasks in flight, retries, and the progress callback."""

    client: Any
    night: str
    window: Callable[[], int]
    retries: int
    progress: Progress | None = None

    def map(self, kind: str, fn: Callable, jobs: Sequence,
            on_result: Callable[[Any, Any], None]) -> None:
        """Run ``fn`` on every job (:func:`~astep_dask.run.tasks.map_bounded`), tasks named
        ``kbmod-<kind>-<night>-<i>``."""
        map_bounded(self.client, fn, jobs, on_result, window=self.window,
                    retries=self.retries, key=lambda i, _: f"kbmod-{kind}-{self.night}-{i}")

    def report(self, done: int, total: int, row: dict) -> None:
        """Tell the progress callback, when there is one."""
        if self.progress:
            self.progress(done, total, row)


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
    frames, problems = calibrated_frames(cal_dir) if cal_dir.is_dir() else ([], [])
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
        for folder in (kdir, reg_dir, kdir / KBMOD_NEIGHBOUR_FOLDER):
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
        return _unusable_apart(_finish(result, rows, failed, ks, started, reference),
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
            started: float, reference: Reference | None = None) -> StageResult:
    """Write the stack, offsets table and manifest (when there is something to write),
    complete the summary (what ``kbmod.json`` holds) and return it as the stage's result."""
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
            if counts["done"] or header_value(stack, "STKPROV") != prov:
                write_stack(stack, good, kdir, reference, ks, prov)
            result["stack"] = stack
            wu = kdir / f"{night}{KBMOD_WORKUNIT_SUFFIX}"
            shard = 0 < ks.workunit_shard_mb * 2**20 < workunit_bytes(len(good),
                                                                       reference.shape)
            wprov = workunit_provenance(good, reference)
            at = kdir / WORKUNIT_SHARD_FOLDER / wu.name if shard else wu
            if header_value(at, WORKUNIT_PROV) != wprov:
                write_workunit(wu, good, kdir, reference, night, wprov, sharded=shard)
            result["workunit"], result["workunit_sharded"] = at, shard
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


def _unusable_apart(res: StageResult, problems: list[dict], cal_dir: Path) -> StageResult:
    """The stage's result with the calibrated files that cannot be read (``problems``)
    moved from its frames to its unusable inputs, as ``calibrate`` reports its unreadable
    raw files. ``kbmod.json`` keeps them among its failed rows, as it always has."""
    listed = {id(p) for p in problems}
    res.frames = [r for r in res.frames if id(r) not in listed]
    res.unusable = [{"path": str(cal_dir / p["file"]), "reason": p["reason"]}
                    for p in problems]
    return res


# --------------------------------------------------------------------------- template stage


def run_template_stage(run: Dispatch, *, night_dir: Path, out: Path | None, kdir: Path,
                       reference: Reference, field: str, filt: str, rows: list[dict],
                       ks: KbmodSettings, ts: TemplateSettings, force: bool
                       ) -> tuple[list[dict], dict]:
    """Template, then one difference task per registered frame of the night.

    ``rows`` are the registration rows (``output`` a file of ``registered/``); ``field``
    and ``filt`` (the reference frame's ``OBJECT`` and filter) choose neighbouring nights.
    Returns the rows of the KBMOD files (registration figures plus the difference's
    ``output``, ``status``, ``provenance``, ``psf_sigma``) and a summary of the template
    (``file``, ``mode``, ``frames``, ``nights``, ``skipped_nights``, ``failed_frames``,
    ``psf_sigma``, ``provenance``, ``error``, ``seconds``).
    """
    reg_dir = kdir / KBMOD_REGISTERED_FOLDER
    good = [_as_written(r) for r in rows if r.get("status") in ("done", "skipped")]
    info: dict = {"file": None, "mode": None, "frames": 0, "nights": [], "skipped_nights": [],
                  "failed_frames": [], "psf_sigma": None, "provenance": None, "error": None,
                  "seconds": 0.0}
    t0 = time.perf_counter()
    sig_med = float(np.median([_sigma0(r, np.nan) for r in good] or [np.nan]))
    sig_med = sig_med if np.isfinite(sig_med) else ks.psf_sigma_guess
    effective: dict[str, tuple[float, float]] = {}
    if ts.nights <= 0:
        info["mode"] = "night, leave-one-out"
        tframes = [_template_frame(r, reg_dir / r["output"], run.night, True)
                   for r in spread(good, ts.max_frames)]
    else:
        tframes = _neighbour_frames(run, night_dir, out, kdir, reference, field, filt, ks, ts,
                                    force, sig_med, info, effective)
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
    tprov = template_provenance(tframes, target, ts)
    tpath = template_path(kdir, run.night)
    info.update(file=tpath, frames=len(tframes), provenance=tprov,
                psf_sigma=float(np.sqrt(target)))
    if force or header_value(tpath, "TPLPROV") != tprov:
        _combine_template(run, tpath, tframes, target, reference, ts, info["mode"], tprov)
    weights = {f.stem: f.weight for f in tframes if f.own}
    jobs = [
        DifferenceJob(
            stem=r["stem"], registered=reg_dir / r["output"],
            output=kdir / r["output"].replace(KBMOD_REG_SUFFIX, KBMOD_SUFFIX), template=tpath,
            kernel_var=kvars.get(r["stem"], (0.0, 0.0)), weight=weights.get(r["stem"]),
            provenance=digest_of(r.get("provenance"), tprov, ts.digest(), __version__),
            template_provenance=tprov, target_sigma=float(np.sqrt(target)), settings=ts,
            wcs=reference.wcs, mode=info["mode"], force=force, grow=grow)
        for r in good
    ]
    out_rows = _difference_frames(run, jobs, good)
    info["seconds"] = time.perf_counter() - t0
    return out_rows, info


def _as_written(row: dict) -> dict:
    """A registration row with the figures the template uses rounded as the file's header
    holds them, so a re-run that reads them back (skipped frames) makes the same template."""
    out = dict(row)
    for key, digits in (("sky_rms", 3), ("psf_sigma_cal", 4), ("dx", 6), ("dy", 6)):
        if out.get(key) is not None:
            out[key] = card_float(out[key], digits)
    return out


def _weight(row: dict) -> float:
    """A frame's weight in the template: 1 / sky variance (1 when unknown)."""
    rms = row.get("sky_rms")
    try:
        rms = float(rms)
    except (TypeError, ValueError):
        return 1.0
    return 1.0 / rms**2 if np.isfinite(rms) and rms > 0 else 1.0


def _sigma0(row: dict, fallback: float) -> float:
    """A frame's PSF σ before resampling, ``fallback`` when unknown."""
    try:
        s = float(row.get("psf_sigma_cal"))
    except (TypeError, ValueError):
        return fallback
    return s if np.isfinite(s) and s > 0 else fallback


def _template_frame(r: dict, path: Path, night: str, own: bool) -> TemplateFrame:
    """A frame going into the template, from its registration row (weight not yet
    normalised, no matching kernel yet)."""
    return TemplateFrame(stem=r["stem"], night=night, path=path, mjd=float(r["mjd"]),
                         weight=_weight(r), kernel_var=(0.0, 0.0), own=own,
                         provenance=str(r.get("provenance", "")))


def _neighbour_frames(run: Dispatch, night_dir: Path, out: Path | None, kdir: Path,
                      reference: Reference, field: str, filt: str, ks: KbmodSettings,
                      ts: TemplateSettings, force: bool, sig_med: float, info: dict,
                      effective: dict[str, tuple[float, float]]) -> list[TemplateFrame]:
    """The template frames from the ``ts.nights`` nearest nights of the field, registered
    onto this night's grid (one export task each, in ``template_frames/``). Fills in the
    summary ``info`` (mode, nights, skipped nights, failed frames) and each frame's
    effective PSF variance in ``effective``."""
    nights, skipped = neighbour_nights(night_dir, out, ts.nights, field, filt)
    info["skipped_nights"] = skipped
    info["nights"] = [n for n, _ in nights]
    info["mode"] = "nights " + ",".join(info["nights"])
    per_night = (ts.max_frames // max(len(nights), 1)) if ts.max_frames > 0 else 0
    ndir = kdir / KBMOD_NEIGHBOUR_FOLDER
    jobs = []
    for _, frames in nights:
        for f in spread(frames, per_night):
            jobs.append(ExportJob(frame=f, output=ndir / f"{f.stem}{KBMOD_REG_SUFFIX}",
                                  provenance=export_provenance(f, reference, ks),
                                  reference=reference, settings=ks, force=force))
    night_of = {f.stem: n for n, frames in nights for f in frames}
    done_rows: list[dict] = []

    def registered(job: ExportJob, row: dict) -> None:
        done_rows.append(row)
        run.report(len(done_rows), len(jobs), {**row, "stage": "template frame"})

    run.map("tframe", export_task, jobs, registered)
    tframes = []
    for r in sorted(done_rows, key=lambda r: (r["mjd"], r["stem"])):
        if r["status"] in ("done", "skipped"):
            r = _as_written(r)
            tframes.append(_template_frame(r, ndir / r["output"], night_of.get(r["stem"], ""),
                                           False))
            effective[r["stem"]] = effective_psf_variance(
                _sigma0(r, sig_med), float(r["dx"]), float(r["dy"]))
        else:
            info["failed_frames"].append({k: r.get(k) for k in ("file", "reason")})
    return tframes


def _combine_template(run: Dispatch, path: Path, tframes: list[TemplateFrame], target: float,
                      reference: Reference, ts: TemplateSettings, mode: str,
                      provenance: str) -> None:
    """Combine the template in strips of rows (one task each) and write it to ``path``."""
    grow = round(ts.grow * float(np.sqrt(target)))
    sat_halo = round(ts.saturation_halo * 2.354820045 * float(np.sqrt(target)))
    ny, nx = reference.shape
    # a row's result depends on rows within the kernel's half-width, then on the
    # rejections grown by ``grow`` px at each clipping iteration
    pad = max([halo(f.kernel_var) for f in tframes] + [0]) + max(
        (ts.iterations + 1) * grow, sat_halo)
    jobs = [StripJob(frames=tuple(tframes), y0=a, y1=b, ny=ny, pad=pad, settings=ts,
                     grow=grow, sat_halo=sat_halo)
            for a, b in strips(ny, nx, len(tframes), ts.memory_mb)]
    parts: list = []

    def combined(job: StripJob, res: tuple) -> None:
        parts.append(res[:3])
        run.report(len(parts), len(jobs), {"file": f"rows {job.y0}-{job.y1}",
                                           "status": "combined", "stage": "template"})

    run.map("template", strip_task, jobs, combined)
    cards = template_cards(run.night, mode, tframes, target, provenance, reference.stem, ts)
    write_template(path, assemble(parts, ny, nx), tframes, cards, reference.wcs)


def _difference_frames(run: Dispatch, jobs: list[DifferenceJob], good: list[dict]
                       ) -> list[dict]:
    """Make the difference frames (one task each): the rows of the KBMOD files, each the
    registration row ``good`` of its frame updated with the difference's figures."""
    by_stem = {r["stem"]: r for r in good}
    out_rows: list[dict] = []

    def differenced(job: DifferenceJob, row: dict) -> None:
        merged = {**by_stem[job.stem], **{k: v for k, v in row.items() if v is not None}}
        merged["registered"] = by_stem[job.stem]["output"]
        merged["provenance_registered"] = by_stem[job.stem].get("provenance")
        out_rows.append(merged)
        run.report(len(out_rows), len(jobs),
                   {**merged, "file": job.output.name, "stage": "difference"})

    run.map("diff", difference_task, jobs, differenced)
    return out_rows
