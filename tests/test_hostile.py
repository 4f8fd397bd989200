"""Hostile headers and shared machines: a header or another user must never steer our
writes or run code as us. Each test reproduces an attack and asserts that nothing is
written outside the output root, the raw files and any other folder are byte-identical,
and the planted code never runs."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from astropy.io import fits

from astep_dask.cli import main
from astep_dask.io.products import output_dir, safe_part
from astep_dask.masters import store
from astep_dask.testing.simulate import SimConfig, simulate_night

pytestmark = pytest.mark.slow  # whole nights

SIM = SimConfig(size=64, n_science=3, n_darks=3, n_flats=3, seed=21)
SCRIPT = str(Path(sys.executable).with_name("astep-dask"))


def _snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders for p in f.rglob("*") if p.is_file()}


def _set_filter(night: Path, value: str) -> None:
    """FILTER of every flat and science frame (raw files are ours to spoil in a test)."""
    for p in night.rglob("*.fits"):
        if p.name.endswith(("_SKYFLAT.fits", "_SCIENCE.fits")):
            with fits.open(p, mode="update") as hdul:
                hdul[0].header["FILTER"] = value


def test_safe_part_keeps_plain_names_and_defuses_the_rest():
    assert safe_part("RC") == "RC" and safe_part("g+r.1-2") == "g+r.1-2"
    for hostile in ("../../../../victim/x", "..", ".hidden", "a/b", "x'onerror='alert(1)",
                    "é", ""):
        name = safe_part(hostile)
        assert "/" not in name and not name.startswith(".") and "'" not in name, name
        assert all(c.isalnum() or c in "._+-" for c in name), name
    assert safe_part("a/b") != safe_part("a_b")  # a hash keeps them apart


def test_a_filter_header_cannot_write_outside_the_output(tmp_path, capsys):
    night = simulate_night(tmp_path / "archive", SIM)
    _set_filter(night, "../../../../victim/x")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.fits").write_bytes(b"precious")
    (victim / "x.fits").chmod(0o444)
    raw, others = _snapshot(night), _snapshot(victim)
    out = tmp_path / "out"
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"])
    assert code == 0, capsys.readouterr()
    assert _snapshot(victim) == others and _snapshot(night) == raw
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - set(raw) - set(others)
    assert all(out in p.parents for p in written), sorted(written)
    flats = list(output_dir(night, out).glob("*_MASTERFLAT_*.fits"))
    assert len(flats) == 1 and flats[0].parent == output_dir(night, out)


def test_a_filter_header_cannot_put_script_in_the_report(tmp_path, capsys):
    night = simulate_night(tmp_path / "archive", SIM)
    _set_filter(night, "x'onerror='alert(1)")
    out = tmp_path / "out"
    assert main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"]) == 0
    assert main(["report", str(night), "--out", str(out), "--no-cluster", "-q"]) == 0
    page = (output_dir(night, out) / "report" / "index.html").read_text()
    assert "onerror='alert" not in page and "x'onerror" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page


def test_a_planted_scratch_folder_runs_no_code(tmp_path):
    """Another user made ``$TMPDIR/dask-scratch-space`` first, world-writable, with
    modules named like the optional imports dask tries; a run with worker processes
    must import none of them (the run's servers use a private folder of their own)."""
    night = simulate_night(tmp_path / "archive", SIM)
    tmp = tmp_path / "tmp"
    planted = tmp / "dask-scratch-space"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    marker = tmp_path / "planted-code-ran.txt"
    for module in ("gilknocker", "pint", "sparse", "cupy", "prometheus_client"):
        (planted / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write({module!r} + '\\n')\n")
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("DASK_TEMPORARY_DIRECTORY", None)
    r = subprocess.run([SCRIPT, "calibrate", str(night), "--out", str(tmp_path / "out"),
                        "--no-cosmics", "--processes", "--workers", "2", "--threads", "1",
                        "--dashboard-address", "127.0.0.1:0"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), marker.read_text()
    assert [p.name for p in tmp.iterdir()] == ["dask-scratch-space"]  # ours removed


def test_a_configured_scratch_folder_others_may_write_is_refused(tmp_path):
    night = simulate_night(tmp_path / "archive", SIM)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may replace what is in it
    env = {**os.environ, "DASK_TEMPORARY_DIRECTORY": str(shared)}
    r = subprocess.run([SCRIPT, "calibrate", str(night), "--out", str(tmp_path / "out"),
                        "--no-cosmics", "--dashboard-address", "127.0.0.1:0"], env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"temporary-directory {shared}: refused: others may write in it" in lines[0]
    assert not any(shared.iterdir())
    assert stat.S_IMODE(shared.stat().st_mode) == 0o777


def test_products_honour_the_umask_and_a_planted_symlink_is_not_followed(tmp_path):
    """Under umask 077 no product is readable by others; a symbolic link planted in the
    output tree where the run's planes folder goes is removed, not written through."""
    night = simulate_night(tmp_path / "archive", SIM)
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.mkdir()
    night_out = output_dir(night, out)
    night_out.mkdir(parents=True)
    (night_out / ".frame-masters").symlink_to(victim, target_is_directory=True)
    r = subprocess.run(["sh", "-c", 'umask 077 && exec "$0" "$@"', SCRIPT, "calibrate",
                        str(night), "--out", str(out), "--no-cosmics", "-q",
                        "--dashboard-address", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not any(victim.iterdir())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_CAL.fits") for p in files)
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o600)}


def test_raw_names_like_our_temporaries_or_not_ascii_are_calibrated(tmp_path, capsys):
    """A raw frame named like a temporary file of ours (``.tmp-…``) or with non-ASCII
    characters in its name is calibrated like any other, its name kept (escaped in
    headers), never a reason to lose the frame."""
    night = simulate_night(tmp_path / "archive", SIM)
    science = sorted(night.rglob("*_SCIENCE.fits"))
    renamed = [science[0].with_name(".tmp-" + science[0].name),
               science[1].with_name("Dôme_C_nuit_" + science[1].name)]
    for old, new in zip(science, renamed, strict=False):
        old.rename(new)
    for flat in sorted(night.rglob("*_SKYFLAT.fits"))[:2]:  # into the master flat
        flat.rename(flat.with_name("Dôme_" + flat.name))
    out = tmp_path / "out"
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"])
    assert code == 0, capsys.readouterr()
    folder = output_dir(night, out)
    for raw in renamed:
        product = folder / (raw.name.removesuffix(".fits") + "_CAL.fits")
        assert product.exists(), sorted(p.name for p in folder.iterdir())
        with fits.open(product) as hdul:
            written = hdul[0].header["RAWFILE"]
        assert urllib.parse.unquote(written) == raw.name
        check = subprocess.run(["fitsverify", "-q", str(product)], capture_output=True,
                               text=True)
        assert "OK" in check.stdout or check.returncode == 0, check.stdout


def test_a_corrupt_manifest_is_kept_aside_and_rebuilt_from_the_products(tmp_path, capsys):
    """A half-truncated manifest is named, kept as ``manifest.json.corrupt`` and rebuilt
    from the products, each frame's figures with it; nothing is calibrated again."""
    night = simulate_night(tmp_path / "archive", SIM)
    out = tmp_path / "out"
    args = ["calibrate", str(night), "--out", str(out), "--no-cosmics",
            "--dashboard-address", "127.0.0.1:0"]
    assert main(args) == 0, capsys.readouterr()
    folder = output_dir(night, out)
    manifest = folder / "manifest.json"
    whole = manifest.read_bytes()
    first = {r["file"]: r for r in json.loads(whole)["frames"]}
    manifest.write_bytes(whole[: len(whole) // 2])
    capsys.readouterr()
    assert main(args) == 0
    said = "".join(capsys.readouterr())
    assert "note: manifest.json was not valid JSON" in said, said
    assert "kept as manifest.json.corrupt" in said
    assert (folder / "manifest.json.corrupt").read_bytes() == whole[: len(whole) // 2]
    again = {r["file"]: r for r in json.loads(manifest.read_text())["frames"]}
    assert set(again) == set(first)
    for name, row in again.items():
        assert row["status"] == "skipped", row  # kept from its product, not redone
        for key in ("median", "mad_sigma", "n_cr"):
            assert row[key] == pytest.approx(first[name][key], rel=1e-6), (name, key)


def test_a_full_disk_in_the_masters_phase_names_the_file(tmp_path, capsys, monkeypatch):
    night = simulate_night(tmp_path / "archive", SIM)
    out = tmp_path / "out"
    real = store.atomic_write_digest

    def full(hdul, path):
        if "flat" in Path(path).name.lower():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(hdul, path)

    monkeypatch.setattr(store, "atomic_write_digest", full)
    code = main(["calibrate", str(night), "--out", str(out), "--no-cosmics", "-q",
                 "--dashboard-address", "127.0.0.1:0"])
    said = "".join(capsys.readouterr())
    assert code != 0
    line = next(ln for ln in said.splitlines() if "masters:" in ln)
    assert "cannot write " in line and "No space left on device" in line, said
    assert str(output_dir(night, out)) in line and "flat" in line.lower(), line
