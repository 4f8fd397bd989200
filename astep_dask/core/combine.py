"""Robust combination of a stack of frames along ``frame``.

The core, :func:`clip_combine`, is a pure numpy function on a ``(frame, y, x)`` block. The
dask wrapper :func:`combine` maps it over a stack opened in row strips (every chunk holds
all frames), so memory is bounded by the strip, not by the number of frames.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from astep_dask.core.stats import MAD_TO_SIGMA, median

__all__ = [
    "Combined",
    "NoiseModel",
    "clip_combine",
    "masked_median",
    "sort_frames",
    "sorting_network",
]


@dataclass(frozen=True)
class Combined:
    """A combined image, its per-pixel variance (of the combined value) and frame counts."""

    data: np.ndarray
    var: np.ndarray
    count: np.ndarray

    @property
    def noise(self) -> float:
        """Typical standard error of a pixel of the combined image (median of sqrt(var))."""
        return median(np.sqrt(self.var), skip_nan=True)


@dataclass(frozen=True)
class NoiseModel:
    """Expected noise of each frame of a stack, for clipping with a known noise.

    Frames were divided by ``levels`` (ADU; 1 for unscaled stacks) after any subtraction;
    a value ``c`` of the scaled stack is ``c · level`` ADU above ``pedestal``, with Poisson
    and read noise. ``pedestal=None`` takes the median of the block's centre values as the
    zero of the Poisson term: right for darks that still carry the bias.
    """

    gain: float  # e-/ADU
    read_noise: float  # e-
    levels: tuple[float, ...] = ()
    pedestal: float | None = 0.0

    def zero(self, centre: np.ndarray) -> float:
        """Zero of the Poisson term: the pedestal, or the median of the centres (not NaN)."""
        if self.pedestal is not None:
            return float(self.pedestal)
        present = centre[~np.isnan(centre)]
        return float(np.median(present)) if present.size else float("nan")

    def frame_variance(self, centre: np.ndarray, zero: float, n_frames: int,
                       out: np.ndarray | None = None) -> np.ndarray:
        """Variance of each frame's value at ``centre`` (shape ``(frame, ...)``), float32.

        Without ``levels`` every frame has the same variance, and the first axis has length
        1 (it broadcasts against the stack): ``n_frames`` times less memory and arithmetic.
        ``out``, of that shape, receives the result (no temporary the size of ``centre``).
        """
        rows = len(self.levels) if self.levels else 1
        if self.levels and rows != n_frames:
            raise ValueError(f"{len(self.levels)} levels for {n_frames} frames")
        if out is None:
            out = np.empty((rows, *np.shape(centre)), np.float32)
        read_var = np.float32((self.read_noise / self.gain) ** 2)
        signal = out[0]
        np.subtract(centre, np.float32(zero), out=signal)
        np.maximum(signal, np.float32(0), out=signal)
        np.divide(signal, np.float32(self.gain), out=signal)
        if not self.levels:
            np.add(signal, read_var, out=signal)
            return out
        lv = np.asarray(self.levels, np.float32).reshape((-1,) + (1,) * (out.ndim - 1))
        # (signal · lv / gain + read²) / lv², written so as to need one (frame, ...) array;
        # numpy buffers ``signal`` (a row of ``out``) before overwriting it
        np.divide(signal[None], lv, out=out)
        np.add(out, read_var / (lv * lv), out=out)
        return out

    def variance(self, centre: np.ndarray, n_frames: int) -> np.ndarray:
        """Per-frame variance at the given centre values, shape ``(frame, ...)``."""
        var = self.frame_variance(centre, self.zero(centre), n_frames)
        return np.broadcast_to(var, (n_frames, *centre.shape))


def clip_combine(
    cube: np.ndarray,
    method: str = "sigclip",
    sigma_low: float = 3.0,
    sigma_high: float = 3.0,
    iterations: int = 3,
    noise: NoiseModel | None = None,
) -> np.ndarray:
    """Combine a ``(frame, ...)`` block robustly along axis 0.

    ``sigclip``: iterative sigma clipping around the median, then the mean of what is
    kept. The scale is 1.4826 × MAD of the values still kept or, when a ``noise`` model is
    given, each frame's expected noise at the median level (IRAF's "ccdclip"): far more
    reliable with the handful of frames a master often has, where the MAD of five values
    is itself too noisy to clip with. ``median``: the plain median. NaN counts as missing.

    Returns
    -------
    numpy.ndarray
        Shape ``(3, ...)``, float32: combined value, variance of that value, and the number
        of frames kept. The variance is the noise model's (Σσ²/n² over kept frames) when
        there is one, else the sample variance of the kept values over n (× π/2 for the
        median).
    """
    with warnings.catch_warnings():  # pixels with no frame left are NaN, by design
        warnings.simplefilter("ignore", RuntimeWarning)
        return _clip_combine(cube, method, sigma_low, sigma_high, iterations, noise)


# Largest stack sorted by a comparator network; longer ones use numpy's sort on a transposed
# copy (measured: the network is ~3x faster than np.sort along axis 0 up to 64 frames).
NETWORK_MAX = 64


# Elements of a frame stack handled at once by the network: small enough that the block of
# every frame stays in a core's cache (about 1 MB).
NETWORK_BLOCK_BYTES = 1 << 20


# Bytes of a frame stack that one step of the sigma clipping works on: its working copies
# stay in cache, and numpy's per-call overhead is spread over enough values (measured
# fastest from 256 KB to 1 MB, with and without dask workers' malloc settings).
CLIP_BLOCK_BYTES = 1 << 20


@functools.lru_cache(maxsize=64)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparator pairs ``(i, j)``, ``i < j``, of Batcher's odd-even merge sort of ``n`` items.

    Built for the next power of two and cut to ``n``: comparators that touch a position
    ``>= n`` would only ever meet +inf padding there, so dropping them keeps the network
    exact. Applying ``(min, max)`` to every pair in order sorts any input.
    """
    pairs = []
    size = 1 << max(0, (n - 1).bit_length())
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        pairs.append((a, b))
            k //= 2
        p *= 2
    return tuple(pairs)


