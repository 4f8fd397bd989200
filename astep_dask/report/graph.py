"""The pipeline's flow for one night, drawn from its dask task graph.

:func:`night_graph` builds, without computing anything, the task graph of a night as the
pipeline runs it: each master's reduction is the very dask graph the master builder
computes (:func:`astep_dask.masters.reduce.prepared_stack` →
:func:`astep_dask.masters.reduce.combine_lazy`: one read task per raw file and strip, the
stack, the rechunk into strips, the clipped combination); the flats also depend on the
flat levels (one task per flat) and on the dark they subtract; the bad-pixel mask on the
flats and the longest dark; every master is written once to a file; then one calibration
task per science frame (:func:`astep_dask.run.frames.process_frame`), which reads the
master files it needs and writes ``<stem>_CAL.fits``; the manifest after all of them;
optionally the QA report (one measuring task per calibrated frame, then the report).

:func:`collapse` folds that graph into one node per stage (every raw read of one master,
its combination, a master file, all frame tasks...), with the number of tasks in each and
of dependencies along each edge, so the chart stays readable for a night of 5,000 frames.
:func:`to_dot` writes it in Graphviz's DOT language; :func:`render` draws it with
Graphviz ``dot`` when installed, else with matplotlib (a layered layout of its own).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.core import get_dependencies
from dask.highlevelgraph import HighLevelGraph
from dask.utils import key_split

from astep_dask.config import Settings
from astep_dask.core.exptimes import ExptimeTolerance
from astep_dask.io.fitsio import atomic_open, atomic_path, atomic_write_text
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import FrameRecord, Inventory, scan_night
from astep_dask.io.products import output_dir
from astep_dask.io.rawfiles import stem
from astep_dask.masters.builder import MasterBuilder, MasterStep, frame_needs
from astep_dask.masters.reduce import combine_lazy, prepared_stack
from astep_dask.report.metrics import measure_file
from astep_dask.run.frames import process_frame, share_masters

__all__ = [
    "GROUP_STYLE",
    "READ_TASKS",
    "FlowGraph",
    "NightGraph",
    "Stage",
    "collapse",
    "draw_matplotlib",
    "flow_chart",
    "flow_graph",
    "layers",
    "night_graph",
    "render",
    "to_dot",
]

READ_TASKS = {"raw", "original-raw", "strip"}  # key prefixes of the tasks that read raw files


GROUP_STYLE = {  # node group: (DOT shape, fill colour)
    "input": ("folder", "#eeeeee"),
    "read": ("box", "#dbe9f6"),
    "master": ("box", "#9ecae1"),
    "file": ("note", "#fdd0a2"),
    "frame": ("box", "#a1d99b"),
    "report": ("box", "#dadaeb"),
}


@dataclass(frozen=True)
class Stage:
    """One node of the collapsed chart."""

    name: str  # identifier
    label: str  # what the chart shows (may hold newlines)
    group: str  # input, read, master, file, frame, report (see GROUP_STYLE)
    tasks: int = 0  # dask tasks folded into this node (0: a file or folder, no task)


@dataclass
class FlowGraph:
    """Stages and the edges between them, with the number of task dependencies each
    edge stands for."""

    night: str
    stages: dict[str, Stage] = field(default_factory=dict)
    edges: dict[tuple[str, str], int] = field(default_factory=dict)
    n_tasks: int = 0  # tasks in the underlying graph


@dataclass
class NightGraph:
    """The uncollapsed task graph of a night: dependencies of every task, the stage each
    task belongs to, stage descriptions, and extra edges from files and folders (which are
    not tasks) to the stages that read them."""

    night: str
    dependencies: dict[Hashable, set]
    stage_of: dict[Hashable, str]
    stages: dict[str, Stage]
    file_edges: list[tuple[str, str]]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _write_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for the atomic FITS write of a master in the graph."""


def _gather_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for gathering a master's strips into one image on the driver."""


def _flat_level_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for the central median of one flat (MasterBuilder._flat_level)."""


def _illum_grid_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for one science frame's star-masked sky grid (masters.illum)."""


def _warm_flags_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for one sampled science frame's cosmic-ray flags (masters.warm)."""


def _manifest_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for write_manifest."""


def _report_stub(*_: object) -> None:  # pragma: no cover - never computed
    """Stands for the QA report's assembly and plots."""


