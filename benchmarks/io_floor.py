"""I/O floor of a calibration run: read every raw science frame, write a float32 copy.

No calibration at all, one frame after the other: what any pipeline pays to read the raw
science frames with astropy and write one float32 image per frame. Science frames are the
files of ``NIGHT_DIR/DATE-CAMS/`` whose ``ACQTYPE`` is ``SCIENCE``. The last line of stdout
is a JSON object with the number of frames and bytes read and written::

    python benchmarks/io_floor.py NIGHT_DIR --out OUTDIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits


def science_frames(night_dir: Path) -> list[Path]:
    """Raw science frames of a night, in name order.

    Parameters
    ----------
    night_dir : Path
        The night folder ``ROOT/DATE``.

    Returns
    -------
    list of Path
        Files of ``DATE-CAMS/`` whose primary header has ``ACQTYPE = 'SCIENCE'``.
    """
    folder = night_dir / f"{night_dir.name}-CAMS"
    frames = []
    for path in sorted(folder.glob("*.fits")):
        try:
            kind = str(fits.getheader(path).get("ACQTYPE", "")).strip().upper()
        except (OSError, ValueError):
            continue
        if kind == "SCIENCE":
            frames.append(path)
    return frames


def copy_as_float32(src: Path, dst: Path) -> tuple[int, int]:
    """Read one raw frame and write its data as float32 with the raw header.

    Parameters
    ----------
    src : Path
        Raw FITS frame (data in the primary HDU).
    dst : Path
        Output file, overwritten.

    Returns
    -------
    tuple of int
        Bytes read and bytes written.
    """
    with fits.open(src, memmap=False) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        header = hdul[0].header.copy()
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(data=data, header=header).writeto(dst, overwrite=True)
    return src.stat().st_size, dst.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints a JSON summary on the last line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 if the night has no science frame.
    """
    parser = argparse.ArgumentParser(description="Read raw science frames, write float32.")
    parser.add_argument("night", type=Path, help="night folder ROOT/DATE")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    frames = science_frames(args.night)
    if not frames:
        print(f"io_floor: error: {args.night}: no science frame found", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    read = written = 0
    for path in frames:
        r, w = copy_as_float32(path, args.out / f"{path.stem}_F32.fits")
        read += r
        written += w
    summary = {"frames": len(frames), "bytes_read": read, "bytes_written": written,
               "seconds": time.perf_counter() - t0}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
