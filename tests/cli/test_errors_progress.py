"""Issue 17 (command line): every bad input is one line on stderr with a documented exit
code, settings are validated when loaded, and progress fits a night of thousands of frames."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys

import pytest

from astep_dask.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, main
from astep_dask.cli.commands import _summary
from astep_dask.cli.progress import PhaseProgress
from astep_dask.config import Settings, load_settings
from astep_dask.run.results import StageResult
from astep_dask.testing.simulate import simulate_night
from tests.conftest import SMALL


def _one_error_line(err: str, *words: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    hits = [ln for ln in lines if all(w in ln for w in words)]
    assert len(hits) == 1, err
    return hits[0]


# ------------------------------------------------------------------------- settings
@pytest.mark.parametrize("text, words", [
    ('[combine]\nsigma_low = "three"\n', ["[combine] sigma_low", "expected a number"]),
    ("[combine]\nmethod = \"mean\"\n", ["[combine] method", "sigclip, median"]),
    ("[detector]\ngain = -2.0\n", ["[detector] gain", "> 0"]),
    ("[cosmics]\nenabled = 1\n", ["[cosmics] enabled", "true or false"]),
    ("[flat]\ncentral_fraction = 1.5\n", ["[flat] central_fraction", "between 0 and 1"]),
    ("[combine]\nsigma_low = 3.0\nsigma_low = 4.0\n", ["not valid TOML"]),
    ("[combine\n", ["not valid TOML"]),
    ("[nosuch]\nx = 1\n", ["unknown settings table [nosuch]"]),
])
def test_bad_settings_file_is_one_line_naming_file_and_key(small_night, tmp_path, capsys,
                                                           text, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ValueError) as info:
        load_settings(cfg)
    assert str(cfg) in str(info.value) and all(w in str(info.value) for w in words)
    code = main(["calibrate", str(small_night), "--out", str(tmp_path / "out"),
                 "--config", str(cfg), "--dashboard-address", ":0"])
    assert code == EXIT_USAGE  # a refused setting is usage, as a refused option
    _one_error_line(capsys.readouterr().err, "error:", str(cfg), *words)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.fits"))


def test_valid_settings_still_load(tmp_path):
    cfg = tmp_path / "ok.toml"
    cfg.write_text("[combine]\nsigma_low = 4\n[cluster]\nkind = \"slurm\"\n")
    s = load_settings(cfg)
    assert s.combine.sigma_low == 4 and s.cluster.kind == "slurm"
    with pytest.raises(ValueError, match=r"\[cluster\] n_workers = 0: must be > 0"):
        Settings().replace(cluster={"n_workers": 0})
    assert Settings().replace(cluster={"n_workers": None}).cluster.n_workers is None


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, words", [
    (["season", "ROOT", "--from", "2026/06/17"], ["--from", "'2026/06/17' is not a date"]),
    (["season", "ROOT", "--to", "2026-02-30"], ["--to", "is not a date"]),
    (["simulate", "ROOT", "--size", "0"], ["--size", "0 is less than 1"]),
    (["simulate", "ROOT", "--date", "15-06-2026"], ["--date", "is not a date"]),
    (["simulate", "ROOT", "--science", "x"], ["--science", "not a whole number"]),
    (["search", "ROOT", "--show", "-1"], ["--show", "less than 0"]),
])
def test_bad_arguments_are_one_usage_line(tmp_path, capsys, argv, words):
    argv = [str(tmp_path) if a == "ROOT" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2  # documented: usage
    _one_error_line(capsys.readouterr().err, "error:", *words)
    assert not any(tmp_path.iterdir())  # nothing written


def test_inspect_into_a_closed_pipe_is_quiet(small_night):
    r = subprocess.run(f"{sys.executable} -m astep_dask.cli inspect --json {small_night} | head -1",
                       shell=True, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "["
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# ------------------------------------------------------------------------ progress
def _rows(n: int, failed: set[int] = frozenset()) -> list[dict]:
    return [{"file": f"f{i:04d}.fits", "output": f"f{i:04d}_CAL.fits", "mjd": float(i),
             "status": "failed" if i in failed else "done", "reason": "boom",
             "median": 100.0 + i, "mad_sigma": 10.0, "n_masked": 5, "n_cr": 3, "n_saturated": 0,
             "t_total": 0.5} for i in range(n)]


def test_progress_log_is_a_line_per_tenth_and_counts_failures():
    out = io.StringIO()
    p = PhaseProgress("frames", stream=out, bar=False)
    for i, row in enumerate(_rows(3000, failed={5, 6}), 1):
        p(i, 3000, row)
    for i in range(1, 5):
        p(i, 4, {"file": "x", "status": "done", "stage": "masters"})
    p.close()
    lines = out.getvalue().splitlines()
    frames = [ln for ln in lines if ln.strip().startswith("frames:")]
    assert len(frames) == 11  # the first frame, then each tenth
    assert frames[0].startswith("  frames: 1/3000")
    assert frames[-1].startswith("  frames: 3000/3000 (100 %)")
    assert "2 failed" in frames[-1]
    assert [ln for ln in lines if "masters: 4/4" in ln]
    assert len(lines) <= 15


def test_quiet_shows_nothing_and_bars_on_a_terminal():
    out = io.StringIO()
    p = PhaseProgress(stream=out, quiet=True)
    for i, row in enumerate(_rows(50), 1):
        p(i, 50, row)
    p.close()
    assert out.getvalue() == ""
    out = io.StringIO()
    p = PhaseProgress(stream=out, bar=True)
    for i, row in enumerate(_rows(50), 1):
        p(i, 50, row)
    p.close()
    assert "50/50" in out.getvalue() and "frames" in out.getvalue()


def test_summary_of_a_long_night_is_short(tmp_path):
    res = StageResult("calibrate", "2026-06-15", tmp_path, frames=_rows(500, failed={1, 2, 3}),
                      started=0.0, finished=10.0)
    text = _summary(res)
    assert len(text.splitlines()) < 15
    assert "497 calibrated" in text and "3 frames (f0001.fits ... f0003.fits): boom" in text
    assert "median e-      median 351.0 (from 100.0 to 599.0)" in text  # 100 + 251 (0 is done)


@pytest.mark.slow
def test_a_500_frame_night_calibrates_in_under_60_lines(tmp_path):
    cfg = dataclasses.replace(SMALL, size=48, n_science=500, n_darks=3, n_flats=3)
    night = simulate_night(tmp_path / "archive", cfg)
    log = tmp_path / "calibrate.log"
    with log.open("w") as fh:
        r = subprocess.run([sys.executable, "-m", "astep_dask.cli", "calibrate", str(night),
                            "--out", str(tmp_path / "out"), "--no-cosmics",
                            "--dashboard-address", ":0"], stdout=fh, stderr=subprocess.STDOUT,
                           timeout=900)
    text = log.read_text()
    assert r.returncode == EXIT_OK, text
    assert len(text.splitlines()) < 60, text
    manifest = json.loads((tmp_path / "out" / night.name / "manifest.json").read_text())
    assert manifest["counts"]["done"] == 500


def test_performance_report_and_kept_dashboard(small_night, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))  # the user presses Enter
    code = main(["calibrate", str(small_night), "--out", str(tmp_path), "--no-cosmics",
                 "--dashboard-address", ":0", "--performance-report", "--keep-dashboard"])
    err = capsys.readouterr().err
    assert code == EXIT_OK
    report = tmp_path / small_night.name / "performance-calibrate.html"
    assert report.stat().st_size > 10_000 and "<html" in report.read_text()[:2000].lower()
    assert f"performance report: {report}" in err
    assert "press Enter" in err and "dashboard kept at" in err
    assert not list(report.parent.glob(".tmp-*"))


def test_unreachable_scheduler_is_one_line_soon(small_night, tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    code = main(["calibrate", str(small_night), "--out", str(tmp_path),
                 "--scheduler", f"tcp://127.0.0.1:{port}"])
    waited = time.monotonic() - t0
    assert code == EXIT_FAILED
    line = _one_error_line(capsys.readouterr().err, "error:", f"127.0.0.1:{port}")
    assert "refused the connection" in line
    assert waited < 30  # the join gives up after 10 s (dask's own default is 30 s)


def test_cluster_starts_while_the_inventory_is_taken_and_closes_on_its_error():
    """calibrate takes the inventory on a thread while its cluster starts in the main
    thread (where a batch cluster's signal handler can be set); an inventory error still
    closes the cluster that started meanwhile."""
    import argparse
    import threading

    from distributed import Client

    from astep_dask.cli import commands
    from astep_dask.errors import ArchiveError

    args = argparse.Namespace(quiet=True)
    settings = Settings().replace(cluster={"dashboard_address": ":0", "n_workers": 1,
                                           "threads_per_worker": 1})
    where = []

    def work() -> int:
        where.append(threading.current_thread() is threading.main_thread())
        return 42

    with commands._cluster_during(settings, args, work) as (client, result):
        assert result == 42 and where == [False]
        assert client.status == "running"
    assert client.status == "closed"

    def broken() -> int:
        raise ArchiveError("night: broken")

    with pytest.raises(ArchiveError, match="broken"), \
            commands._cluster_during(settings, args, broken):
        pytest.fail("the block runs only with an inventory")
    with pytest.raises(ValueError):
        Client.current()  # no client of that cluster is left open


def test_each_phase_ends_once_with_its_own_duration(monkeypatch):
    """A phase's last line is printed once, also when the display is closed later, and its
    duration runs from the end of the phase before it (not from its first item, nor to
    the moment the display is closed)."""
    import types

    from astep_dask.cli import progress as module

    clock = [100.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    out = io.StringIO()
    p = PhaseProgress("frames", stream=out, bar=False)
    clock[0] = 130.0  # the first master takes 30 s
    p(1, 2, {"stage": "masters", "status": "done"})
    clock[0] = 160.0
    p(2, 2, {"stage": "masters", "status": "done"})
    clock[0] = 200.0  # the first frame ends 40 s after the masters
    for i in range(1, 5):
        p(i, 4, {"file": f"f{i}", "status": "done"})
        clock[0] += 10.0
    clock[0] = 1000.0  # the display is closed much later: nothing more is printed
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln for ln in lines if "masters: 2/2" in ln] == ["  masters: 2/2 (100 %) in 1 min 00 s"]
    assert [ln for ln in lines if "frames: 4/4" in ln] == ["  frames: 4/4 (100 %) in 1 min 10 s"]

    monkeypatch.undo()
    out = io.StringIO()  # on a terminal: the bar's last state, no log line after it
    p = PhaseProgress("frames", stream=out, bar=True)
    for i in range(1, 4):
        p(i, 3, {"file": f"f{i}", "status": "done"})
    p.close()
    assert "frames: 3/3 (100 %)" not in out.getvalue() and "3/3" in out.getvalue()
