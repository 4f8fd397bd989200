"""Data checksums of every product of a few simulated nights, to prove a refactor changes none.

Simulates nights (fixed seeds), runs ``astep-dask calibrate --kbmod``, ``search`` and
``report`` on each, and writes one JSON mapping every product file to the SHA-256 of its
data: each FITS HDU's name, dtype, shape and bytes (headers are left out: they hold dates),
and the bytes of CSV files. Compare two runs with ``--compare``::

    python benchmarks/product_checksums.py --out /tmp/before.json
    # or, for an older tree: PYTHONPATH=/path/to/old/tree python benchmarks/product_...
    # ... change the code ...
    python benchmarks/product_checksums.py --out /tmp/after.json --compare /tmp/before.json

The nights: the tests' small night (128², high cosmic-ray rate, broken files), the same
with bias frames and overscan, and a 1024² night (``--big-size``, ``--big-science``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

NIGHTS = {
    "small": ["--size", "128", "--science", "6", "--darks", "5", "--flats", "7", "--seed", "3",
              "--bad-files"],
    "bias_overscan": ["--size", "128", "--science", "6", "--darks", "5", "--flats", "7",
                      "--bias", "5", "--overscan", "8", "--seed", "4"],
}
# Header cards that are compared too (values that define the product, no dates). Not
# ADPROV and KBPROV: they hash the master files, whose DATE card changes with every run.
CARDS = ("ADHASH", "MJD", "FILTVARF", "PSFSIGMA", "DARKMETH", "GAIN", "RDNOISE")


def fits_digest(path: Path) -> dict[str, str]:
    """SHA-256 of each HDU's data (name, dtype, shape, bytes) and of the defining cards."""
    out: dict[str, str] = {}
    with fits.open(path, memmap=False) as hdul:
        for i, hdu in enumerate(hdul):
            h = hashlib.sha256()
            h.update(f"{hdu.name}".encode())
            data = hdu.data
            if data is not None:
                if isinstance(data, np.ndarray) and data.dtype.names is None:
                    a = np.ascontiguousarray(data)
                    h.update(f"{a.dtype.str}{a.shape}".encode())
                    h.update(a.tobytes())
                else:  # a table
                    h.update(repr(data.columns).encode())
                    for name in data.columns.names:
                        h.update(np.ascontiguousarray(data[name]).tobytes())
            cards = {k: hdu.header[k] for k in CARDS if k in hdu.header}
            h.update(json.dumps(cards, sort_keys=True, default=str).encode())
            out[f"{i}:{hdu.name}"] = h.hexdigest()
    return out


def digests(folder: Path) -> dict[str, object]:
    """Digest of every FITS and CSV product under ``folder``, keyed by relative path."""
    result: dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.name.endswith(".fits"):
            result[rel] = fits_digest(path)
        elif path.suffix == ".csv":
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def run(cmd: list[str], cwd: Path) -> None:
    """Run an ``astep-dask`` command in ``cwd`` (not the source tree, so that PYTHONPATH
    can choose the code under test); exit codes 0 and 3 (partial) are accepted."""
    proc = subprocess.run([sys.executable, "-m", "astep_dask.cli", *cmd],
                          capture_output=True, text=True, cwd=cwd)
    if proc.returncode not in (0, 3):
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    """Simulate, process, digest; optionally compare with an earlier digest file."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file of digests to write")
    ap.add_argument("--compare", type=Path, help="earlier JSON file to compare with")
    ap.add_argument("--big-size", type=int, default=1024, help="side of the big night (0: none)")
    ap.add_argument("--big-science", type=int, default=24, help="science frames, big night")
    ap.add_argument("--workdir", type=Path, help="keep the nights here (default: temporary)")
    args = ap.parse_args(argv)
    nights = dict(NIGHTS)
    if args.big_size:
        nights["big"] = ["--size", str(args.big_size), "--science", str(args.big_science),
                         "--seed", "5"]
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.workdir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        table: dict[str, object] = {}
        for name, sim in nights.items():
            root = work / name
            run(["simulate", str(root), "--date", "2026-06-15", *sim], work)
            night = root / "2026-06-15"
            run(["calibrate", str(night), "--kbmod", "--workers", "2"], work)
            run(["search", str(night)], work)
            run(["report", str(night), "--no-cluster"], work)
            table[name] = digests(night / "2026-06-15-CAMS_CAL")
            print(f"{name}: {sum(1 for _ in table[name])} products", flush=True)
    args.out.write_text(json.dumps(table, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        bad = 0
        for night in sorted(set(before) | set(table)):
            b, a = before.get(night, {}), table.get(night, {})
            for key in sorted(set(b) | set(a)):
                if b.get(key) != a.get(key):
                    bad += 1
                    print(f"DIFFERS {night}/{key}")
            print(f"{night}: {len(a)} products, {len(b)} before")
        print(f"{bad} products differ" if bad else "all products identical")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
