"""Issue 21, items 5, 6, 8, 10 and 11: one bad frame fails alone, a full disk ends the night
partial with the manifest written, the manifest grows over re-runs and interruptions, bad
command-line values and lock files are refused, a filter with no flat fails once up front,
and simulate never writes into an existing night."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import astep_dask.io.fitsio as fitsio
import astep_dask.run.frames as frames
from astep_dask.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, main
from astep_dask.cli.progress import PhaseProgress
from astep_dask.errors import RunError
from astep_dask.io.products import LOCK, MANIFEST, night_lock, output_dir

RUN = ["--workers", "1", "--threads", "1", "--dashboard-address", ":0", "--no-cosmics"]


def _calibrate(night: Path, out: Path, *extra: str) -> int:
    return main(["calibrate", str(night), "--out", str(out), *RUN, *extra])


def _arrays(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.glob("*_CAL.fits")):
        with fits.open(p) as h:
            out[p.name] = tuple(h[k].data.copy() for k in ("SCI", "VAR", "MASK"))
    return out


def _same(a: dict[str, tuple], b: dict[str, tuple], names) -> None:
    for name in names:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_array_equal(x, y)


def _lines(text: str, *words: str) -> list[str]:
    return [ln for ln in text.splitlines() if all(w in ln for w in words)]


def _no_temps(folder: Path) -> None:
    assert not list(folder.glob(".tmp-*"))


@pytest.fixture(scope="module")
def clean(small_night, tmp_path_factory) -> dict[str, tuple]:
    """SCI/VAR/MASK of every frame of a clean run of the small night."""
    out = tmp_path_factory.mktemp("clean")
    assert _calibrate(small_night, out) == EXIT_OK
    return _arrays(output_dir(small_night, out))


def _copy(night: Path, dest: Path) -> Path:
    copy = dest / "archive" / night.name
    shutil.copytree(night, copy)
    return copy


def _science(night: Path) -> list[Path]:
    return sorted((night / f"{night.name}-CAMS").glob("*_SCIENCE.fits"))


# ------------------------------------------------------------------------------- item 5
def test_fully_masked_frame_fails_alone_and_is_not_retried(small_night, clean, tmp_path,
                                                           capsys, monkeypatch):
    night = _copy(small_night, tmp_path)
    bad = _science(night)[2]
    # the lowest plausible level, below every pixel (bias 1000 adu): all masked, sky NaN
    fits.setval(bad, "SATURATE", value=100.0)
    calls: dict[str, int] = {}
    real = frames.calibrate_frame

    def counting(*args, **kwargs):
        calls[threading.current_thread().name] = calls.get(threading.current_thread().name,
                                                           0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(frames, "calibrate_frame", counting)
    code = _calibrate(night, tmp_path / "out")
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL
    line, = _lines(out, "failed:", bad.name)
    assert "every pixel is masked" in line and "SATURATE" in line
    assert sum(calls.values()) == 6  # once per frame: the bad one was not retried
    folder = output_dir(night, tmp_path / "out")
    _no_temps(folder)
    got = _arrays(folder)
    assert set(got) == set(clean) - {bad.name.replace(".fits", "_CAL.fits")}
    _same(got, clean, got)
    rows = json.loads((folder / MANIFEST).read_text())["frames"]
    assert [r["status"] for r in rows].count("failed") == 1


def test_any_error_of_one_frame_fails_that_frame(small_night, clean, tmp_path, capsys,
                                                 monkeypatch):
    victim = _science(small_night)[1].name
    real = frames.calibrated_hdul

    def broken(raw_header, sci, var, mask, cards, *args, **kwargs):
        if cards["RAWFILE"][0] == victim:
            raise KeyError("boom in the header")
        return real(raw_header, sci, var, mask, cards, *args, **kwargs)

    monkeypatch.setattr(frames, "calibrated_hdul", broken)
    code = _calibrate(small_night, tmp_path)
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL
    line, = _lines(out, "failed:", victim)
    assert "KeyError" in line and "boom" in line
    folder = output_dir(small_night, tmp_path)
    _no_temps(folder)
    got = _arrays(folder)
    assert len(got) == 5
    _same(got, clean, got)


def test_non_finite_cards_are_left_out():
    cards = {"SKYLEVEL": (float("nan"), "sky"), "X": (np.float32("inf"), ""), "G": (1.5, "")}
    assert frames.finite_cards(cards) == {"G": (1.5, "")}


# ------------------------------------------------------------------------------- item 6
def _full_disk(monkeypatch, when) -> None:
    """Writes of temporary files for which ``when(name)`` is true go to /dev/full (ENOSPC
    at the first flush), through ``os.fdopen`` as in the issue (astropy's free-space check
    then fails with an AttributeError on the file object)."""
    real = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and when(Path(path).name):
            return os.fdopen(os.open("/dev/full", os.O_WRONLY), mode, *args, **kwargs)
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(fitsio, "open", fake_open, raising=False)


def test_disk_full_ends_the_night_partial_with_its_manifest(small_night, clean, tmp_path,
                                                            capsys, monkeypatch):
    lock = threading.Lock()
    written = {"n": 0}

    def third_frame_on(name: str) -> bool:
        if "_CAL.fits" not in name:
            return False
        with lock:
            written["n"] += 1
            return written["n"] > 2

    _full_disk(monkeypatch, third_frame_on)
    code = _calibrate(small_night, tmp_path)
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL
    failed = _lines(out, "failed:", "No space left on device")
    assert len(failed) == 1 and "_CAL.fits" in failed[0]
    assert _lines(out, "not calibrated: 3 frames")
    folder = output_dir(small_night, tmp_path)
    _no_temps(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["status"] == "partial"
    assert len(manifest["frames"]) == 6 and manifest["counts"]["done"] == 2
    got = _arrays(folder)
    assert len(got) == 2
    _same(got, clean, got)
    monkeypatch.undo()
    assert _calibrate(small_night, tmp_path) == EXIT_OK  # space freed: resumes
    _same(_arrays(folder), clean, clean)


def test_disk_full_at_the_manifest_is_one_clear_line(small_night, tmp_path, capsys,
                                                     monkeypatch):
    _full_disk(monkeypatch, lambda name: MANIFEST in name)
    code = _calibrate(small_night, tmp_path)
    out = capsys.readouterr().out
    assert code == EXIT_FAILED
    line, = _lines(out, "manifest not written")
    assert "No space left on device" in line and "6 frames calibrated and kept" in line
    folder = output_dir(small_night, tmp_path)
    _no_temps(folder)
    assert not (folder / MANIFEST).exists()
    assert len(list(folder.glob("*_CAL.fits"))) == 6


# ------------------------------------------------------------------------------- item 8
def test_rerun_keeps_the_manifest_rows_rejections_and_exit_code(bad_night, tmp_path, capsys):
    assert _calibrate(bad_night, tmp_path) == EXIT_PARTIAL
    folder = output_dir(bad_night, tmp_path)
    first = json.loads((folder / MANIFEST).read_text())
    assert first["masters"]["rejected"]
    assert _calibrate(bad_night, tmp_path) == EXIT_PARTIAL
    capsys.readouterr()
    second = json.loads((folder / MANIFEST).read_text())
    assert second["masters"]["rejected"] == first["masters"]["rejected"]
    before = {r["file"]: r for r in first["frames"] if r["status"] == "done"}
    after = {r["file"]: r for r in second["frames"]}
    assert before and set(before) <= set(after)
    for name, row in before.items():
        assert after[name]["status"] == "skipped"
        for key in ("median", "mad_sigma", "n_masked", "n_cr", "t_total", "worker"):
            assert after[name][key] == row[key], (name, key)
    assert [r["file"] for r in second["frames"] if r["status"] == "failed"] == \
        [r["file"] for r in first["frames"] if r["status"] == "failed"]


def test_interrupted_run_writes_its_manifest(small_night, tmp_path, capsys, monkeypatch):
    real = PhaseProgress.__call__

    def interrupt_after_two(self, done, total, row):
        real(self, done, total, row)
        if done == 2 and row.get("stage") is None:  # the second calibrated frame
            raise KeyboardInterrupt

    monkeypatch.setattr(PhaseProgress, "__call__", interrupt_after_two)
    assert _calibrate(small_night, tmp_path) == EXIT_INTERRUPTED
    capsys.readouterr()
    folder = output_dir(small_night, tmp_path)
    _no_temps(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["error"] == "interrupted" and manifest["status"] == "failed"
    assert manifest["counts"]["done"] >= 2
    recorded = {r["file"]: r["median"] for r in manifest["frames"] if r["status"] == "done"}
    monkeypatch.undo()
    assert _calibrate(small_night, tmp_path) == EXIT_OK
    rows = {r["file"]: r for r in json.loads((folder / MANIFEST).read_text())["frames"]}
    assert len(rows) == 6
    for name, level in recorded.items():  # skipped rows keep the figures recorded earlier
        assert rows[name]["status"] == "skipped" and rows[name]["median"] == level


# ------------------------------------------------------------------------------ item 10
@pytest.mark.parametrize("option,value", [("--workers", "-1"), ("--workers", "0"),
                                          ("--threads", "-2"), ("--retries", "-1"),
                                          ("--workers", "two")])
def test_bad_cluster_values_refused_at_once(small_night, tmp_path, capsys, option, value):
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as info:
        main(["calibrate", str(small_night), "--out", str(tmp_path), option, value])
    assert info.value.code == 2 and time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    line, = _lines(err, "error:")
    assert option in line and value in line
    assert not (tmp_path / small_night.name).exists()


def test_retries_help_is_true():
    from astep_dask.cli.parser import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["calibrate"]
    text = " ".join(sub.format_help().split())
    assert "worker died" in text and "never retried" in text


def test_empty_lock_is_not_stale(tmp_path):
    (tmp_path / LOCK).write_text("")
    with pytest.raises(RunError, match="holds the lock"):
        with night_lock(tmp_path):
            pass
    assert (tmp_path / LOCK).exists()


def test_one_holder_among_racing_runs(tmp_path):
    (tmp_path / LOCK).write_text(f"{socket.gethostname()} 999999999\n")  # a dead run's
    start = threading.Barrier(8)
    holders: list[int] = []
    refused: list[str] = []

    def take(i: int) -> None:
        start.wait()
        try:
            with night_lock(tmp_path):
                holders.append(i)
                assert (tmp_path / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}\n"
                time.sleep(0.3)
        except RunError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(holders) == 1 and len(refused) == 7
    assert not (tmp_path / LOCK).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{LOCK}.break"]


# ------------------------------------------------------------------------------ item 11
def test_filter_without_flat_fails_once_up_front(small_night, clean, tmp_path, capsys,
                                                 monkeypatch):
    night = _copy(small_night, tmp_path)
    orphans = _science(night)[1:5]
    for p in orphans:  # a copy of the raw night: the archive stays untouched
        fits.setval(p, "FILTER", value="V")
    calls: list[str] = []
    real = frames.calibrate_frame

    def counting(*args, **kwargs):
        calls.append("x")
        return real(*args, **kwargs)

    monkeypatch.setattr(frames, "calibrate_frame", counting)
    code = _calibrate(night, tmp_path / "out")
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL
    line, = _lines(out, "failed:", "no master flat for filter 'V'")
    assert "4 frames" in line and orphans[0].name in line and orphans[-1].name in line
    assert len(calls) == 2  # the four V frames never reached a worker
    folder = output_dir(night, tmp_path / "out")
    got = _arrays(folder)
    assert set(got) == set(clean) - {p.name.replace(".fits", "_CAL.fits") for p in orphans}
    _same(got, clean, got)
    rows = json.loads((folder / MANIFEST).read_text())["frames"]
    assert sorted(r["file"] for r in rows if r["status"] == "failed") == \
        sorted(p.name for p in orphans)


def test_simulate_refuses_to_mix_into_an_existing_night(small_night, tmp_path, capsys):
    night = _copy(small_night, tmp_path)
    before = {p: p.read_bytes() for p in night.rglob("*") if p.is_file()}
    code = main(["simulate", str(night.parent), "--date", night.name, "--size", "64",
                 "--science", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_FAILED
    line, = _lines(err, "error:", str(night), "already holds")
    assert f"{len(before)} files" in line
    assert {p: p.read_bytes() for p in night.rglob("*") if p.is_file()} == before


def test_season_names_a_dated_folder_without_raw_data(small_night, tmp_path, capsys):
    """Item 9: a night folder of the season with no raw folder is in the table, failed."""
    night = _copy(small_night, tmp_path)
    (night.parent / "2026-06-16").mkdir()
    (night.parent / "2026-06-16" / "readme.txt").write_text("transfer pending")
    assert main(["season", str(night.parent), "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    line, = _lines(out, "2026-06-16")
    assert "fail" in line and "not an archive night" in line
    assert _lines(out, night.name, "calibrate")
