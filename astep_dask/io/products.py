"""Every file and folder name of our products, and the output folder of a night.

A night's products live in one output folder (:func:`output_dir`): beside the raw night
in ``ROOT/DATE/DATE-CAMS_CAL/`` by default, or ``OUT/DATE/``. This module names what is
in it (masters, calibrated frames, manifest, lock, the KBMOD and report sub-folders),
checks that it can be written, locks it against a second run, and reads the manifest
and the list of masters back for the products built on a calibrated night.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from astropy.io import fits

from astep_dask.errors import RunError

__all__ = [
    "LOCK",
    "MANIFEST",
    "QA_JSON",
    "REPORT_FOLDER",
    "REPORT_INDEX",
    "SHARED_MASTERS_FOLDER",
    "check_writable",
    "dead_holder",
    "holder_record",
    "inside",
    "master_files",
    "master_name",
    "night_lock",
    "output_dir",
    "read_manifest",
    "safe_part",
    "set_aside_corrupt_manifest",
    "sibling_outputs",
]


_SAFE = re.compile(r"[A-Za-z0-9._+-]")


def safe_part(text: str) -> str:
    """A header value (``FILTER``, ``OBJECT``) made fit to be part of a file name.

    A header must never steer where a file is written (``FILTER = '../../x'``). Every
    character outside ``[A-Za-z0-9._+-]`` becomes ``_`` and a leading dot ``_`` (no
    hidden file, no ``..``); when anything was changed, a short hash of the original
    value is appended, so that two values that differ only in such characters still give
    two names. ``RC`` stays ``RC``."""
    text = str(text)
    safe = "".join(c if _SAFE.fullmatch(c) else "_" for c in text)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != text or not safe:
        safe = f"{safe[:40]}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"
    return safe


def inside(folder: Path, name: str) -> Path:
    """``folder / name``, checked to land inside ``folder``: ``name`` is one plain file
    name (no separator, not ``.`` or ``..``) and the path is not a symbolic link.

    Raises
    ------
    RunError
        When it would not land there (the message names the path).
    """
    path = Path(folder) / name
    if (not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name)
            or path.is_symlink()):
        raise RunError(f"{path}: refused: a product must be a plain file inside {folder}")
    return path


def master_name(night: str, role: str, exptime: float | None = None, filter: str = "",
                science_exptime: float | None = None, flat_exptime: float | None = None) -> str:
    """File name of a master, as DESIGN.md names them."""
    if role == "bias":
        return f"{night}_MASTERBIAS.fits"
    if role == "dark":
        if science_exptime is not None and np.isclose(exptime, science_exptime):
            return f"{night}_MASTERDARK.fits"
        if flat_exptime is not None and np.isclose(exptime, flat_exptime):
            return f"{night}_MASTERDARK_FLAT.fits"
        return f"{night}_MASTERDARK_{exptime:g}S.fits"
    if role == "flat":
        return (f"{night}_MASTERFLAT_{safe_part(filter)}.fits" if filter
                else f"{night}_MASTERFLAT.fits")
    if role == "mask":
        return f"{night}_MASK.fits"
    if role == "illum":
        return f"{night}_ILLUM_{safe_part(filter)}.fits" if filter else f"{night}_ILLUM.fits"
    raise ValueError(role)


OUTPUT_FOLDER = "CAMS_CAL"
REPORT_FOLDER = "report"
QA_JSON = "qa.json"
REPORT_INDEX = "index.html"
MANIFEST = "manifest.json"
LOCK = ".astep-dask.lock"
# A run's scratch folder in a night's output: the planes each frame needs, shared by the
# worker processes (masters.shared); removed when the run ends.
SHARED_MASTERS_FOLDER = ".frame-masters"


def output_dir(night_dir: Path, out: Path | None) -> Path:
    """Where a night's products go: ``OUT/DATE/`` or, by default, ``ROOT/DATE/DATE-CAMS_CAL/``."""
    night = night_dir.name
    return (out / night) if out is not None else night_dir / f"{night}-{OUTPUT_FOLDER}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, or raise RunError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"{folder}: output location not writable ({exc.strerror})") from exc


