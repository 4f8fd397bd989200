"""Small-body yield at the photon limit (issue 31): what KBMOD finds in our WorkUnit
against what it finds in an ideal WorkUnit made from the simulator's truth.

Simulates one night (default 1024², 20 science frames at 100 s cadence = 32 min, PSF σ
1.06 px, a WCS, 24 movers of 250–2,500 e- per frame, slow ones of 305–483 px/day and fast
ones of ~2,000–2,200 px/day, in several directions), calibrates it with the installed
``astep-dask calibrate NIGHT --kbmod`` (a subprocess, as a user runs it) and reads our
WorkUnit with KBMOD's ``WorkUnit.from_fits``. The IDEAL WorkUnit is made on the same grid
(our reference frame's), with our times and WCS: per frame, SCI is the movers alone
(pixel-integrated Gaussians of the true σ at their true positions) plus Gaussian noise of
the true per-pixel variance (the frame's noiseless model — sky, stars, movers — plus dark
current and read noise², flat-fielded, moved onto the reference grid), VAR that variance,
no mask (but the handful of pixels whose true response is < 0.05: no light, an infinite
true variance that KBMOD's validation refuses), PSF_i the true PSF (the frame's own, with
``--seeing-scatter``). Both are searched by KBMOD's own CPU search
(``SearchRunner.run_search_from_work_unit``) with the same ``SearchConfiguration``:

- ``VelocityGridSearch`` over vx, vy in ±2.5 px/frame in steps of 0.25 px/frame (441
  velocities, in px/day). The simulated movers' velocities are nodes of that grid, so the
  comparison measures our frames, not the grid's velocity mismatch;
- ``lh_level`` 5 (so that a mover we lose is still seen with its likelihood); a mover or a
  result counts as *found* at likelihood ≥ 10, the acceptance threshold;
- ``num_obs`` half the frames; sigma-G filtering, near-duplicate filtering and clustering
  as KBMOD's defaults (they apply to both searches alike); ``compute_ra_dec`` off (not
  needed here) and no result files.

A result matches a mover by its track: within 2 px of the truth at the first and at the
last frame (KBMOD's ``predict_pixel_locations`` for the result's positions). This is the
rule of KBMOD's ``trajectory_utils.match_trajectory_sets`` made per end point: that
function thresholds the *mean* of the distances and assigns results one to one by
distance, where here each mover takes its highest-likelihood result within 2 px at both
ends (KBMOD's own matcher is run too, as a cross-check). Printed:

- per mover: flux, speed, the truth's matched-filter SNR, the ideal and our search
  likelihoods, their ratio, found by each, and the likelihood of the true track evaluated
  directly (``StackSearch.search_linear_trajectory``, no sigma-G) on each, and the
  fraction of its flux our frames keep at its true positions (PSF photometry);
- completeness ours / ideal (movers the ideal finds at ≥ 10) per flux bin and per speed
  bin (slow ≤ 500 px/day, fast above), the median likelihood ratio over the movers both
  searches return, false detections: our results ≥ 10 matching no mover and no ideal
  result by the same track rule, and not a mover's side-lobe (a result whose track lies
  within 2 px of a mover in ≥ 3 frames: the mover at a neighbouring velocity, which
  KBMOD's duplicate filters leave in both searches, ~8 per bright mover; they are counted
  and listed apart);
- the noise-only calibration: KBMOD's likelihood of 2,000 random trajectories (grid
  velocities, starts away from the movers and the edges; and 1,000 more of slow grid
  velocities only, where noise shared by the frames' templates adds up) on ours and on
  the ideal, its standard deviation (target 1.00 ± 0.05) and mean (0 expected: a
  negative mean is a bias of the difference frames);
- the blank-sky matched-filter calibration: per frame, psi / sqrt(phi) of the PSF_i
  weighted sum (psi = Σ P·sci/var, phi = Σ P²/var over the kernel, masked pixels skipped)
  at random positions away from stars and movers, its standard deviation (target 1.00 ±
  0.03), and the per-pixel scatter sci / sqrt(var) there;
- the acceptance lines of issue 31 with PASS / FAIL, and a JSON summary in
  ``WORK/yield-LABEL.json`` (``yield-LABEL-only-SIDE.json`` with ``--only``).

The ideal frames' noise is, by default (``--ideal-noise data``), the simulated raw
frames' own: photon and read noise taken from the raw ADU (less bias, the overscan's
offset, the expected electrons and the cosmic rays, divided by the flat), moved onto the
reference grid by whole pixels, with the cosmic rays, warm and saturated pixels masked as
a perfect calibration would. A mover the noise happens to dim in our data is then dimmed
in the ideal too, and the comparison measures what calibration and subtraction lose.
``--ideal-noise independent`` draws the ideal's noise anew (``--ideal-seed``), as before
December 2026: a mover near the threshold (truth SNR ≲ 13) is then found or lost by
either side by chance (±1 in likelihood; on the default night, mover 2's flux in the
calibrated frames is 0.77 of the truth, the noise of the raw frames alone).

Everything is kept in ``--work`` (default ``/tmp/yield``): the simulated night (one folder
per simulation setting), our pipeline's output (one per setting and ``--label``, with the
code state it ran with in ``yield-code.txt``) and the ideal search's results (keyed by
all they depend on); they are reused when present, so after a change of our code run
with ``--fresh`` (everything anew), remove that label's ``out-*`` folder (the pipeline
anew) or use another ``--label``. Two settings files compare in one work folder
with two labels; ``--only ours`` skips the ideal search when its results are not cached.

KBMOD is built from source (``shared/kbmod-build.md``, CPU only); run with the Python of
that build's virtual environment, with our package installed there (``pip install -e .``)
and KBMOD's ``src`` on the path::

    OMP_NUM_THREADS=2 PYTHONPATH=$KB/kbmod/src $KB/venv/bin/python benchmarks/yield.py \\
        --work /tmp/yield --label baseline [--config settings.toml]
    ... benchmarks/yield.py --quick          # 256², 8 movers: a smoke run (~1 min)

The default run takes ~5–7 min on 2 cores (pipeline 1–2 min, each search ~1.5 min; the
ideal search is skipped when cached).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import types
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")  # before KBMOD's OpenMP starts

import numpy as np
from astropy.io import fits
from scipy import ndimage

from astep_dask.core.register import shifted
from astep_dask.testing.simulate import (
    SimConfig,
    add_sources,
    load_frame_truth,
    load_truth,
    mover_tracks,
    psf_stamp,
    simulate_night,
)

CODE_FILE = "yield-code.txt"  # in our output: the code state the pipeline ran with
FOUND_LH = 10.0  # a mover or a result counts as found at this likelihood
SEARCH_LH = 5.0  # the searches' lh_level: weaker results are kept to be measured
MATCH_PX = 2.0  # track match: within this at the first and at the last frame
GRID_STEP = 0.25  # px/frame, the velocity grid's step
GRID_MAX = 2.5  # px/frame, the velocity grid's reach in vx and vy
SLOW_PX_DAY = 500.0  # slow movers: at most this speed
FLUX_BINS = (250.0, 500.0, 1000.0, 2500.0)  # e- per frame
N_RANDOM = 2000  # random trajectories of the noise-only calibration
BLANK_PER_FRAME = 500  # blank-sky positions per frame
IDEAL_VERSION = 2  # of how the ideal frames are made (part of their results' cache key)
DEAD_FLAT = 0.05  # ideal frames: pixels of a smaller response get no light (masked)
WCS_CENTER = (97.5, -75.0)  # deg, the simulated frames' WCS centre

# Mover velocities (px/frame), all nodes of the search grid: slow (0.35–0.56 px/frame,
# 305–483 px/day at 100 s), medium (~1.1–1.3) and fast (2.3–2.5), several directions.
SLOW = ((0.5, 0.25), (-0.25, 0.5), (0.0, -0.5), (-0.5, -0.25), (0.25, 0.25), (0.5, 0.0),
        (-0.25, -0.5), (0.25, -0.25))
MEDIUM = ((1.0, 0.5), (-0.75, 1.0), (1.25, -0.5), (-1.0, -0.75))
FAST = ((2.0, 1.25), (-1.5, 2.0), (2.25, -0.75), (-2.0, -1.25), (0.75, 2.25), (-2.25, 0.5))



def _say(fmt: str, *args: object) -> None:
    """Progress on stderr, with the time."""
    print(time.strftime("%H:%M:%S ") + (fmt % args if args else fmt), file=sys.stderr,
          flush=True)


# --------------------------------------------------------------------------- set-up


def import_kbmod(src: str | None = None) -> types.SimpleNamespace:
    """Import the KBMOD pieces the benchmark uses.

    Parameters
    ----------
    src
        KBMOD's ``src`` folder to put first on ``sys.path``; None: as the path has it.

    Returns
    -------
    types.SimpleNamespace
        ``WorkUnit``, ``SearchRunner``, ``SearchConfiguration``, ``ImageStackPy``,
        ``StackSearch``, ``Trajectory``, ``predict_pixel_locations`` and
        ``match_trajectory_sets``.

    Notes
    -----
    ``import kbmod`` imports torchvision (its CNN stamp filter, unused here); the
    torchvision wheel beside the CPU torch of the build recipe fails on import, so a
    stand-in module is given when torchvision is missing or broken.
    """
    if src:
        sys.path.insert(0, src)
    tv_ok = importlib.util.find_spec("torchvision") is not None
    if tv_ok:
        try:
            import torchvision  # noqa: F401
        except Exception:
            tv_ok = False
    if not tv_ok:
        tv = types.ModuleType("torchvision")
        tv.models = types.ModuleType("torchvision.models")  # type: ignore[attr-defined]
        tv.models.__getattr__ = lambda name: None  # type: ignore[attr-defined]
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.models"] = tv.models  # type: ignore[attr-defined]
    try:
        import kbmod.search as kbs
        from kbmod.configuration import SearchConfiguration
        from kbmod.core.image_stack_py import ImageStackPy
        from kbmod.run_search import SearchRunner
        from kbmod.trajectory_utils import match_trajectory_sets, predict_pixel_locations
        from kbmod.work_unit import WorkUnit
    except ImportError as exc:
        raise SystemExit(f"cannot import KBMOD ({exc}): build it as shared/kbmod-build.md "
                         "says and put its src folder on PYTHONPATH (or --kbmod-src)") from exc
    _quiet_kbmod_logs()
    return types.SimpleNamespace(
        WorkUnit=WorkUnit, SearchRunner=SearchRunner, SearchConfiguration=SearchConfiguration,
        ImageStackPy=ImageStackPy, StackSearch=kbs.StackSearch,
        predict_pixel_locations=predict_pixel_locations, Trajectory=kbs.Trajectory,
        match_trajectory_sets=match_trajectory_sets)


class _Collect(logging.Handler):
    """Keeps the distinct warnings KBMOD logs (what it complains about in a WorkUnit)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"{record.name}: {record.getMessage()}"
        if "without GPU" not in msg and msg not in self.seen:  # CPU build: expected
            self.seen.append(msg)


