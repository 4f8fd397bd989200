"""Season runs: several nights through one cluster, a broken night, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from astep_dask.cli import EXIT_OK, EXIT_PARTIAL, main
from astep_dask.testing.simulate import simulate_night
from tests.conftest import SMALL

pytestmark = pytest.mark.slow  # whole nights end to end

DATES = ("2026-06-15", "2026-06-16", "2026-06-17")
BROKEN = "2026-06-16"


@pytest.fixture(scope="module")
def season(tmp_path_factory) -> Path:
    """Three small nights; the middle one has no darks at all."""
    root = tmp_path_factory.mktemp("season")
    for i, date in enumerate(DATES):
        cfg = dataclasses.replace(SMALL, date=date, n_science=5, seed=20 + i)
        night = simulate_night(root, cfg)
        if date == BROKEN:
            for p in night.rglob("*_DARK.fits"):
                p.unlink()
    return root


def _run(season: Path, out: Path, *extra: str) -> int:
    return main(["season", str(season), "--out", str(out), "--workers", "2",
                 "--dashboard-address", ":0", "--no-cosmics", *extra])


def test_season_partial_then_resumes(season, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(season, out, "--nights", "3") == EXIT_PARTIAL
    text = capsys.readouterr().out
    report = json.loads((out / "season.json").read_text())
    by_night = {n["night"]: n for n in report["nights"]}
    assert by_night[BROKEN]["status"] == "failed"
    assert "no usable dark frames" in by_night[BROKEN]["reason"]
    assert BROKEN in text and "no usable dark frames" in text
    for date in set(DATES) - {BROKEN}:
        assert by_night[date]["status"] == "complete" and by_night[date]["done"] == 5
        manifest = json.loads((out / date / "manifest.json").read_text())
        assert manifest["status"] == "complete"
    # Two nights ran on the cluster at the same time: one night's frame tasks ran while
    # the other night was in progress (its masters or its frames).
    a, b = (by_night[d] for d in sorted(set(DATES) - {BROKEN}))
    assert a["started"] < b["finished"] and b["started"] < a["finished"]
    assert (b["started"] < a["last_task"] < b["finished"]
            or a["started"] < b["last_task"] < a["finished"])
    # Re-run: the complete nights are skipped without being calibrated again.
    assert _run(season, out) == EXIT_PARTIAL
    again = json.loads((out / "season.json").read_text())
    status = {n["night"]: n["status"] for n in again["nights"]}
    assert status == {"2026-06-15": "skipped", BROKEN: "failed", "2026-06-17": "skipped"}


def test_fallback_masters_rescue_the_broken_night(season, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(season, out, "--fallback-masters") == EXIT_OK
    capsys.readouterr()
    manifest = json.loads((out / BROKEN / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert any("using" in n for n in manifest["masters"]["notes"])


def test_dry_run_and_date_range(season, tmp_path, capsys):
    assert main(["season", str(season), "--dry-run", "--from", "2026-06-16"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "2026-06-15" not in text and "2026-06-16" in text and "2026-06-17" in text
    assert not list(season.rglob("manifest.json"))