@contextmanager
def night_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder; a second run on it fails at once.

    The lock file appears with its holder (``host pid``) already in it: written to a
    private file first and hard-linked to the lock's name, which fails when a lock is
    there (``O_EXCL`` with the holder written at once where links are not supported).
    A lock is taken over only when its holder is a dead process of this host (see
    :func:`_break_lock`); an empty, unreadable or foreign one is left for its owner (or a
    person) to remove.
    """
    path = folder / LOCK
    mine = holder_record()
    for _ in range(3):
        if _create_lock(path, mine):
            break
        holder = _read_lock(path)
        if holder is None:  # released meanwhile
            continue
        if dead_holder(holder):
            _break_lock(path, holder)
            continue
        shown = holder.strip() or "empty lock file, its holder unknown"
        raise RunError(
            f"{folder}: another astep-dask run holds the lock ({path}: {shown}); "
            "wait for it or remove the lock if it is dead"
        )
    else:  # pragma: no cover - lost a race three times
        raise RunError(f"{folder}: could not take the lock {path}")
    try:
        yield
    finally:
        if _read_lock(path) == mine:
            path.unlink(missing_ok=True)


def _create_lock(path: Path, text: str) -> bool:
    """Create the lock file holding ``text``, atomically; False when one exists."""
    private = path.with_name(
        f"{path.name}.{os.getpid()}.{threading.get_ident()}.{time.time_ns()}")
    try:
        private.write_text(text)
        try:
            os.link(private, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network file systems)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            return True
    finally:
        private.unlink(missing_ok=True)


def _read_lock(path: Path) -> str | None:
    """The lock file's text, or None when there is none."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        return ""


