"""Season runs: several nights through one cluster, a broken night, resume."""

from __future__ import annotations

import dataclasses
import json
import re
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


def _table(text: str) -> list[dict]:
    """The last table printed: rows keyed by its header, cut at the header's columns
    (the reason column has spaces in it)."""
    lines = text.splitlines()
    head = max(i for i, line in enumerate(lines) if line.startswith("night ")
               and "skipped" in line)
    header = lines[head]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()
    rows = []
    for line in lines[head + 2:]:
        if not line.strip() or line.startswith("season "):
            break
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


COUNTS = ("done", "skipped", "failed", "unusable")


def _manifest_counts(out: Path) -> dict[str, dict[str, int]]:
    return {d: json.loads((out / d / "manifest.json").read_text())["counts"] for d in DATES
            if (out / d / "manifest.json").exists()}


def test_season_table_totals_equal_the_manifests(season, tmp_path, capsys):
    """The summary ends with a table whose counts are the manifests' and whose TOTAL row
    is their sum; a second run shows the same frames as skipped."""
    out = tmp_path / "out"
    assert _run(season, out, "--nights", "3") == EXIT_PARTIAL
    captured = capsys.readouterr()
    text = captured.out
    rows = _table(text)
    last = text.strip().splitlines()[-1]
    assert last.startswith("season partial: 3 nights in ") and f"report: {out}" in last
    assert "{'" not in text  # no Python dict printed
    manifests = _manifest_counts(out)
    assert set(manifests) == set(DATES)  # the broken night wrote one too (masters failed)
    by_night = {r["night"]: r for r in rows}
    assert list(by_night) == [*DATES, "TOTAL"]
    for date, counts in manifests.items():
        assert {k: int(by_night[date][k]) for k in COUNTS} == {k: counts[k] for k in COUNTS}
    total = {k: int(by_night["TOTAL"][k]) for k in COUNTS}
    assert total == {k: sum(c[k] for c in manifests.values()) for k in COUNTS}
    assert total["done"] == 10 and by_night["TOTAL"]["status"] == "partial"
    assert "no usable dark frames" in by_night[BROKEN]["reason"]
    # The progress lines count frames only (not the masters' steps): up to the total.
    seen = [int(n) for n in re.findall(r"season: (\d+) frames", captured.err)]
    assert seen and max(seen) == total["done"] + total["failed"]

    assert _run(season, out) == EXIT_PARTIAL
    rows = _table(capsys.readouterr().out)
    again = {r["night"]: r for r in rows}
    assert [again[d]["status"] for d in DATES] == ["skipped", "failed", "skipped"]
    manifests = _manifest_counts(out)
    for date in set(DATES) - {BROKEN}:  # not shown as 0: read from the manifest
        assert int(again[date]["skipped"]) == manifests[date]["done"] == 5
    second = {k: int(again["TOTAL"][k]) for k in COUNTS}
    assert second == {"done": 0, "skipped": total["done"] + total["skipped"],
                      "failed": total["failed"], "unusable": total["unusable"]}
    assert second["skipped"] == sum(c["done"] + c["skipped"] for c in manifests.values())
