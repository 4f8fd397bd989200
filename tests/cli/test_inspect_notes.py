"""``astep-dask inspect`` gives each distinct note once, with how many files and an
example, not once per file (issue 29, item 3): run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from astep_dask.testing.simulate import SimConfig, simulate_night

CLI = Path(sys.executable).parent / "astep-dask"


def test_one_line_per_distinct_note(tmp_path):
    cfg = SimConfig(size=32, n_science=4, n_darks=2, n_flats=2, omit_keys=("GAIN",))
    night = simulate_night(tmp_path, cfg)
    n_files = sum(1 for _ in night.rglob("*.fits"))
    done = subprocess.run([str(CLI), "inspect", str(night)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stdout.splitlines() if line.strip().startswith("note:")]
    assert len(notes) == len(set(notes)) == 1
    assert "no GAIN in header" in notes[0]
    assert f"({n_files} files, e.g. ASTEP_" in notes[0]
    # No file name is repeated: the note is not printed per file.
    names = Counter(w for line in done.stdout.splitlines() for w in line.split()
                    if w.endswith(".fits"))
    assert all(n == 1 for n in names.values())
