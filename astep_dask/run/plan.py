"""A night's plan, from metadata alone: every master to build or reuse and every frame to
calibrate or leave, each with the reason, before anything runs.

:func:`plan_night` takes the inventory (headers; unchanged files not even opened, see
:mod:`astep_dask.io.index`), the settings and what is on disk (the manifest, the masters'
headers, the status of every product), and decides with the functions the run itself
uses: the master recipe and its provenance hashes (:meth:`MasterBuilder.plan`), which
masters a frame needs (:func:`~astep_dask.masters.builder.frame_needs`), and which frames
are already done (:func:`~astep_dask.run.night.already_done`). ``astep-dask plan NIGHT``
prints it (text or JSON); it reads no pixel, starts no cluster and writes nothing.

What only the run can know is said as such: a flat rejected by its level, a master
taken from another night, a frame that fails in its task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from astep_dask.config import Settings
from astep_dask.core.exptimes import ExptimeTolerance
from astep_dask.io.headers import FrameType, filter_label
from astep_dask.io.index import FileIndex
from astep_dask.io.layout import Inventory, scan_night
from astep_dask.io.products import CAL_SUFFIX, output_dir, read_manifest
from astep_dask.io.provenance import digest_of, frame_provenance
from astep_dask.io.rawfiles import content_digest, stem
from astep_dask.masters.builder import MasterBuilder, MasterStep, frame_needs
from astep_dask.masters.detector import detector_plan
from astep_dask.masters.store import MasterPaths, open_master
from astep_dask.run.frames import FrameJob

__all__ = ["NightPlan", "Step", "already_done", "load_index", "plan_night"]


@dataclass(frozen=True)
class Step:
    """One product of the night: what will be done about it and why.

    ``action``: ``build`` or ``reuse`` (a master), ``calibrate``, ``done`` or ``fail`` (a
    frame). ``inputs``: raw file names; ``needs``: the masters (file names) it is made
    from.
    """

    kind: str  # "master" or "frame"
    name: str  # the product's file name
    action: str
    reason: str
    role: str = ""  # bias, dark, flat, mask, illum; science for a frame
    inputs: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


@dataclass
class NightPlan:
    """Every master and frame of a night, in the order the run makes them."""

    night: str
    out_dir: Path
    steps: list[Step] = field(default_factory=list)
    unusable: list[dict] = field(default_factory=list)
    detector: dict = field(default_factory=dict)  # gain and read noise (detector_plan)

    def masters(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "master"]

    def frames(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "frame"]

    def counts(self) -> dict[str, int]:
        """Steps per action."""
        out: dict[str, int] = {}
        for s in self.steps:
            out[s.action] = out.get(s.action, 0) + 1
        return out

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"night": self.night, "out_dir": str(self.out_dir), "counts": self.counts(),
                "steps": [asdict(s) for s in self.steps], "unusable": self.unusable,
                "detector": self.detector}

    def text(self, most: int = 20) -> str:
        """The plan in a few lines: the masters one by one, the frames grouped by action
        and reason (a night of thousands of frames stays short)."""
        counts = ", ".join(f"{n} {a}" for a, n in sorted(self.counts().items()))
        lines = [f"plan {self.night}: {counts}  -> {self.out_dir}"]
        if self.detector:
            lines.append(f"  {self.detector['action']:<9} gain and read noise: "
                         f"{self.detector['reason']}")
        for s in self.masters():
            needs = f" (from {', '.join(s.needs)})" if s.needs else ""
            lines.append(f"  {s.action:<9} {s.name}: {s.reason}{needs}")
        groups: dict[tuple[str, str], list[str]] = {}
        for s in self.frames():
            groups.setdefault((s.action, s.reason), []).append(s.name)
        for (action, reason), names in groups.items():
            shown = (", ".join(names) if len(names) <= 3
                     else f"{len(names)} frames ({names[0]} ... {names[-1]})")
            lines.append(f"  {action:<9} {shown}: {reason}")
        lines += [f"  unusable  {u['path']}: {u['reason']}" for u in self.unusable[:most]]
        return "\n".join(lines)


def plan_night(night_dir: str | Path, settings: Settings | None = None,
               out: Path | None = None, force: bool = False,
               inventory: Inventory | None = None, *, manifest: dict | None = None,
               index: FileIndex | None = None) -> NightPlan:
    """The night's plan (module docstring), from metadata: nothing is written.

    Parameters
    ----------
    night_dir
        The raw night ``ROOT/YYYY-MM-DD/``.
    settings
        The run's settings (defaults when None).
    out
        Output root (None: beside the raw night).
    force
        Plan as ``calibrate --force`` (every frame calibrated again).
    inventory
        The night's inventory, when the caller has it.
    manifest, index
        The night's manifest and its file index, when the caller has read them.
    """
    settings = settings or Settings()
    night_dir = Path(night_dir).absolute()
    out = out.absolute() if out is not None else None
    out_dir = output_dir(night_dir, out)
    previous = read_manifest(out_dir) if manifest is None else manifest
    index = load_index(out_dir, previous) if index is None else index
    inv = inventory or scan_night(night_dir)
    builder = MasterBuilder(inv, out_dir, settings, index=index)
    recipe = builder.plan()
    plan = NightPlan(inv.night, out_dir,
                     unusable=[{"path": str(f.path), "reason": f.problem}
                               for f in inv.problems])
    failed = (previous.get("masters") or {}).get("failed") or {}
    actions = {}
    for step in recipe:
        action, reason = _master_action(out_dir / step.name, step, index, failed)
        actions[step.name] = action
        plan.steps.append(Step("master", step.name, action, reason, step.role,
                               tuple(r.path.name for r in step.records), step.needs))
    plan.steps += _frames(inv, recipe, actions, out_dir, settings, previous, index, force)
    plan.detector = detector_plan(inv, settings, previous.get("detector"))
    return plan


def _master_action(path: Path, step: MasterStep, index, failed: dict) -> tuple[str, str]:
    """Whether the run reuses or builds one master, and why."""
    if step.digest in failed:
        return "skip", f"could not be made from the same inputs before: {failed[step.digest]}"
    if not path.exists():
        return "build", "not made yet"
    try:
        made = open_master(path).digest
    except (OSError, ValueError) as exc:
        return "build", f"unreadable ({exc})"
    if made != step.digest:
        return "build", "its inputs or settings changed (another provenance hash)"
    if index.known(path) is None:
        return "reuse", "same inputs and settings; its data are verified first (its file " \
                        "status changed since it was written)"
    return "reuse", "same inputs and settings, unchanged since it was written"


def _frames(inv: Inventory, recipe: list[MasterStep], actions: dict[str, str],
            out_dir: Path, settings: Settings, previous: dict, index, force: bool
            ) -> list[Step]:
    """One step per science frame: fail (no master can calibrate it), done (already
    calibrated with the same provenance, product unchanged) or calibrate (and why)."""
    flats = {s.filter for s in recipe if s.role == "flat"}
    ready = all(a == "reuse" or a == "skip" for a in actions.values())
    masters_digest = _masters_digest(recipe, actions, out_dir, index) if ready else ""
    steps, jobs = [], []
    for rec in inv.select(FrameType.SCIENCE):
        output = out_dir / f"{rec.out_stem or stem(rec.path)}{CAL_SUFFIX}"
        needs = frame_needs(recipe, rec.exptime, rec.filter,
                            ExptimeTolerance.of(settings.combine))
        if rec.filter not in flats:
            steps.append(Step("frame", output.name, "fail",
                              f"no master flat for filter {filter_label(rec.filter)} can be made "
                              "here (the run may take one from another night)", "science",
                              (rec.path.name,), needs))
            continue
        provenance = (frame_provenance(rec, masters_digest, settings)
                      if masters_digest and rec.digest else "")
        jobs.append(FrameJob(rec, output, _NO_PATHS, provenance, settings, force,
                             masters_digest=masters_digest))
        steps.append(Step("frame", output.name, "calibrate", "", "science",
                          (rec.path.name,), needs))
    done, _ = already_done(jobs, previous, index)
    done_names = {r["output"] for r in done}
    out = []
    for s in steps:
        if s.action != "calibrate":
            out.append(s)
        elif s.name in done_names:
            out.append(Step(s.kind, s.name, "done", "calibrated before with the same raw "
                            "file, masters and settings; unchanged since written", s.role,
                            s.inputs, s.needs))
        else:
            out.append(Step(s.kind, s.name, "calibrate",
                            _why(s, previous, masters_digest, force, actions), s.role,
                            s.inputs, s.needs))
    return out


_NO_PATHS = MasterPaths(None, (), (), Path())  # already_done needs no master path


def _masters_digest(recipe: list[MasterStep], actions: dict[str, str], out_dir: Path,
                    index) -> str:
    """The frames' masters hash as the run computes it (the masters' file digests), when
    every master is reused and the index knows its digest; else ""."""
    digests = {}
    for step in recipe:
        if actions[step.name] == "skip":
            continue
        entry = index.known(out_dir / step.name)
        if entry is None:
            return ""
        digests[step.name] = entry.digest
    return digest_of(sorted(digests.items()))


def _why(step: Step, previous: dict, masters_digest: str, force: bool,
         actions: dict[str, str]) -> str:
    """Why a frame is calibrated (again)."""
    if force:
        return "--force"
    rows = {r.get("output"): r for r in previous.get("frames") or [] if isinstance(r, dict)}
    row = rows.get(step.name)
    if row is None or row.get("status") not in ("done", "skipped"):
        return "not calibrated yet" if row is None else f"{row.get('status')} before"
    rebuilt = [n for n in step.needs if actions.get(n) == "build"]
    if rebuilt:
        return f"its masters are made again ({', '.join(rebuilt)})"
    if not masters_digest:
        return "its masters' files changed since they were written: checked by the run"
    return ("its raw file or product changed since it was recorded (or an earlier version "
            "made it): the worker checks it and calibrates it only if it must")


def load_index(out_dir: Path, manifest: dict | None = None) -> FileIndex:
    """The night's :class:`~astep_dask.io.index.FileIndex` (the ``files`` table of its
    manifest, read unless given), told to this process's raw-file reader: an inventory
    taken after it reads no unchanged file's bytes."""
    index = (FileIndex.from_manifest(manifest) if manifest is not None
             else FileIndex.load(out_dir))
    index.seed()
    return index


