"""A camera's own folder of raw frames arranged as an archive night, by header.

Small telescopes write a night into one folder (or a few of their own), not into the
archive layout this package reads (``ROOT/YYYY-MM-DD/YYYY-MM-DD-CAMS/`` and
``…-CAMS_SKYFLAT/``). :func:`arrange_night` makes that layout beside the data with
symbolic links to the raw files (or copies), placing each file by what its header says
(:func:`~astep_dask.io.layout.read_record`, the inventory's own reading): flats, and
darks of a flat's exposure time that no science frame has, go to ``-CAMS_SKYFLAT``;
everything else usable to ``-CAMS``. The night's date is the evening it began: the first
science frame's UTC time minus 12 hours, unless given. The raw files are only read.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from astropy.time import Time

from astep_dask.errors import ArchiveError
from astep_dask.io.headers import FrameType
from astep_dask.io.layout import FLAT_FOLDER, SCIENCE_FOLDER, FrameRecord, read_record
from astep_dask.io.rawfiles import is_fits_name

__all__ = ["Arranged", "arrange_night", "evening_of"]


@dataclass
class Arranged:
    """What :func:`arrange_night` did: the night folder, the files placed in each raw
    folder, and the files left out with the reason."""

    night: Path
    placed: dict[str, list[Path]] = field(default_factory=dict)  # folder name -> sources
    left_out: list[tuple[Path, str]] = field(default_factory=list)


def evening_of(mjd: float) -> str:
    """The date (``YYYY-MM-DD``) of the evening a night began, for a frame taken at
    ``mjd`` (UTC): the calendar date 12 hours earlier, so that a night's frames after
    midnight belong to the evening before."""
    return str(Time(mjd - 0.5, format="mjd", scale="utc").isot[:10])


def _sources(source: Path) -> list[Path]:
    """The raw FITS files under ``source`` (recursively): not symbolic links, nor files in
    an archive night's folders (``…-CAMS``, ``…-CAMS_SKYFLAT``, products), which an
    earlier arrangement into this folder made."""
    ours = (f"-{SCIENCE_FOLDER}", f"-{FLAT_FOLDER}", "_CAL")
    return sorted(p for p in source.rglob("*")
                  if is_fits_name(p.name) and not p.is_symlink() and p.is_file()
                  and not any(q.name.endswith(ours) for q in p.relative_to(source).parents
                              if q.name))


def arrange_night(source: str | Path, root: str | Path, date: str | None = None,
                  copy: bool = False) -> Arranged:
    """Arrange the raw frames under ``source`` as the night ``root/DATE/``.

    Parameters
    ----------
    source
        A folder of raw FITS frames, searched recursively.
    root
        The archive root that receives the night (it may be ``source`` itself).
    date
        The night's name ``YYYY-MM-DD``; None: the evening of the first science frame.
    copy
        Copy the files rather than link to them.

    Returns
    -------
    Arranged
        The night folder, what was placed where, and what was left out and why.

    Raises
    ------
    ArchiveError
        When ``source`` holds no usable frame, no science frame to date the night by (and
        ``date`` is None), or a file of the same name and other content is already where
        a frame would go.
    """
    source, root = Path(source).absolute(), Path(root).absolute()
    if not source.is_dir():
        raise ArchiveError(f"{source}: no such folder")
    records: list[FrameRecord] = []
    out = Arranged(night=root)  # the night folder is set once the date is known
    for path in _sources(source):
        rec = read_record(path)
        if rec.problem:
            out.left_out.append((path, rec.problem))
        else:
            records.append(rec)
    if not records:
        raise ArchiveError(f"{source}: no usable raw frame among {len(out.left_out)} FITS "
                           f"files{_reasons(out.left_out)}")
    science = [r for r in records if r.kind == FrameType.SCIENCE and math.isfinite(r.mjd)]
    if date is None:
        if not science:
            raise ArchiveError(f"{source}: no science frame with a time to date the night "
                               "by; give its date (--date YYYY-MM-DD)")
        date = evening_of(min(r.mjd for r in science))
    night = root / date
    out.night = night
    flat_times = {round(r.exptime, 3) for r in records if r.kind == FrameType.FLAT}
    sci_times = {round(r.exptime, 3) for r in records if r.kind == FrameType.SCIENCE}
    taken: dict[Path, Path] = {}
    for rec in records:
        et = round(rec.exptime, 3)
        to_flats = rec.kind == FrameType.FLAT or (
            rec.kind == FrameType.DARK and et in flat_times and et not in sci_times)
        folder = f"{date}-{FLAT_FOLDER if to_flats else SCIENCE_FOLDER}"
        dest = night / folder / rec.path.name
        if dest in taken:  # the same name in two of the camera's folders: keep both
            dest = dest.with_name(f"{rec.path.parent.name}_{rec.path.name}")
        _place(rec.path, dest, copy)
        taken[dest] = rec.path
        out.placed.setdefault(folder, []).append(rec.path)
    return out


def _reasons(left_out: list[tuple[Path, str]], most: int = 5) -> str:
    """Why files were left out, each reason once with how many files and an example (the
    most frequent first, at most ``most`` of them), as one text to append to a message."""
    seen: dict[str, list] = {}
    for path, why in left_out:
        seen.setdefault(why, [0, path.name])[0] += 1
    lines = [f"{why} ({n} files, e.g. {ex})" if n > 1 else f"{why} ({ex})"
             for why, (n, ex) in sorted(seen.items(), key=lambda kv: -kv[1][0])[:most]]
    more = f"; and {len(seen) - most} other reasons" if len(seen) > most else ""
    return (": " + "; ".join(lines) + more) if lines else ""


def _place(src: Path, dest: Path, copy: bool) -> None:
    """Link (or copy) ``src`` to ``dest``; one already there and the same is kept."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink() or dest.exists():
        if dest.resolve() == src.resolve() or (
                copy and dest.stat().st_size == src.stat().st_size
                and dest.read_bytes() == src.read_bytes()):
            return
        raise ArchiveError(f"{dest}: already there and not {src}; arrange into another root")
    if copy:
        tmp = dest.with_name(f".tmp-{dest.name}.{os.getpid()}")
        shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    else:
        dest.symlink_to(src)