KBMOD_LOG = _Collect()


def _quiet_kbmod_logs() -> None:
    """Route KBMOD's loggers' warnings to :data:`KBMOD_LOG` instead of the terminal."""
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] == "kbmod":
            lg = logging.getLogger(name)
            lg.handlers, lg.propagate = [KBMOD_LOG], False
            lg.setLevel(logging.WARNING)


def _compact(notes: list[str]) -> list[str]:
    """Notes that differ only in their numbers shown once, with how many there are."""
    groups: dict[str, list[str]] = {}
    for n in notes:
        groups.setdefault(re.sub(r"\d+(\.\d+)?(e[+-]?\d+)?", "#", n), []).append(n)
    return [g[0] + (f"  (and {len(g) - 1} more like it)" if len(g) > 1 else "")
            for g in groups.values()]


def _tag_since(first: int, tag: str) -> None:
    """Prefix what KBMOD logged since entry ``first`` of :data:`KBMOD_LOG` with ``tag``."""
    KBMOD_LOG.seen[first:] = [f"[{tag}] {m}" for m in KBMOD_LOG.seen[first:]]


def default_movers(n: int) -> tuple[tuple[float, float, float], ...]:
    """``n`` movers ``(vx, vy, flux)`` (px/frame, e- per frame).

    Fluxes are spread geometrically over 250–2,500 e-; the speed classes cycle slow, fast,
    slow, medium (half of the movers slow), each class cycling through its directions, so
    every class spans the flux range.

    Parameters
    ----------
    n
        Number of movers.

    Returns
    -------
    tuple of (vx, vy, flux)
    """
    fluxes = np.geomspace(250.0, 2500.0, n) if n > 1 else np.array([1000.0])
    pools = {"slow": SLOW, "fast": FAST, "medium": MEDIUM}
    used = dict.fromkeys(pools, 0)
    out = []
    for k in range(n):
        cls = ("slow", "fast", "slow", "medium")[k % 4]
        vx, vy = pools[cls][used[cls] % len(pools[cls])]
        used[cls] += 1
        out.append((float(vx), float(vy), round(float(fluxes[k]), 1)))
    return tuple(out)


def _sim_key(cfg: SimConfig) -> str:
    """A short name of a simulation setting (its folder in the work folder)."""
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    return f"{cfg.size}px-{cfg.n_science}f-{len(cfg.movers)}m-s{cfg.seed}-{digest[:8]}"


def ensure_night(work: Path, cfg: SimConfig, fresh: bool) -> Path:
    """Simulate the night into ``work/night-KEY`` unless it is there already.

    Parameters
    ----------
    work
        The work folder.
    cfg
        The simulation setting.
    fresh
        Simulate anew even when the night exists.

    Returns
    -------
    Path
        The night folder ``ROOT/DATE``.
    """
    root = work / f"night-{_sim_key(cfg)}"
    night = root / cfg.date
    if fresh and root.exists():
        shutil.rmtree(root)
    if (night / "truth" / "truth.json").exists():
        _say("reusing the simulated night %s", night)
        return night
    if root.exists():
        shutil.rmtree(root)  # an interrupted simulation
    t0 = time.perf_counter()
    simulate_night(root, cfg)
    _say("simulated %s in %.0f s", night, time.perf_counter() - t0)
    return night


def _astep_command() -> str:
    """The ``astep-dask`` console script of the environment this Python runs in."""
    beside = Path(sys.executable).parent / "astep-dask"
    if beside.exists():
        return str(beside)
    found = shutil.which("astep-dask")
    if not found:
        raise SystemExit("no astep-dask console script beside this Python nor on PATH: "
                         "pip install -e . in this environment")
    return found


def run_pipeline(night: Path, out: Path, config: str | None, fresh: bool) -> Path:
    """Calibrate the night and write its KBMOD export with the installed console script.

    Parameters
    ----------
    night
        The night folder.
    out
        The output root (``--out``).
    config
        Our settings file (TOML), or None.
    fresh
        Remove an earlier output first (else a complete one is reused).

    Returns
    -------
    Path
        The export's ``kbmod.json``.
    """
    kdir = out / night.name / "kbmod"
    summary = kdir / "kbmod.json"
    if fresh and out.exists():
        shutil.rmtree(out)
    if summary.exists() and json.loads(summary.read_text()).get("workunit"):
        _say("reusing our pipeline's output %s", out)
        return summary
    cmd = [_astep_command(), "calibrate", str(night), "--kbmod", "--out", str(out), "-q"]
    if config:
        cmd += ["--config", str(config)]
    _say("running %s", " ".join(cmd))
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / CODE_FILE).write_text(_code_state() + "\n")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"astep-dask calibrate exited {proc.returncode}")
    _say("pipeline: exit %d in %.0f s", proc.returncode, time.perf_counter() - t0)
    if not summary.exists():
        raise SystemExit(f"the pipeline wrote no {summary}")
    return summary


# --------------------------------------------------------------------------- WorkUnits


