"""Master bias, darks, flats and the bad-pixel mask of a night, built as dask reductions.

Each master is a robust combination (:mod:`astep_dask.core.combine`, through
:mod:`astep_dask.masters.reduce`) of a lazy row-strip stack, computed on whatever dask
scheduler is active (the distributed cluster in a run). Masters are written once per
night, atomically, with their provenance and a hash of their inputs and settings; a master
whose file already holds the same hash is read back, not rebuilt. How a frame's dark is
made from the masters is :func:`astep_dask.core.darks.dark_for_exptime`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from astep_dask.config import Settings
from astep_dask.core.badpix import bad_pixel_mask
from astep_dask.core.bits import MASK_DTYPE, Bit
from astep_dask.core.combine import Combined, NoiseModel
from astep_dask.core.darks import (
    DarkSolution,
    bias_level,
    dark_for_exptime,
    dark_how,
    darks_needed,
)
from astep_dask.core.exptimes import ExptimeTolerance, exptime_groups, format_exptimes
from astep_dask.core.illumination import transfer_correction
from astep_dask.core.stats import median, robust_sigma
from astep_dask.errors import CalibrationError
from astep_dask.io.headers import FrameType
from astep_dask.io.index import FileIndex
from astep_dask.io.layout import FrameRecord, Inventory, detector_values
from astep_dask.io.products import master_name
from astep_dask.io.provenance import digest_of, input_identity
from astep_dask.masters.flats import central_box, normalise_flat, screen_flats
from astep_dask.masters.illum import (
    choose_frames,
    compute_illumination,
    illum_cards,
    illum_inputs,
)
from astep_dask.masters.reduce import (
    combine_blocks,
    combine_cards,
    compute_combined,
    flat_level,
    inputs_table,
    prepared_stack,
    strip_chunked,
)
from astep_dask.masters.store import Master, MasterPaths, MasterStore, read_master
from astep_dask.masters.warm import WARM_FROM, build_warm, warm_digest, warm_name, warm_records
from astep_dask.version import __version__

__all__ = ["MasterBuilder", "MasterStep", "frame_needs"]


@dataclass(frozen=True)
class MasterStep:
    """One master of a night's recipe: its role, file name, raw inputs and the masters
    (by file name) it is made from."""

    role: str  # bias, dark, flat, mask, illum
    name: str
    records: tuple[FrameRecord, ...] = ()
    needs: tuple[str, ...] = ()
    exptime: float | None = None
    filter: str = ""
    digest: str = ""  # the provenance hash (ADHASH) the master made from these will have


def frame_needs(steps: Sequence[MasterStep], exptime: float, filt: str,
                tol: ExptimeTolerance | None = None) -> tuple[str, ...]:
    """File names of the masters of ``steps`` that calibrate a science frame of this
    exposure time and filter (as :func:`~astep_dask.masters.store.frame_masters` reads
    them: the darks :func:`~astep_dask.core.darks.darks_needed` names, the flat, the
    mask)."""
    by_role: dict[str, list[MasterStep]] = {}
    for s in steps:
        by_role.setdefault(s.role, []).append(s)
    darks = {s.exptime: s.name for s in by_role.get("dark", [])}
    bias = [s.name for s in by_role.get("bias", [])]
    used = darks_needed(exptime, darks, bool(bias), tol) or ()
    return (*bias, *(darks[et] for et in used),
            *(s.name for s in by_role.get("flat", []) if s.filter == filt),
            *(s.name for s in by_role.get("illum", []) if s.filter == filt),
            *(s.name for s in by_role.get("mask", [])),
            *(s.name for s in by_role.get("warm", [])))


def _solutions(exptimes: Sequence[float], bias: Master | None, darks: dict[float, Master],
               tol: ExptimeTolerance | None = None) -> dict[float, DarkSolution]:
    """The darks to subtract for each exposure time: called only when a master that needs
    them is built, so that a run reusing its masters reads none of the darks' pixels."""
    return {et: dark_for_exptime(et, bias, darks, tol) for et in exptimes}


