"""Photon transfer: a detector's gain and read noise from pairs of its own frames.

The method is the photon-transfer technique (Janesick, *Photon Transfer: DN → λ*, SPIE
Press, 2007): the signal's shot noise in ADU² grows as the mean signal over the gain, and
the difference of two frames of one scene holds the noise alone, the fixed patterns
(pixel response, vignetting, the bias structure) cancelling. For a pair of bias (or short
dark) frames ``var(B1 - B2) = 2 σ²`` (σ: the read noise in ADU, quantisation included);
for a pair of flats ``A``, ``B`` of one exposure time, their level ``L`` (bias and dark)
removed, ``A' = A - L`` of mean ``a``, ``B' = B - L`` of mean ``b``, scaled to the same
level (``r = a / b``, so that twilight flats that fade between frames still pair, and the
pixel response cancels in ``A' - r B'``):

    var(A' - r B') = a (1 + r) / g + (1 + r²) σ² + (1 - r)² var(L)

(``g``: the gain in e-/ADU; the shot noise of a frame of mean ``a`` ADU is ``a / g``
ADU²). Each pair gives ``g``; the gain is the median over pairs at every level the night
has. When σ is not known, two or more levels give both (a straight line through the
points ``(a (1 + r), var)``).

The variance of a difference is measured robustly (:func:`difference_variance`) on a
central region. Twilight flats change level and gradient between exposures: after
scaling, a difference of two flats whose gradients differ by 1 % across the frame still
holds a ramp of ``0.01 a`` peak to peak: at 27,000 ADU its variance, 270² / 12 ≈ 6,100
ADU², half the shot noise of the difference at 4 e-/ADU; stars, which do not scale with
the sky, add far more (``tests/core/test_ptc.py``: the plain variance of a simulated
twilight pair gives a gain 0.03 to 0.09 times the truth, 0.33 times with the stars
clipped but the gradients left). The difference is therefore cut
into boxes of :data:`BOX` px and a plane is fitted to each box and removed: any
structure smooth over a few tens of pixels (gradients, the slow curvature of a twilight
sky, a level change) is taken out, the shot noise, white, is not. The plane of each box
takes three of its degrees of freedom, so the residuals' sum of squares is divided by
``n - 3`` per box of ``n`` kept pixels, not ``n``: for white noise this is exact (least
squares), no other factor is needed. Boxes rather than a median filter of the
difference: a median filter's output is itself noisy and correlated with the pixel it is
subtracted from, which needs a correction factor that depends on the noise's
distribution and the filter's size; a fitted plane's needs only the count of its
parameters. On the real twilight flats tried (Lowell 42-inch, 1,365 × 1,370 binned
pixels) the variance does not depend on the box: boxes of 4 to 64 px give gains within
0.4 % of each other. Stars (which do not scale with the sky, or moved), cosmic rays and hot
pixels are clipped iteratively at ``clip`` sigmas with their surroundings, and the
variance kept is divided by the variance a normal law keeps within ``clip`` sigmas
(0.999985 at 5 σ).

Each pair also records the correlation of its difference between neighbouring pixels
along rows (``rho_x``) and columns (``rho_y``). Shot noise is white: a correlation means
the pixels do not hold independent counts, either because charge was shared between
them after it was collected (charge-transfer inefficiency smears a pixel's charge into
the next one read, mostly at low signal; the brighter-fatter effect at high signal: both
positive), or because the read-out chain carries part of a pixel's signal into the next
one read (either sign). Sharing lowers the variance of single pixels while the variance
of their sums is kept, so a gain from single pixels is then too high by about
``1 + 2 (rho_x + rho_y)`` (nearest neighbours); :mod:`astep_dask.masters.detector`
notes a large correlation. The gain itself is that of single pixels, as the noise model
of a calibrated frame's pixels needs. On a real night (Lowell 42-inch, 3 × 3 binned) the
row neighbours' correlation is -0.007 in twilight flats at 21,000-26,000 ADU and grows
as the signal falls in pairs of sky frames (+0.002 at 5,300 ADU, +0.021 at 1,800, +0.033
at 1,200): single pixels give 3.67 e-/ADU from the flats and 3.95-4.05 from the sky,
counted with their neighbours both give 3.71-3.81. The flats' gain is then not the
single-pixel gain of the sky, whatever the statistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PairStat",
    "central_region",
    "difference_variance",
    "gain_from_pairs",
    "pair_stat",
    "read_variance",
]

BOX = 32  # px: the side of the boxes whose own plane is removed from a difference
CLIP = 5.0  # sigmas
ITERATIONS = 10


@dataclass(frozen=True)
class PairStat:
    """What one pair of frames says: the mean signal (ADU, level removed) of its first
    and second frame over the pixels kept, the scale ``ratio = mean_a / mean_b`` applied
    to the second, the variance (ADU²) of ``A - ratio B``, the pixels it holds, and the
    correlation of the difference between neighbouring pixels along rows (``rho_x``) and
    columns (``rho_y``; module docstring; NaN when not measured)."""

    mean_a: float
    mean_b: float
    ratio: float
    variance: float
    n_pixels: int
    rho_x: float = float("nan")
    rho_y: float = float("nan")


def central_region(shape: tuple[int, int], fraction: float = 0.75,
                   max_side: int = 1024) -> tuple[slice, slice]:
    """Rows and columns of the central ``fraction`` of each axis of an image of ``shape``,
    at most ``max_side`` pixels a side (a measurement's precision needs no more)."""
    out = []
    for n in shape:
        side = max(1, min(int(n * fraction), max_side, n))
        start = (n - side) // 2
        out.append(slice(start, start + side))
    return out[0], out[1]


def _truncated_fraction(k: float) -> float:
    """Variance of a unit normal law truncated at ±k (what clipping at k sigma keeps)."""
    phi = math.exp(-k * k / 2) / math.sqrt(2 * math.pi)
    inside = math.erf(k / math.sqrt(2))
    return 1.0 - 2.0 * k * phi / inside


def _blocks(image: np.ndarray, box: int) -> np.ndarray:
    """``image`` cut into ``box`` × ``box`` blocks, one per row (the remainder dropped)."""
    ny, nx = image.shape[0] // box, image.shape[1] // box
    cut = image[:ny * box, :nx * box]
    return cut.reshape(ny, box, nx, box).swapaxes(1, 2).reshape(ny * nx, box * box)


def _unblocks(blocks: np.ndarray, ny: int, nx: int, box: int) -> np.ndarray:
    """The image :func:`_blocks` cut (its remainder dropped)."""
    return blocks.reshape(ny, nx, box, box).swapaxes(1, 2).reshape(ny * box, nx * box)


def _plane_clip(values: np.ndarray, kept: np.ndarray, basis: np.ndarray, clip: float,
                iterations: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Fit a plane to each block's kept pixels, drop those beyond ``clip`` sigmas, again
    until none changes; the variance of the kept residuals (planes' degrees of freedom
    taken off), the pixels kept and the residuals (NaN variance when too few remain)."""
    resid = np.zeros_like(values)
    variance = float("nan")
    for _ in range(max(1, iterations)):
        w = kept.astype(np.float64)
        n = w.sum(axis=1)
        fit = n >= 10
        if not fit.any():
            return float("nan"), np.zeros_like(kept), resid
        normal = np.einsum("kp,bp,lp->bkl", basis, w[fit], basis)
        rhs = np.einsum("kp,bp->bk", basis, w[fit] * values[fit])
        coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
        resid = np.zeros_like(values)
        resid[fit] = values[fit] - coef @ basis
        dof = float(n[fit].sum()) - 3.0 * int(fit.sum())
        if dof <= 0:
            return float("nan"), np.zeros_like(kept), resid
        variance = float((w * resid**2).sum() / dof)
        new = kept & fit[:, None] & (np.abs(resid) <= clip * math.sqrt(variance))
        if np.array_equal(new, kept):
            break
        kept = new
    return variance, kept, resid


SMOOTH = 5  # px: the box a difference is smoothed with to find faint sources
GROW = 3  # px: every pixel within this of a rejected one is rejected too


def difference_variance(diff: np.ndarray, box: int = BOX, clip: float = CLIP,
                        iterations: int = ITERATIONS) -> tuple[float, np.ndarray]:
    """Robust variance of a difference image and the pixels it kept.

    The image is cut into ``box`` × ``box`` blocks (smaller when the image is); a plane
    is fitted to each block's kept pixels and removed; pixels further than ``clip``
    sigmas from their plane are dropped, again until none changes. Sources (a star that
    moved between the frames, a cosmic ray) have wings below any per-pixel threshold that
    would still add to the variance: pixels where the difference smoothed over
    :data:`SMOOTH` px stands out by ``clip`` of its own sigmas are dropped too, and every
    dropped pixel's surroundings (:data:`GROW` px); the planes are then fitted again. The
    variance of what is kept is divided by the variance a normal law keeps within
    ``clip`` sigmas. Non-finite pixels are never kept.

    Parameters
    ----------
    diff
        2-D difference image (any float type).
    box, clip, iterations
        Block side (px), clipping threshold (sigmas), most clipping passes.

    Returns
    -------
    variance
        The variance (NaN when fewer than ten pixels per block remain).
    kept
        Boolean blocks (one row per block, as the image is cut) of the pixels kept.

    Raises
    ------
    ValueError
        When ``diff`` is not 2-D.
    """
    variance, kept, _ = _difference_variance(diff, box, clip, iterations)
    return variance, kept


def _difference_variance(diff: np.ndarray, box: int, clip: float, iterations: int
                         ) -> tuple[float, np.ndarray, np.ndarray]:
    """:func:`difference_variance`, and the residuals from the planes (blocks)."""
    from scipy import ndimage

    if diff.ndim != 2:
        raise ValueError(f"a difference image is 2-D, not {diff.ndim}-D")
    box = max(2, min(box, *diff.shape))
    ny, nx = diff.shape[0] // box, diff.shape[1] // box
    values = _blocks(np.asarray(diff, dtype=np.float64), box)
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    yy, xx = np.mgrid[:box, :box]
    basis = np.stack([np.ones(box * box), (xx - (box - 1) / 2).ravel(),
                      (yy - (box - 1) / 2).ravel()])  # (3, pixels)
    variance, kept, resid = _plane_clip(values, finite, basis, clip, iterations)
    if not math.isfinite(variance):
        return variance, kept, resid
    image = _unblocks(np.where(kept, resid, 0.0), ny, nx, box)
    smooth = ndimage.uniform_filter(image, SMOOTH, mode="constant")
    sources = np.abs(smooth) > clip * math.sqrt(variance) / SMOOTH
    rejected = sources | ~_unblocks(kept, ny, nx, box)
    rejected = ndimage.binary_dilation(rejected, np.ones((2 * GROW + 1,) * 2, bool))
    variance, kept, resid = _plane_clip(values, finite & ~_blocks(rejected, box), basis,
                                        clip, iterations)
    return variance / _truncated_fraction(clip), kept, resid


def _neighbour_correlation(resid: np.ndarray, kept: np.ndarray, shape: tuple[int, int],
                           box: int) -> tuple[float, float]:
    """Correlation of the kept residuals (blocks as :func:`_blocks` cuts an image of
    ``shape``) between neighbours along rows and along columns (NaN without pairs). The
    plane removed from a block of ``n = box²`` pixels leaves white noise a correlation of
    about ``-3 / n`` between any two of its pixels (the hat matrix of a least-squares
    plane); it is added back, so that white noise reads 0."""
    ny, nx = shape[0] // box, shape[1] // box
    r = _unblocks(np.where(kept, resid, 0.0), ny, nx, box)
    k = _unblocks(kept, ny, nx, box)
    n0 = int(k.sum())
    if n0 == 0:
        return float("nan"), float("nan")
    v0 = float((r * r).sum()) / n0
    out = []
    for r1, r2, k1, k2 in ((r[:, 1:], r[:, :-1], k[:, 1:], k[:, :-1]),
                           (r[1:], r[:-1], k[1:], k[:-1])):
        n = int((k1 & k2).sum())
        out.append(float((r1 * r2).sum()) / n / v0 + 3.0 / box**2 if n and v0 > 0
                   else float("nan"))
    return out[0], out[1]


def pair_stat(a: np.ndarray, b: np.ndarray, level: np.ndarray | float = 0.0,
              scale: bool = True, box: int = BOX, clip: float = CLIP) -> PairStat:
    """The photon-transfer figures of one pair of frames of one scene.

    Parameters
    ----------
    a, b
        The two frames (ADU; the same region of each, e.g. :func:`central_region`).
    level
        What each frame holds besides its signal (ADU: the bias, and the dark current of
        the exposure; an image or a number), removed before the means are taken.
    scale
        Scale ``b`` to ``a``'s mean signal before the difference (flats whose level
        changed between frames); False for frames without signal (bias, darks).
    box, clip
        As :func:`difference_variance`.

    Returns
    -------
    PairStat
        The means over the pixels the difference kept; ``ratio`` 1 when not ``scale``;
        the neighbours' correlation of the difference (module docstring).

    Raises
    ------
    ValueError
        When the frames differ in shape or the means cannot be scaled (``b`` has no
        positive signal).
    """
    if a.shape != b.shape:
        raise ValueError(f"a pair's frames differ in shape: {a.shape} and {b.shape}")
    a1 = np.asarray(a, np.float64) - level
    b1 = np.asarray(b, np.float64) - level
    ratio = 1.0
    if scale:
        mb = float(np.nanmedian(b1))
        if not mb > 0:
            raise ValueError("no signal in the second frame of a flat pair")
        ratio = float(np.nanmedian(a1)) / mb
    variance, kept, resid = _difference_variance(a1 - ratio * b1, box, clip, ITERATIONS)
    side = max(2, min(box, *a1.shape))
    ka, kb = _blocks(a1, side)[kept], _blocks(b1, side)[kept]
    mean_a = float(ka.mean()) if ka.size else float("nan")
    mean_b = float(kb.mean()) if kb.size else float("nan")
    if scale and ka.size:  # the scale that makes the two kept means equal
        ratio2 = mean_a / mean_b if mean_b > 0 else ratio
        if abs(ratio2 - ratio) > 1e-6 * abs(ratio):
            variance, kept, resid = _difference_variance(a1 - ratio2 * b1, box, clip,
                                                         ITERATIONS)
            ratio = ratio2
    rho_x, rho_y = (_neighbour_correlation(resid, kept, a1.shape, side)
                    if math.isfinite(variance) else (float("nan"), float("nan")))
    return PairStat(mean_a, mean_b, ratio, variance, int(kept.sum()), rho_x, rho_y)


def read_variance(pairs: Sequence[PairStat]) -> float:
    """The read-noise variance (ADU²) from pairs of bias or dark frames: the mean of
    ``var(B1 - B2) / 2`` over the pairs, weighted by their pixels (NaN without pairs)."""
    good = [p for p in pairs if np.isfinite(p.variance) and p.n_pixels > 0]
    if not good:
        return float("nan")
    n = np.array([p.n_pixels for p in good], float)
    return float((np.array([p.variance for p in good]) / 2 * n).sum() / n.sum())


def gain_from_pairs(pairs: Sequence[PairStat], read_var: float | None = None,
                    level_var: float = 0.0) -> tuple[float, list[float], float]:
    """The gain (e-/ADU) from flat pairs (photon transfer, module docstring).

    Parameters
    ----------
    pairs
        Flat pairs (:func:`pair_stat`), at one level or several.
    read_var
        The read-noise variance in ADU² (:func:`read_variance`); None (or NaN): fitted
        with the gain, which needs pairs at two levels at least (the brightest 1.5 times
        the faintest).
    level_var
        The variance (ADU²) of the level image removed from each frame (a mean of bias or
        dark frames), counted in the difference as ``(1 - r)² level_var``.

    Returns
    -------
    gain
        The median of the pairs' gains (NaN when no pair gives a positive one).
    gains
        Each pair's gain (NaN where it gives none).
    read_var
        The read-noise variance used (as given, or fitted).
    """
    pts = [p for p in pairs if np.isfinite(p.variance) and p.mean_a > 0 and p.n_pixels > 0]
    if read_var is None or not np.isfinite(read_var):
        levels = [p.mean_a for p in pts]
        if len(pts) < 2 or max(levels) < 1.5 * min(levels):
            return float("nan"), [float("nan")] * len(pairs), float("nan")
        x = np.array([[p.mean_a * (1 + p.ratio), 1 + p.ratio**2] for p in pts])
        y = np.array([p.variance - (1 - p.ratio) ** 2 * level_var for p in pts])
        _, read_var = np.linalg.lstsq(x, y, rcond=None)[0]
        read_var = float(max(read_var, 0.0))
    gains = []
    for p in pairs:
        noise = p.variance - (1 + p.ratio**2) * read_var - (1 - p.ratio) ** 2 * level_var
        ok = np.isfinite(p.variance) and p.mean_a > 0 and noise > 0
        gains.append(p.mean_a * (1 + p.ratio) / noise if ok else float("nan"))
    finite = [g for g in gains if np.isfinite(g)]
    return (float(np.median(finite)) if finite else float("nan")), gains, float(read_var)