@dataclass
class Night:
    """Our WorkUnit and what ties it to the simulator's truth."""

    ours: Any  # kbmod WorkUnit
    stems: list[str]  # raw stems of the WorkUnit's images, in its order
    reference: str  # raw stem of the reference frame (the grid)
    tracks: list[dict]  # mover_tracks on the reference grid, in the WorkUnit's frames
    zeroed: np.ndarray  # days since the first image
    notes: list[str]  # what looked wrong in our WorkUnit


def load_ours(kb: types.SimpleNamespace, night: Path, summary_path: Path) -> Night:
    """Read our WorkUnit with KBMOD and tie its images to the raw frames by time.

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    night
        The simulated night folder.
    summary_path
        The export's ``kbmod.json``.

    Returns
    -------
    Night
    """
    summary = json.loads(summary_path.read_text())
    if summary.get("workunit_sharded"):
        raise SystemExit("our WorkUnit is sharded; this benchmark reads a single file")
    path = Path(summary.get("workunit") or summary_path.parent / f"{night.name}_WORKUNIT.fits")
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = len(KBMOD_LOG.seen)
        ours = kb.WorkUnit.from_fits(str(path), show_progress=False)
        _tag_since(first, "ours, read")
    notes += sorted({" ".join(f"[ours, read] {w.category.__name__}: {w.message}".split())
                     for w in caught})
    stack = ours.im_stack
    by_mjd = [(fr["mjd"], fr["stem"]) for fr in summary["frames"] if fr.get("mjd")]
    mjds = np.array([m for m, _ in by_mjd])
    stems = []
    for t in stack.times:
        i = int(np.argmin(np.abs(mjds - t)))
        if abs(mjds[i] - t) * 86400.0 > 1.0:
            raise SystemExit(f"WorkUnit image at MJD {t} matches no frame of kbmod.json")
        stems.append(by_mjd[i][1])
    zeroed = np.asarray(stack.zeroed_times, dtype=float)
    if np.any(np.diff(zeroed) <= 0):
        notes.append("images not in increasing time order")
    if ours.wcs is None:
        notes.append("no global WCS")
    if not ours.reprojected:
        notes.append("REPRJCTD is false")
    tracks = mover_tracks(night, stems, summary["reference"])
    shapes = {tuple(np.shape(p)) for p in stack.psfs}
    if shapes == {(1, 1)}:
        notes.append("no PSF kernels (1×1 identity)")
    _say("our WorkUnit: %d images %dx%d, reference %s", stack.num_times, stack.width,
             stack.height, summary["reference"])
    return Night(ours, stems, summary["reference"], tracks, zeroed, notes)


def _true_psf(sigma: float) -> np.ndarray:
    """The true PSF as a kernel: a pixel-integrated Gaussian of σ ``sigma`` on an odd square
    reaching ceil(4σ) from its centre, summing to 1."""
    stamp, _, _ = psf_stamp(0.0, 0.0, sigma, half=int(np.ceil(4 * sigma)))
    return (stamp / stamp.sum()).astype(np.float32)