def _break_lock(path: Path, holder: str) -> None:
    """Remove a stale lock, but only the one judged stale: under an exclusive ``flock`` of
    ``LOCK.break`` (released by the kernel if this process dies, kept in the folder), the
    lock is read again and removed only when it still names the same dead holder, so that
    two runs breaking it at once cannot remove a lock that a third has just taken."""
    guard = os.open(path.with_name(f"{path.name}.break"), os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _read_lock(path) == holder:
            path.unlink(missing_ok=True)
    finally:
        os.close(guard)  # releases the flock


def holder_record() -> str:
    """This process as the holder of a lock or a run's scratch folder: ``host pid``, one
    line (:func:`dead_holder` reads it)."""
    return f"{socket.gethostname()} {os.getpid()}\n"


def dead_holder(holder: str) -> bool:
    """True when a holder record (``host pid``, :func:`holder_record`) names a dead
    process on this host; False when it is alive, of another host, or unreadable."""
    try:
        host, pid = holder.split()
        pid_n = int(pid)
    except ValueError:
        return False  # empty or unreadable: its holder may be alive
    if host != socket.gethostname() or pid_n <= 0:
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def sibling_outputs(night_dir: Path, out: Path | None) -> list[Path]:
    """Output folders of the other nights of the same season (for master fallbacks)."""
    root = night_dir.parent
    folders = []
    for other in sorted(root.iterdir()):
        if other == night_dir or not other.is_dir():
            continue
        folder = output_dir(other, out)
        if folder.is_dir():
            folders.append(folder)
    return folders


def set_aside_corrupt_manifest(out_dir: Path) -> str | None:
    """Move an unreadable ``manifest.json`` (truncated, not JSON, not an object) aside as
    ``manifest.json.corrupt`` (``.corrupt.1``, … when one is there already), so that the
    run that rebuilds it from the products does not replace it silently; returns the note
    that says so, or None when the manifest is missing or reads."""
    path = out_dir / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{path}: unreadable ({exc.strerror or exc}); its figures are lost"
    try:
        if isinstance(json.loads(data), dict):
            return None
        why = "not a JSON object"
    except ValueError as exc:  # UnicodeDecodeError included
        why = f"not valid JSON ({str(exc).splitlines()[0]})"
    aside = path.with_name(path.name + ".corrupt")
    n = 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt.{n}")
    os.replace(path, aside)
    return (f"{path.name} was {why}: kept as {aside.name}; this run rebuilds it from the "
            "products")


def read_manifest(out_dir: Path) -> dict:
    """The night's ``manifest.json`` (an empty dict when missing or unreadable)."""
    try:
        return json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _local(path: str | None, out_dir: Path) -> Path | None:
    """A product path from a manifest: the file of that name in ``out_dir`` when there
    (manifests may hold paths relative to another working directory), else as given."""
    if not path:
        return None
    here = out_dir / Path(path).name
    return here if here.exists() else Path(path)


def master_files(out_dir: Path, manifest: dict | None = None) -> dict[str, Path]:
    """Master files of a night's output by label (``dark 90s``, ``flat RC``, ``mask``...),
    from the manifest, or from the file names when there is none."""
    paths = (manifest or {}).get("masters", {}).get("paths") or {}
    out: dict[str, Path] = {}
    if paths:
        if (p := _local(paths.get("bias"), out_dir)) is not None:
            out["bias"] = p
        for et, p in sorted((paths.get("darks") or {}).items(), key=lambda kv: float(kv[0])):
            out[f"dark {et}s"] = _local(p, out_dir)
        for f, p in sorted((paths.get("flats") or {}).items()):
            out[f"flat {f}"] = _local(p, out_dir)
        if (p := _local(paths.get("mask"), out_dir)) is not None:
            out["mask"] = p
        for f, p in sorted((paths.get("illums") or {}).items()):
            out[f"illum {f}"] = _local(p, out_dir)
        return {k: v for k, v in out.items() if v is not None and v.exists()}
    for p in (sorted(out_dir.glob("*_MASTER*.fits")) + sorted(out_dir.glob("*_MASK.fits"))
              + sorted(out_dir.glob("*_ILLUM*.fits"))):
        role = str(fits.getval(p, "MASTTYPE", default="")).lower()
        if role == "dark":
            out[f"dark {fits.getval(p, 'EXPTIME', default=0):g}s"] = p
        elif role in ("flat", "illum"):
            out[f"{role} {fits.getval(p, 'FILTER', default='')}".strip()] = p
        elif role in ("bias", "mask"):
            out[role] = p
    return out


# --------------------------------------------------------------------------- KBMOD export
# The calibrated frames the export reads, and the names in its folder (``[kbmod] folder``
# of the settings, KBMOD_FOLDER by default, in the night's output folder).

CAL_SUFFIX = "_CAL.fits"  # a calibrated frame: <raw stem>_CAL.fits
KBMOD_FOLDER = "kbmod"  # the export's folder by default
KBMOD_SUFFIX = "_KBMOD.fits"  # a KBMOD file: <stem>_KBMOD.fits
KBMOD_MANIFEST = "kbmod.json"  # the export's summary (not the night's MANIFEST)
KBMOD_REGISTERED_FOLDER = "registered"  # registered frames, when KBMOD files are differences
KBMOD_REG_SUFFIX = "_REG.fits"  # a registered frame: <stem>_REG.fits
KBMOD_TEMPLATE_SUFFIX = "_TEMPLATE.fits"  # the static-sky template: DATE_TEMPLATE.fits
KBMOD_WORKUNIT_SUFFIX = "_WORKUNIT.fits"  # the night as one KBMOD WorkUnit: DATE_WORKUNIT.fits
KBMOD_NEIGHBOUR_FOLDER = "template_frames"  # other nights' frames on this night's grid


__all__ += [
    "CAL_SUFFIX",
    "KBMOD_FOLDER",
    "KBMOD_MANIFEST",
    "KBMOD_NEIGHBOUR_FOLDER",
    "KBMOD_REGISTERED_FOLDER",
    "KBMOD_REG_SUFFIX",
    "KBMOD_SUFFIX",
    "KBMOD_TEMPLATE_SUFFIX",
    "KBMOD_WORKUNIT_SUFFIX",
]
