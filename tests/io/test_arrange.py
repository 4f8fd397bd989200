"""A camera's own folder of raw frames arranged as an archive night by the installed
``astep-dask arrange``: every frame where the archive layout puts it (by header, not by
name), the night dated by its first science frame, the raw files untouched, an unusable
file named and left out, and a second run harmless."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from astep_dask.io.arrange import evening_of
from astep_dask.io.layout import scan_night
from astep_dask.testing.simulate import SimConfig, simulate_night

SCRIPT = str(Path(sys.executable).with_name("astep-dask"))
SIM = SimConfig(size=64, n_science=3, n_darks=3, n_flats=3, n_bias=2, seed=31)


def _groups(night: Path) -> Counter:
    inv = scan_night(night)
    return Counter((r.folder, str(r.kind), r.exptime) for r in inv.frames if r.usable)


def test_a_camera_folder_becomes_the_archive_night(tmp_path):
    night = simulate_night(tmp_path / "archive", SIM)
    camera = tmp_path / "camera"
    for i, raw in enumerate(sorted(night.rglob("*.fits"))):  # one folder, names mixed
        sub = camera / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy2(raw, sub / raw.name.replace("_SKYFLAT", "").replace("_DARK", ""))
    (camera / "a" / "log.fits").write_text("not a FITS file")
    before = {p: p.read_bytes() for p in camera.rglob("*") if p.is_file()}
    root = tmp_path / "root"
    r = subprocess.run([SCRIPT, "arrange", str(camera), str(root)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 3, r.stderr  # one file left out
    assert "log.fits" in r.stdout and f"calibrate {root / SIM.date}" in r.stdout, r.stdout
    arranged = root / SIM.date
    # every usable frame in the folder the archive puts it, whatever its name said
    assert _groups(arranged) == _groups(night)
    links = [p for p in arranged.rglob("*.fits")]
    assert links and all(p.is_symlink() and p.resolve() in before for p in links)
    assert {p: p.read_bytes() for p in camera.rglob("*") if p.is_file()} == before
    again = subprocess.run([SCRIPT, "arrange", str(camera), str(root)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 3 and sorted(arranged.rglob("*.fits")) == sorted(links)


def test_the_night_is_the_evening_it_began():
    assert evening_of(61206.75) == "2026-06-15"  # 18:00 UTC
    assert evening_of(61207.1) == "2026-06-15"  # 02:24 UTC the next day


def test_a_folder_of_unusable_frames_names_each_reason(tmp_path):
    # a camera writing EXPTIME with a decimal comma (seen on a real Andor night): every
    # frame is unusable, and the error says why, once per reason, with an example
    import numpy as np
    from astropy.io import fits

    camera = tmp_path / "camera"
    camera.mkdir()
    for i in range(3):
        h = fits.Header({"IMAGETYP": "OBJECT", "EXPTIME": "30,00000",
                         "DATE-OBS": f"2019-08-0{i + 1}T02:00:00"})
        fits.PrimaryHDU(np.zeros((8, 8), np.uint16), h).writeto(camera / f"f{i}.fits")
    (camera / "log.fits").write_text("not a FITS file")
    r = subprocess.run([SCRIPT, "arrange", str(camera), str(tmp_path / "root")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    err = r.stderr
    assert "no usable raw frame among 4 FITS files" in err, err
    assert "EXPTIME '30,00000'" in err and "(3 files, e.g. f" in err, err
    assert "log.fits" in err, err