def _data_noise(night: Path, stem: str, truth: Any, ft: dict[str, np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """The photon and read noise of a simulated raw frame, in e- of sky (the flat taken
    out), and the pixels the ideal calibration knows to be bad (a cosmic ray, a warm
    pixel, saturation): the raw ADU less the bias (and the overscan's offset), times the
    gain, less the frame's expected electrons (flat × model + dark) and its cosmic rays.
    ``ft`` is the frame's truth (``load_frame_truth``)."""
    cfg = truth.config
    n = cfg.size
    with fits.open(night / f"{cfg.date}-CAMS" / f"{stem}.fits") as hdul:
        raw = hdul[0].data.astype(np.float64)
    offset = float(np.median(raw[:, n:]) - cfg.bias_level) if raw.shape[1] > n else 0.0
    flat = truth.flat.astype(np.float64)
    dark = truth.dark_rate * cfg.science_exptime
    expected = flat * ft["model"].astype(np.float64) + dark + ft["cr"]
    bad = (ft["cr"] > 0) | ft["saturated"]
    if truth.warm is not None and np.ndim(truth.warm) == 2:
        expected = expected + truth.warm
        bad |= truth.warm > 0
    noise = (raw[:, :n] - truth.bias - offset) * cfg.gain - expected
    return noise / flat, bad


def build_ideal(kb: types.SimpleNamespace, night: Path, nt: Night, config: Any,
                seed: int | None) -> Any:
    """The ideal WorkUnit: the movers alone plus photon and read noise, on our grid.

    With ``seed`` None (``--ideal-noise data``, the default) the noise is the simulated
    raw frames' own (:func:`_data_noise`), moved onto the reference grid by the nearest
    whole pixel (so it stays white; the movers are drawn at their true sub-pixel places,
    within half a pixel of the noise they saw: a PSF-sized filter's noise there is ~95 %
    the same), the pixels a perfect calibration knows to be bad masked: the comparison
    then measures what our calibration and subtraction lose, not a second draw of the
    noise. With a seed, an independent draw of the same variance (the figures before).

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    night
        The simulated night folder.
    nt
        Our WorkUnit and its ties to the truth (:func:`load_ours`).
    config
        The ``SearchConfiguration`` the WorkUnit carries.
    seed
        Seed of the ideal frames' noise; None: the raw frames' own noise.

    Returns
    -------
    kbmod WorkUnit
        SCI (movers + noise), VAR (the true variance), no mask (but pixels without light:
        response < :data:`DEAD_FLAT`), the true PSF per frame, our
        times, global and per-image WCS and observatory.
    """
    truth = load_truth(night)
    cfg = truth.config
    frames = {fr["file"].removesuffix(".fits"): fr for fr in truth.frames}
    ref = np.array(frames[nt.reference]["offset"])
    flat = truth.flat.astype(np.float64)
    dark = truth.dark_rate.astype(np.float64) * cfg.science_exptime
    shape = (nt.ours.im_stack.height, nt.ours.im_stack.width)
    if shape != flat.shape:
        raise SystemExit(f"our grid {shape} differs from the raw frames' {flat.shape}")
    rng = np.random.default_rng(seed if seed is not None else 0)
    sci, var, psfs = [], [], []
    for i, stem in enumerate(nt.stems):
        sigma = float(frames[stem].get("psf_sigma", cfg.psf_sigma))  # the frame's seeing
        psfs.append(_true_psf(sigma))
        ft = load_frame_truth(night, stem)
        model = ft["model"].astype(np.float64)
        v = (flat * model + dark + cfg.read_noise**2) / flat**2  # on the frame's own grid
        shift = np.array(frames[stem]["offset"]) - ref  # frame = reference grid + shift
        img = np.zeros(shape)
        for k, tr in enumerate(nt.tracks):
            x, y = tr["positions"][i]
            add_sources(img, [x], [y], [cfg.movers[k][2]], sigma)
        if seed is None:
            noise, bad = _data_noise(night, stem, truth, ft)
            dx, dy = (int(np.rint(c)) for c in shift)
            v = shifted(v, dy, dx, np.nan)
            img += shifted(noise, dy, dx, np.nan)
            blind = shifted((flat < DEAD_FLAT) | bad, dy, dx, True) | ~np.isfinite(v)
        else:
            v = ndimage.shift(v, (-shift[1], -shift[0]), order=1, mode="nearest")
            img += rng.standard_normal(shape) * np.sqrt(v)
            blind = ndimage.shift((flat < DEAD_FLAT).astype(float), (-shift[1], -shift[0]),
                                  order=1, mode="nearest") > 0
        img[blind], v[blind] = np.nan, np.nan  # no light: no information, infinite variance
        sci.append(img.astype(np.float32))
        var.append(v.astype(np.float32))
    ours = nt.ours
    stack = kb.ImageStackPy(np.array(ours.im_stack.times), sci, var, psfs=psfs)
    first = len(KBMOD_LOG.seen)
    wu = kb.WorkUnit(stack, config, wcs=ours.wcs,
                     per_image_wcs=list(ours.org_img_meta["per_image_wcs"]),
                     reprojected=ours.reprojected, reprojection_frame=ours.reprojection_frame,
                     observatory=ours.observatory)
    _tag_since(first, "ideal, built")
    return wu


# --------------------------------------------------------------------------- search


def _px_per_day(cadence_s: float) -> float:
    """px/day of a speed of 1 px per frame at ``cadence_s``."""
    return 86400.0 / cadence_s


def search_config(kb: types.SimpleNamespace, n_frames: int, cadence_s: float) -> Any:
    """The one ``SearchConfiguration`` of both searches (see the module docstring).

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    n_frames
        Images in the WorkUnit (``num_obs`` is half of them).
    cadence_s
        Seconds between frames (the grid is in px/frame, converted to px/day).

    Returns
    -------
    kbmod.configuration.SearchConfiguration
    """
    k = _px_per_day(cadence_s)
    steps = round(2 * GRID_MAX / GRID_STEP) + 1
    c = kb.SearchConfiguration()
    c.set("generator_config", {
        "name": "VelocityGridSearch",
        "vx_steps": steps, "min_vx": -GRID_MAX * k, "max_vx": GRID_MAX * k,
        "vy_steps": steps, "min_vy": -GRID_MAX * k, "max_vy": GRID_MAX * k,
    })
    c.set("lh_level", SEARCH_LH)
    c.set("num_obs", max(2, n_frames // 2))
    c.set("cpu_only", True)
    c.set("compute_ra_dec", False)
    c.set("save_config", False)
    c.set("result_filename", None)
    return c


def _grid_velocities(cadence_s: float) -> np.ndarray:
    """The search grid's velocities (px/day), shape (n, 2)."""
    k = _px_per_day(cadence_s)
    axis = np.linspace(-GRID_MAX, GRID_MAX, round(2 * GRID_MAX / GRID_STEP) + 1) * k
    vx, vy = np.meshgrid(axis, axis)
    return np.column_stack([vx.ravel(), vy.ravel()])


RESULT_COLUMNS = ("x", "y", "vx", "vy", "likelihood", "flux", "obs_count")


def run_search(kb: types.SimpleNamespace, wu: Any, config: Any, side: str
               ) -> dict[str, np.ndarray]:
    """KBMOD's search of one WorkUnit.

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    wu
        The KBMOD WorkUnit; its ``config`` is replaced by a copy of ``config``.
    config
        The ``SearchConfiguration``.
    side
        'ideal' or 'ours': tags what KBMOD warns of in :data:`KBMOD_LOG`.

    Returns
    -------
    dict
        The results' columns :data:`RESULT_COLUMNS` as arrays, likelihood descending, and
        ``seconds`` (the search's wall time).
    """
    import copy

    wu.config = copy.deepcopy(config)  # run_search adjusts num_obs in place
    t0 = time.perf_counter()
    _quiet_kbmod_logs()
    first = len(KBMOD_LOG.seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = kb.SearchRunner().run_search_from_work_unit(wu)
    for w in caught:
        msg = " ".join(f"{w.category.__name__}: {w.message}".split())
        if msg not in KBMOD_LOG.seen:
            KBMOD_LOG.seen.append(msg)
    _tag_since(first, f"{side}, search")
    out = {c: np.asarray(res[c], dtype=float) for c in RESULT_COLUMNS} if len(res) else {
        c: np.zeros(0) for c in RESULT_COLUMNS}
    order = np.argsort(-out["likelihood"])
    out = {c: v[order] for c, v in out.items()}
    out["seconds"] = np.array(time.perf_counter() - t0)
    return out


def _ends(kb: types.SimpleNamespace, res: dict[str, np.ndarray], t_last: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (n, 2) of results at the first and at the last frame."""
    t = np.array([0.0, t_last])
    px = kb.predict_pixel_locations(t, res["x"], res["vx"], centered=False, as_int=False)
    py = kb.predict_pixel_locations(t, res["y"], res["vy"], centered=False, as_int=False)
    px, py = np.asarray(px).reshape(-1, 2), np.asarray(py).reshape(-1, 2)
    return np.column_stack([px[:, 0], py[:, 0]]), np.column_stack([px[:, 1], py[:, 1]])


def _track_hits(start: np.ndarray, end: np.ndarray, p0: np.ndarray, p1: np.ndarray
               ) -> np.ndarray:
    """Which of the tracks ``(start, end)`` (n, 2 each) are within :data:`MATCH_PX` of
    ``p0`` at the first frame and of ``p1`` at the last."""
    return ((np.hypot(*(start - p0).T) <= MATCH_PX) & (np.hypot(*(end - p1).T) <= MATCH_PX))


def match_movers(kb: types.SimpleNamespace, res: dict[str, np.ndarray], tracks: list[dict],
                 t_last: float) -> tuple[np.ndarray, np.ndarray]:
    """Each mover's best result by the track rule.

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    res
        A search's results (:func:`run_search`).
    tracks
        The movers (:func:`~astep_dask.testing.simulate.mover_tracks`).
    t_last
        The last frame's time, days after the first.

    Returns
    -------
    (lh, matched)
        Per mover, the likelihood of its highest-likelihood matching result (NaN: none);
        per result, whether it matches any mover.
    """
    n = res["x"].size
    matched = np.zeros(n, bool)
    lh = np.full(len(tracks), np.nan)
    if n == 0:
        return lh, matched
    start, end = _ends(kb, res, t_last)
    for k, tr in enumerate(tracks):
        hit = _track_hits(start, end, tr["positions"][0], tr["positions"][-1])
        matched |= hit
        if hit.any():
            lh[k] = res["likelihood"][hit].max()
    return lh, matched


def unmatched_in(kb: types.SimpleNamespace, res: dict[str, np.ndarray], mask: np.ndarray,
                 other: dict[str, np.ndarray], t_last: float) -> np.ndarray:
    """Of the results ``res[mask]``, which match no result of ``other`` by the track rule.

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    res, other
        Two searches' results (:func:`run_search`).
    mask
        Which results of ``res`` to test.
    t_last
        The last frame's time, days after the first.

    Returns
    -------
    numpy.ndarray
        Boolean over all of ``res``: selected and matching no result of ``other``.
    """
    out = np.zeros(res["x"].size, bool)
    if not mask.any():
        return out
    s, e = _ends(kb, res, t_last)
    if other["x"].size == 0:
        out[mask] = True
        return out
    os_, oe = _ends(kb, other, t_last)
    for i in np.flatnonzero(mask):
        out[i] = not _track_hits(os_, oe, s[i], e[i]).any()
    return out


def sidelobes(res: dict[str, np.ndarray], sel: np.ndarray, movers: np.ndarray,
              zeroed: np.ndarray, frames: int = 3) -> np.ndarray:
    """Which mover each selected result is a side-lobe of.

    A side-lobe is a result whose track passes within :data:`MATCH_PX` of a mover's
    position at the same time in ≥ ``frames`` frames: the mover found at a neighbouring
    velocity or start, which KBMOD's duplicate filters left.

    Parameters
    ----------
    res
        A search's results (:func:`run_search`).
    sel
        Which results to test (boolean).
    movers
        The movers' positions, shape (movers, frames, 2).
    zeroed
        The frames' times, days after the first.
    frames
        Frames of overlap that make a side-lobe.

    Returns
    -------
    numpy.ndarray
        Per result, the mover's index, or -1 (none, or not selected).
    """
    out = np.full(res["x"].size, -1)
    if not movers.size:
        return out
    for i in np.flatnonzero(sel):
        xs = res["x"][i] + res["vx"][i] * zeroed
        ys = res["y"][i] + res["vy"][i] * zeroed
        near = np.hypot(xs[None, :] - movers[..., 0], ys[None, :] - movers[..., 1]) <= MATCH_PX
        hits = near.sum(axis=1)
        if hits.max() >= frames:
            out[i] = int(np.argmax(hits))
    return out


def _reference_stars(night: Path, reference: str) -> np.ndarray:
    """The simulated stars (x, y, e-) on the reference frame's grid."""
    truth = load_truth(night)
    ref = next(fr["offset"] for fr in truth.frames
               if fr["file"].removesuffix(".fits") == reference)
    return truth.stars + np.array([ref[0], ref[1], 0.0])


def _brightest_star(stars: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                   radius: float = 4.0) -> tuple[float, float]:
    """The brightest star within ``radius`` px of a track: (e-, distance px); (0, NaN)
    when there is none."""
    d = np.hypot(stars[:, None, 0] - xs[None, :], stars[:, None, 1] - ys[None, :]).min(1)
    near = np.flatnonzero(d <= radius)
    if not near.size:
        return 0.0, float("nan")
    j = near[np.argmax(stars[near, 2])]
    return float(stars[j, 2]), float(d[j])


def _star_note(stars: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> str:
    """:func:`_brightest_star` as a note."""
    flux, d = _brightest_star(stars, xs, ys)
    return f" (star of {flux:.0f} e- at {d:.1f} px)" if flux else " (no star within 4 px)"


def kbmod_matcher(kb: types.SimpleNamespace, res: dict[str, np.ndarray] | None,
                  tracks: list[dict], t_last: float) -> int | None:
    """How many movers KBMOD's own ``match_trajectory_sets`` matches among the results ≥
    :data:`FOUND_LH` (a cross-check of the per-end-point rule).

    Parameters
    ----------
    kb
        From :func:`import_kbmod`.
    res
        A search's results (:func:`run_search`), or None (not searched).
    tracks
        The movers (``mover_tracks``).
    t_last
        The last frame's time, days after the first.

    Returns
    -------
    int or None
        Movers matched (mean first/last-frame distance < :data:`MATCH_PX`, one to one).
    """
    if res is None:
        return None
    strong = res["likelihood"] >= FOUND_LH
    if not strong.any():
        return 0
    base = [kb.Trajectory(x=int(x), y=int(y), vx=float(vx), vy=float(vy))
            for x, y, vx, vy in zip(res["x"][strong], res["y"][strong], res["vx"][strong],
                                    res["vy"][strong], strict=True)]
    query = [kb.Trajectory(x=round(float(tr["positions"][0][0])),
                           y=round(float(tr["positions"][0][1])),
                           vx=float(tr["v"][0]), vy=float(tr["v"][1])) for tr in tracks]
    idx = kb.match_trajectory_sets(query, base, MATCH_PX, times=[0.0, t_last])
    return int(np.sum(np.asarray(idx) >= 0))


def _code_state() -> str:
    """The commit of this checkout and how many files under astep_dask/ differ from it."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--",
                                "astep_dask"], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{sha}" + (f" + {len(dirty)} changed files under astep_dask/" if dirty else "")


# --------------------------------------------------------------------------- calibration


def _stack_search(kb: types.SimpleNamespace, wu: Any) -> Any:
    """A KBMOD ``StackSearch`` (its psi/phi images) of a WorkUnit, to evaluate given
    trajectories."""
    st = wu.im_stack
    return kb.StackSearch(st.sci, st.var, st.psfs, list(np.asarray(st.zeroed_times, float)),
                          -1)


def forced_lh(search: Any, trajs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KBMOD's likelihood of given trajectories, evaluated directly (no sigma-G).

    Parameters
    ----------
    search
        A KBMOD ``StackSearch`` (:func:`_stack_search`).
    trajs
        Shape (n, 4): start x, y (rounded to the pixel) and vx, vy in px/day.

    Returns
    -------
    (lh, obs_count)
        Per trajectory: KBMOD's likelihood Σpsi / sqrt(Σphi) and the frames it used.
    """
    lh = np.empty(len(trajs))
    nobs = np.empty(len(trajs), int)
    for i, (x, y, vx, vy) in enumerate(trajs):
        t = search.search_linear_trajectory(round(float(x)), round(float(y)), float(vx),
                                            float(vy), False)
        lh[i], nobs[i] = t.lh, t.obs_count
    return lh, nobs


def _mover_positions(tracks: list[dict]) -> np.ndarray:
    """The movers' positions, shape (movers, frames, 2)."""
    return np.array([tr["positions"] for tr in tracks]).reshape(len(tracks), -1, 2)


def random_trajectories(rng: np.random.Generator, n: int, shape: tuple[int, int],
                        zeroed: np.ndarray, velocities: np.ndarray, movers: np.ndarray,
                        margin: float = 12.0, avoid: float = 15.0) -> np.ndarray:
    """Random trajectories without a mover.

    Parameters
    ----------
    rng
        Random generator.
    n
        How many.
    shape
        (rows, columns) of the frames.
    zeroed
        The frames' times, days after the first.
    velocities
        The velocities to draw from (px/day), shape (m, 2).
    movers
        The movers' positions, shape (movers, frames, 2).
    margin
        Every position stays this far inside the frame, px.
    avoid
        Every position stays this far from every mover at the same frame, px.

    Returns
    -------
    numpy.ndarray
        Shape (n, 4): start x, y (whole pixels), vx, vy (px/day).
    """
    out: list[np.ndarray] = []
    ny, nx = shape
    while sum(len(o) for o in out) < n:
        m = 4 * n
        v = velocities[rng.integers(0, len(velocities), m)]
        x0, y0 = rng.uniform(0, nx, m), rng.uniform(0, ny, m)
        xs = x0[:, None] + v[:, :1] * zeroed[None, :]
        ys = y0[:, None] + v[:, 1:] * zeroed[None, :]
        ok = ((xs.min(1) >= margin) & (xs.max(1) <= nx - 1 - margin)
              & (ys.min(1) >= margin) & (ys.max(1) <= ny - 1 - margin))
        if movers.size:
            d = np.hypot(xs[:, None, :] - movers[None, :, :, 0],
                         ys[:, None, :] - movers[None, :, :, 1])
            ok &= d.min(axis=(1, 2)) >= avoid
        out.append(np.column_stack([np.round(x0), np.round(y0), v])[ok])
    return np.concatenate(out)[:n]


def blank_positions(rng: np.random.Generator, night: Path, nt: Night, n: int,
                    half: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random pixels of blank sky on the reference grid.

    Blank: under 1 e- of (noiseless) star light anywhere within ``half`` px (the stars
    drawn with 1.5 times the reference frame's PSF σ, to keep clear of their wings in the
    difference frames), ≥ 12 px from every mover's track and ≥ ``half + 8`` px from the
    edges.

    Parameters
    ----------
    rng
        Random generator.
    night
        The simulated night folder.
    nt
        Our WorkUnit and its ties to the truth.
    n
        Pixels per frame.
    half
        Half-width of the PSF kernels, px.

    Returns
    -------
    list of (rows, columns)
        One pair of index arrays per frame.
    """
    truth = load_truth(night)
    cfg = truth.config
    fr = next(fr for fr in truth.frames if fr["file"].removesuffix(".fits") == nt.reference)
    ref = np.array(fr["offset"])
    shape = (nt.ours.im_stack.height, nt.ours.im_stack.width)
    stars = np.zeros(shape)
    add_sources(stars, truth.stars[:, 0] + ref[0], truth.stars[:, 1] + ref[1],
                truth.stars[:, 2], 1.5 * float(fr.get("psf_sigma", cfg.psf_sigma)))
    blank = ndimage.maximum_filter(stars, size=2 * half + 1) < 1.0
    near = np.zeros(shape, bool)
    for tr in nt.tracks:
        for x, y in tr["positions"]:
            ix, iy = round(float(x)), round(float(y))
            near[max(iy - 12, 0): iy + 13, max(ix - 12, 0): ix + 13] = True
    blank &= ~near
    edge = half + 8
    blank[:edge], blank[-edge:], blank[:, :edge], blank[:, -edge:] = False, False, False, False
    ys, xs = np.nonzero(blank)
    out = []
    for _ in nt.stems:
        pick = rng.choice(ys.size, size=min(n, ys.size), replace=False)
        out.append((ys[pick], xs[pick]))
    return out


def track_flux(wu: Any, tracks: list[dict]) -> np.ndarray:
    """Each mover's flux in a WorkUnit's frames, as a fraction of its true flux.

    PSF photometry at the true positions: per frame, a pixel-integrated Gaussian at the
    mover's sub-pixel position, of the σ of that frame's PSF kernel (from its second
    moment, less the pixel's 1/12 px²), weighted by 1/VAR; frames combined with their
    weights (Σ psi / Σ phi), masked pixels skipped. 1 for a mover the frames keep whole.

    Parameters
    ----------
    wu
        A KBMOD WorkUnit.
    tracks
        The movers (``mover_tracks``, on the WorkUnit's grid, in its frames).

    Returns
    -------
    numpy.ndarray
        Per mover, the fraction of its flux in the frames (NaN: no usable pixel).
    """
    st = wu.im_stack
    psi = np.zeros(len(tracks))
    phi = np.zeros(len(tracks))
    for i in range(st.num_times):
        p = np.asarray(st.psfs[i], dtype=float)
        p = p / p.sum()
        yy, xx = np.mgrid[: p.shape[0], : p.shape[1]]
        cy, cx = np.sum(p * yy), np.sum(p * xx)
        m2 = 0.5 * np.sum(p * ((yy - cy) ** 2 + (xx - cx) ** 2))
        sigma = float(np.sqrt(max(m2 - 1.0 / 12.0, 0.09)))
        sci, var = st.sci[i], st.var[i]
        for k, tr in enumerate(tracks):
            x, y = tr["positions"][i]
            stamp, ys, xs = psf_stamp(x, y, sigma, sci.shape, half=int(np.ceil(4 * sigma)))
            s = np.asarray(sci[np.ix_(ys, xs)], dtype=float)
            v = np.asarray(var[np.ix_(ys, xs)], dtype=float)
            ok = np.isfinite(s) & np.isfinite(v) & (v > 0)
            w = np.where(ok, stamp / np.where(ok, v, 1.0), 0.0)
            psi[k] += np.sum(w * np.where(ok, s, 0.0))
            phi[k] += np.sum(w * stamp)
    flux = np.array([tr["flux"] for tr in tracks])
    with np.errstate(invalid="ignore", divide="ignore"):
        return psi / phi / flux


def matched_filter_snr(wu: Any, positions: list[tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The blank-sky matched filter of a WorkUnit's frames.

    Parameters
    ----------
    wu
        A KBMOD WorkUnit.
    positions
        Per frame, (rows, columns) of the pixels (:func:`blank_positions`).

    Returns
    -------
    (snr, pixel)
        psi / sqrt(phi) at each position, with psi = Σ P·sci/var and phi = Σ P²/var over
        the frame's PSF kernel P (pixels without a value skipped); and sci / sqrt(var) at
        each position's own pixel.
    """
    snr, pix = [], []
    st = wu.im_stack
    for i, (ys, xs) in enumerate(positions):
        p = np.asarray(st.psfs[i], dtype=float)
        hy, hx = p.shape[0] // 2, p.shape[1] // 2
        dy, dx = np.mgrid[-hy: hy + 1, -hx: hx + 1]
        sci = np.asarray(st.sci[i], dtype=float)
        var = np.asarray(st.var[i], dtype=float)
        s = sci[ys[:, None, None] + dy, xs[:, None, None] + dx]
        v = var[ys[:, None, None] + dy, xs[:, None, None] + dx]
        ok = np.isfinite(s) & np.isfinite(v) & (v > 0)
        w = np.where(ok, p / np.where(ok, v, 1.0), 0.0)
        psi = np.sum(w * np.where(ok, s, 0.0), axis=(1, 2))
        phi = np.sum(w * p, axis=(1, 2))
        good = phi > 0
        snr.append(psi[good] / np.sqrt(phi[good]))
        c = sci[ys, xs] / np.sqrt(var[ys, xs])
        pix.append(c[np.isfinite(c)])
    return np.concatenate(snr), np.concatenate(pix)


def _robust_std(a: np.ndarray) -> float:
    """1.4826 × the median absolute deviation."""
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a)))) if a.size else float("nan")


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".1f") -> str:
    """A number, or '-' for NaN."""
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


def _completeness(mask_ideal: np.ndarray, mask_ours: np.ndarray, sel: np.ndarray
                 ) -> tuple[int, int]:
    """(ours found, ideal found) among the movers ``sel``."""
    base = mask_ideal & sel
    return int((mask_ours & base).sum()), int(base.sum())


def _ideal_cache_key(nt: Night, sim: SimConfig, seed: int | None, config: Any) -> str:
    """What the ideal search's results depend on: the simulation, our grid and times, the
    noise seed and the search settings."""
    st = nt.ours.im_stack
    blob = json.dumps({
        "sim": asdict(sim), "reference": nt.reference, "stems": nt.stems,
        "times": [round(float(t), 9) for t in st.times], "shape": [st.height, st.width],
        "seed": seed, "ideal": IDEAL_VERSION, "generator": config["generator_config"],
        "lh": config["lh_level"],
        "num_obs": config["num_obs"], "wcs": str(nt.ours.wcs),
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); returns the exit status (0 always
    when it ran: the acceptance lines say PASS or FAIL)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=None, help="frame side, px (1024)")
    ap.add_argument("--frames", type=int, default=20, help="science frames (20)")
    ap.add_argument("--movers", type=int, default=None, help="number of movers (24)")
    ap.add_argument("--seed", type=int, default=1, help="simulation seed (1)")
    ap.add_argument("--seeing-scatter", type=float, default=0.0,
                    help="frame-to-frame seeing: σ of ln(PSF σ) (0: steady, as issue 31)")
    ap.add_argument("--ideal-noise", choices=("data", "independent"), default="data",
                    help="the ideal frames' noise: the raw frames' own (data, default) or "
                         "an independent draw of the same variance (independent)")
    ap.add_argument("--ideal-seed", type=int, default=None,
                    help="seed of the independent draw (1000 + --seed)")
    ap.add_argument("--work", default="/tmp/yield", help="work folder (/tmp/yield)")
    ap.add_argument("--config", default=None, help="our settings file (TOML)")
    ap.add_argument("--label", default=None,
                    help="name of this run's outputs (baseline; quick with --quick)")
    ap.add_argument("--only", choices=("ours", "ideal"), default=None,
                    help="search only one side (the ideal's cached results are used)")
    ap.add_argument("--quick", action="store_true", help="256², 8 movers: a smoke run")
    ap.add_argument("--fresh", action="store_true",
                    help="simulate, calibrate and search anew")
    ap.add_argument("--kbmod-src", default=os.environ.get("KBMOD_SRC"),
                    help="KBMOD's src folder (else as PYTHONPATH has it)")
    args = ap.parse_args(argv)
    size = args.size or (256 if args.quick else 1024)
    n_movers = args.movers if args.movers is not None else (8 if args.quick else 24)
    label = args.label or ("quick" if args.quick else "baseline")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kb = import_kbmod(args.kbmod_src)
    timings: dict[str, float] = {}

    sim = SimConfig(size=size, n_science=args.frames, cadence_s=100.0, psf_sigma=1.06,
                    movers=default_movers(n_movers), wcs_center=WCS_CENTER, seed=args.seed,
                    seeing_scatter=args.seeing_scatter)
    t0 = time.perf_counter()
    night = ensure_night(work, sim, args.fresh)
    timings["simulate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_dir = work / f"out-{_sim_key(sim)}-{label}"
    summary = run_pipeline(night, out_dir, args.config, args.fresh)
    code_file = out_dir / CODE_FILE
    code = code_file.read_text().strip() if code_file.exists() else "unknown"
    timings["pipeline"] = time.perf_counter() - t0
    nt = load_ours(kb, night, summary)
    n_img = nt.ours.im_stack.num_times
    config = search_config(kb, n_img, sim.cadence_s)
    t_last = float(nt.zeroed[-1])
    noise_seed = None if args.ideal_noise == "data" else (
        args.ideal_seed if args.ideal_seed is not None else 1000 + args.seed)

    t0 = time.perf_counter()
    ideal = build_ideal(kb, night, nt, config, noise_seed)
    timings["build_ideal"] = time.perf_counter() - t0

    cache = work / f"ideal-{_ideal_cache_key(nt, sim, noise_seed, config)}.npz"
    res: dict[str, dict[str, np.ndarray] | None] = {"ideal": None, "ours": None}
    if cache.exists() and not args.fresh:
        with np.load(cache) as z:
            res["ideal"] = {k: z[k] for k in z}
        _say("reusing the ideal search's results %s", cache)
    elif args.only != "ours":
        _say("searching the ideal WorkUnit (%d velocities)",
                 len(_grid_velocities(sim.cadence_s)))
        res["ideal"] = run_search(kb, ideal, config, "ideal")
        timings["search_ideal"] = float(res["ideal"]["seconds"])
        np.savez(cache, **res["ideal"])
    if args.only != "ideal":
        _say("searching our WorkUnit")
        res["ours"] = run_search(kb, nt.ours, config, "ours")
        timings["search_ours"] = float(res["ours"]["seconds"])

    # Likelihood of the true tracks, and the noise-only calibration, on both.
    truth_trajs = np.array([[*tr["positions"][0], *tr["v"]] for tr in nt.tracks]
                           ).reshape(-1, 4)
    rng = np.random.default_rng(args.seed + 7)
    shape = (nt.ours.im_stack.height, nt.ours.im_stack.width)
    grid = _grid_velocities(sim.cadence_s)
    randoms = random_trajectories(rng, N_RANDOM, shape, nt.zeroed, grid,
                                  _mover_positions(nt.tracks))
    slow_grid = grid[np.hypot(grid[:, 0], grid[:, 1]) <= SLOW_PX_DAY]
    randoms_slow = random_trajectories(rng, N_RANDOM // 2, shape, nt.zeroed, slow_grid,
                                       _mover_positions(nt.tracks))
    half = max(max(np.shape(p)) for p in nt.ours.im_stack.psfs) // 2
    blanks = blank_positions(rng, night, nt, BLANK_PER_FRAME, max(half, 5))
    calib: dict[str, dict[str, float]] = {}
    _say("noise calibration: %d random trajectories, %d blank-sky positions per frame",
        len(randoms), BLANK_PER_FRAME)
    forced: dict[str, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for side, wu in (("ideal", ideal), ("ours", nt.ours)):
        ss = _stack_search(kb, wu)
        forced[side], _ = forced_lh(ss, truth_trajs)
        kept[side] = track_flux(wu, nt.tracks)
        lh, nobs = forced_lh(ss, randoms)
        good = nobs >= config["num_obs"]
        lh = lh[good]
        lh_slow, nobs_slow = forced_lh(ss, randoms_slow)
        lh_slow = lh_slow[nobs_slow >= config["num_obs"]]
        snr, pix = matched_filter_snr(wu, blanks)
        calib[side] = {
            "random_slow_n": int(lh_slow.size), "random_slow_mean": float(np.mean(lh_slow)),
            "random_slow_std": float(np.std(lh_slow)),
            "random_n": int(lh.size), "random_mean": float(np.mean(lh)),
            "random_std": float(np.std(lh)), "random_robust_std": _robust_std(lh),
            "random_max": float(np.max(lh)), "blank_n": int(snr.size),
            "blank_mean": float(np.mean(snr)), "blank_std": float(np.std(snr)),
            "blank_robust_std": _robust_std(snr), "pixel_std": float(np.std(pix)),
        }
        del ss
    timings["calibration"] = time.perf_counter() - t0

    # Per mover.
    tracks = nt.tracks
    flux = np.array([tr["flux"] for tr in tracks])
    speed = np.array([float(np.hypot(*tr["v"])) for tr in tracks])
    lh_ideal = lh_ours = np.full(len(tracks), np.nan)
    matched_ideal = matched_ours = np.zeros(0, bool)
    if res["ideal"] is not None:
        lh_ideal, matched_ideal = match_movers(kb, res["ideal"], tracks, t_last)
    if res["ours"] is not None:
        lh_ours, matched_ours = match_movers(kb, res["ours"], tracks, t_last)
    found_ideal = np.nan_to_num(lh_ideal, nan=-1) >= FOUND_LH
    found_ours = np.nan_to_num(lh_ours, nan=-1) >= FOUND_LH
    ratio = lh_ours / lh_ideal
    slow = speed <= SLOW_PX_DAY

    print(f"\n=== yield: {label} — {night}, {n_img} frames {shape[1]}x{shape[0]}, "
          f"{len(tracks)} movers; search: {len(_grid_velocities(sim.cadence_s))} velocities, "
          f"lh_level {SEARCH_LH:g}, num_obs {config['num_obs']}, found at lh ≥ {FOUND_LH:g}")
    print(f"pipeline code: {code}; settings: {args.config or 'defaults'}; ideal noise: "
          + ("the raw frames' own" if noise_seed is None else f"seed {noise_seed}"))
    print(f"{'k':>3} {'flux':>7} {'px/day':>7} {'class':>5} {'SNR':>6} {'ideal':>7} "
          f"{'ours':>7} {'ratio':>6} {'I':>2} {'O':>2} {'f.ideal':>8} {'f.ours':>7} "
          f"{'kept':>5}")
    for k, tr in enumerate(tracks):
        print(f"{k:3d} {flux[k]:7.0f} {speed[k]:7.0f} {'slow' if slow[k] else 'fast':>5} "
              f"{tr['ideal']:6.1f} {_fmt(lh_ideal[k]):>7} {_fmt(lh_ours[k]):>7} "
              f"{_fmt(ratio[k], '.3f'):>6} {'Y' if found_ideal[k] else '.':>2} "
              f"{'Y' if found_ours[k] else '.':>2} {_fmt(forced['ideal'][k]):>8} "
              f"{_fmt(forced['ours'][k]):>7} {_fmt(kept['ours'][k], '.2f'):>5}")
    print("(SNR: the truth's matched-filter SNR; ideal/ours: search likelihood of the best "
          "matching result;\n I/O: found at ≥ 10; f.*: likelihood of the true track "
          "evaluated directly, no sigma-G;\n kept: the flux PSF photometry finds at the true "
          "positions in our frames / the true flux, ±1/SNR)")

    kept_summary = {
        "ours_slow": float(np.nanmedian(kept["ours"][slow])) if slow.any() else None,
        "ours_fast": float(np.nanmedian(kept["ours"][~slow])) if (~slow).any() else None,
        "ideal_all": float(np.nanmedian(kept["ideal"])),
    }
    ks, kf = kept_summary["ours_slow"], kept_summary["ours_fast"]
    print(f"flux kept at the true positions (median): ours slow {_fmt(ks, '.3f')}, fast "
          f"{_fmt(kf, '.3f')}; ideal {kept_summary['ideal_all']:.3f} (a check of the "
          f"photometry: 1)")
    both = res["ideal"] is not None and res["ours"] is not None
    out: dict[str, Any] = {
        "label": label, "night": str(night), "config_file": args.config, "code": code,
        "ideal_noise_seed": noise_seed, "sim": asdict(sim),
        "search": {"generator": config["generator_config"], "lh_level": SEARCH_LH,
                   "num_obs": config["num_obs"], "found_lh": FOUND_LH,
                   "match_px": MATCH_PX},
        "workunit_notes": nt.notes, "timings_s": timings, "calibration": calib,
        "flux_kept": kept_summary,
        "movers": [{"k": k, "flux": float(flux[k]), "speed_px_day": float(speed[k]),
                    "truth_snr": float(tracks[k]["ideal"]),
                    "lh_ideal": None if np.isnan(lh_ideal[k]) else float(lh_ideal[k]),
                    "lh_ours": None if np.isnan(lh_ours[k]) else float(lh_ours[k]),
                    "forced_ideal": float(forced["ideal"][k]),
                    "kept_ours": float(kept["ours"][k]), "kept_ideal": float(kept["ideal"][k]),
                    "forced_ours": float(forced["ours"][k])} for k in range(len(tracks))],
    }
    acceptance: dict[str, dict[str, Any]] = {}
    if both:
        print("\ncompleteness ours / ideal (movers the ideal finds at ≥ 10):")
        comp: dict[str, list[int]] = {}
        for lo, hi in itertools.pairwise(FLUX_BINS):
            sel = (flux >= lo) & (flux < hi if hi < FLUX_BINS[-1] else flux <= hi)
            comp[f"flux {lo:.0f}-{hi:.0f}"] = list(_completeness(found_ideal, found_ours, sel))
        comp[f"slow ≤ {SLOW_PX_DAY:.0f} px/day"] = list(
            _completeness(found_ideal, found_ours, slow))
        comp["fast"] = list(_completeness(found_ideal, found_ours, ~slow))
        comp["all"] = list(_completeness(found_ideal, found_ours, np.ones_like(slow)))
        for name, (a, b) in comp.items():
            print(f"  {name:<22} {a:3d} / {b:3d}  {_fmt(100.0 * a / b if b else np.nan):>5} %")
        ratio_sel = np.isfinite(ratio) & found_ideal
        med = float(np.median(ratio[ratio_sel])) if ratio_sel.any() else float("nan")
        fr = forced["ours"] / forced["ideal"]
        fsel = found_ideal & (forced["ideal"] > 0)
        med_forced = float(np.median(fr[fsel])) if fsel.any() else float("nan")
        print(f"median likelihood ratio ours / ideal: {_fmt(med, '.3f')} over {ratio_sel.sum()} "
              f"movers both searches return (ideal ≥ 10); true tracks evaluated directly: "
              f"{_fmt(med_forced, '.3f')}")
        kbm = {side: kbmod_matcher(kb, res[side], tracks, t_last) for side in res}
        print(f"cross-check, KBMOD's match_trajectory_sets (mean of the first- and last-frame "
              f"distances < {MATCH_PX:g} px, one to one) on results ≥ 10: movers matched: "
              f"ideal {kbm['ideal']}, ours {kbm['ours']}")
        ro, ri = res["ours"], res["ideal"]
        strong = ro["likelihood"] >= FOUND_LH
        unmatched = unmatched_in(kb, ro, strong & ~matched_ours, ri, t_last)
        mpos = _mover_positions(tracks)
        stars = _reference_stars(night, nt.reference)
        lobe = sidelobes(ro, unmatched, mpos, nt.zeroed)
        false = unmatched & (lobe < 0)
        ideal_unmatched = (ri["likelihood"] >= FOUND_LH) & ~matched_ideal
        ideal_lobe = sidelobes(ri, ideal_unmatched, mpos, nt.zeroed)
        print(f"false detections (ours ≥ 10, matching no mover and no ideal result, not a "
              f"mover's side-lobe): {int(false.sum())}")
        print(f"  ours ≥ 10 matching no mover and no ideal result: {int(unmatched.sum())}, "
              f"of which side-lobes {int((lobe >= 0).sum())}; ≥ 10 matching no mover: ours "
              f"{int((strong & ~matched_ours).sum())}, ideal {int(ideal_unmatched.sum())} "
              f"(side-lobes {int((ideal_lobe >= 0).sum())})")
        for i in np.flatnonzero(unmatched)[:20]:
            xs = ro["x"][i] + ro["vx"][i] * nt.zeroed
            ys = ro["y"][i] + ro["vy"][i] * nt.zeroed
            dmin = float(np.min(np.hypot(xs[None, :] - mpos[..., 0], ys[None, :] - mpos[..., 1]))
                         ) if mpos.size else float("nan")
            what = (f"side-lobe of mover {lobe[i]}" if lobe[i] >= 0
                    else "FALSE" + _star_note(stars, xs, ys))
            print(f"    x {ro['x'][i]:5.0f} y {ro['y'][i]:5.0f} vx {ro['vx'][i]:7.1f} "
                  f"vy {ro['vy'][i]:7.1f} lh {ro['likelihood'][i]:6.1f} "
                  f"obs {ro['obs_count'][i]:3.0f}  nearest mover {dmin:6.1f} px  {what}")
        static = false & (np.hypot(ro["vx"], ro["vy"]) == 0)
        at_star = np.zeros(false.size, bool)
        for i in np.flatnonzero(false):
            at_star[i] = _brightest_star(stars, ro["x"][i:i + 1], ro["y"][i:i + 1])[0] >= 1e5
        print(f"  of the {int(false.sum())} false: static (v = 0) {int(static.sum())}; starting "
              f"within 4 px of a star ≥ 1e5 e- {int((false & at_star).sum())}")
        out.update(completeness=comp, median_ratio=med, median_ratio_forced=med_forced,
                   kbmod_matcher=kbm, false_static=int(static.sum()),
                   false_at_bright_star=int((false & at_star).sum()),
                   false_detections=int(false.sum()),
                   false_list=[{c: float(ro[c][i]) for c in RESULT_COLUMNS}
                               for i in np.flatnonzero(false)],
                   unmatched_not_in_ideal=int(unmatched.sum()),
                   sidelobes_not_in_ideal=int((lobe >= 0).sum()),
                   ours_unmatched=int((strong & ~matched_ours).sum()),
                   ideal_unmatched=int(ideal_unmatched.sum()))
        a_all, b_all = comp["all"]
        a_slow, b_slow = comp[f"slow ≤ {SLOW_PX_DAY:.0f} px/day"]
        acceptance["median likelihood ratio ours/ideal ≥ 0.90"] = {
            "value": med, "pass": bool(med >= 0.90)}
        acceptance["completeness ≥ 95 % of the ideal's (all)"] = {
            "value": a_all / b_all if b_all else None,
            "pass": bool(b_all and a_all >= 0.95 * b_all)}
        acceptance["completeness ≥ 95 % of the ideal's (slow ≤ 500 px/day)"] = {
            "value": a_slow / b_slow if b_slow else None,
            "pass": bool(b_slow and a_slow >= 0.95 * b_slow)}
        acceptance["no false detection ≥ 10 that the ideal does not have "
                   "(side-lobes of movers aside)"] = {
            "value": int(false.sum()), "pass": bool(false.sum() == 0)}

    print("\nnoise-only calibration (KBMOD likelihood of random trajectories without a mover)"
          " and blank-sky matched filter (psi/sqrt(phi) per frame):")
    for side in ("ideal", "ours"):
        c = calib[side]
        print(f"  {side:<5} random: n {c['random_n']}, mean {c['random_mean']:+.3f}, "
              f"std {c['random_std']:.3f} (robust {c['random_robust_std']:.3f}, max "
              f"{c['random_max']:.1f});  blank sky: n {c['blank_n']}, mean "
              f"{c['blank_mean']:+.3f}, std {c['blank_std']:.3f} (robust "
              f"{c['blank_robust_std']:.3f}); per pixel sci/sqrt(var) std {c['pixel_std']:.3f}")
        print(f"        random, slow velocities only (≤ {SLOW_PX_DAY:.0f} px/day): n "
              f"{c['random_slow_n']}, mean {c['random_slow_mean']:+.3f}, std "
              f"{c['random_slow_std']:.3f}")
    c = calib["ours"]
    acceptance["random-trajectory likelihood std 1.00 ± 0.05 (ours)"] = {
        "value": c["random_std"], "pass": bool(abs(c["random_std"] - 1.0) <= 0.05)}
    acceptance["blank-sky matched-filter scatter 1.00 ± 0.03 (ours)"] = {
        "value": c["blank_std"], "pass": bool(abs(c["blank_std"] - 1.0) <= 0.03)}
    if nt.ours.im_stack.num_times != n_img:
        nt.notes.append(f"KBMOD's search left out {n_img - nt.ours.im_stack.num_times} of "
                        f"our images (max_masked_pixels)")
    nt.notes += [m for m in KBMOD_LOG.seen if m not in nt.notes]
    out["workunit_notes"] = nt.notes
    if nt.notes:
        print("\nwhat KBMOD said about the WorkUnits (reading and searching):")
        for note in _compact(nt.notes):
            print(f"  - {note}")
    print("\nacceptance (issue 31):")
    for name, a in acceptance.items():
        v = a["value"]
        vs = "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
        print(f"  {'PASS' if a['pass'] else 'FAIL'}  {name}: {vs}")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    out["acceptance"] = acceptance
    path = work / (f"yield-{label}.json" if not args.only else
                   f"yield-{label}-only-{args.only}.json")
    path.write_text(json.dumps(out, indent=1, default=float))
    print(f"summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