def already_done(jobs: list[FrameJob], previous: dict, index: FileIndex
                 ) -> tuple[list[dict], list[FrameJob]]:
    """Split the jobs into the frames already done (their ``skipped`` rows, from the
    previous manifest) and those to send to the cluster, from metadata alone.

    A frame is done when the previous run calibrated it with the same provenance (the
    raw file's digest known unchanged, the same masters and settings) and its product is
    unchanged: its status is the one recorded when it was written, or, when the status
    changed (a copied archive), its bytes hash to the recorded digest (read once, then
    recorded again). Anything else goes to a worker, which decides from the files
    (an output an earlier version wrote, one the index does not know).
    """
    earlier = {r.get("file"): r for r in previous.get("frames") or []
               if isinstance(r, dict) and r.get("status") in ("done", "skipped")}
    done, todo = [], []
    for job in jobs:
        row = earlier.get(job.record.path.name)
        if (not job.force and job.provenance and row is not None
                and row.get("output") == job.output.name
                and row.get("provenance") == job.provenance
                and _unchanged(job.output, index)):
            done.append({**row, "status": "skipped", "note": ""})
        else:
            todo.append(job)
    return done, todo


def _unchanged(path: Path, index: FileIndex) -> bool:
    """Whether a product is the one the index recorded (by status, else by content)."""
    if index.known(path) is not None:
        return True
    entry = index.recorded(path)
    try:
        st = path.stat()
        if entry is None or st.st_size != entry.stamp.size:
            return False
        digest = content_digest(path)
    except OSError:
        return False
    if digest != entry.digest:
        return False
    index.record(path, st, digest, written=True)
    return True
