"""The night plan: decided from metadata, equal to what the run then does, drawn by the
flow chart, and a dry run that writes nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from astep_dask.cli import EXIT_OK, main
from astep_dask.config import Settings
from astep_dask.io.layout import scan_night
from astep_dask.io.products import MANIFEST, output_dir
from astep_dask.report.graph import night_graph
from astep_dask.run.plan import plan_night
from astep_dask.testing.simulate import SimConfig, simulate_night

pytestmark = pytest.mark.slow  # whole nights, several runs

SIM = SimConfig(size=64, n_science=4, n_darks=3, n_flats=3, seed=9)
SETTINGS = Settings().replace(cosmics={"enabled": False})


@pytest.fixture
def night(tmp_path) -> Path:
    night = simulate_night(tmp_path / "archive", SIM)
    hour_ago = time.time_ns() - 3600 * 10**9  # an archive's files: their digests not racy
    for p in night.rglob("*.fits"):
        os.utime(p, ns=(hour_ago, hour_ago))
    return night


def _snapshot(*folders: Path) -> dict:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns)
            for f in folders for p in f.rglob("*") if p.is_file()}


def _calibrate(night: Path, out: Path) -> dict:
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"])
    assert code == EXIT_OK
    return json.loads((output_dir(night, out) / MANIFEST).read_text())


def _actions(plan, kind: str) -> dict[str, str]:
    return {s.name: s.action for s in plan.steps if s.kind == kind}


def test_the_plan_is_what_the_run_does(night, tmp_path):
    out = tmp_path / "out"
    plan = plan_night(night, SETTINGS, out=out)
    assert not out.exists()  # a dry run writes nothing
    masters, frames = _actions(plan, "master"), _actions(plan, "frame")
    assert set(masters.values()) == {"build"} and set(frames.values()) == {"calibrate"}
    assert len(frames) == SIM.n_science

    manifest = _calibrate(night, out)
    assert sorted(manifest["masters"]["built"]) == sorted(masters)
    done = {r["output"] for r in manifest["frames"] if r["status"] == "done"}
    assert done == set(frames)
    assert manifest["plan"]["counts"] == plan.counts()  # the manifest holds the plan

    # Nothing changed: everything reused and done, and the run does exactly that.
    before = _snapshot(night, out)
    plan = plan_night(night, SETTINGS, out=out)
    assert _snapshot(night, out) == before  # the dry run wrote nothing
    assert set(_actions(plan, "master").values()) == {"reuse"}
    assert set(_actions(plan, "frame").values()) == {"done"}
    _calibrate(night, out)
    assert _snapshot(night, out) == before  # nothing to do: the run wrote nothing either

    # One raw frame rewritten: the plan calibrates it, with the reason; the run too.
    sci = sorted(night.rglob("*_SCIENCE.fits"))[2]
    data = bytearray(sci.read_bytes())
    data[-50] ^= 0x01
    sci.write_bytes(bytes(data))
    plan = plan_night(night, SETTINGS, out=out)
    todo = {n for n, a in _actions(plan, "frame").items() if a == "calibrate"}
    assert todo == {sci.name.replace(".fits", "_CAL.fits")}
    reason = next(s.reason for s in plan.frames() if s.action == "calibrate")
    assert "raw file or product changed" in reason
    manifest = _calibrate(night, out)
    assert {r["output"] for r in manifest["frames"] if r["status"] == "done"} == todo

    # --force: every frame, the masters reused.
    plan = plan_night(night, SETTINGS, out=out, force=True)
    assert set(_actions(plan, "frame").values()) == {"calibrate"}
    assert {s.reason for s in plan.frames()} == {"--force"}


def test_the_flow_chart_draws_every_step_of_the_plan(night, tmp_path):
    plan = plan_night(night, SETTINGS, out=tmp_path / "out")
    graph = night_graph(scan_night(night), SETTINGS, report=False)
    for step in plan.masters():
        assert f"file {step.name}" in graph.stages, step.name
    assert graph.stages["calibrate"].tasks == len(plan.frames())
    assert graph.stages["shared planes"].tasks == 1  # one exposure time, one filter


def test_the_plan_command_prints_text_and_json_and_writes_nothing(night, tmp_path, capsys):
    out = tmp_path / "out"
    before = _snapshot(night)
    assert main(["plan", str(night), "--out", str(out), "--no-cosmics"]) == EXIT_OK
    text = capsys.readouterr().out
    assert f"plan {night.name}:" in text and "4 calibrate" in text and "not made yet" in text
    assert main(["plan", str(night), "--out", str(out), "--json"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["calibrate"] == SIM.n_science
    assert not out.exists() and _snapshot(night) == before
