"""Master bias, darks, flats and the bad-pixel mask of a night, built as dask reductions.

Each master is a robust combination (:mod:`astep_dask.core.combine`, through
:mod:`astep_dask.masters.reduce`) of a lazy row-strip stack, computed on whatever dask
scheduler is active (the distributed cluster in a run). Masters are written once per
night, atomically, with their provenance and a hash of their inputs and settings; a master
whose file already holds the same hash is read back, not rebuilt. How a frame's dark is
made from the masters is :func:`astep_dask.core.darks.dark_for_exptime`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from astep_dask.config import Settings
from astep_dask.core.badpix import bad_pixel_mask
from astep_dask.core.bits import MASK_DTYPE, Bit
from astep_dask.core.combine import Combined, NoiseModel
from astep_dask.core.darks import dark_for_exptime
from astep_dask.core.stats import median, robust_sigma
from astep_dask.errors import CalibrationError
from astep_dask.io.layout import FrameRecord, FrameType, Inventory
from astep_dask.io.products import master_name
from astep_dask.io.provenance import digest_of, input_identity
from astep_dask.io.stack import frame_section
from astep_dask.masters.reduce import (
    combine_blocks,
    combine_cards,
    compute_combined,
    flat_level,
    inputs_table,
    prepared_stack,
    strip_chunked,
)
from astep_dask.masters.store import Master, MasterPaths, read_master, write_master
from astep_dask.version import __version__

__all__ = ["MasterBuilder", "MasterReport"]


@dataclass
class MasterReport:
    """What was built, reused or could not be made, for the manifest."""

    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


class MasterBuilder:
    """Builds (or reuses) every master of one night into ``out_dir``."""

    def __init__(self, inventory: Inventory, out_dir: Path, settings: Settings,
                 reuse_foreign: bool = False, fallbacks: Sequence[Path] = ()):
        self.inv = inventory
        self.out = Path(out_dir)
        self.settings = settings
        self.reuse_foreign = reuse_foreign
        self.fallbacks = list(fallbacks)
        self.report = MasterReport()
        sci = inventory.exptimes(FrameType.SCIENCE)
        flat = inventory.exptimes(FrameType.FLAT)
        self.science_exptime = sci[0] if sci else None
        self.flat_exptime = flat[0] if flat else None
        self._writer: ThreadPoolExecutor | None = None  # set while build() runs
        self._writes: list[Future] = []

    def _write(self, master: Master, path: Path) -> None:
        """Write a master: at once, or (inside :meth:`build`) on a background thread, so
        the FITS encoding and fsync overlap the next master's computation. The master's
        ``path`` is set either way; :meth:`build` waits for every write before returning."""
        if self._writer is None:
            write_master(master, path)
            return
        master.path = Path(path)
        self._writes.append(self._writer.submit(write_master, master, path))

    # -- helpers ---------------------------------------------------------------------
    def _name(self, role: str, exptime: float | None = None, filter: str = "") -> str:
        return master_name(self.inv.night, role, exptime, filter, self.science_exptime,
                           self.flat_exptime)

    def _existing(self, path: Path, digest: str) -> Master | None:
        if not path.exists():
            return None
        try:
            m = read_master(path)
        except (OSError, ValueError) as exc:
            self.report.notes.append(f"{path.name}: unreadable ({exc}); rebuilt")
            return None
        if m.digest == digest:
            self.report.reused.append(path.name)
            return m
        if not m.digest and self.reuse_foreign:
            self.report.reused.append(f"{path.name} (written by another tool)")
            m.digest = digest
            return m
        return None

    def _fallback(self, name_suffix: str, role: str, why: str) -> Master | None:
        """The same master from the nearest other night's output, if any."""
        night = np.datetime64(self.inv.night)
        candidates = []
        for folder in self.fallbacks:
            for p in folder.glob(f"*_{name_suffix}"):
                date = p.name.split("_", 1)[0]
                if date == self.inv.night:
                    continue
                try:
                    gap = abs((np.datetime64(date) - night).astype(int))
                except ValueError:
                    continue
                candidates.append((gap, p))
        if not candidates:
            return None
        _, path = min(candidates)
        m = read_master(path, role)
        m.cards["FALLBACK"] = (path.name, "master taken from another night")
        self.report.notes.append(f"{role} {name_suffix}: {why}; using {path}")
        return m

    def _enough(self, records: Sequence[FrameRecord], what: str) -> bool:
        need = self.settings.combine.min_frames
        if len(records) >= need:
            return True
        self.report.notes.append(f"{what}: {len(records)} usable frame(s), need {need}")
        return False

    def _combine(self, records: Sequence[FrameRecord], subtract=None, levels=None) -> Combined:
        return compute_combined(self._combine_lazy(records, subtract, levels))[0]

    def _combine_lazy(self, records: Sequence[FrameRecord], subtract=None,
                      levels=None) -> da.Array:
        """The lazy robust combination of ``records`` (see :func:`compute_combined`)."""
        stack = prepared_stack(records, self.settings)
        if subtract is not None:
            stack = stack - strip_chunked(subtract, stack)
        if levels is not None:
            stack = stack / xr.DataArray(np.asarray(levels, np.float32), dims="frame")
        noise = None
        if self.settings.combine.noise_clip:
            det = self.settings.detector
            noise = NoiseModel(
                gain=records[0].gain or det.gain,
                read_noise=records[0].read_noise or det.read_noise,
                levels=tuple(float(v) for v in levels) if levels is not None else (),
                pedestal=0.0 if (levels is not None or subtract is not None) else None,
            )
        return combine_blocks(stack, self.settings.combine, noise)

    def _settings_digest(self) -> str:
        return self.settings.digest("combine", "flat", "mask", "detector")

    # -- masters ---------------------------------------------------------------------
    def bias(self) -> Master | None:
        """Master bias, when the night has enough bias frames."""
        recs = self.inv.select(FrameType.BIAS)
        if not recs or not self._enough(recs, "bias"):
            return None
        digest = digest_of("bias", input_identity(recs), self._settings_digest(), __version__)
        path = self.out / self._name("bias")
        if (m := self._existing(path, digest)) is not None:
            return m
        res = self._combine(recs)
        m = Master("bias", res.data, res.var, res.count, digest,
                   combine_cards(self.settings, len(recs), res), inputs_table(recs))
        self._write(m, path)
        self.report.built.append(path.name)
        return m

    def darks(self, bias: Master | None) -> dict[float, Master]:
        """Master dark per exposure time (bias-subtracted when there is a bias)."""
        out: dict[float, Master] = {}
        todo = []  # darks to build, all in one graph
        for et in self.inv.exptimes(FrameType.DARK):
            recs = self.inv.select(FrameType.DARK, exptime=et)
            name = self._name("dark", et)
            if not self._enough(recs, f"dark {et:g}s"):
                fb = self._fallback(name.split("_", 1)[1], "dark", "too few frames")
                if fb is not None:
                    out[et] = fb
                continue
            digest = digest_of("dark", et, input_identity(recs), bias.digest if bias else None,
                               self._settings_digest(), __version__)
            path = self.out / name
            if (m := self._existing(path, digest)) is None:
                todo.append((et, recs, digest, path))
            else:
                out[et] = m
        lazy = [self._combine_lazy(recs, subtract=bias.data if bias is not None else None)
                for _, recs, _, _ in todo]
        for (et, recs, digest, path), res in zip(todo, compute_combined(*lazy), strict=True):
            cards = combine_cards(self.settings, len(recs), res)
            cards["EXPTIME"] = (float(et), "[s] exposure time of the darks")
            cards["DARKBIAS"] = (bias is not None,
                                 "bias subtracted (F: the dark carries the bias)")
            m = Master("dark", res.data, res.var, res.count, digest, cards,
                       inputs_table(recs))
            self._write(m, path)
            self.report.built.append(path.name)
            out[et] = m
        out = dict(sorted(out.items()))
        if not out and self.science_exptime is not None:
            fb = self._fallback(self._name("dark", self.science_exptime).split("_", 1)[1],
                                "dark", "no usable darks")
            if fb is not None:
                out[self.science_exptime] = fb
        return out

    def _central_box(self, rec: FrameRecord) -> tuple[slice, slice]:
        """Rows and columns (of the data section) where a flat's level is measured: every
        ``level_row_step``-th row of the central box, so that measuring the levels reads
        a small fraction of each flat before the combination reads it whole."""
        fs = self.settings.flat
        ny, nx = frame_section(rec).shape
        hy, hx = int(ny * fs.central_fraction / 2), int(nx * fs.central_fraction / 2)
        cy, cx = ny // 2, nx // 2
        step = max(1, min(fs.level_row_step, hy))
        return slice(cy - hy, cy + hy, step), slice(cx - hx, cx + hx)

    def flats(self, bias: Master | None, darks: dict[float, Master]) -> dict[str, Master]:
        """Master flat per filter: dark-subtracted, level-scaled, clipped, median 1."""
        out: dict[str, Master] = {}
        fs = self.settings.flat
        for filt in self.inv.filters(FrameType.FLAT):
            recs = self.inv.select(FrameType.FLAT, filter=filt)
            name = self._name("flat", filter=filt)
            suffix = name.split("_", 1)[1]
            exptimes = sorted({r.exptime for r in recs})
            try:
                dark_info = {et: dark_for_exptime(et, bias, darks) for et in exptimes}
            except CalibrationError as exc:
                self.report.notes.append(f"flat {filt}: {exc}")
                fb = self._fallback(suffix, "flat", str(exc))
                if fb is not None:
                    out[filt] = fb
                continue
            dark_digest = sorted(
                [bias.digest if bias else ""] + [d.digest for d in darks.values()]
            )
            digest = digest_of("flat", filt, input_identity(recs), dark_digest,
                               self._settings_digest(), __version__)
            path = self.out / name
            if (m := self._existing(path, digest)) is not None:
                out[filt] = m
                continue
            box = self._central_box(recs[0])
            dark_boxes = {et: dask.delayed(np.ascontiguousarray(d.total[box]))
                          for et, d in dark_info.items()}
            overscan = self.settings.detector.overscan == "auto"
            levels = dask.compute(*[
                dask.delayed(flat_level)(r, box, dark_boxes[r.exptime], overscan)
                for r in recs
            ])
            keep, kept_levels = [], []
            dark_levels = {et: median(d.total) for et, d in dark_info.items()}
            for r, level in zip(recs, levels, strict=True):
                dark_level = dark_levels[r.exptime]
                sat = r.saturation or self.settings.detector.saturation_adu
                if not np.isfinite(level):
                    reason = "no finite pixels in the central region"
                elif level < fs.min_level_adu:
                    reason = f"too little signal: level {level:.0f} ADU < {fs.min_level_adu:g}"
                elif level + dark_level > fs.max_level_fraction * sat:
                    reason = (f"near saturation: level {level + dark_level:.0f} ADU > "
                              f"{fs.max_level_fraction:g} x {sat:g}")
                else:
                    keep.append(r)
                    kept_levels.append(level)
                    continue
                self.report.rejected.append({"path": str(r.path), "reason": reason})
            if not self._enough(keep, f"flat {filt}"):
                fb = self._fallback(suffix, "flat", "too few usable flats")
                if fb is not None:
                    out[filt] = fb
                continue
            how = {dark_info[et].how for et in {r.exptime for r in keep}}
            dark_stack = xr.DataArray(
                np.stack([dark_info[r.exptime].total for r in keep]) if len(how) > 1
                else dark_info[keep[0].exptime].total,
                dims=("frame", "y", "x") if len(how) > 1 else ("y", "x"),
            )
            res = self._combine(keep, subtract=dark_stack, levels=kept_levels)
            cards = combine_cards(self.settings, len(keep), res)
            cards["FILTER"] = (filt, "filter")
            cards["DARKMODE"] = ("; ".join(sorted(how))[:68], "dark subtracted from the flats")
            cards["NREJECT"] = (len(recs) - len(keep), "flats rejected (see manifest)")
            m = Master("flat", res.data, res.var, res.count, digest, cards,
                       inputs_table(keep, kept_levels))
            out[filt] = m
        return out

    def mask(self, bias: Master | None, darks: dict[float, Master],
             flats: dict[str, Master]) -> Master:
        """Bad-pixel mask; also renormalises new flats to median 1 over good pixels and
        writes them."""
        hot_source = None
        if darks:
            et = max(darks)
            hot_source = darks[et].data
        digest = digest_of("mask", sorted(m.digest for m in flats.values()),
                           sorted(d.digest for d in darks.values()),
                           self._settings_digest(), __version__)
        path = self.out / self._name("mask")
        existing = self._existing(path, digest)
        if existing is not None:
            mask = existing
        else:
            masks = [
                bad_pixel_mask(f.data / np.float32(median(f.data, skip_nan=True)), hot_source,
                               self.settings.mask)
                for f in flats.values()
            ]
            if not masks:
                if hot_source is None:
                    raise CalibrationError("neither darks nor flats: no bad-pixel mask")
                masks.append(bad_pixel_mask(None, hot_source, self.settings.mask))
            data = np.bitwise_or.reduce(masks)
            ms = self.settings.mask
            cards = {
                "HOTSIG": (ms.hot_sigma, "hot: dark excess above this many sigma"),
                "DEADSIG": (ms.dead_sigma, "dead: flat deficit above this many sigma"),
                "DEADFLR": (ms.dead_floor, "dead: minimum fractional deficit"),
                "NHOT": (int(((data >> Bit.HOT) & 1).sum()), "hot pixels"),
                "NDEAD": (int(((data >> Bit.DEAD) & 1).sum()), "dead pixels (incl. columns)"),
            }
            if hot_source is not None:
                cards["HOTNOISE"] = (robust_sigma(hot_source), "[adu] robust sigma of dark")
            mask = Master("mask", data.astype(MASK_DTYPE), None, None, digest, cards)
            self._write(mask, path)
            self.report.built.append(path.name)
        for filt, f in flats.items():
            if f.path is not None:
                continue  # reused or fallback: already normalised
            good = (mask.data == 0) & np.isfinite(f.data)
            norm = np.float32(median(f.data[good]))
            f.data = f.data / norm
            if f.var is not None:
                f.var = f.var / (norm * norm)
            f.cards["FLATNORM"] = (float(norm), "divided by the median of good pixels")
            f.cards["NORMMETH"] = ("median of unmasked pixels", "flat normalisation")
            self._write(f, self.out / self._name("flat", filter=filt))
            self.report.built.append(f.path.name)
        return mask

    def build(self) -> MasterPaths:
        """Build or reuse every master; return their paths (once all are written)."""
        with ThreadPoolExecutor(1, thread_name_prefix="master-writer") as writer:
            self._writer, self._writes = writer, []
            try:
                paths = self._build()
            finally:
                self._writer = None
        for w in self._writes:
            w.result()  # re-raise a failed write
        return paths

    def _build(self) -> MasterPaths:
        self.out.mkdir(parents=True, exist_ok=True)
        bias = self.bias()
        darks = self.darks(bias)
        if not darks and bias is None:
            why = "; ".join(self.report.notes) or "none in the night"
            raise CalibrationError(f"no usable dark frames and no bias frames ({why})")
        flats = self.flats(bias, darks)
        mask = self.mask(bias, darks, flats)
        for m in [*darks.values(), *flats.values()]:
            if m.path is None or m.path.parent != self.out:
                # fallback masters are copied beside the night's own, under this night's name
                role = m.role
                name = self._name(role, m.exptime if role == "dark" else None,
                                  str(m.cards.get("FILTER", ("",))[0]) if role == "flat" else "")
                self._write(m, self.out / name)
        return MasterPaths(
            bias=bias.path if bias else None,
            darks=tuple(sorted((et, m.path) for et, m in darks.items())),
            flats=tuple(sorted((f, m.path) for f, m in flats.items())),
            mask=mask.path,
        )
