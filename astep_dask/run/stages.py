"""The pipeline's stages, in the order they run: the one table the command line, the flow
chart and the notebooks read.

A stage names what it does, the ``astep-dask`` command that runs it, the stages whose
products it needs and what it writes in the night's output folder. The entry point of each
stage is a public function of the package (``STAGE.entry``, a dotted name resolved by the
caller: this module sits below the products that implement the last stages, and imports
none of them).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STAGES", "Stage", "stage", "stages_after"]


@dataclass(frozen=True)
class Stage:
    """One stage of a night's processing."""

    name: str  # identifier, also the flow chart's group
    command: str  # the astep-dask subcommand that runs it
    summary: str  # what it does, in one line
    needs: tuple[str, ...]  # stages whose products it reads
    writes: str  # what it leaves in the night's output folder
    entry: str  # the public function that runs it (dotted name)


STAGES: tuple[Stage, ...] = (
    Stage("inventory", "inspect",
          "find the night's files and classify each from its header",
          (), "nothing (headers only)", "astep_dask.io.layout.scan_night"),
    Stage("masters", "calibrate",
          "bias, darks per exposure, flat per filter, bad-pixel mask: dask reductions",
          ("inventory",), "DATE_MASTER*.fits, DATE_MASK.fits",
          "astep_dask.masters.builder.MasterBuilder"),
    Stage("calibrate", "calibrate",
          "one task per science frame: bias, dark, flat, gain, variance, mask, cosmic rays",
          ("masters",), "<stem>_CAL.fits, manifest.json", "astep_dask.run.night.calibrate_night"),
    Stage("kbmod", "kbmod",
          "register the frames, build a static-sky template, write difference frames",
          ("calibrate",), "kbmod/", "astep_dask.kbmod.stage.export_night"),
    Stage("search", "search",
          "first-look shift-and-stack search for moving objects",
          ("kbmod",), "kbmod/search/", "astep_dask.kbmod.search.search_night"),
    Stage("report", "report",
          "quality report: per-frame measures, outlier flags, figures, HTML",
          ("calibrate",), "report/", "astep_dask.report.night.night_report"),
)


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises
    ------
    KeyError
        When there is no such stage; the message lists those that exist.
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; stages: {', '.join(s.name for s in STAGES)}")


def stages_after(name: str) -> list[Stage]:
    """The stages that need ``name``'s products, directly or through others, in order."""
    wanted = {name}
    out = []
    for s in STAGES:
        if wanted & set(s.needs):
            wanted.add(s.name)
            out.append(s)
    return out