def night_graph(inventory: Inventory, settings: Settings | None = None,
                report: bool = True) -> NightGraph:
    """The task graph of a night (nothing is computed; headers only are read).

    The stages are built in the pipeline's order: the input folders, each master of the
    night's plan (:meth:`~astep_dask.masters.builder.MasterBuilder.plan`: the masters and
    what each is made from, by the recipe's own rules), the calibration of each science
    frame from the masters it reads (:func:`~astep_dask.masters.builder.frame_needs`) and
    the manifest, then, with ``report``, the QA measures and the report.

    Parameters
    ----------
    inventory
        The night's inventory (:func:`astep_dask.io.layout.scan_night`).
    settings
        Settings (memory budget of the strips, combination).
    report
        Include the QA report's tasks after the calibration.
    """
    b = _GraphBuilder(inventory, settings or Settings())
    b.add_inputs()
    steps = MasterBuilder(inventory, Path(inventory.night), b.settings).plan()
    for step in steps:
        b.add_master(step)
    science = inventory.select(FrameType.SCIENCE)
    if science and any(s.role == "mask" for s in steps):
        cal, done = b.add_calibration(science, steps)
        if report:
            b.add_report(science, cal, done)
    return b.result()


class _GraphBuilder:
    """The state :func:`night_graph` builds, stage by stage: the stages, the stage of every
    task, the edges from files and folders, and the dask collections made so far."""

    def __init__(self, inventory: Inventory, settings: Settings) -> None:
        self.inventory = inventory
        self.settings = settings
        self.night = inventory.night
        self.stages: dict[str, Stage] = {}
        self.stage_of: dict[Hashable, str] = {}
        self.file_edges: list[tuple[str, str]] = []
        self.collections: list = []
        self.strips: dict[str, object] = {}  # master file name: its combination's strips
        self.whole: dict[str, object] = {}  # master file name: the image gathered whole
        self.files: dict[str, object] = {}  # master file name: the task writing it
        self.planned: dict[str, MasterStep] = {}  # master file name: its step of the plan

    # ----------------------------------------------------------------- building blocks

    def per_file(self, stub, recs: list[FrameRecord], needs: list, prefix: str,
                 stage: str) -> list:
        """One ``stub`` task per raw file of ``recs`` (``prefix-<file name>``), each
        depending on ``needs``, all in ``stage``."""
        tasks = [dask.delayed(stub, pure=True)(str(r.path), *needs,
                                               dask_key_name=f"{prefix}-{r.path.name}")
                 for r in recs]
        for t in tasks:
            self.assign(t, stage, stage)
        return tasks

    def assign(self, obj, read_stage: str, stage: str) -> None:
        """Stage of each new task of ``obj``: those that read raw files (named so, or
        with no dependency) go to ``read_stage``, the others to ``stage``."""
        graph = dict(obj.__dask_graph__())
        for key in graph:
            if key in self.stage_of:
                continue
            reads = key_split(key) in READ_TASKS or not get_dependencies(graph, key)
            self.stage_of[key] = read_stage if reads else stage
        self.collections.append(obj)

    def add(self, name: str, label: str, group: str) -> str:
        """A new stage (tasks counted at the end); returns its name."""
        self.stages[name] = Stage(name, label, group)
        return name

    def reduce(self, records: list[FrameRecord], what: str, folder: str, subtract=None,
               levels=None) -> tuple:
        """A master's reduction, the very graph the master builder computes: the strips
        of its combination and the whole image gathered on the driver."""
        stack = prepared_stack(records, self.settings)
        if subtract is not None:
            stack = stack - xr.DataArray(subtract, dims=("y", "x"))
        if levels is not None:
            stack = stack / xr.DataArray(levels, dims="frame")
        data = combine_lazy(stack, self.settings.combine)["data"].data
        read = self.add(f"read {what}", f"read raw {what}\n{_plural(len(records), 'file')}, "
                        f"row strips", "read")
        comb = self.add(f"combine {what}", f"master {what}\nsigma-clipped combination",
                        "master")
        self.file_edges.append((f"input {folder}", read))
        self.assign(data, read, comb)
        # The driver gathers the strips into one image, used whole from then on.
        whole = dask.delayed(_gather_stub, pure=True)(data, dask_key_name=f"gather-{what}")
        self.assign(whole, comb, comb)
        return data, whole

    def write(self, data, fname: str):
        """The task writing a master file, in a stage of its own (the file)."""
        node = self.add(f"file {fname}", fname, "file")
        task = dask.delayed(_write_stub, pure=True)(data, dask_key_name=f"write-{fname}")
        self.assign(task, node, node)
        self.files[fname] = task
        return task

    # ----------------------------------------------------------------- the stages

    def add_inputs(self) -> None:
        """One stage per folder of usable raw files."""
        folders = defaultdict(list)
        for rec in self.inventory.frames:
            if rec.usable:
                folders[rec.folder].append(rec)
        for folder, recs in folders.items():
            self.add(f"input {folder}", f"{folder}/\n{_plural(len(recs), 'raw file')}", "input")

    def add_master(self, step: MasterStep) -> None:
        """One master of the plan: its reduction from its raw frames and the masters it
        needs (a flat also measures each flat's level first), and its file; the mask also
        normalises the new flats, which are written after it."""
        self.planned[step.name] = step
        if step.role == "mask":
            self._add_mask(step)
            return
        if step.role == "illum":
            self._add_illum(step)
            return
        if step.role == "warm":
            self._add_warm(step)
            return
        recs = list(step.records)
        what = {"bias": "bias", "dark": f"dark {step.exptime or 0:g} s",
                "flat": f"flat {step.filter}"}[step.role]
        subtract = self.strips[step.needs[0]] if step.needs else None
        levels = None
        if step.role == "flat":
            levels = self._flat_levels(step, recs)
        strips, whole = self.reduce(recs, what, recs[0].folder, subtract=subtract,
                                    levels=levels)
        self.strips[step.name], self.whole[step.name] = strips, whole
        if step.role != "flat":  # a flat is written once normalised, after the mask
            self.write(whole, step.name)

    def _flat_levels(self, step: MasterStep, recs: list[FrameRecord]) -> da.Array:
        """One level task per flat (its central median, less the darks it needs)."""
        lv = self.add(f"levels flat {step.filter}",
                      f"flat levels {step.filter}\ncentral median per flat", "master")
        self.file_edges.append((f"input {recs[0].folder}", lv))
        darks = [self.whole[n] for n in step.needs]
        level_tasks = self.per_file(_flat_level_stub, recs, darks, "flat-level", lv)
        return da.stack([da.from_delayed(t, (), np.float32) for t in level_tasks])

    def _add_mask(self, step: MasterStep) -> None:
        """The bad-pixel mask from the masters it needs, its file, then each new flat
        normalised over its good pixels, and the flat's file."""
        mask_stage = self.add("mask", "bad-pixel mask\nhot (dark), dead (flats)", "master")
        task = dask.delayed(_write_stub, pure=True)(*(self.whole[n] for n in step.needs),
                                                    dask_key_name=f"mask-{self.night}")
        self.assign(task, mask_stage, mask_stage)
        self.write(task, step.name)
        for flat in (self.planned[n] for n in step.needs):
            if flat.role != "flat":
                continue
            stage = self.add(f"normalise flat {flat.filter}",
                             f"normalise flat {flat.filter}\nmedian of good pixels = 1",
                             "master")
            norm = dask.delayed(_write_stub, pure=True)(
                self.whole[flat.name], task, dask_key_name=f"normalise-flat-{flat.filter}")
            self.assign(norm, stage, stage)
            self.write(norm, flat.name)

    def _add_illum(self, step: MasterStep) -> None:
        """The illumination correction: one task per science frame it reads (sampled
        rows, calibrated in memory with the master files it needs, reduced to a sky
        grid), their combination and fit, and its file."""
        recs = list(step.records)
        read = self.add(f"read illum {step.filter}",
                        f"read science rows\n{_plural(len(recs), 'file')}, every "
                        f"{self.settings.illum.row_step}th row", "read")
        comb = self.add(f"illum {step.filter}", f"illumination {step.filter}\nstar-masked "
                        "sky grids,\nscreened, combined, fitted", "master")
        self.file_edges.append((f"input {recs[0].folder}", read))
        needs = [self.files[n] for n in step.needs]
        grids = self.per_file(_illum_grid_stub, recs, needs, "illum-grid", read)
        task = dask.delayed(_write_stub, pure=True)(*grids,
                                                    dask_key_name=f"illum-{step.filter}")
        self.assign(task, comb, comb)
        self.write(task, step.name)

    def _add_warm(self, step: MasterStep) -> None:
        """The warm pixels: one task per sampled science frame (calibrated with the
        master files it needs, cosmic rays included; its flags kept), their count, and
        its file (masters.warm)."""
        recs = list(step.records)
        read = self.add("read warm", f"read science frames\n{_plural(len(recs), 'file')}, "
                        "a sample in time", "read")
        count = self.add("warm", "warm pixels\ncosmic-ray flags counted\nover the sample",
                         "master")
        self.file_edges.append((f"input {recs[0].folder}", read))
        needs = [self.files[n] for n in step.needs]
        flags = self.per_file(_warm_flags_stub, recs, needs, "warm-flags", read)
        task = dask.delayed(_write_stub, pure=True)(*flags, dask_key_name=f"warm-{self.night}")
        self.assign(task, count, count)
        self.write(task, step.name)

    def add_calibration(self, science: list[FrameRecord],
                        steps: list[MasterStep]) -> tuple[str, object]:
        """One calibration task per science frame, reading the master files it needs
        (:func:`astep_dask.run.frames.process_frame`), then the manifest. Returns the
        calibrated files' stage and the manifest's task."""
        frame_stage = self.add("calibrate", "calibrate frame (one task each)\n"
                               "overscan, dark, flat, e-,\nvariance, mask, cosmic rays",
                               "frame")
        self.file_edges.append((f"input {science[0].folder}", frame_stage))
        cal = self.add("file cal", f"<stem>_CAL.fits\none per frame (up to {len(science)})",
                       "file")
        # The planes a frame reads are made once per exposure time and filter from the
        # masters and memory-mapped by the workers (run.frames.share_masters).
        shared_stage = self.add("shared planes", "frame planes (one task per\nexposure "
                                "time and filter)\ndark, flat, mask", "master")
        shared_file = self.add("file shared", ".frame-masters/*.npy\nmemory-mapped by "
                               "the workers", "file")
        planes = {}
        for rec in science:
            combo = (rec.exptime, rec.filter)
            if combo not in planes:
                needs = [self.files[n] for n in frame_needs(
                    steps, rec.exptime, rec.filter, ExptimeTolerance.of(self.settings.combine))]
                planes[combo] = dask.delayed(share_masters, pure=True)(
                    *needs, dask_key_name=f"share-masters-{rec.exptime:g}-{rec.filter}")
                self.assign(planes[combo], shared_stage, shared_stage)
        self.file_edges.append((shared_stage, shared_file))
        self.file_edges.append((shared_file, frame_stage))
        rows = []
        for rec in science:
            row = dask.delayed(process_frame, pure=True)(
                str(rec.path), planes[(rec.exptime, rec.filter)],
                dask_key_name=f"calibrate-{stem(rec.path)}")
            self.assign(row, frame_stage, frame_stage)
            rows.append(row)
        self.file_edges.append((frame_stage, cal))
        manifest = self.add("file manifest", "manifest.json", "file")
        done = dask.delayed(_manifest_stub, pure=True)(*rows,
                                                       dask_key_name=f"manifest-{self.night}")
        self.assign(done, manifest, manifest)
        return cal, done

    def add_report(self, science: list[FrameRecord], cal: str, done) -> None:
        """The QA report: one measuring task per calibrated frame
        (:func:`astep_dask.report.metrics.measure_file`), then the report itself."""
        measure = self.add("qa measure", "QA measures (one task per frame)\n"
                           "sky, FWHM, star flux, streaks", "report")
        self.file_edges.append((cal, measure))
        qa_rows = []
        for rec in science:
            t = dask.delayed(measure_file, pure=True)(
                f"{stem(rec.path)}_CAL.fits", dask_key_name=f"qa-measure-{stem(rec.path)}")
            self.assign(t, measure, measure)
            qa_rows.append(t)
        rep = self.add("file report", "report/\nqa.json, PNG plots,\nindex.html", "file")
        final = dask.delayed(_report_stub, pure=True)(done, *qa_rows,
                                                      dask_key_name=f"report-{self.night}")
        self.assign(final, rep, rep)

    def result(self) -> NightGraph:
        """The graph: every task's dependencies, and each stage with its number of tasks
        (none for a folder or a file)."""
        deps = _dependencies(self.collections)
        counts: dict[str, int] = defaultdict(int)
        for key in deps:
            counts[self.stage_of[key]] += 1
        stages = {name: Stage(st.name, st.label, st.group,
                              counts.get(name, 0) if st.group not in ("input", "file") else 0)
                  for name, st in self.stages.items()}
        return NightGraph(self.night, deps, self.stage_of, stages, self.file_edges)


