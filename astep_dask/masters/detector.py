"""The night's own gain and read noise, measured when its headers do not give them.

Many cameras write no ``GAIN`` or ``RDNOISE``. The night holds what measures them
(:mod:`astep_dask.core.photon transfer <astep_dask.core.ptc>`): the read noise from pairs
of bias frames (else of the shortest darks), the gain from pairs of flats of one exposure
time at every level the night has, their bias and dark removed with the mean of the darks
of that exposure (else of the bias frames). Only the central region of the few frames
needed is read, as one small dask graph on the run's cluster (a frame's region read once,
whatever pairs use it).

Levels: a frame with an overscan (``BIASSEC``) has its own overscan level (a clipped
mean) subtracted from its region when ``[detector] overscan = "auto"``, flats, bias and
darks alike, so that the level image removed from the flats (the mean of the darks or
bias frames, their overscan removed the same way) holds only what the overscan does not
see (the bias structure, the dark current): a flat's signal is its counts above its
own read-out zero, whatever the zero did between frames. Without the overscan the level
image removes the mean bias, which is the same when the zero is stable.

Each flat pair records the correlation of its difference between neighbouring pixels; a
large one is a note (:func:`shared_charge_note`): the gain from single pixels then
depends on the signal level.

Which value a frame uses: its header, else the ``[detector]`` setting, else this
measurement (:func:`~astep_dask.io.layout.detector_values`); each frame's product says
which (``GAINSRC = 'flat pairs, 4 pairs'``), and so does the manifest (``detector``). A
measurement more than 10 % from a header's value is a note. A night where nothing gives a
frame its gain or read noise is refused with one line naming the setting to give.

The measurement is a function of the frames it reads (their identities are in its key,
and in the masters' provenance): a re-run whose manifest holds the same key reads none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import dask
import numpy as np

from astep_dask.config import Settings
from astep_dask.core.calibrate import overscan_level
from astep_dask.core.ptc import (
    PairStat,
    central_region,
    gain_from_pairs,
    pair_stat,
    read_variance,
)
from astep_dask.errors import CalibrationError
from astep_dask.io.headers import GAIN_RANGE, FrameType
from astep_dask.io.layout import NO_GAIN, NO_READ_NOISE, FrameRecord, Inventory
from astep_dask.io.provenance import digest_of, input_identity
from astep_dask.io.stack import frame_section, read_section

__all__ = [
    "DetectorMeasurement",
    "apply_measurement",
    "detector_plan",
    "measure_detector",
    "missing_values",
    "night_detector",
    "shared_charge_note",
]

METHOD_VERSION = 2  # of the measurement: a change here measures every night again
# 2: each pair records its neighbours' correlation (rho_x, rho_y), noted when large
MAX_NOISE_PAIRS = 4  # bias (or dark) pairs for the read noise
MAX_FLAT_PAIRS = 8  # flat pairs for the gain, spread over the night's levels
LEVEL_FRAMES = 4  # darks (or bias frames) averaged into the level removed from flats
MAX_RATIO = 1.5  # a flat pair's levels differ by at most this factor
MAX_SATURATION = 0.7  # a flat pair's raw level at most this fraction of SATURATE
DIFFERS = 0.10  # a measurement this far from a header's value is a note
SHARED = 0.02  # flat pairs whose 2 (rho_x + rho_y) is larger than this are a note


@dataclass(frozen=True)
class DetectorMeasurement:
    """What the night's frames measured (None where they could not) and how.

    ``gain`` in e-/ADU, ``read_noise_adu`` in ADU (in electrons it depends on the gain
    each frame uses); ``pairs`` the figures of every pair read; ``key`` the identity of
    the inputs and method (a re-run with the same key reuses the measurement)."""

    key: str
    gain: float | None = None
    gain_method: str = ""
    read_noise_adu: float | None = None
    read_noise_method: str = ""
    pairs: tuple[dict, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready dict (the manifest's ``detector``; a figure that is not a finite
        number is None)."""
        d = asdict(self)
        d["pairs"] = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in row.items()} for row in self.pairs]
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectorMeasurement:
        """The measurement :meth:`to_dict` wrote."""
        values = {k: d[k] for k in d if k in cls.__dataclass_fields__}
        values["pairs"] = tuple(values.get("pairs") or ())
        values["notes"] = tuple(values.get("notes") or ())
        return cls(**values)


