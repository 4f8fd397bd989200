"""Bad or ambiguous raw input found at inventory time (issue 21, items 3, 4, 5, 7 and 9):
truncated compressed files, changed content, two inputs for one output, bad header
values and entries that are no files. Each test works on its own small simulated night."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astep_dask.cli import EXIT_OK, EXIT_PARTIAL, main
from astep_dask.config import Settings
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import FLAT_FOLDER, SCIENCE_FOLDER, scan_night
from astep_dask.io.products import MANIFEST, output_dir
from astep_dask.io.provenance import frame_provenance, input_identity, night_provenance
from astep_dask.io.rawfiles import content_digest
from astep_dask.testing.simulate import SimConfig, simulate_night

TINY = SimConfig(size=64, n_science=3, n_darks=3, n_flats=5, seed=5)
CLUSTER = ["--workers", "1", "--dashboard-address", ":0"]


@pytest.fixture
def night(tmp_path) -> Path:
    """A fresh 64² night (3 science, 3+3 darks, 5 flats) of this test's own."""
    return simulate_night(tmp_path / "raw", TINY)


def _folders(night: Path) -> tuple[Path, Path]:
    return night / f"{night.name}-{SCIENCE_FOLDER}", night / f"{night.name}-{FLAT_FOLDER}"


def _problems(night: Path) -> dict[str, str]:
    return {f.path.name: f.problem for f in scan_night(night).problems}


def _line(text: str, *words: str) -> str:
    """The one output line holding every word."""
    lines = [ln for ln in text.splitlines() if all(w in ln for w in words)]
    assert len(lines) == 1, (words, text)
    return lines[0]


def _inspect(night: Path, capsys) -> tuple[int, str]:
    code = main(["inspect", str(night)])
    return code, capsys.readouterr().out