def _dependencies(collections: Iterable) -> dict[Hashable, set]:
    """Dependencies of every task of the given dask collections (one merged graph)."""
    dsk = dict(HighLevelGraph.merge(*[c.__dask_graph__() for c in collections]))
    return {k: set(get_dependencies(dsk, k)) for k in dsk}


def collapse(dependencies: Mapping[Hashable, Iterable], stage_of: Mapping[Hashable, str],
             stages: Mapping[str, Stage], extra_edges: Iterable[tuple[str, str]] = (),
             night: str = "") -> FlowGraph:
    """Fold a task graph into stages: one node per stage, an edge wherever a task of one
    stage depends on a task of another, weighted by the number of such dependencies.

    Parameters
    ----------
    dependencies
        Every task's dependencies (task keys).
    stage_of
        The stage of every task.
    stages
        Stage descriptions, by name.
    extra_edges
        Edges that are not task dependencies (a folder read by a stage, a file written).
    """
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for key, deps in dependencies.items():
        b = stage_of[key]
        for d in deps:
            a = stage_of[d]
            if a != b:
                edges[(a, b)] += 1
    for a, b in extra_edges:
        edges[(a, b)] += 0
    used = {n for e in edges for n in e} | {stage_of[k] for k in dependencies}
    kept = {n: s for n, s in stages.items() if n in used}
    return FlowGraph(night, kept, dict(edges), n_tasks=len(dependencies))


