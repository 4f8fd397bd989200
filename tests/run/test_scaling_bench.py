"""benchmarks/scaling.py: core counts, layouts, and a whole run on a tiny night."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"


def _module():
    spec = importlib.util.spec_from_file_location("scaling_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_core_counts_and_layout_options():
    s = _module()
    assert s.core_counts(1) == [1]
    assert s.core_counts(2) == [1, 2]
    assert s.core_counts(12) == [1, 2, 4, 8, 12]
    assert s.core_counts(16) == [1, 2, 4, 8, 16]
    assert s.layout_options("default", 8) == []
    assert s.layout_options("threads", 8) == ["--workers", "1", "--threads", "8"]
    assert s.layout_options("procs2", 8) == ["--processes", "--workers", "4", "--threads", "2"]
    assert s.layout_options("procs2", 1) is None
    assert s.layout_options("p4x2", 8) == ["--workers", "4", "--threads", "2", "--processes"]
    assert s.layout_options("p4x2", 4) is None
    assert s.layout_options("2x2", 4) == ["--workers", "2", "--threads", "2"]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_scaling_runs_on_one_and_two_cores(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "64", "--science", "3", "--darks", "3",
         "--flats", "3", "--cores", "1,2", "--workdir", str(tmp_path / "work"),
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [(r["layout"], r["cores"]) for r in runs] == [("default", 1), ("default", 2)]
    for r in runs:
        assert r["status"] == "ok"
        assert r["frames_done"] == 3  # every simulated science frame, from the manifest
        assert r["wall_s"] > r["frame_phase_s"] > 0
        # The stage's own clock holds the frame phase; the rest is start-up and shut-down.
        assert r["wall_s"] > r["stage_s"] >= r["frame_phase_s"]
        assert r["before_frames_s"] == pytest.approx(r["stage_s"] - r["frame_phase_s"])
        assert r["outside_stage_s"] == pytest.approx(r["wall_s"] - r["stage_s"])
        assert r["peak_pss_mb"] > 0 and r["cpu_s"] > 0
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["cores"])
        assert set(r["steps_median_s"]) >= {"t_read", "t_cosmics", "t_write", "t_total"}
    # The report names the code that ran: this checkout's package.
    assert report["code"]["package"] == str(SCRIPT.resolve().parents[1] / "astep_dask")
    assert report["code"]["commit"].startswith(report["machine"]["git_commit"] or "")
    assert runs[0]["speedup"] == pytest.approx(1.0)
    assert runs[1]["speedup"] == pytest.approx(runs[0]["wall_s"] / runs[1]["wall_s"])
    assert "default" in proc.stdout


@pytest.mark.slow
def test_worker_memory_shows_no_master_kept_by_a_worker(tmp_path):
    """benchmarks/worker_memory.py: the workers map the run's shared planes and keep no
    master of their own (issue 16)."""
    script = SCRIPT.parent / "worker_memory.py"
    out = tmp_path / "memory.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--size", "64", "--science", "3", "--workers", "2",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["status"] == "complete" and report["counts"]["done"] == 3
    assert len(report["workers"]) == 2
    for w in report["workers"]:
        assert w["masters_loaded"] == 0
        assert w["rss_mib"] >= w["pss_mib"] >= w["uss_mib"] > 0