def _calibrate(night: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["calibrate", str(night), *CLUSTER, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _manifest(night: Path) -> dict:
    return json.loads((output_dir(night, None) / MANIFEST).read_text())


def _rewrite_pixels(path: Path, delta: int = 7) -> None:
    """Rewrite a raw file with other pixels under the same header, same size and the same
    modification time (what the issue's rewritten frame and flat did)."""
    st = path.stat()
    with fits.open(path) as hdul:
        data = hdul[0].data + np.uint16(delta)  # unsigned 16-bit, written back as such
        header = hdul[0].header.copy()
    fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def _write_fz(src: Path, dest: Path) -> Path:
    with fits.open(src) as hdul:
        comp = fits.CompImageHDU(hdul[0].data, header=hdul[0].header, compression_type="RICE_1")
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(dest)
    return dest


def _write_gz(src: Path, dest: Path) -> Path:
    with fits.open(src) as hdul:
        hdul.writeto(dest)
    return dest


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- item 5: truncated compressed files ------------------------------------------------


def test_truncated_fz_and_gz_are_unusable_at_inventory(night, capsys):
    cams, flats = _folders(night)
    science = sorted(cams.glob("*_SCIENCE.fits"))
    flat = sorted(flats.glob("*_SKYFLAT.fits"))[0]
    fz = _write_fz(science[0], cams / "cut_fz_SCIENCE.fits.fz")
    gz = _write_gz(science[1], cams / "cut_gz_SCIENCE.fits.gz")
    flat_fz = _write_fz(flat, flats / "cut_fz_SKYFLAT.fits.fz")
    whole_fz = _write_fz(science[2], cams / "whole_fz_SCIENCE.fits.fz")
    whole_gz = _write_gz(science[2], cams / "whole_gz_SCIENCE.fits.gz")
    for path in (fz, gz, flat_fz):
        _truncate(path)

    problems = _problems(night)
    assert problems[fz.name].startswith("truncated: ")
    assert "header needs" in problems[fz.name]
    assert problems[gz.name] == "truncated: the gzip stream ends early or is corrupt"
    assert problems[flat_fz.name].startswith("truncated: ")
    assert whole_fz.name not in problems and whole_gz.name not in problems

    code, out = _inspect(night, capsys)
    assert code == EXIT_PARTIAL  # unusable files: partial, as the README says
    assert "truncated" in _line(out, str(fz))
    assert "truncated" in _line(out, str(gz))

    # The night no longer aborts ("buffer is too small"): the bad files are listed, the rest
    # is calibrated (the two whole compressed copies are duplicates of no file: other bytes),
    # and unusable files make the night "partial".
    code, out = _calibrate(night, capsys)
    assert code == EXIT_PARTIAL, out
    assert "5 calibrated" in out and "3 unusable files" in out
    assert "truncated" in _line(out, "unusable:", str(flat_fz))
    unusable = {Path(u["path"]).name: u["reason"] for u in _manifest(night)["unusable"]}
    assert unusable[gz.name].startswith("truncated")
    assert unusable[flat_fz.name].startswith("truncated")


def test_gzip_of_a_truncated_fits_file_is_found(night):
    """A whole gzip stream of a FITS file that was already short is caught too."""
    cams, _ = _folders(night)
    src = sorted(cams.glob("*_SCIENCE.fits"))[0]
    short = cams / "short_SCIENCE.fits"
    short.write_bytes(src.read_bytes()[:-2880])
    import gzip

    gz = cams / "short_gz_SCIENCE.fits.gz"
    gz.write_bytes(gzip.compress(short.read_bytes()))
    short.unlink()
    problem = _problems(night)[gz.name]
    assert problem.startswith("truncated: ") and "decompressed, header needs" in problem


# -- item 3: a raw file's identity includes its content --------------------------------


def test_records_carry_size_and_content_digest(night):
    """Calibration frames are hashed by the inventory (the masters' provenance names
    them); a science frame by the worker that reads it for calibration, not here."""
    inv = scan_night(night)
    for f in inv.frames:
        assert f.size == f.path.stat().st_size
        if f.kind is FrameType.SCIENCE:
            assert f.digest == ""
        else:
            assert f.digest == content_digest(f.path)
    calibration = [f.digest for f in inv.frames if f.kind is not FrameType.SCIENCE]
    assert len(set(calibration)) == len(calibration)


def test_changed_pixels_change_identity_and_provenance(night):
    settings = Settings()
    before = scan_night(night)
    flat_recs = before.select(FrameType.FLAT)
    sci = before.select(FrameType.SCIENCE)[0]
    sci_digest = content_digest(sci.path)
    _rewrite_pixels(flat_recs[0].path)
    _rewrite_pixels(sci.path)
    after = scan_night(night)
    assert input_identity(after.select(FrameType.FLAT)) != input_identity(flat_recs)
    new_sci = after.select(FrameType.SCIENCE)[0]
    assert content_digest(new_sci.path) != sci_digest
    assert frame_provenance(new_sci, "m", settings) != frame_provenance(sci, "m", settings,
                                                                        sci_digest)
    other = before.select(FrameType.SCIENCE)[1]
    assert frame_provenance(after.select(FrameType.SCIENCE)[1], "m", settings) == \
        frame_provenance(other, "m", settings)


def test_changed_flat_rebuilds_master_and_redoes_frames(night, capsys):
    code, out = _calibrate(night, capsys)
    assert code == EXIT_OK and "3 calibrated, 0 already done" in out, out
    settings = Settings()
    first = night_provenance(night, settings)
    cams, flats = _folders(night)

    flat = sorted(flats.glob("*_SKYFLAT.fits"))[0]
    _rewrite_pixels(flat)
    assert night_provenance(night, settings) != first
    code, out = _calibrate(night, capsys)
    assert code == EXIT_OK and "3 calibrated, 0 already done" in out, out
    masters = _manifest(night)["masters"]
    assert any("MASTERFLAT" in name for name in masters["built"]), masters
    assert not any("MASTERFLAT" in name for name in masters["reused"]), masters

    science = sorted(cams.glob("*_SCIENCE.fits"))[1]
    _rewrite_pixels(science)
    code, out = _calibrate(night, capsys)
    assert code == EXIT_OK and "1 calibrated, 2 already done" in out, out
    rows = {r["file"]: r["status"] for r in _manifest(night)["frames"]}
    assert rows[science.name] == "done" and list(rows.values()).count("done") == 1, rows
    masters = _manifest(night)["masters"]
    assert not masters["built"], masters


# -- item 4: two inputs, one output; duplicates by content -----------------------------


def test_compressed_twin_gets_its_own_output(night, capsys):
    cams, _ = _folders(night)
    science = sorted(cams.glob("*_SCIENCE.fits"))
    twin = cams / (science[0].name + ".gz")  # another exposure under the same stem
    _write_gz(science[1], twin)
    inv = scan_night(night)
    recs = {f.path.name: f for f in inv.frames}
    assert recs[science[0].name].usable and recs[twin.name].usable
    assert recs[science[0].name].output_stem == science[0].name.removesuffix(".fits")
    assert recs[twin.name].output_stem == science[0].name.removesuffix(".fits") + "_fits_gz"
    assert f"has {science[0].name.removesuffix('.fits')}" in recs[twin.name].note

    code, out = _calibrate(night, capsys)
    assert code == EXIT_OK and "4 calibrated" in out, out
    folder = output_dir(night, None)
    name = science[0].name.removesuffix(".fits") + "_fits_gz_CAL.fits"
    assert (folder / name).exists()
    assert (folder / science[0].name.replace(".fits", "_CAL.fits")).exists()
    _line(out, name)
    # A re-run keeps both: nothing flips.
    code, out = _calibrate(night, capsys)
    assert code == EXIT_OK and "0 calibrated, 4 already done" in out, out


def test_same_name_in_both_folders_gets_a_suffix_then_a_conflict(night):
    cams, flats = _folders(night)
    science = sorted(cams.glob("*_SCIENCE.fits"))
    base = science[0].name.removesuffix(".fits")
    clash = flats / science[0].name  # a science frame, other bytes, in the flats' folder
    clash.write_bytes(science[1].read_bytes()[:-1] + b" ")
    recs = {(f.folder, f.path.name): f for f in scan_night(night).frames}
    assert recs[(FLAT_FOLDER, clash.name)].usable
    assert recs[(FLAT_FOLDER, clash.name)].output_stem == f"{base}_fits"
    # An input whose own stem is that name keeps it; the one that needed a new name is
    # unusable, naming the other.
    third = cams / f"{base}_fits.fits"
    third.write_bytes(science[2].read_bytes()[:-1] + b" ")
    problems = _problems(night)
    assert problems == {clash.name: f"same output name as {cams.name}/{third.name}"}


def test_duplicates_are_decided_by_content(night, capsys):
    cams, _ = _folders(night)
    science = sorted(cams.glob("*_SCIENCE.fits"))
    # Same DATE-OBS and size, other pixels: another exposure, kept.
    other = cams / "AAA_other_SCIENCE.fits"
    other.write_bytes(science[0].read_bytes())
    _rewrite_pixels(other)
    # Identical bytes: a copy, whichever name sorts first.
    copy = cams / "AAA_copy_SCIENCE.fits"
    copy.write_bytes(science[1].read_bytes())
    problems = _problems(night)
    assert other.name not in problems
    assert problems == {science[1].name: f"duplicate of {copy.name}"}
    code, out = _inspect(night, capsys)
    assert code == EXIT_PARTIAL
    assert f"duplicate of {copy.name}" in _line(out, str(science[1]))


# -- item 7: header values validated at inventory time ---------------------------------


@pytest.mark.parametrize(
    ("name", "cards", "reason"),
    [
        ("gain0_SCIENCE.fits", {"GAIN": 0.0}, "bad GAIN 0.0 (must be a number > 0)"),
        ("gainneg_SCIENCE.fits", {"GAIN": -1.5}, "bad GAIN -1.5 (must be a number > 0)"),
        ("gaintext_SCIENCE.fits", {"GAIN": "high"},
         "bad GAIN 'high' (must be a number > 0)"),
        ("ron_SCIENCE.fits", {"RDNOISE": -2.0}, "bad RDNOISE -2.0 (must be a number ≥ 0)"),
        ("sat_SCIENCE.fits", {"SATURATE": 0.0}, "bad SATURATE 0.0 (must be a number > 0)"),
        ("exp0_SCIENCE.fits", {"EXPTIME": 0.0}, "EXPTIME 0 s for a science frame (must be > 0)"),
        ("expbig_SCIENCE.fits", {"EXPTIME": 1e9}, "EXPTIME 1e+09 s is longer than a day"),
        ("exptext_SCIENCE.fits", {"EXPTIME": "long"}, "bad EXPTIME 'long' (not a number)"),
        ("dark0_DARK.fits", {"EXPTIME": 0.0, "ACQTYPE": "DARK", "IMAGETYP": "DARK"},
         "EXPTIME 0 s for a dark frame (must be > 0)"),
    ],
)
def test_bad_header_values_are_unusable(night, capsys, name, cards, reason):
    cams, _ = _folders(night)
    src = sorted(cams.glob("*_SCIENCE.fits"))[0]
    with fits.open(src) as hdul:
        hdu = fits.PrimaryHDU(hdul[0].data + np.uint16(3), header=hdul[0].header)
    for key, value in cards.items():
        hdu.header[key] = value
    path = cams / name
    hdu.writeto(path)
    assert _problems(night) == {name: reason}
    code, out = _inspect(night, capsys)
    assert code == EXIT_PARTIAL
    assert reason in _line(out, str(path))


def test_missing_gain_and_read_noise_are_noted(night, capsys):
    cams, _ = _folders(night)
    path = sorted(cams.glob("*_SCIENCE.fits"))[0]
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header["GAIN"]
        del hdul[0].header["RDNOISE"]
    rec = next(f for f in scan_night(night).frames if f.path == path)
    assert rec.usable and rec.gain is None and rec.read_noise is None
    assert "no GAIN in header: the settings' gain is used" in rec.note
    assert "no RDNOISE in header: the settings' read noise is used" in rec.note
    code, out = _inspect(night, capsys)
    assert code == EXIT_OK
    assert "1 file: " in _line(out, "note:", "no GAIN in header", path.name)


def test_bias_may_have_zero_exposure(tmp_path):
    night = simulate_night(tmp_path, SimConfig(**{**TINY.__dict__, "n_bias": 2}))
    inv = scan_night(night)
    assert len(inv.select(FrameType.BIAS)) == 2
    assert not inv.problems


# -- item 9: entries that are no regular files -----------------------------------------


def test_entries_that_are_not_files_are_listed_never_opened(night, capsys):
    cams, _ = _folders(night)
    fifo = cams / "pipe_SCIENCE.fits"
    os.mkfifo(fifo)  # opening it would block: the inventory must not
    (cams / "folder_SCIENCE.fits").mkdir()
    (cams / "dangling_SCIENCE.fits").symlink_to(cams / "nowhere.fits")
    (cams / "loop_SCIENCE.fits").symlink_to(cams / "loop_SCIENCE.fits")
    good_link = cams / "link_SCIENCE.fits.fz"  # a link to a real file is a file
    _write_fz(sorted(cams.glob("*_SCIENCE.fits"))[0], tmp := cams.parent / "elsewhere.fits.fz")
    good_link.symlink_to(tmp)

    problems = _problems(night)
    assert problems == {
        "pipe_SCIENCE.fits": "not a regular file (a FIFO)",
        "folder_SCIENCE.fits": "not a regular file (a folder)",
        "dangling_SCIENCE.fits": f"dangling symbolic link (to {cams / 'nowhere.fits'})",
        "loop_SCIENCE.fits": "symbolic link loop",
    }
    code, out = _inspect(night, capsys)
    assert code == EXIT_PARTIAL
    assert "a FIFO" in _line(out, str(fifo))
    assert "symbolic link loop" in _line(out, "loop_SCIENCE.fits")
    assert "4 unusable" in out or "unusable files (4)" in out

    code, out = _calibrate(night, capsys)
    assert code == EXIT_PARTIAL, out
    assert "4 calibrated" in out and "4 unusable files" in out, out
    assert "a FIFO" in _line(out, "unusable:", str(fifo))
    assert len(_manifest(night)["unusable"]) == 4
