"""The stage table: ordered, each stage's needs before it, each entry point real."""

from __future__ import annotations

import importlib

import pytest

from astep_dask.cli import build_parser
from astep_dask.run.stages import STAGES, stage, stages_after


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_stages_are_ordered_by_their_needs():
    seen: set[str] = set()
    for s in STAGES:
        assert set(s.needs) <= seen, f"{s.name} needs {s.needs}, not all before it"
        seen.add(s.name)
    assert [s.name for s in STAGES][:3] == ["inventory", "masters", "calibrate"]


def test_every_entry_point_exists_with_a_docstring_and_every_command_parses():
    commands = build_parser()._subparsers._group_actions[0].choices
    for s in STAGES:
        fn = _resolve(s.entry)
        assert callable(fn) and fn.__doc__, s.entry
        assert s.command in commands, f"{s.name}: no subcommand {s.command}"


def test_lookups():
    assert stage("kbmod").needs == ("calibrate",)
    assert [s.name for s in stages_after("kbmod")] == ["search"]
    assert [s.name for s in stages_after("masters")] == ["calibrate", "kbmod", "search", "report"]
    with pytest.raises(KeyError, match="stages: inventory"):
        stage("flat")
