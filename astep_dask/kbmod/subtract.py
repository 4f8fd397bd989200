"""The template and difference steps of the KBMOD export (steps 4 and 5 of
:mod:`astep_dask.kbmod.stage`): the frames of the template (this night's, or neighbouring
nights' registered onto this night's grid), their PSF matching and combination in strips
(:func:`~astep_dask.kbmod.template.strip_task`), and one difference frame per frame
(:func:`~astep_dask.kbmod.difference.difference_task`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from astep_dask.config import KbmodSettings, TemplateSettings
from astep_dask.io.products import (
    KBMOD_NEIGHBOUR_FOLDER,
    KBMOD_REG_SUFFIX,
    KBMOD_REGISTERED_FOLDER,
    KBMOD_SUFFIX,
)
from astep_dask.io.provenance import digest_of
from astep_dask.kbmod.difference import DifferenceJob, NearFrame, difference_task
from astep_dask.kbmod.dispatch import Dispatch
from astep_dask.kbmod.export import (
    ExportJob,
    export_provenance,
    export_task,
)
from astep_dask.kbmod.kernels import (
    effective_psf_variance,
    halo,
    matching_variances,
    template_kernels,
    template_target,
)
from astep_dask.kbmod.products import (
    Reference,
    card_float,
    trusted,
)
from astep_dask.kbmod.template import (
    StripJob,
    TemplateFrame,
    assemble,
    blocks,
    mover_pad,
    neighbour_nights,
    spread,
    strip_task,
    template_cards,
    template_path,
    template_provenance,
    time_ranks,
    tracks_searched,
    write_template,
)
from astep_dask.version import __version__

__all__ = ["near_window", "run_template_stage"]


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
    ``psf_sigma``, ``provenance``, ``error``, ``seconds``, ``frames_left_out``: frames of
    wider PSF than the template's, left out of it).
    """
    reg_dir = kdir / KBMOD_REGISTERED_FOLDER
    good = [_as_written(r) for r in rows if r.get("status") in ("done", "skipped")]
    info: dict = {"file": None, "mode": None, "frames": 0, "nights": [], "skipped_nights": [],
                  "failed_frames": [], "psf_sigma": None, "provenance": None, "error": None,
                  "seconds": 0.0, "frames_left_out": 0}
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
                                                      float(r["dy"]), ks.resampling)
    need = max(ts.min_frames, 1) + (1 if ts.nights <= 0 else 0)
    if len(tframes) < need:
        where = "this night" if ts.nights <= 0 else f"{ts.nights} neighbouring night(s)"
        info["error"] = (f"template: {len(tframes)} usable frame(s) from {where}, at least "
                         f"{need} needed (use the sky-only export or other nights)")
        return [], info
    tkvars: dict[str, tuple[float, float]] = {}
    if ts.psf_match and ts.psf_target == "snr":
        own = {f.stem: effective[f.stem] for f in tframes}
        target = template_target(own, {r["stem"]: effective[r["stem"]] for r in good}, need)
        tframes = [f for f in tframes if max(effective[f.stem]) <= target]
        target, kvars = matching_variances(effective, target)
        tkvars = template_kernels(effective, target)
        info["frames_left_out"] = len(own) - len(tframes)
    elif ts.psf_match:
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
    if force or not trusted(tpath, "TPLPROV", tprov):
        _combine_template(run, tpath, tframes, target, reference, ts, info["mode"], tprov)
    weights = {f.stem: f.weight for f in tframes if f.own}
    ranks = {f.stem: int(r) for f, r in zip(tframes, time_ranks(tframes), strict=True)
             if f.own}
    window = near_window(ts.near_speed, target)
    jobs = [
        DifferenceJob(
            stem=r["stem"], registered=reg_dir / r["output"],
            output=kdir / r["output"].replace(KBMOD_REG_SUFFIX, KBMOD_SUFFIX), template=tpath,
            kernel_var=kvars.get(r["stem"], (0.0, 0.0)), weight=weights.get(r["stem"]),
            provenance=digest_of(r.get("provenance"), tprov, ts.digest(), __version__),
            template_provenance=tprov,
            target_sigma=_matched_sigma(effective[r["stem"]], target, ts.psf_match),
            settings=ts, wcs=reference.wcs, mode=info["mode"], force=force, grow=grow,
            rank=ranks.get(r["stem"]),
            template_kernel_var=tkvars.get(r["stem"], (0.0, 0.0)),
            near=_near(r, tframes, ranks, window), near_window=window)
        for r in good
    ]
    out_rows = _difference_frames(run, jobs, good)
    info["seconds"] = time.perf_counter() - t0
    return out_rows, info