class MasterBuilder:
    """The master recipe of one night: bias → darks per exposure time → flat per filter →
    bad-pixel mask (which also normalises the new flats) → illumination correction per
    filter (from the science frames flat-fielded in memory), each built into ``out_dir``
    or reused from it (:class:`~astep_dask.masters.store.MasterStore`).

    Parameters
    ----------
    inventory
        The night's inventory.
    out_dir
        The night's output folder.
    settings
        Combination, flat, mask and detector settings (their hash is in every master's).
    reuse_foreign, fallbacks, index
        As :class:`~astep_dask.masters.store.MasterStore`.
    failed
        The masters an earlier run could not make (:attr:`MasterReport.failed`): one with
        the same provenance hash is not tried again.
    """

    def __init__(self, inventory: Inventory, out_dir: Path, settings: Settings,
                 reuse_foreign: bool = False, fallbacks: Sequence[Path] = (),
                 progress: Callable[[int, int, dict], None] | None = None,
                 index: FileIndex | None = None, failed: dict[str, str] | None = None):
        self.inv = inventory
        self.failed_before = dict(failed or {})  # an earlier run's MasterReport.failed
        self.progress = progress
        self.out = Path(out_dir)
        self.settings = settings
        self.store = MasterStore(self.out, reuse_foreign, fallbacks, settings.resume.verify,
                                 index)
        self.report = self.store.report
        sci = inventory.exptimes(FrameType.SCIENCE)
        flat = sorted(set(self._exptime_of(inventory.select(FrameType.FLAT)).values()))
        self.science_exptime = sci[0] if sci else None
        self.flat_exptime = flat[0] if flat else None

    def plan(self) -> list[MasterStep]:
        """The masters this night can make from its own frames, in the order :meth:`build`
        makes them, each with the masters it needs, by the rules :meth:`build` follows
        (``min_frames`` inputs; the darks :func:`~astep_dask.core.darks.darks_needed`
        names). Which are reused, which flats are rejected and which masters come from
        another night are decided while building; the flow chart draws this plan."""
        need = self.settings.combine.min_frames
        bias_recs = self.inv.select(FrameType.BIAS)
        bias = (MasterStep("bias", self._name("bias"), tuple(bias_recs),
                           digest=self.bias_digest(bias_recs))
                if bias_recs and len(bias_recs) >= need else None)
        after_bias = (bias.name,) if bias else ()
        bias_digest = bias.digest if bias else None
        darks: dict[float, MasterStep] = {}
        for et, recs in self._groups(self.inv.select(FrameType.DARK)).items():
            if len(recs) >= need:
                darks[et] = MasterStep("dark", self._name("dark", et), tuple(recs), after_bias,
                                       exptime=et,
                                       digest=self.dark_digest(et, recs, bias_digest))
        dark_digests = [d.digest for d in darks.values()]
        flats = []
        for filt in self.inv.filters(FrameType.FLAT):
            recs = self.inv.select(FrameType.FLAT, filter=filt)
            used = [darks_needed(et, darks, bias is not None, self.tol)
                    for et in sorted(set(self._exptime_of(recs).values()))]
            if len(recs) < need or any(u is None for u in used):
                continue
            ets = sorted({et for u in used for et in u})
            flats.append(MasterStep("flat", self._name("flat", filter=filt), tuple(recs),
                                    (*after_bias, *(darks[et].name for et in ets)),
                                    filter=filt, digest=self.flat_digest(
                                        filt, recs, bias_digest, dark_digests)))
        steps = [*([bias] if bias else []), *darks.values(), *flats]
        mask_digest = self.mask_digest([f.digest for f in flats], dark_digests)
        if flats or darks:
            hot = (darks[max(darks)].name,) if darks else ()
            steps.append(MasterStep("mask", self._name("mask"), (),
                                    (*hot, *(f.name for f in flats)), digest=mask_digest))
        il = self.settings.illum
        for f in flats if il.enabled else ():
            sci = [r for r in self.inv.select(FrameType.SCIENCE, filter=f.filter)
                   if darks_needed(r.exptime, darks, bias is not None, self.tol) is not None]
            if len(sci) < il.min_frames:
                continue
            ets = sorted({et for r in sci for et in darks_needed(
                r.exptime, darks, bias is not None, self.tol) or ()})
            hows = {et: dark_how(et, darks, bias is not None, self.tol)
                    for et in sorted({r.exptime for r in sci})}
            steps.append(MasterStep("illum", self._name("illum", filter=f.filter),
                                    tuple(choose_frames(sci, il.max_frames)),
                                    (*after_bias, *(darks[et].name for et in ets), f.name,
                                     self._name("mask")), filter=f.filter,
                                    digest=self.illum_digest(f.filter, sci, f.digest,
                                                             mask_digest, hows)))
        science = self.inv.select(FrameType.SCIENCE)
        if sample := warm_records(science, {f.filter for f in flats}, self.settings):
            used = [s for s in steps if s.role in WARM_FROM]
            steps.append(MasterStep("warm", warm_name(self.inv.night), tuple(sample),
                                    tuple(s.name for s in used), digest=warm_digest(
                                        sample, [s.digest for s in used], self.settings)))
        return steps

    # -- helpers ---------------------------------------------------------------------
    @property
    def tol(self) -> ExptimeTolerance:
        """When two exposure times are the same (``[combine] exptime_rtol``, ``_atol``)."""
        return ExptimeTolerance.of(self.settings.combine)

    def _groups(self, recs: Sequence[FrameRecord]) -> dict[float, list[FrameRecord]]:
        """``recs`` by exposure-time group (:func:`~astep_dask.core.exptimes.exptime_groups`),
        each named by its median time, in the order of ``recs`` within a group."""
        names = exptime_groups([r.exptime for r in recs], self.tol)
        out: dict[float, list[FrameRecord]] = {}
        for r in recs:
            out.setdefault(names[float(r.exptime)], []).append(r)
        return dict(sorted(out.items()))

    def _exptime_of(self, recs: Sequence[FrameRecord]) -> dict[float, float]:
        """Each of ``recs``' exposure times mapped to its group's name."""
        return exptime_groups([r.exptime for r in recs], self.tol)

    def _name(self, role: str, exptime: float | None = None, filter: str = "") -> str:
        return master_name(self.inv.night, role, exptime, filter, self.science_exptime,
                           self.flat_exptime)

    def _fallback(self, name_suffix: str, role: str, why: str) -> Master | None:
        return self.store.fallback(self.inv.night, name_suffix, role, why)

    def _new(self, master: Master, path: Path) -> None:
        """Write a newly built master and report it."""
        self.store.write(master, path)
        self.report.built.append(path.name)

    def _enough(self, records: Sequence[FrameRecord], what: str,
                need: int | None = None) -> bool:
        """At least ``need`` records (default ``[combine] min_frames``), else a note."""
        need = self.settings.combine.min_frames if need is None else need
        if len(records) >= need:
            return True
        self.report.notes.append(f"{what}: {len(records)} usable frame(s), need {need}")
        return False

    def _combine(self, records: Sequence[FrameRecord], subtract=None, levels=None) -> Combined:
        return compute_combined(self._combine_lazy(records, subtract, levels))[0]

    def _combine_lazy(self, records: Sequence[FrameRecord], subtract=None,
                      levels=None, pedestal: float | None = None) -> da.Array:
        """The lazy robust combination of ``records`` (see :func:`compute_combined`);
        ``pedestal``: the zero of the noise model's Poisson term for frames that carry the
        bias (default: their median level)."""
        stack = prepared_stack(records, self.settings)
        if subtract is not None:
            stack = stack - strip_chunked(subtract, stack)
        if levels is not None:
            stack = stack / xr.DataArray(np.asarray(levels, np.float32), dims="frame")
        noise = None
        if self.settings.combine.noise_clip:
            values = detector_values(records[0], self.settings.detector)
            noise = NoiseModel(
                gain=values.gain,
                read_noise=values.read_noise,
                levels=tuple(float(v) for v in levels) if levels is not None else (),
                pedestal=0.0 if (levels is not None or subtract is not None) else pedestal,
            )
        return combine_blocks(stack, self.settings.combine, noise)

    def _settings_digest(self) -> str:
        return self.settings.digest("combine", "flat", "mask", "detector")

    # -- provenance hashes (ADHASH): one formula per master, for the build and the plan --
    def bias_digest(self, recs: Sequence[FrameRecord]) -> str:
        """The provenance hash of the master bias made from ``recs``."""
        return digest_of("bias", input_identity(recs), self._settings_digest(), __version__)

    def dark_digest(self, et: float, recs: Sequence[FrameRecord], bias: str | None) -> str:
        """... of the master dark of exposure ``et`` (``bias``: the bias's hash, if any)."""
        return digest_of("dark", et, input_identity(recs), bias, self._settings_digest(),
                         __version__)

    def flat_digest(self, filt: str, recs: Sequence[FrameRecord], bias: str | None,
                    darks: Sequence[str]) -> str:
        """... of the master flat of ``filt`` (the night's bias and darks' hashes)."""
        dark_digest = sorted([bias or "", *darks])
        return digest_of("flat", filt, input_identity(recs), dark_digest,
                         self._settings_digest(), __version__)

    def mask_digest(self, flats: Sequence[str], darks: Sequence[str]) -> str:
        """... of the bad-pixel mask (the flats' and darks' hashes)."""
        return digest_of("mask", sorted(flats), sorted(darks), self._settings_digest(),
                         __version__)

    def illum_digest(self, filt: str, recs: Sequence[FrameRecord], flat: str, mask: str,
                     hows: dict[float, str]) -> str:
        """... of the illumination correction of ``filt`` from the science ``recs``."""
        return digest_of("illum", filt, input_identity(recs, content=False), flat, mask,
                         sorted(f"{et:g}:{how}" for et, how in hows.items()),
                         self.settings.digest("illum", "detector"), __version__)

    # -- masters ---------------------------------------------------------------------
    def bias(self) -> Master | None:
        """Master bias, when the night has enough bias frames."""
        recs = self.inv.select(FrameType.BIAS)
        if not recs or not self._enough(recs, "bias"):
            return None
        digest = self.bias_digest(recs)
        path = self.out / self._name("bias")
        if (m := self.store.existing(path, digest)) is not None:
            return m
        res = self._combine(recs)
        m = Master("bias", res.data, res.var, res.count, digest,
                   combine_cards(self.settings, len(recs), res), inputs_table(recs))
        self._new(m, path)
        return m

    def darks(self, bias: Master | None) -> dict[float, Master]:
        """Master dark per exposure time (bias-subtracted when there is a bias)."""
        out: dict[float, Master] = {}
        todo = []  # darks to build, all in one graph
        groups = self._groups(self.inv.select(FrameType.DARK))
        for et, recs in groups.items():
            name = self._name("dark", et)
            if not self._enough(recs, f"dark {et:g}s"):
                fb = self._fallback(name.split("_", 1)[1], "dark", "too few frames")
                if fb is not None:
                    out[et] = fb
                continue
            digest = self.dark_digest(et, recs, bias.digest if bias else None)
            path = self.out / name
            if (m := self.store.existing(path, digest)) is None:
                todo.append((et, recs, digest, path))
            else:
                out[et] = m
        zero = self._carried_bias(groups) if todo and bias is None else None
        lazy = [self._combine_lazy(recs, subtract=bias.data if bias is not None else None,
                                   pedestal=zero)
                for _, recs, _, _ in todo]
        for (et, recs, digest, _), res in zip(todo, compute_combined(*lazy), strict=True):
            cards = combine_cards(self.settings, len(recs), res)
            cards["EXPTIME"] = (float(et), "[s] exposure time of the darks")
            cards["EXPTIMES"] = (format_exptimes(r.exptime for r in recs),
                                 "[s] exposure times of the darks combined")
            cards["DARKBIAS"] = (bias is not None,
                                 "bias subtracted (F: the dark carries the bias)")
            if bias is not None:
                cards["BIASHASH"] = (bias.digest, "ADHASH of the bias subtracted")
            if zero is not None:
                cards["DARKZERO"] = (zero, "[adu] bias level, zero of dark current noise")
            out[et] = Master("dark", res.data, res.var, res.count, digest, cards,
                             inputs_table(recs))
        out = dict(sorted(out.items()))
        for et, _, _, path in todo:
            self._new(out[et], path)
        if not out and self.science_exptime is not None:
            fb = self._fallback(self._name("dark", self.science_exptime).split("_", 1)[1],
                                "dark", "no usable darks")
            if fb is not None:
                out[self.science_exptime] = fb
        return out

    def _carried_bias(self, groups: dict[float, list[FrameRecord]]) -> float | None:
        """The bias level of darks that carry the bias (no bias frames), for their noise
        model: :func:`~astep_dask.core.darks.bias_level` from the median of a central box
        of one dark of each of the shortest and longest exposure times (read sparsely,
        :func:`~astep_dask.masters.flats.central_box`); None with one exposure time."""
        if len(groups) < 2 or not self.settings.combine.noise_clip:
            return None
        ends = {et: recs[len(recs) // 2] for et, recs in groups.items()
                if et in (min(groups), max(groups))}
        box = central_box(next(iter(ends.values())), self.settings.flat)
        overscan = self.settings.detector.overscan == "auto"
        levels = dask.compute(*[dask.delayed(flat_level)(r, box, np.float32(0), overscan)
                                for r in ends.values()])
        return bias_level(dict(zip(ends, levels, strict=True)))

    def flats(self, bias: Master | None, darks: dict[float, Master]) -> dict[str, Master]:
        """Master flat per filter: dark-subtracted, level-scaled, clipped. New flats are
        not yet normalised nor written: :meth:`mask` does both, once the mask is known."""
        out: dict[str, Master] = {}
        for filt in self.inv.filters(FrameType.FLAT):
            recs = self.inv.select(FrameType.FLAT, filter=filt)
            suffix = self._name("flat", filter=filt).split("_", 1)[1]
            exptimes = sorted(set(self._exptime_of(recs).values()))
            try:  # can a dark be made for each? (without the darks' pixels)
                for et in exptimes:
                    dark_how(et, darks, bias is not None, self.tol)
            except CalibrationError as exc:
                self.report.notes.append(f"flat {filt}: {exc}")
                m = self._fallback(suffix, "flat", str(exc))
            else:
                m = self._flat(filt, recs,
                               partial(_solutions, exptimes, bias, darks, self.tol), bias,
                               darks)
            if m is not None:
                out[filt] = m
        return out

    def _flat(self, filt: str, recs: list[FrameRecord],
              solve: Callable[[], dict[float, DarkSolution]],
              bias: Master | None, darks: dict[float, Master]) -> Master | None:
        """The master flat of one filter: reused, built from its usable flats (the darks
        to subtract from ``solve()``), or taken from another night when too few are
        usable."""
        digest = self.flat_digest(filt, recs, bias.digest if bias else None,
                                  [d.digest for d in darks.values()])
        name = self._name("flat", filter=filt)
        if (m := self.store.existing(self.out / name, digest)) is not None:
            return m
        dark_info = solve()
        group = self._exptime_of(recs)  # a flat's exposure time -> its group's
        fs = self.settings.flat
        box = central_box(recs[0], fs)
        dark_boxes = {et: dask.delayed(np.ascontiguousarray(d.total[box]))
                      for et, d in dark_info.items()}
        overscan = self.settings.detector.overscan == "auto"
        levels = dask.compute(*[
            dask.delayed(flat_level)(r, box, dark_boxes[group[r.exptime]], overscan)
            for r in recs
        ])
        dark_levels = {r.exptime: median(dark_info[group[r.exptime]].total) for r in recs}
        keep, kept_levels, rejected = screen_flats(recs, levels, dark_levels, fs,
                                                   self.settings.detector)
        self.report.rejected.extend(rejected)
        if not self._enough(keep, f"flat {filt}"):
            return self._fallback(name.split("_", 1)[1], "flat", "too few usable flats")
        how = {dark_info[group[r.exptime]].how for r in keep}
        dark_stack = xr.DataArray(
            np.stack([dark_info[group[r.exptime]].total for r in keep]) if len(how) > 1
            else dark_info[group[keep[0].exptime]].total,
            dims=("frame", "y", "x") if len(how) > 1 else ("y", "x"),
        )
        res = self._combine(keep, subtract=dark_stack, levels=kept_levels)
        cards = combine_cards(self.settings, len(keep), res)
        cards["FILTER"] = (filt, "filter")
        cards["DARKMODE"] = ("; ".join(sorted(how)), "dark subtracted from the flats")
        cards["NREJECT"] = (len(recs) - len(keep), "flats rejected (see manifest)")
        cards["EXPTIMES"] = (format_exptimes(r.exptime for r in keep),
                             "[s] exposure times of the flats combined")
        return Master("flat", res.data, res.var, res.count, digest, cards,
                      inputs_table(keep, kept_levels))

    def mask(self, bias: Master | None, darks: dict[float, Master],
             flats: dict[str, Master]) -> Master:
        """Bad-pixel mask (hot pixels from the longest dark, dead ones from the flats);
        then the new flats are normalised over its good pixels and written."""
        digest = self.mask_digest([m.digest for m in flats.values()],
                                  [d.digest for d in darks.values()])
        path = self.out / self._name("mask")
        mask = self.store.existing(path, digest)
        if mask is None:
            hot_source = darks[max(darks)].data if darks else None
            mask = self._bad_pixels(hot_source, flats, digest)
            self._new(mask, path)
        for filt, f in flats.items():
            if f.path is None:  # new; reused and fallback flats are already normalised
                normalise_flat(f, mask.data)
                self._new(f, self.out / self._name("flat", filter=filt))
        return mask

    def _bad_pixels(self, hot_source: np.ndarray | None, flats: dict[str, Master],
                    digest: str) -> Master:
        """A new bad-pixel mask: hot pixels of ``hot_source``, dead pixels of each flat."""
        ms = self.settings.mask
        masks = [
            bad_pixel_mask(f.data / np.float32(median(f.data, skip_nan=True)), hot_source, ms)
            for f in flats.values()
        ]
        if not masks:
            if hot_source is None:
                raise CalibrationError("neither darks nor flats: no bad-pixel mask")
            masks.append(bad_pixel_mask(None, hot_source, ms))
        data = np.bitwise_or.reduce(masks)
        cards = {
            "HOTSIG": (ms.hot_sigma, "hot: dark excess above this many sigma"),
            "DEADSIG": (ms.dead_sigma, "dead: flat deficit above this many sigma"),
            "DEADFLR": (ms.dead_floor, "dead: minimum fractional deficit"),
            "NHOT": (int(((data >> Bit.HOT) & 1).sum()), "hot pixels"),
            "NDEAD": (int(((data >> Bit.DEAD) & 1).sum()), "dead pixels (incl. columns)"),
        }
        if hot_source is not None:
            cards["HOTNOISE"] = (robust_sigma(hot_source), "[adu] robust sigma of dark")
        return Master("mask", data.astype(MASK_DTYPE), None, None, digest, cards)

    def illums(self, bias: Master | None, darks: dict[float, Master],
               flats: dict[str, Master], mask: Master) -> dict[str, Master]:
        """Illumination correction per filter (``[illum]``), from the night's science
        frames flat-fielded in memory with the new master flat: reused, built, or taken
        from the nearest night when too few frames are usable (``[masters] fallback``)."""
        out: dict[str, Master] = {}
        if not self.settings.illum.enabled:
            return out
        for filt, flat in flats.items():
            recs = self.inv.select(FrameType.SCIENCE, filter=filt)
            name = self._name("illum", filter=filt)
            hows = {}
            for et in sorted({r.exptime for r in recs}):
                try:
                    hows[et] = dark_how(et, darks, bias is not None, self.tol)
                except CalibrationError:
                    continue
            usable = [r for r in recs if r.exptime in hows]
            solve = partial(_solutions, tuple(hows), bias, darks, self.tol)
            if (m := self._illum(filt, usable, hows, solve, flat, mask)) is None:
                m = self._fallback(name.split("_", 1)[1], "illum",
                                   "too few usable science frames")
                if m is not None and (m := self._transfer(m, flat, mask)) is not None:
                    self.report.illum[filt] = _illum_summary(m)
            if m is not None:
                out[filt] = m
        return out

    def _illum(self, filt: str, recs: list[FrameRecord], hows: dict[float, str],
               solve: Callable[[], dict[float, DarkSolution]], flat: Master,
               mask: Master) -> Master | None:
        il = self.settings.illum
        what = f"illumination {filt or '(no filter)'}"
        if not self._enough(recs, what, il.min_frames):
            return None
        digest = self.illum_digest(filt, recs, flat.digest, mask.digest, hows)
        path = self.out / self._name("illum", filter=filt)
        if (m := self.store.existing(path, digest)) is not None:
            self.report.illum[filt] = _illum_summary(m)
            return m
        if (why := self.failed_before.get(digest)) is not None:
            self.report.failed[digest] = why
            self.report.notes.append(f"{what}: {why}")
            return None
        dark_info = solve()
        result, used = compute_illumination(recs, {et: d.total for et, d in dark_info.items()},
                                            flat.data, mask.data, self.settings)
        if result.correction is None:
            why = result.why or (f"{result.n_used} usable frame(s) of {len(used)}, need "
                                 f"{il.min_frames}")
            self.report.failed[digest] = why
            self.report.notes.append(f"{what}: {why}")
            return None
        m = Master("illum", result.correction, None, None, digest,
                   illum_cards(result, self.settings, filt, self._name("flat", filter=filt)),
                   illum_inputs(used, result))
        self._new(m, path)
        self.report.illum[filt] = _illum_summary(m)
        return m

    def _transfer(self, m: Master, flat: Master, mask: Master) -> Master | None:
        """Another night's correction ``m`` fitted to this night's ``flat``
        (:func:`~astep_dask.core.illumination.transfer_correction`), through the flat it
        was made for (``ILLFLAT``, beside it); as it is, and said so, when that flat is
        not there; None (not used) when it has another shape."""
        source = m.path.parent / str(m.cards.get("ILLFLAT", ("",))[0]) if m.path else None
        if source is None or not source.is_file():
            self.report.notes.append(f"{m.cards['FALLBACK'][0]}: its flat is not beside it; "
                                     "used as it is")
            return m
        flat_from = read_master(source, "flat").data
        if flat_from.shape != flat.data.shape or m.data.shape != flat.data.shape:
            self.report.notes.append(f"{m.cards['FALLBACK'][0]}: another shape; not used")
            return None
        m.data = transfer_correction(m.data, flat_from, flat.data, mask.data == 0,
                                     self.settings.illum)
        m.cards["ILLXFER"] = (source.name, "fitted to this flat through this one")
        m.cards["ILLFLAT"] = (self._name("flat", filter=str(m.cards["FILTER"][0])),
                              "master flat this corrects (divide it by this)")
        m.digest = digest_of("illum-transfer", m.digest, flat.digest, mask.digest)
        return m

    def build(self) -> MasterPaths:
        """Build or reuse every master; return their paths (once all are written).

        Raises
        ------
        CalibrationError
            When the night has neither darks nor bias frames (nor a fallback for them),
            or no bad-pixel mask can be made.
        """
        with self.store.writing():
            paths = self._build()
        # Warm pixels: cosmic-ray flags on a sample of science frames, calibrated by the
        # workers with the master files, now written (masters.warm).
        return build_warm(self.store, self.inv, self.settings, paths, self.failed_before)

    def _tell(self, done: int, what: str) -> None:
        """Progress of the master stage: bias, darks, flats, mask, illumination (5 steps)."""
        if self.progress:
            self.progress(done, 5, {"file": what, "status": "done", "stage": "masters"})

    def _build(self) -> MasterPaths:
        self.out.mkdir(parents=True, exist_ok=True)
        bias = self.bias()
        self._tell(1, "bias")
        darks = self.darks(bias)
        self._tell(2, "darks")
        if not darks and bias is None:
            why = "; ".join(self.report.notes) or "none in the night"
            raise CalibrationError(f"no usable dark frames and no bias frames ({why})")
        flats = self.flats(bias, darks)
        self._tell(3, "flats")
        mask = self.mask(bias, darks, flats)
        self._tell(4, "mask")
        illums = self.illums(bias, darks, flats, mask)
        self._tell(5, "illumination")
        for m in [*darks.values(), *flats.values(), *illums.values()]:
            if m.path is None or m.path.parent != self.out:
                # fallback masters are copied beside the night's own, under this night's name
                role = m.role
                name = self._name(role, m.exptime if role == "dark" else None,
                                  str(m.cards.get("FILTER", ("",))[0])
                                  if role in ("flat", "illum") else "")
                self.store.write(m, self.out / name)
        return MasterPaths(
            bias=bias.path if bias else None,
            darks=tuple(sorted((et, m.path) for et, m in darks.items())),
            flats=tuple(sorted((f, m.path) for f, m in flats.items())),
            mask=mask.path,
            illums=tuple(sorted((f, m.path) for f, m in illums.items())),
            tol=self.tol,
        )


def _illum_summary(m: Master) -> dict:
    """What the manifest says of an illumination master: file, frames, amplitude."""
    def card(key: str):
        return m.cards.get(key, (None,))[0]
    return {"file": m.path.name if m.path else None, "frames": card("NCOMBINE"),
            "rejected": card("NREJECT"), "amplitude": card("ILLAMP"),
            "noise": card("ILLNOISE"), "fallback": card("FALLBACK")}
