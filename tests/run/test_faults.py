"""Bad input and faults: every frame accounted for, nothing lost, nothing half-written."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from distributed import Client, LocalCluster

from astep_dask.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, main
from astep_dask.config import Settings
from astep_dask.io.fitsio import verify_file
from astep_dask.io.products import output_dir
from astep_dask.run.night import calibrate_night
from astep_dask.testing.simulate import BAD_FILES, BAD_FLATS, BAD_FRAMES

SETTINGS = Settings().replace(cluster={"dashboard_address": ":0"})


def tree_digest(root: Path) -> dict[str, tuple]:
    """Content hash, size, mtime and mode of every file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (
                hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns,
                st.st_mode,
            )
    return out


def _raw(night: Path) -> dict[str, tuple]:
    digest = {}
    for sub in (f"{night.name}-CAMS", f"{night.name}-CAMS_SKYFLAT"):
        digest.update({f"{sub}/{k}": v for k, v in tree_digest(night / sub).items()})
    return digest


@pytest.fixture(scope="module")
def threads_client():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        yield c


def _arrays(folder: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(folder.glob("*_CAL.fits")):
        with fits.open(p) as h:
            out[p.name] = (h["SCI"].data.copy(), h["VAR"].data.copy(), h["MASK"].data.copy())
    return out


@pytest.mark.slow
def test_bad_night_partial_and_good_frames_identical(small_night, bad_night, tmp_path, capsys):
    before = _raw(bad_night)
    code = main(["calibrate", str(bad_night), "--out", str(tmp_path / "bad"), "--workers", "2",
                 "--dashboard-address", ":0"])
    out = capsys.readouterr().out
    assert code == EXIT_PARTIAL
    assert _raw(bad_night) == before  # raw data untouched
    for name, reason in {**BAD_FILES, **BAD_FRAMES, **BAD_FLATS}.items():
        line = next((ln for ln in out.splitlines() if name in ln), None)
        assert line is not None and reason in line, (name, line)
    import json

    manifest = json.loads((output_dir(bad_night, tmp_path / "bad") / "manifest.json").read_text())
    assert manifest["status"] == "partial"
    named = {Path(u["path"]).name for u in manifest["unusable"]}
    named |= {r["file"] for r in manifest["frames"] if r["status"] == "failed"}
    named |= {Path(r["path"]).name for r in manifest["masters"]["rejected"]}
    assert named == set(BAD_FILES) | set(BAD_FRAMES) | set(BAD_FLATS)
    # The good frames, two of them read from .fits.gz / .fits.fz, equal the clean night's.
    assert main(["calibrate", str(small_night), "--out", str(tmp_path / "clean"),
                 "--workers", "2", "--dashboard-address", ":0"]) == EXIT_OK
    bad = _arrays(output_dir(bad_night, tmp_path / "bad"))
    clean = _arrays(output_dir(small_night, tmp_path / "clean"))
    assert set(bad) == set(clean) and len(clean) == 6
    for name in clean:
        for a, b in zip(bad[name], clean[name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_cli_errors_before_any_work(small_night, tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "nowhere")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "nowhere" in err and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["calibrate", str(small_night), "--out", str(blocker)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "not writable" in err and err.count("\n") == 1


def test_raw_tree_untouched_by_every_command(small_night, tmp_path, capsys):
    before = _raw(small_night)
    assert main(["inspect", str(small_night)]) == EXIT_OK
    assert main(["inspect", "--json", str(small_night.parent)]) == EXIT_OK
    assert main(["calibrate", str(small_night), "--out", str(tmp_path), "--workers", "1",
                 "--dashboard-address", ":0", "--no-cosmics"]) == EXIT_OK
    capsys.readouterr()
    assert _raw(small_night) == before


@pytest.mark.slow
def test_disk_full_stops_cleanly(small_night, tmp_path, threads_client, monkeypatch):
    calls = {"n": 0}
    real_writeto = fits.HDUList.writeto

    def failing_writeto(self, fileobj, *args, **kwargs):
        if "ADPROV" in self[0].header:  # a calibrated frame (masters have SCI too)
            calls["n"] += 1
            if calls["n"] > 2:
                fileobj.write(b"\0" * 1000)  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_writeto(self, fileobj, *args, **kwargs)

    monkeypatch.setattr(fits.HDUList, "writeto", failing_writeto)
    result = calibrate_night(small_night, threads_client, SETTINGS, out=tmp_path)
    folder = output_dir(small_night, tmp_path)
    full = [r for r in result.frames if r.get("write_error")]
    assert len(full) == 1 and "No space left" in full[0]["reason"]
    assert "_CAL.fits" in full[0]["reason"]
    assert result.status == "partial" and result.counts["done"] == 2
    assert all(r["status"] == "failed" for r in result.frames if r["status"] != "done")
    assert not list(folder.glob(".tmp-*"))
    for p in folder.glob("*_CAL.fits"):
        with fits.open(p) as h:  # every file that exists is whole
            assert len(h) == 4 and h["SCI"].data.shape == (128, 128)
    monkeypatch.undo()
    again = calibrate_night(small_night, threads_client, SETTINGS, out=tmp_path)
    assert again.status == "complete"
    assert again.counts["done"] + again.counts["skipped"] == 6


@pytest.mark.slow
def test_worker_killed_mid_night(small_night, tmp_path):
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        folder = output_dir(small_night, tmp_path)
        box: dict = {}

        def run() -> None:
            box["result"] = calibrate_night(small_night, client, SETTINGS, out=tmp_path)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 120
        while time.time() < deadline and not list(folder.glob("*_CAL.fits")):
            time.sleep(0.02)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=300)
        result = box["result"]
    assert result.status == "complete", result.frames
    assert result.counts["done"] + result.counts["skipped"] == 6
    names = sorted(p.name for p in folder.glob("*_CAL.fits"))
    assert len(names) == 6 and len(set(names)) == 6
    assert not list(folder.glob(".tmp-*"))
    for p in folder.glob("*_CAL.fits"):
        with fits.open(p, checksum=True) as h:
            assert h["SCI"].data.shape == (128, 128)


# ----------------------------------------------------------------------- damaged products
# Issue 21, items 1 and 2: a re-run checks a product's data checksums before it trusts it.


def _flip(path: Path, offset: int) -> None:
    """Flip the bits of one byte of a file, in place (a damaged disk block)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _calibrate(night: Path, out: Path) -> int:
    return main(["calibrate", str(night), "--out", str(out), "--dashboard-address", ":0"])


def test_a_damaged_master_is_rebuilt_not_reused(small_night, tmp_path, capsys):
    out = tmp_path / "out"
    assert _calibrate(small_night, out) == EXIT_OK
    folder = output_dir(small_night, out)
    clean, raw = _arrays(folder), _raw(small_night)
    flat = next(folder.glob("*_MASTERFLAT_*.fits"))
    _flip(flat, flat.stat().st_size // 2)  # inside the flat's data
    assert verify_file(flat) is not None
    capsys.readouterr()
    assert _calibrate(small_night, out) == EXIT_OK
    text = capsys.readouterr().out
    (line,) = [ln for ln in text.splitlines() if f"{flat.name}: damaged" in ln]
    assert "checksum" in line and "rebuilt" in line
    assert verify_file(flat) is None  # rebuilt whole
    again = _arrays(folder)
    assert again.keys() == clean.keys()
    for name, planes in clean.items():
        for a, b in zip(planes, again[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert _raw(small_night) == raw
    assert not list(folder.glob(".tmp-*"))


def test_damaged_calibrated_frames_are_remade(small_night, tmp_path, capsys):
    out = tmp_path / "out"
    assert _calibrate(small_night, out) == EXIT_OK
    folder = output_dir(small_night, out)
    clean = _arrays(folder)
    first, second, *_ = sorted(folder.glob("*_CAL.fits"))
    with open(first, "r+b") as fh:  # a truncated copy
        fh.truncate(first.stat().st_size - 3000)
    _flip(second, second.stat().st_size // 2)  # a bit error in VAR
    capsys.readouterr()
    assert _calibrate(small_night, out) == EXIT_OK
    text = capsys.readouterr().out
    assert f"(2 calibrated, {len(clean) - 2} already done" in text
    notes = [ln for ln in text.splitlines() if "previous output damaged" in ln]
    assert len(notes) == 2
    assert any("truncated" in ln for ln in notes)
    assert any("checksum" in ln for ln in notes)
    again = _arrays(folder)
    for name, planes in clean.items():
        for a, b in zip(planes, again[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert verify_file(first) is None and verify_file(second) is None
    assert not list(folder.glob(".tmp-*"))


def test_a_signal_lost_in_a_finaliser_still_stops_the_run(monkeypatch, capsys):
    """Python drops an exception raised in ``__del__`` (a dask future's finaliser runs in
    the main thread): the SIGTERM it carried must still end the command with 130."""
    import argparse

    import astep_dask.cli as cli

    class Finalised:
        def __del__(self):
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside __del__
            sum(range(1000))

    def command(args):
        Finalised()  # collected at once; its KeyboardInterrupt is printed, then dropped
        return EXIT_OK

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=command)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: dropped.append(u.exc_type))
    before = signal.getsignal(signal.SIGTERM)
    assert main([]) == EXIT_INTERRUPTED
    assert dropped == [KeyboardInterrupt]  # the exception was indeed lost
    assert "interrupted; finished frames are kept" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    from astep_dask.run.stop import stop_requested
    assert not stop_requested()  # the next in-process command starts afresh


def test_a_requested_stop_ends_the_task_loop(threads_client):
    """After a stop is requested, the task loop raises at its next finished task and
    cancels what it queued: no further item is started."""
    from astep_dask.run.stop import clear_stop, request_stop, stop_requested
    from astep_dask.run.tasks import map_bounded

    seen = []

    def on_result(item, result):
        seen.append(result)
        if len(seen) == 2:
            request_stop()

    try:
        with pytest.raises(KeyboardInterrupt):
            map_bounded(threads_client, lambda x: x * 10, list(range(50)), on_result,
                        window=lambda: 2, key=lambda i, x: f"stop-{i}")
        assert stop_requested() and len(seen) == 2
        with pytest.raises(KeyboardInterrupt):  # a later loop does not start
            map_bounded(threads_client, lambda x: x, [1], on_result,
                        window=lambda: 1, key=lambda i, x: "late")
        assert len(seen) == 2
    finally:
        clear_stop()