def flow_graph(night_dir: str | Path, settings: Settings | None = None,
               report: bool = True) -> FlowGraph:
    """The collapsed flow of a night (reads its headers only)."""
    inv = scan_night(night_dir)
    g = night_graph(inv, settings, report)
    return collapse(g.dependencies, g.stage_of, g.stages, g.file_edges, g.night)


# --------------------------------------------------------------------------- drawing


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _node_label(st: Stage) -> str:
    if st.tasks:
        return f"{st.label}\n[{_plural(st.tasks, 'dask task')}]"
    return st.label


def to_dot(flow: FlowGraph, output_label: str = "") -> str:
    """The flow in Graphviz's DOT language (top to bottom)."""
    title = f"astep-dask: flow of night {flow.night} ({flow.n_tasks} dask tasks)"
    if output_label:
        title += f"\noutput: {output_label}"
    lines = [
        "digraph flow {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=14, labelloc=t, '
        f'label="{_dot_text(title)}\\n ", nodesep=0.3, ranksep=0.35, pad=0.2];',
        '  node [fontname="Helvetica", fontsize=10, style="filled,rounded", penwidth=0.8];',
        '  edge [fontname="Helvetica", fontsize=8, color="#555555", arrowsize=0.7];',
    ]
    for st in flow.stages.values():
        shape, fill = GROUP_STYLE[st.group]
        style = "filled" if shape in ("note", "folder") else "filled,rounded"
        lines.append(f'  "{_dot_text(st.name)}" [label="{_dot_text(_node_label(st))}", '
                     f'shape={shape}, fillcolor="{fill}", style="{style}"];')
    for (a, b), n in flow.edges.items():
        label = f' [label="{n}", penwidth={1 + np.log10(n):.2f}]' if n > 1 else ""
        lines.append(f'  "{_dot_text(a)}" -> "{_dot_text(b)}"{label};')
    lines.append("}")
    return "\n".join(lines) + "\n"