@dataclass(frozen=True)
class _Inputs:
    """The frames a measurement reads."""

    noise_pairs: tuple[tuple[FrameRecord, FrameRecord], ...]
    noise_kind: str  # "bias" or "dark (10 s)"
    # Per flat group: its pairs and the frames whose mean is its level.
    flat_groups: tuple[tuple[tuple[tuple[FrameRecord, FrameRecord], ...],
                             tuple[FrameRecord, ...]], ...]
    notes: tuple[str, ...]

    def records(self) -> list[FrameRecord]:
        out = {r.path: r for pair in self.noise_pairs for r in pair}
        for pairs, level in self.flat_groups:
            out.update({r.path: r for pair in pairs for r in pair})
            out.update({r.path: r for r in level})
        return list(out.values())


def _pairs(records: Sequence[FrameRecord], most: int) -> list[tuple[FrameRecord, FrameRecord]]:
    """Consecutive pairs (1-2, 3-4, ...) of time-ordered frames, at most ``most``, taken
    evenly over the series (so that a fading twilight gives every level it has)."""
    pairs = [(records[i], records[i + 1]) for i in range(0, len(records) - 1, 2)]
    if len(pairs) <= most:
        return pairs
    keep = np.unique(np.linspace(0, len(pairs) - 1, most).round().astype(int))
    return [pairs[i] for i in keep]


