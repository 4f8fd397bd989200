"""Resume from metadata: a re-run with nothing to do reads no raw or product bytes and
starts no cluster; a changed file is found by its status and hashed again; an archive
copied elsewhere is re-hashed, not recalibrated; ``verify`` finds damage that a re-run
trusts by status, and ``--repair`` remakes it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from astep_dask.cli import EXIT_OK, EXIT_PARTIAL, main
from astep_dask.io.index import RACY_NS, Entry, FileIndex, Stamp
from astep_dask.io.products import MANIFEST, output_dir
from astep_dask.testing.simulate import SimConfig, simulate_night

pytestmark = pytest.mark.slow  # whole nights, several runs

SIM = SimConfig(size=64, n_science=4, n_darks=3, n_flats=3, seed=8)


def _archive(root: Path) -> Path:
    """A night whose files were written an hour ago (as an archive's are): their digests
    are not racy when a run takes them."""
    night = simulate_night(root, SIM)
    hour_ago = time.time_ns() - 3600 * 10**9
    for p in night.rglob("*.fits"):
        os.utime(p, ns=(hour_ago, hour_ago))
    return night


def _calibrate(night: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics",
                 "--dashboard-address", "127.0.0.1:0", *extra])
    return code, capsys.readouterr().out


def _forbid(monkeypatch, module, *names: str) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"a no-op re-run called {module.__name__}.{names}")

    for name in names:
        monkeypatch.setattr(module, name, refuse)


def test_a_no_op_rerun_reads_no_data_and_starts_no_cluster(tmp_path, capsys, monkeypatch):
    night = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    code, text = _calibrate(night, out, capsys)
    assert code == EXIT_OK and f"{SIM.n_science} calibrated" in text, text
    manifest = json.loads((output_dir(night, out) / MANIFEST).read_text())
    entries = manifest["files"]["entries"]
    raws = [n for n, e in entries.items() if not e["written"]]
    products = [n for n, e in entries.items() if e["written"]]
    assert len(raws) == len(list(night.rglob("*.fits")))  # every input, science included
    assert len(products) == SIM.n_science + 4  # frames and masters (dark x2, flat, mask)

    import astep_dask.io.rawfiles as rawfiles
    import astep_dask.io.stack as stack
    import astep_dask.run.cluster as cluster

    rawfiles._CONTENT.clear()  # a new process: it knows only what the manifest says
    _forbid(monkeypatch, cluster, "connect", "local_cluster")
    _forbid(monkeypatch, stack, "read_raw", "read_section")
    real = rawfiles.read_content

    def known_only(path, st):  # a digest the manifest gave, never the file's bytes
        assert rawfiles.known_content(path, st) is not None, f"{path} was read"
        return real(path, st)

    monkeypatch.setattr(rawfiles, "read_content", known_only)
    code, text = _calibrate(night, out, capsys)
    assert code == EXIT_OK and f"0 calibrated, {SIM.n_science} already done" in text, text


def test_a_changed_raw_file_is_hashed_again_and_its_frame_redone(tmp_path, capsys):
    """Other pixels, the same size, the modification time set back: the inode-change
    time still moves, so the file is hashed again and its frame recalibrated."""
    night = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    assert _calibrate(night, out, capsys)[0] == EXIT_OK
    sci = sorted(night.rglob("*_SCIENCE.fits"))[1]
    st = sci.stat()
    data = bytearray(sci.read_bytes())
    data[-100] ^= 0x01  # a pixel of the last rows
    sci.write_bytes(bytes(data))
    os.utime(sci, ns=(st.st_atime_ns, st.st_mtime_ns))
    code, text = _calibrate(night, out, capsys)
    assert code == EXIT_OK and "1 calibrated" in text, text


def test_a_copied_archive_is_rehashed_not_recalibrated(tmp_path, capsys):
    night = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    assert _calibrate(night, out, capsys)[0] == EXIT_OK
    shutil.copytree(tmp_path / "archive", tmp_path / "copy", copy_function=shutil.copy2)
    shutil.copytree(out, tmp_path / "copy-out", copy_function=shutil.copy2)
    code, text = _calibrate(tmp_path / "copy" / night.name, tmp_path / "copy-out", capsys)
    assert code == EXIT_OK and f"0 calibrated, {SIM.n_science} already done" in text, text


def test_verify_finds_damage_the_status_hides_and_repairs_it(tmp_path, capsys):
    night = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    assert _calibrate(night, out, capsys)[0] == EXIT_OK
    raw = {p: p.read_bytes() for p in night.rglob("*.fits")}
    product = sorted(output_dir(night, out).glob("*_CAL.fits"))[2]
    st = product.stat()
    data = bytearray(product.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, same size, times restored
    product.write_bytes(bytes(data))
    os.utime(product, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert product.stat().st_size == st.st_size and product.stat().st_mtime_ns == st.st_mtime_ns

    args = ["verify", str(night), "--out", str(out), "--dashboard-address", "127.0.0.1:0"]
    assert main(args) == EXIT_PARTIAL
    said = capsys.readouterr().out
    assert f"damaged product: {product}: its bytes hash to" in said, said
    assert "1 damaged" in said
    assert main([*args, "--repair"]) == EXIT_OK
    said = capsys.readouterr().out
    assert "1 repaired" in said, said
    assert product.with_name(product.name + ".damaged").exists()
    assert main(args) == EXIT_OK
    assert "0 damaged" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in night.rglob("*.fits")} == raw  # raw never touched


def test_racy_entries_are_not_trusted_by_status(tmp_path):
    """An input modified within the time-stamp granularity of the moment its digest was
    taken could have changed without its status changing: hashed again next time. Files
    the pipeline wrote are exempt (hashed as written, renamed into place)."""
    f = tmp_path / "x.fits"
    f.write_bytes(b"x" * 2880)
    st = f.stat()
    stamp = Stamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    index = FileIndex()
    index.record(f, stamp, "d", checked_ns=st.st_mtime_ns + RACY_NS // 2)
    assert index.recorded(f).racy and index.known(f) is None
    index.record(f, stamp, "d", checked_ns=st.st_mtime_ns + 2 * RACY_NS)
    assert not index.recorded(f).racy and index.known(f) is not None
    index.record(f, stamp, "d", checked_ns=st.st_mtime_ns, written=True)
    assert index.known(f) is not None
    again = FileIndex.from_manifest({"files": index.to_manifest()})
    assert again.entries == index.entries
    assert isinstance(next(iter(again.entries.values())), Entry)
    f.write_bytes(b"y" * 2880)  # rewritten: the status differs
    assert again.known(f) is None
    assert dataclasses.replace(stamp, size=1) != stamp