def layers(flow: FlowGraph) -> dict[str, int]:
    """Column of each stage in a left-to-right layout: its longest path from a source."""
    preds: dict[str, list[str]] = defaultdict(list)
    for a, b in flow.edges:
        preds[b].append(a)
    depth: dict[str, int] = {}

    def visit(n: str, seen: frozenset = frozenset()) -> int:
        if n in depth:
            return depth[n]
        if n in seen:  # a cycle cannot come from a dask graph; guard anyway
            return 0
        d = max((visit(p, seen | {n}) + 1 for p in preds[n]), default=0)
        depth[n] = d
        return d

    for n in flow.stages:
        visit(n)
    return depth


def draw_matplotlib(flow: FlowGraph, path: Path, output_label: str = "") -> Path:
    """Draw the flow with matplotlib alone (no Graphviz), top to bottom: stages in rows
    by :func:`layers`, ordered in each row by the mean position of their predecessors."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    depth = layers(flow)
    nrow = max(depth.values(), default=0) + 1
    rows: dict[int, list[str]] = defaultdict(list)
    for n in flow.stages:
        rows[depth[n]].append(n)
    preds: dict[str, list[str]] = defaultdict(list)
    for a, b in flow.edges:
        preds[b].append(a)
    col: dict[str, float] = {}
    for r in range(nrow):
        names = sorted(rows[r], key=lambda n: (np.mean([col.get(p, 0.0) for p in preds[n]])
                                               if preds[n] else 0.0, n))
        for i, n in enumerate(names):
            col[n] = i - (len(names) - 1) / 2
    ncol = max((len(v) for v in rows.values()), default=1)
    w, h, dx, dy = 2.5, 0.8, 2.8, 1.25
    fig = Figure(figsize=(max(6.0, dx * ncol + 0.4), dy * nrow + 0.9), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1 - 0.8 / (dy * nrow + 0.9)))
    ax.set_xlim(-dx * ncol / 2, dx * ncol / 2)
    ax.set_ylim(-dy * (nrow - 1) - h, h)
    ax.axis("off")
    pos = {n: (col[n] * dx, -depth[n] * dy) for n in flow.stages}
    for n, st in flow.stages.items():
        x, y = pos[n]
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                    boxstyle="round,pad=0.02,rounding_size=0.08",
                                    fc=GROUP_STYLE[st.group][1], ec="#333333", lw=0.8))
        ax.text(x, y, _node_label(st), ha="center", va="center", fontsize=7.5)
    for (a, b), k in flow.edges.items():
        (x0, y0), (x1, y1) = pos[a], pos[b]
        ax.add_patch(FancyArrowPatch((x0, y0 - h / 2), (x1, y1 + h / 2), arrowstyle="-|>",
                                     mutation_scale=9, lw=0.7 + 0.5 * np.log10(max(k, 1)),
                                     color="#555555", shrinkA=1, shrinkB=1))
        if k > 1:
            ax.text(0.3 * x0 + 0.7 * x1 + 0.08, 0.3 * (y0 - h / 2) + 0.7 * (y1 + h / 2),
                    str(k), fontsize=7, color="#333333")
    title = f"astep-dask: flow of night {flow.night} ({flow.n_tasks} dask tasks)"
    fig.suptitle(title + (f"\noutput: {output_label}" if output_label else ""), fontsize=10)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=path.suffix.lstrip(".").lower())
    return path


def render(flow: FlowGraph, path: str | Path, engine: str = "auto",
           output_label: str = "") -> Path:
    """Draw the flow to ``path`` (.svg, .png or .pdf; .dot writes the DOT text).

    ``engine``: ``dot`` (Graphviz, must be installed), ``matplotlib``, or ``auto`` (dot
    when it is on the PATH).
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf", "dot"):
        raise ValueError(f"{path}: the chart is written as .svg, .png, .pdf or .dot")
    text = to_dot(flow, output_label)
    if fmt == "dot":
        return atomic_write_text(path, text)
    use_dot = engine == "dot" or (engine == "auto" and shutil.which("dot") is not None)
    if not use_dot:
        return draw_matplotlib(flow, path, output_label)
    if shutil.which("dot") is None:
        raise RuntimeError("Graphviz `dot` is not installed (Debian: apt-get install graphviz)")
    extra = ["-Gdpi=110"] if fmt == "png" else []
    with atomic_path(path) as tmp:
        subprocess.run(["dot", f"-T{fmt}", *extra, "-o", str(tmp)], input=text.encode(),
                       check=True, capture_output=True, timeout=120)
    return path


def flow_chart(night_dir: str | Path, path: str | Path, out: str | Path | None = None,
               settings: Settings | None = None, engine: str = "auto",
               report: bool = True) -> Path:
    """Draw the flow of a night (masters → frames → outputs) to ``path`` and return it.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/`` (headers only are read; nothing is computed).
    path
        The chart: ``.svg``, ``.png``, ``.pdf`` or ``.dot``.
    out
        The ``--out`` root of the calibration, shown as where the products go.
    settings
        Settings that shape the graph (memory budget of the strips).
    engine
        ``auto`` (Graphviz when installed, else matplotlib), ``dot`` or ``matplotlib``.
    report
        Include the QA report's stage.
    """
    flow = flow_graph(night_dir, settings, report)
    where = output_dir(Path(night_dir), Path(out) if out is not None else None)
    return render(flow, path, engine, output_label=str(where))