@functools.lru_cache(maxsize=256)
def _pruned_network(n: int, wanted: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The comparators of :func:`sorting_network` that the ``wanted`` sorted positions
    depend on (a median needs about 10 % fewer than a full sort)."""
    need = set(wanted)
    kept = []
    for a, b in reversed(sorting_network(n)):
        if a in need or b in need:
            need.update((a, b))
            kept.append((a, b))
    return tuple(reversed(kept))


def sort_frames(data: np.ndarray, positions: Sequence[int] | None = None) -> list[np.ndarray]:
    """Sort a ``(frame, pixel)`` array along ``frame``; return the sorted rows.

    NaN must have been replaced (by +inf, say): the comparators propagate it. Short stacks
    go through a sorting network applied with ``np.minimum``/``np.maximum`` on whole rows,
    a block of pixels at a time: several times faster than ``np.sort`` along a short
    strided axis. Only the rows at ``positions`` (default: all) are exact and returned
    non-empty; the others are left out (empty) when the network can skip them.
    """
    n, npix = data.shape
    wanted = tuple(range(n)) if positions is None else tuple(sorted(set(positions)))
    if n > NETWORK_MAX:
        s = np.sort(np.ascontiguousarray(data.T), axis=1)
        return [np.ascontiguousarray(s[:, i]) if i in wanted else s[:0, 0] for i in range(n)]
    pairs = _pruned_network(n, wanted)
    out = [np.empty(npix, data.dtype) if i in wanted else data[:0, 0] for i in range(n)]
    block = max(1024, NETWORK_BLOCK_BYTES // (n * data.itemsize))
    spare = np.empty(min(block, npix), data.dtype)
    for p0 in range(0, npix, block):
        p1 = min(p0 + block, npix)
        rows = [data[i, p0:p1].copy() for i in range(n)]
        tmp = spare[: p1 - p0]
        for a, b in pairs:
            np.minimum(rows[a], rows[b], out=tmp)
            np.maximum(rows[a], rows[b], out=rows[b])
            rows[a], tmp = tmp, rows[a]
        for i in wanted:
            out[i][p0:p1] = rows[i]
    return out


def masked_median(data: np.ndarray, axis: int = 0) -> np.ndarray:
    """Median along ``axis`` ignoring NaN (like ``np.nanmedian``), NaN where all are NaN.

    Along a short axis numpy's nanmedian (and even median) walks the other axes pixel by
    pixel; this sorts all pixels at once with :func:`sort_frames`. Without NaN only the
    two middle rows are needed; with NaN, each pixel's middle is picked from the sorted
    rows by its count of values.
    """
    moved = np.moveaxis(np.asarray(data), axis, 0)
    n, shape = moved.shape[0], moved.shape[1:]
    flat = moved.reshape(n, -1)
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    if n == 0:
        return np.full(shape, np.nan, flat.dtype)
    missing = np.isnan(flat)
    if n > NETWORK_MAX:  # long axis: numpy's sort along contiguous rows, NaN last
        s = np.sort(np.ascontiguousarray(flat.T), axis=1)
        k = (n - missing.sum(axis=0))[:, None]
        lo = np.take_along_axis(s, np.maximum((k - 1) // 2, 0), axis=1)[:, 0]
        hi = np.take_along_axis(s, np.maximum(k // 2, 0), axis=1)[:, 0]
        with np.errstate(invalid="ignore"):
            med = np.where(k[:, 0] > 0, (lo + hi) * flat.dtype.type(0.5), np.nan)
        return med.astype(flat.dtype, copy=False).reshape(shape)
    if not missing.any():
        mid = ((n - 1) // 2, n // 2)
        rows = sort_frames(flat, mid)
        med = rows[mid[0]] if mid[0] == mid[1] else (rows[mid[0]] + rows[mid[1]]) * 0.5
        return med.astype(flat.dtype, copy=False).reshape(shape)
    rows = sort_frames(np.where(missing, np.inf, flat))  # NaN last, like np.sort
    k = n - missing.sum(axis=0)
    stacked = np.stack(rows)
    cols = np.arange(flat.shape[1])
    lo = stacked[np.maximum((k - 1) // 2, 0), cols]
    hi = stacked[np.maximum(k // 2, 0), cols]
    with np.errstate(invalid="ignore"):
        med = np.where(k > 0, (lo + hi) * flat.dtype.type(0.5), np.nan)
    return med.astype(flat.dtype, copy=False).reshape(shape)


def _clip_combine(cube, method, sigma_low, sigma_high, iterations, noise) -> np.ndarray:
    cube = np.asarray(cube)
    n, shape = cube.shape[0], cube.shape[1:]
    data = np.array(cube, dtype=np.float32, copy=True).reshape(n, -1)
    if method == "median":
        centre = masked_median(data)
        count = np.isfinite(data).sum(axis=0)
        if noise is None:
            spread = (MAD_TO_SIGMA * _mad(data, centre, np.isnan(cube).any())) ** 2
        else:
            spread = noise.variance(centre, n).mean(axis=0)
        var = (np.pi / 2) * spread / np.maximum(count, 1)
        return np.stack([centre, var, count]).astype(np.float32).reshape(3, *shape)
    if method != "sigclip":
        raise ValueError(f"unknown combine method {method!r}")
    odd = ~np.isfinite(data).all(axis=0)  # pixels with a NaN or ±inf among their values
    has_nan = bool(odd.any()) and bool(np.isnan(data[:, odd]).any())
    model_var, touched = _sigma_clip(data, sigma_low, sigma_high, iterations, noise, has_nan)
    touched |= odd
    # Statistics of every pixel as if all its values were kept (a plain sum over frames),
    # then those of the few pixels that lost values, or had odd ones, redone.
    out = _all_kept_stats(data, model_var)
    redo = np.flatnonzero(touched)
    if redo.size:
        out[:, redo] = _clipped_stats(data[:, redo],
                                      None if model_var is None else model_var[:, redo])
    return out.reshape(3, *shape)


def _clipped_stats(data: np.ndarray, model_var: np.ndarray | None) -> np.ndarray:
    """Mean, variance of the mean and count of the values left (not NaN) along axis 0.

    ±inf counts as present in the mean (as in ``np.nanmean``) but not in the count.
    """
    present = ~np.isnan(data)
    kept = np.isfinite(data)
    count = kept.sum(axis=0)
    nk = count.astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = _frame_sum(data, present)
        n_present = present.sum(axis=0)
        mean = total / n_present.astype(np.float32)
        if model_var is not None:
            if model_var.shape[0] == 1:  # same variance for every frame: Σσ² = nσ²
                var = model_var[0] * nk / (nk * nk)
            else:
                var = _frame_sum(model_var, kept)
                var = var / (nk * nk)
        else:
            dev = np.where(present, data - mean, np.float32(0))
            var = _frame_sum(dev * dev) / (n_present - 1) / count
            var = np.where(count > 1, var, np.nan)
    return np.stack([mean, var, nk])


def _all_kept_stats(data: np.ndarray, model_var: np.ndarray | None) -> np.ndarray:
    """:func:`_clipped_stats` of a block whose values are all finite and kept: the same
    arithmetic with the count a constant, written straight into the result rows."""
    n = data.shape[0]
    nk = np.float32(n)
    out = np.empty((3, data.shape[1]), np.float32)
    mean, var = out[0], out[1]
    _frame_sum(data, out=mean)
    np.divide(mean, nk, out=mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        if model_var is not None:
            if model_var.shape[0] == 1:  # same variance for every frame: Σσ² = nσ²
                np.multiply(model_var[0], nk, out=var)
            else:
                _frame_sum(model_var, out=var)
            np.divide(var, nk * nk, out=var)
        else:  # float64 division, as by an integer count array
            dev = data - mean
            var[:] = _frame_sum(dev * dev) / np.float64(n - 1) / np.float64(n) if n > 1 else np.nan
    out[2] = nk
    return out


def _frame_sum(data: np.ndarray, where: np.ndarray | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """Sum over axis 0 (of the values ``where`` true), adding frame after frame.

    The order is fixed on purpose: numpy may sum a short axis pairwise or row by row
    depending on the array's shape, and the float32 result would then depend on which
    pixels are summed together.
    """
    total = np.zeros(data.shape[1:], np.float32) if out is None else out
    total[...] = 0
    for i in range(data.shape[0]):
        if where is None:
            total += data[i]
        else:
            np.add(total, data[i], out=total, where=where[i])
    return total


def _mad(data: np.ndarray, centre: np.ndarray, ignore_nan: bool) -> np.ndarray:
    """Median absolute deviation from ``centre`` along axis 0. NaN deviations (from
    ``inf - inf``) are ignored only when ``ignore_nan``, as a plain median would not."""
    dev = np.abs(data - centre)
    mad = masked_median(dev)
    if not ignore_nan:
        mad[np.isnan(dev).any(axis=0)] = np.nan
    return mad


def _blocks(shape: tuple[int, int], pixels: np.ndarray | None, whole: bool = False):
    """Pixel selections of a ``(frame, pixel)`` array about ``CLIP_BLOCK_BYTES`` each:
    slices over every pixel when ``whole``, else pieces of the index array ``pixels``."""
    n, npix = shape
    step = max(256, CLIP_BLOCK_BYTES // (4 * max(n, 1)))
    if whole:
        return [slice(p, min(p + step, npix)) for p in range(0, npix, step)]
    return [pixels[p : p + step] for p in range(0, pixels.size, step)]


def _sigma_clip(data, sigma_low, sigma_high, iterations, noise,
                has_nan: bool) -> tuple[np.ndarray | None, np.ndarray]:
    """Clip ``data`` ``(frame, pixel)`` in place: rejected values become NaN.

    Iterates like the textbook loop (centre, scale, reject, until nothing is rejected or
    ``iterations`` are done), with two savings that leave the result unchanged:

    - after the first pass only the pixels that lost a value can change, so only those
      are recomputed (a few per cent of them); a noise model whose zero is the median of
      all centres (``pedestal=None``) re-tests every pixel when that zero moves, as the
      textbook loop would;
    - each pass walks the pixels in blocks that fit a core's cache, so its dozen
      array operations do not each stream the whole strip through memory.

    Returns
    -------
    model_var : numpy.ndarray or None
        With a noise model, each frame's variance at the last centre of each pixel (first
        axis of length 1 when all frames share it), for the variance of the mean.
    touched : numpy.ndarray
        Boolean, per pixel: it lost a value.
    """
    n, npix = data.shape
    touched = np.zeros(npix, bool)
    tracker = _MedianTracker()
    centre = np.empty(npix, np.float32)
    model_var = None
    if noise is not None:
        rows = len(noise.levels) if noise.levels else 1
        model_var = np.empty((rows, npix), np.float32)
    pixels: np.ndarray | None = None  # pixels whose values changed (None: all)
    zero = None
    two_step = noise is not None and noise.pedestal is None  # the zero needs every centre
    todo = _blocks(data.shape, None, whole=True)
    scratch = _Scratch(n, max(_size(sel) for sel in todo), 1 if model_var is None else
                       model_var.shape[0])
    for _ in range(iterations):
        todo = _blocks(data.shape, pixels, whole=pixels is None)
        if two_step:
            for sel in todo:
                scratch.median(data[:, sel], centre[sel] if isinstance(sel, slice) else None,
                               no_nan=pixels is None and not has_nan, into=centre, sel=sel)
            new_zero = tracker.update(centre)  # = noise.zero(centre), often without a sort
            if pixels is not None and not _same(new_zero, zero):
                todo = _blocks(data.shape, None, whole=True)  # a new zero moves every cut
            zero = new_zero
        elif noise is not None:
            zero = noise.zero(centre)
        hits = []
        for sel in todo:
            sub = data[:, sel]
            whole = isinstance(sel, slice)
            if not two_step:
                scratch.median(sub, centre[sel] if whole else None,
                               no_nan=pixels is None and not has_nan, into=centre, sel=sel)
            c = centre[sel]
            if noise is None:
                scale = MAD_TO_SIGMA * _mad(sub, c, ignore_nan=pixels is not None or has_nan)
            else:
                var = noise.frame_variance(c, zero, n, out=scratch.var[:, : c.size])
                model_var[:, sel] = var
                scale = np.sqrt(var, out=scratch.scale[: var.shape[0], : c.size])
            reject = scratch.reject(sub, c, scale, sigma_low, sigma_high)
            hit = np.logical_or.reduce(reject, axis=0)
            if not hit.any():
                continue
            # A pixel whose every value is off its centre (two pairs far apart, the
            # median of an even count between them) keeps them: never clipped to nothing.
            emptied = hit & np.logical_and.reduce(reject | np.isnan(sub), axis=0)
            if emptied.any():
                reject[:, emptied] = False
                hit &= ~emptied
                if not hit.any():
                    continue
            sub[reject] = np.nan
            if isinstance(sel, slice):
                hits.append(np.flatnonzero(hit) + sel.start)
            else:
                data[:, sel] = sub  # fancy indexing gave a copy
                hits.append(sel[hit])
        if not hits:
            break
        pixels = np.concatenate(hits)
        touched[pixels] = True
    return model_var, touched


class _MedianTracker:
    """The median of the non-NaN values of an array that changes a little at a time.

    The first call sorts (partially); later calls first check, by counting, that the one
    or two middle values found last time still hold the middle ranks, which is far
    cheaper than a new partition and, with few values changed, nearly always true.
    The result equals ``np.median`` of the non-NaN values.
    """

    def __init__(self) -> None:
        self.size = -1
        self.middle: tuple[np.floating, np.floating] | None = None
        self.value = float("nan")

    def update(self, values: np.ndarray) -> float:
        """The median now."""
        present = ~np.isnan(values)
        size = int(present.sum())
        if size == 0:
            self.size, self.middle, self.value = 0, None, float("nan")
            return self.value
        ranks = ((size - 1) // 2, size // 2)
        if size == self.size and all(
            np.count_nonzero(values < v) <= r < np.count_nonzero(values <= v)
            for v, r in zip(self.middle, ranks, strict=True)
        ):
            return self.value
        part = np.partition(values[present] if size < values.size else values, ranks)
        self.size, self.middle = size, (part[ranks[0]], part[ranks[1]])
        self.value = float(np.mean(part[ranks[0] : ranks[1] + 1]))
        return self.value


def _size(sel: slice | np.ndarray) -> int:
    return sel.stop - sel.start if isinstance(sel, slice) else sel.size


class _Scratch:
    """Work arrays for one block of ``(frame, pixel)`` values, reused block after block.

    Allocating a dozen block-sized temporaries per block costs page faults whenever the
    allocator hands memory back to the system between blocks, as dask workers set it to
    (``MALLOC_TRIM_THRESHOLD_``): up to half the CPU time of a strip in a worker.
    """

    def __init__(self, n: int, size: int, var_rows: int):
        self.rows = np.empty((n + 1, size), np.float32)  # the sorting network's rows + 1
        self.var = np.empty((var_rows, size), np.float32)
        self.scale = np.empty((var_rows, size), np.float32)
        self.lo = np.empty((var_rows, size), np.float32)
        self.hi = np.empty((var_rows, size), np.float32)
        self.rej = np.empty((n, size), bool)
        self.rej_hi = np.empty((n, size), bool)

    def median(self, block: np.ndarray, out: np.ndarray | None, no_nan: bool,
               into: np.ndarray, sel: slice | np.ndarray) -> None:
        """``into[sel] = masked_median(block)``; by the sorting network in the work rows
        when ``block`` has no NaN (``out``, a view of ``into[sel]``, is then written)."""
        n, m = block.shape
        if not no_nan or n > NETWORK_MAX or out is None:
            into[sel] = masked_median(block)
            return
        mid = ((n - 1) // 2, n // 2)
        rows = [self.rows[i, :m] for i in range(n)]
        for i in range(n):
            np.copyto(rows[i], block[i])
        tmp = self.rows[n, :m]
        for a, b in _pruned_network(n, mid):
            np.minimum(rows[a], rows[b], out=tmp)
            np.maximum(rows[a], rows[b], out=rows[b])
            rows[a], tmp = tmp, rows[a]
        if mid[0] == mid[1]:
            np.copyto(out, rows[mid[0]])
        else:  # as np.median: the mean of the two middle values, in float32
            np.add(rows[mid[0]], rows[mid[1]], out=out)
            np.multiply(out, np.float32(0.5), out=out)

    def reject(self, block: np.ndarray, centre: np.ndarray, scale: np.ndarray,
               sigma_low: float, sigma_high: float) -> np.ndarray:
        """Values below ``centre - sigma_low·scale`` or above ``centre + sigma_high·scale``."""
        m = block.shape[1]
        rows = scale.shape[0]
        lo, hi = self.lo[:rows, :m], self.hi[:rows, :m]
        rej, rej_hi = self.rej[:, :m], self.rej_hi[:, :m]
        with np.errstate(invalid="ignore"):
            np.multiply(scale, np.float32(sigma_low), out=lo)
            np.subtract(centre, lo, out=lo)
            np.multiply(scale, np.float32(sigma_high), out=hi)
            np.add(centre, hi, out=hi)
            np.less(block, lo, out=rej)
            np.greater(block, hi, out=rej_hi)
        return np.logical_or(rej, rej_hi, out=rej)


def _same(a: float | None, b: float | None) -> bool:
    """Equal, NaN equal to NaN."""
    return a == b or (a is not None and b is not None and np.isnan(a) and np.isnan(b))