def near_window(speed: float, target: float) -> float:
    """Half-width (days) of the time window around a frame whose template frames are left
    out of its template: the time a mover of ``speed`` px/day needs to move 2.5 PSF σ
    (σ² = ``target``); 0 when ``speed`` is 0 or the PSF is not known."""
    if not (speed > 0 and np.isfinite(target) and target > 0):
        return 0.0
    return 2.5 * float(np.sqrt(target)) / speed


def _near(row: dict, tframes: list[TemplateFrame], ranks: dict[str, int], window: float
          ) -> tuple[NearFrame, ...]:
    """The night's template frames (other than the frame ``row`` itself) taken within
    ``window`` days of it, nearest first, as many as leave at least half of the template's
    frames in it."""
    t = float(row["mjd"])
    own = [f for f in tframes if f.own and f.stem != row["stem"]]
    close = sorted((f for f in own if abs(f.mjd - t) <= window), key=lambda f: abs(f.mjd - t))
    room = len(tframes) // 2 - (1 if row["stem"] in ranks else 0)
    return tuple(NearFrame(f.path, f.kernel_var, f.weight, ranks[f.stem])
                 for f in close[:max(room, 0)])


def _matched_sigma(effective: tuple[float, float], target: float, match: bool) -> float:
    """A difference frame's PSF σ (KBMOD takes a circular one): per axis, the template's
    variance where the frame was matched up to it, the frame's own where the template was
    convolved to the frame, the two axes averaged; the template's when nothing is matched."""
    if not match:
        return float(np.sqrt(target))
    vx, vy = (max(v, target) for v in effective)
    return float(np.sqrt(0.5 * (vx + vy)))


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
                _sigma0(r, sig_med), float(r["dx"]), float(r["dy"]), ks.resampling)
        else:
            info["failed_frames"].append({k: r.get(k) for k in ("file", "reason")})
    return tframes


def _combine_template(run: Dispatch, path: Path, tframes: list[TemplateFrame], target: float,
                      reference: Reference, ts: TemplateSettings, mode: str,
                      provenance: str) -> None:
    """Combine the template in blocks (strips of rows, or tiles of a wide frame; one task
    each) and write it to ``path``."""
    grow = round(ts.grow * float(np.sqrt(target)))
    sat_halo = round(ts.saturation_halo * 2.354820045 * float(np.sqrt(target)))
    ny, nx = reference.shape
    # a row's result depends on rows within the kernel's half-width, then on the
    # rejections grown by ``grow`` px at each clipping iteration
    # (and, with the mover rejection, on its matched filter and its grown runs, twice,
    # then on the track search's reach)
    sigma = float(np.sqrt(target)) if np.isfinite(target) and target > 0 else 0.0
    pad = max([halo(f.kernel_var) for f in tframes] + [0]) + max(
        (ts.iterations + 1) * grow + mover_pad(ts, sigma, tracks_searched(ts, tframes, sigma)),
        sat_halo)
    jobs = [StripJob(frames=tuple(tframes), y0=a, y1=b, ny=ny, pad=pad, settings=ts,
                     grow=grow, sat_halo=sat_halo, psf_sigma=sigma, x0=c, x1=d, nx=nx)
            for a, b, c, d in blocks(ny, nx, len(tframes), ts.memory_mb, pad)]
    parts: list = []

    def combined(job: StripJob, res: tuple) -> None:
        parts.append((job.y0, job.y1, job.x0, job.x1, res[2]))
        run.report(len(parts), len(jobs), {
            "file": f"rows {job.y0}-{job.y1}, columns {job.x0}-{job.x1}",
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