def _choose(inv: Inventory) -> _Inputs:
    """The frames that measure the night's detector (none read here)."""
    notes: list[str] = []
    bias = inv.select(FrameType.BIAS)
    noise_kind = "bias"
    noise_pairs = _pairs(bias, MAX_NOISE_PAIRS)
    if not noise_pairs:
        for et in inv.exptimes(FrameType.DARK):
            darks = inv.select(FrameType.DARK, exptime=et)
            if len(darks) >= 2:
                noise_pairs, noise_kind = _pairs(darks, MAX_NOISE_PAIRS), f"dark ({et:g} s)"
                break
    groups = []
    for filt in inv.filters(FrameType.FLAT):
        for et in sorted({round(f.exptime, 3) for f in inv.select(FrameType.FLAT,
                                                                   filter=filt)}):
            flats = inv.select(FrameType.FLAT, exptime=et, filter=filt)
            pairs = _pairs(flats, MAX_FLAT_PAIRS)
            if not pairs:
                continue
            level = inv.select(FrameType.DARK, exptime=et)[:LEVEL_FRAMES] or bias[:LEVEL_FRAMES]
            if not level:
                notes.append(f"flats {filt} {et:g} s: no dark of that exposure and no bias "
                             "to remove their level: not used to measure the gain")
                continue
            groups.append((tuple(pairs), tuple(level)))
    spread = max(1, MAX_FLAT_PAIRS // max(1, len(groups)))
    groups = [(pairs[:spread] if len(groups) > 1 else pairs, level) for pairs, level in groups]
    return _Inputs(tuple(noise_pairs), noise_kind, tuple(groups), tuple(notes))


def _key(inputs: _Inputs, settings: Settings) -> str:
    """The identity of the inputs and method ("" when a file is gone since the scan: then
    nothing earlier is reused, and the pairs it is in say why they are not used)."""
    try:
        identity = input_identity(inputs.records())
    except OSError:
        return ""
    return digest_of("detector", METHOD_VERSION, identity, settings.detector.overscan)


def _region(rec: FrameRecord, overscan: bool) -> np.ndarray:
    """The central region (:func:`~astep_dask.core.ptc.central_region`) of a frame's data
    section, in ADU, less its overscan level when it has one and ``overscan``."""
    sec = frame_section(rec)
    rows, cols = central_region(sec.shape)
    data = read_section(rec.path, rec.hdu, slice(sec.y0 + rows.start, sec.y0 + rows.stop),
                        slice(sec.x0 + cols.start, sec.x0 + cols.stop))
    if overscan and rec.overscan is not None:
        level = overscan_level(read_section(rec.path, rec.hdu, *rec.overscan.slices))
        data = data - np.float32(level)
    return data


def _read(rec: FrameRecord, overscan: bool) -> np.ndarray | str:
    """:func:`_region`, or why the frame could not be read (it changed since the scan):
    the pairs it is in are then not used, and say why."""
    try:
        return _region(rec, overscan)
    except (OSError, ValueError, TypeError) as exc:
        return f"cannot read {rec.path.name}: {exc}"


def _mean(*frames: np.ndarray | str) -> np.ndarray | str:
    if why := next((f for f in frames if isinstance(f, str)), None):
        return why
    return np.mean(np.stack(frames).astype(np.float64), axis=0)


def _noise_pair(a: np.ndarray | str, b: np.ndarray | str) -> PairStat | str:
    """A bias or dark pair's figures, or why it is not used."""
    if why := next((f for f in (a, b) if isinstance(f, str)), None):
        return why
    try:
        return pair_stat(a, b, scale=False)
    except ValueError as exc:
        return str(exc)


def _flat_pair(a: np.ndarray | str, b: np.ndarray | str, level: np.ndarray | str,
               saturation: float) -> PairStat | str:
    """A flat pair's figures, or why it is not used."""
    if why := next((f for f in (a, b, level) if isinstance(f, str)), None):
        return why
    top = max(float(np.median(a)), float(np.median(b)))
    if top > MAX_SATURATION * saturation:
        return f"level {top:.0f} adu near saturation ({saturation:g})"
    try:
        stat = pair_stat(a, b, level)
    except ValueError as exc:
        return str(exc)
    if not (stat.mean_a > 0 and 1 / MAX_RATIO <= stat.ratio <= MAX_RATIO):
        return f"levels {stat.mean_a:.0f} and {stat.mean_b:.0f} adu too far apart"
    return stat


def shared_charge_note(pairs: Sequence[PairStat]) -> str:
    """A note when the flat pairs' differences correlate between neighbouring pixels
    (:mod:`~astep_dask.core.ptc`: charge shared between pixels after it was collected),
    else "".

    The gain measured is that of single pixels at the flats' level; with a correlation
    ``rho_x``, ``rho_y`` between neighbours it differs from the gain counted with them,
    the conversion gain, by about ``2 (rho_x + rho_y)`` (nearest neighbours), and frames
    at another level, where the sharing differs (transfer inefficiency grows at low
    signal), have single pixels of another variance. Noted when that figure (the pairs'
    means weighted by their pixels) is beyond :data:`SHARED` and beyond four times its
    own noise (each correlation's is ``1 / sqrt(pixels)``).
    """
    good = [p for p in pairs if math.isfinite(p.rho_x) and math.isfinite(p.rho_y)
            and p.n_pixels > 0]
    if not good:
        return ""
    n = np.array([p.n_pixels for p in good], float)
    mx = float(np.dot([p.rho_x for p in good], n) / n.sum())
    my = float(np.dot([p.rho_y for p in good], n) / n.sum())
    share = 2 * (mx + my)
    if abs(share) <= max(SHARED, 4 * 2 * math.sqrt(2 / n.sum())):
        return ""
    return (f"flat pairs: neighbouring pixels of the differences correlate (rho_x {mx:+.3f}, "
            f"rho_y {my:+.3f}): charge shared between pixels; the gain measured, of single "
            f"pixels at the flats' level, is about {100 * share:+.1f} % off the gain counted "
            "with their neighbours")


def measure_detector(inv: Inventory, settings: Settings, previous: dict | None = None
                     ) -> DetectorMeasurement:
    """Measure the night's gain and read noise (module docstring) as one dask graph on
    the active scheduler (the run's cluster), or take ``previous`` (the earlier run's
    manifest ``detector``) when it was made from the same frames by the same method.

    Returns
    -------
    DetectorMeasurement
        ``gain`` None when no flat pair gives one (none, near saturation, no level to
        remove), ``read_noise_adu`` None when no pair of bias or dark frames (nor flats
        at two levels) gives one; ``notes`` say why.
    """
    inputs = _choose(inv)
    key = _key(inputs, settings)
    if key and isinstance(previous, dict) and previous.get("key") == key:
        try:
            return DetectorMeasurement.from_dict(previous)
        except (TypeError, ValueError):
            pass  # a damaged manifest entry: measured again
    overscan = settings.detector.overscan == "auto"
    read = {r.path: dask.delayed(_read, pure=True)(r, overscan) for r in inputs.records()}
    noise = [dask.delayed(_noise_pair)(read[a.path], read[b.path])
             for a, b in inputs.noise_pairs]
    flats, labels = [], []
    for pairs, level in inputs.flat_groups:
        mean = dask.delayed(_mean)(*(read[r.path] for r in level))
        for a, b in pairs:
            sat = a.saturation or settings.detector.saturation_adu
            flats.append(dask.delayed(_flat_pair)(read[a.path], read[b.path], mean, sat))
            labels.append((a, b, len(level)))
    noise_stats, flat_stats = dask.compute(noise, flats) if (noise or flats) else ([], [])
    notes = list(inputs.notes)
    rows: list[dict] = [{"kind": inputs.noise_kind, "files": [a.path.name, b.path.name],
                         **({"unused": s} if isinstance(s, str) else asdict(s))}
                        for (a, b), s in zip(inputs.noise_pairs, noise_stats, strict=True)]
    noise_stats = [s for s in noise_stats if not isinstance(s, str)]
    read_var = read_variance(noise_stats) if noise_stats else float("nan")
    read_method = (f"{inputs.noise_kind} pairs, {len(noise_stats)} pair"
                   f"{'s' if len(noise_stats) != 1 else ''}") if noise_stats else ""
    good, n_levels = [], []
    for (a, b, n_level), s in zip(labels, flat_stats, strict=True):
        row = {"kind": "flat", "files": [a.path.name, b.path.name]}
        if isinstance(s, str):
            rows.append({**row, "unused": s})
            continue
        rows.append({**row, **asdict(s)})
        good.append(s)
        n_levels.append(n_level)
    gain: float | None = None
    gain_method = ""
    if good:
        # The level image is the mean of n frames: its variance is the read variance / n
        # (dark current's own shot noise aside); fitted with the gain when unknown.
        n_level = min(n_levels)
        known = read_var if math.isfinite(read_var) else None
        g, gains, rv = gain_from_pairs(good, known, (known or 0.0) / n_level)
        n_ok = sum(math.isfinite(x) for x in gains)
        for row, gi in zip((r for r in rows if r["kind"] == "flat" and "unused" not in r),
                           gains, strict=True):
            row["gain"] = gi
        if math.isfinite(g) and GAIN_RANGE[0] <= g <= GAIN_RANGE[1]:
            gain = g
            gain_method = f"flat pairs, {n_ok} pair{'s' if n_ok != 1 else ''}"
            if why := shared_charge_note(good):
                notes.append(why)
            if known is None and math.isfinite(rv):
                read_var = rv
                read_method = f"flat pairs (fit), {n_ok} pairs"
        elif math.isfinite(g):
            notes.append(f"gain measured from flat pairs {g:g} e-/ADU is implausible "
                         f"(outside {GAIN_RANGE[0]:g}..{GAIN_RANGE[1]:g}): not used")
    if gain is None and not notes:
        notes.append("no pair of flats of one exposure time to measure the gain")
    if not math.isfinite(read_var):
        notes.append("no pair of bias or dark frames to measure the read noise")
    return DetectorMeasurement(
        key=key, gain=gain, gain_method=gain_method,
        read_noise_adu=math.sqrt(read_var) if math.isfinite(read_var) else None,
        read_noise_method=read_method if math.isfinite(read_var) else "",
        pairs=tuple(rows), notes=tuple(notes))


def detector_plan(inv: Inventory, settings: Settings, previous: dict | None = None) -> dict:
    """What a run will do about the night's gain and read noise, from metadata (nothing
    read): ``action`` ``measure`` (the frames it reads: ``files``), ``reuse`` (the
    earlier manifest's measurement, same frames), ``none`` (nothing to measure from) or
    ``refuse`` (and why: a frame needs a gain or read noise nothing can give), with a
    ``reason``."""
    inputs = _choose(inv)
    files = sorted(r.path.name for r in inputs.records())
    det = settings.detector
    usable = [f for f in inv.frames if f.usable and f.kind is not FrameType.UNKNOWN]
    need_gain = [f for f in usable if f.gain is None] if det.gain is None else []
    need_rn = [f for f in usable if f.read_noise is None] if det.read_noise is None else []
    n_flat = sum(len(pairs) for pairs, _ in inputs.flat_groups)
    n_noise = len(inputs.noise_pairs)
    if need_gain and not n_flat:
        return {"action": "refuse", "reason": NO_GAIN.format(
            name=f"{len(need_gain)} frame(s) (e.g. {need_gain[0].path.name})"), "files": []}
    if need_rn and not (n_noise or n_flat > 1):
        return {"action": "refuse", "reason": NO_READ_NOISE.format(
            name=f"{len(need_rn)} frame(s) (e.g. {need_rn[0].path.name})"), "files": []}
    why = (f"used by {len({f.path for f in need_gain + need_rn})} frame(s) whose headers give "
           "none" if need_gain or need_rn else "to check the values given")
    if not files:
        return {"action": "none", "reason": "no pair of bias, dark or flat frames", "files": []}
    key = _key(inputs, settings)
    if key and isinstance(previous, dict) and previous.get("key") == key:
        return {"action": "reuse", "reason": f"measured from the same frames before ({why})",
                "files": files}
    return {"action": "measure",
            "reason": f"{n_flat} flat pair(s), {n_noise} {inputs.noise_kind} pair(s): the "
                      f"central region of {len(files)} frames ({why})", "files": files}


def apply_measurement(inv: Inventory, m: DetectorMeasurement) -> Inventory:
    """The inventory with the measurement on every frame's record (where
    :func:`~astep_dask.io.layout.detector_values` takes it when header and settings give
    nothing)."""
    frames = [replace(f, gain_measured=m.gain, gain_method=m.gain_method,
                      read_noise_adu_measured=m.read_noise_adu,
                      read_noise_method=m.read_noise_method) for f in inv.frames]
    return replace(inv, frames=frames)


def missing_values(inv: Inventory, settings: Settings) -> str:
    """Why the night cannot be calibrated for lack of a gain or read noise (one line
    naming the setting to give), or "". Every usable frame needs both: the masters'
    noise model and the calibrated frames' electrons."""
    det = settings.detector
    frames = [f for f in inv.frames if f.usable and f.kind is not FrameType.UNKNOWN]
    for attr, setting, measured, text in (
        ("gain", det.gain, "gain_measured", NO_GAIN),
        ("read_noise", det.read_noise, "read_noise_adu_measured", NO_READ_NOISE),
    ):
        lacking = [f for f in frames if getattr(f, attr) is None and setting is None
                   and getattr(f, measured) is None]
        if lacking:
            what = (lacking[0].path.name if len(lacking) == 1
                    else f"{len(lacking)} frames (e.g. {lacking[0].path.name})")
            return text.format(name=what)
    return ""


def _header_notes(inv: Inventory, m: DetectorMeasurement) -> list[str]:
    """A note for each header value more than :data:`DIFFERS` from the measurement."""
    notes = []
    usable = [f for f in inv.frames if f.usable]
    if m.gain is not None:
        for h in sorted({f.gain for f in usable if f.gain is not None}):
            if abs(m.gain - h) > DIFFERS * h:
                notes.append(f"GAIN {h:g} e-/ADU of the headers differs from the {m.gain:.4g} "
                             f"measured ({m.gain_method}) by {100 * (m.gain / h - 1):+.0f} %; "
                             "the header's is used")
    if m.read_noise_adu is not None:
        pairs = {(f.read_noise, f.gain if f.gain is not None else m.gain)
                 for f in usable if f.read_noise is not None
                 and (f.gain is not None or m.gain is not None)}
        for rn, g in sorted(pairs):
            measured = m.read_noise_adu * g
            if abs(measured - rn) > DIFFERS * rn:
                notes.append(f"RDNOISE {rn:g} e- of the headers differs from the "
                             f"{measured:.4g} measured ({m.read_noise_method}) by "
                             f"{100 * (measured / rn - 1):+.0f} %; the header's is used")
    return notes


def night_detector(inv: Inventory, settings: Settings, previous: dict | None = None
                   ) -> tuple[Inventory, dict]:
    """Measure the night's detector (:func:`measure_detector`), put it on the records
    and check that every frame has a gain and a read noise.

    Returns
    -------
    inventory
        The inventory whose records carry the measurement.
    details
        The manifest's ``detector``: the measurement, and the notes (a header value
        that differs from it by more than 10 %).

    Raises
    ------
    CalibrationError
        When a usable frame has no gain or read noise from any source (one line naming
        the setting to give).
    """
    m = measure_detector(inv, settings, previous)
    inv = apply_measurement(inv, m)
    if why := missing_values(inv, settings):
        raise CalibrationError(why)
    details = m.to_dict()
    details["header_notes"] = _header_notes(inv, m)
    return inv, details
