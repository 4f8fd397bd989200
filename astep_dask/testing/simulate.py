"""Synthetic ASTEP nights with a known truth, for tests, benchmarks and the demo.

A night is written exactly as the camera and archive would: unsigned 16-bit FITS frames
(BZERO=32768) with realistic headers in ``ROOT/DATE/DATE-CAMS/`` (science frames and their
darks) and ``ROOT/DATE/DATE-CAMS_SKYFLAT/`` (twilight flats and their darks). The truth that
made them (bias, dark current, flat, hot and dead pixels, per-frame noiseless sky model,
drift, moving objects, cosmic rays) is written beside them in ``ROOT/DATE/truth/``.

The signal model, in electrons, of a pixel of a science frame is::

    raw_e = Poisson(flat * illum * model + dark_rate * t) + CR + N(0, rn)
    raw_adu = clip(round(raw_e / gain + bias), 0, 65535)

where ``model`` (sky + stars + movers, before the flat) is what a perfect calibration
recovers. Frames are generated one at a time, so memory does not grow with their number.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time
from scipy.special import erf

from astep_dask.errors import ArchiveError
from astep_dask.io.fitsio import atomic_write
from astep_dask.io.layout import FLAT_FOLDER, SCIENCE_FOLDER

__all__ = [
    "BAD_FILES",
    "BAD_FLATS",
    "BAD_FRAMES",
    "SimConfig",
    "Truth",
    "add_sources",
    "cosmic_rays",
    "load_frame_truth",
    "load_truth",
    "make_static_truth",
    "mover_tracks",
    "moving_light",
    "psf_stamp",
    "simulate_night",
    "wcs_cards",
    "write_bad_files",
]

TRUTH_FOLDER = "truth"


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Rates in electrons; positions in pixels; velocities in px/frame."""

    date: str = "2026-06-15"
    size: int = 256
    n_science: int = 12
    n_darks: int = 8  # per dark exposure time (science darks and flat darks)
    n_flats: int = 9
    n_bias: int = 0  # ASTEP takes none: darks carry the bias
    science_exptime: float = 90.0
    flat_exptime: float = 10.0
    extra_dark_exptimes: tuple[float, ...] = ()
    science_darks: bool = True  # darks of the science exposure (False: only the extra ones)
    filter: str = "RC"
    cadence_s: float = 100.0
    gain: float = 1.5  # e-/ADU
    read_noise: float = 10.0  # e-
    bias_level: float = 1000.0  # ADU
    overscan: int = 0  # columns of overscan on the right (0: none, like ASTEP)
    dark_rate: float = 0.02  # e-/s, typical pixel
    hot_fraction: float = 1e-3
    hot_rate: tuple[float, float] = (0.5, 50.0)  # e-/s, log-uniform
    sky: float = 600.0  # e- per science exposure, before the flat
    star_density: float = 4e-3  # per pixel
    star_flux: tuple[float, float] = (300.0, 3e6)  # e-, power law between
    psf_sigma: float = 1.3  # px
    # Seeing that changes from frame to frame: each science frame's PSF σ is psf_sigma
    # times exp(N(0, seeing_scatter)) (its own random stream; the frame's truth records
    # it as "psf_sigma"). 0: steady seeing, every frame at psf_sigma.
    seeing_scatter: float = 0.0
    drift: tuple[float, float] = (0.35, -0.22)  # px per frame (x, y)
    jitter: float = 0.05  # px rms on top of the drift
    movers: tuple[tuple[float, float, float], ...] = (
        (0.6, 0.25, 4000.0),
        (-0.4, 0.7, 3000.0),
        (0.08, -0.05, 5000.0),
    )  # (vx, vy, flux) in sky px/frame and e-
    # Cosmic-ray events per megapixel per science frame. Order of magnitude: ~1 muon per
    # cm² per minute at sea level, a few times more at Dome C's 3,200 m; 1 Mpx of 13.5 µm
    # pixels is 1.8 cm², so ~10-30 per Mpx in 90 s. Tests raise it for statistics.
    cr_per_mpix: float = 30.0
    # Warm pixels that the darks do not show (warm at the science frames' temperature):
    # each adds warm_charge (x 0.5-1.5) e- to every science frame; the bad-pixel mask
    # misses them, astroscrappy flags them frame after frame. 0: none.
    n_warm: int = 0
    warm_charge: float = 1500.0
    warm_corner: int = 0  # the last pixels of row 0 warm too (a warm corner, as seen)
    vignetting: float = 0.08  # fractional loss at the field corner
    prnu: float = 0.008  # pixel-to-pixel response scatter
    n_dust: int = 3
    dead_fraction: float = 3e-4
    dead_columns: int = 2
    flat_levels: tuple[float, float] = (28000.0, 14000.0)  # ADU, first and last flat
    flat_gradient: float = 0.015  # illumination gradient across the field (fraction)
    flat_stars: int = 15
    # The science sky's own gradient (moon, dawn), peak to peak along its direction
    # (fraction of the sky), whose direction turns ``sky_gradient_turns`` times over the
    # night from ``sky_gradient_angle`` (rad): at Dome C's polar night the moon circles the
    # field once a day. It is real sky: it is in each frame's truth model.
    sky_gradient: float = 0.0
    sky_gradient_turns: float = 1.0
    sky_gradient_angle: float = 0.3
    bad_files: bool = False
    # A celestial WCS in the science frames, following the drift (:func:`wcs_cards`): the
    # reference frame's centre (RA, Dec) in degrees; None (default): none.
    wcs_center: tuple[float, float] | None = None
    pixel_scale: float = 0.93  # arcsec per pixel (ASTEP's, about)
    # Header keywords left out of every frame (e.g. ("GAIN", "RDNOISE"): a camera that
    # writes none, whose night must measure them).
    omit_keys: tuple[str, ...] = ()
    seed: int = 1


@dataclass
class Truth:
    """The static truth of a simulated night (images are float32 arrays)."""

    config: SimConfig
    bias: np.ndarray  # ADU
    dark_rate: np.ndarray  # e-/s
    flat: np.ndarray  # response, median 1
    illumination: np.ndarray  # mean twilight illumination pattern of the flats, mean 1
    hot: np.ndarray  # bool
    dead: np.ndarray  # bool (dead pixels and dead columns)
    stars: np.ndarray  # (n, 3): x, y, flux in the sky (reference-frame) grid
    flat_stars: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))  # flat, x, y, e-
    warm: np.ndarray | None = None  # e- each warm pixel adds to a science frame (n_warm)
    frames: list[dict] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        """Write the truth as ``truth.npz`` and ``truth.json`` in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            folder / "truth.npz",
            bias=self.bias,
            dark_rate=self.dark_rate,
            flat=self.flat,
            illumination=self.illumination,
            hot=self.hot,
            dead=self.dead,
            stars=self.stars,
            flat_stars=self.flat_stars,
            **({"warm": self.warm} if self.warm is not None else {}),
        )
        meta = {"config": asdict(self.config), "frames": self.frames}
        (folder / "truth.json").write_text(json.dumps(meta, indent=1))


def load_truth(night_dir: str | Path) -> Truth:
    """Read back the truth of a simulated night (per-frame models stay on disk)."""
    folder = Path(night_dir) / TRUTH_FOLDER
    arrays = np.load(folder / "truth.npz")
    meta = json.loads((folder / "truth.json").read_text())
    cfg = meta["config"]
    cfg["movers"] = tuple(tuple(m) for m in cfg["movers"])
    for key in ("hot_rate", "star_flux", "drift", "flat_levels", "extra_dark_exptimes"):
        cfg[key] = tuple(cfg[key])
    cfg["omit_keys"] = tuple(cfg.get("omit_keys", ()))
    if cfg.get("wcs_center") is not None:
        cfg["wcs_center"] = tuple(cfg["wcs_center"])
    return Truth(config=SimConfig(**cfg), frames=meta["frames"], **{k: arrays[k] for k in arrays})


def load_frame_truth(night_dir: str | Path, stem: str) -> dict[str, np.ndarray]:
    """Noiseless model (e-, before the flat) and cosmic-ray image of one science frame."""
    with np.load(Path(night_dir) / TRUTH_FOLDER / f"{stem}.npz") as z:
        return {k: z[k] for k in z}


def psf_stamp(x: float, y: float, sigma: float, shape: tuple[int, int] | None = None,
              half: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-integrated circular Gaussian of σ ``sigma`` centred at ``(x, y)`` (pixel
    centres at integers): the fraction of a point source's flux that falls in each pixel.

    Parameters
    ----------
    x, y
        Centre, px (x the column, y the row).
    sigma
        Gaussian σ, px, of the PSF *before* pixel integration.
    shape
        ``(ny, nx)`` of the image the stamp is for: rows and columns outside it are
        dropped. None: no clipping.
    half
        Half-width of the stamp, px, around the pixel nearest to the centre; None:
        ``ceil(5σ)``, which holds all but ~1e-6 of the flux.

    Returns
    -------
    (stamp, ys, xs)
        ``stamp[j, i]`` is the flux fraction in pixel ``(ys[j], xs[i])``: it sums to ~1
        before clipping. Add a source with ``image[np.ix_(ys, xs)] += flux * stamp``.
    """
    half = int(np.ceil(5 * sigma)) if half is None else int(half)
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    xs = np.arange(ix - half, ix + half + 1)
    ys = np.arange(iy - half, iy + half + 1)
    s = sigma * np.sqrt(2.0)
    px = np.diff(0.5 * erf((np.append(xs - 0.5, xs[-1] + 0.5) - x) / s))
    py = np.diff(0.5 * erf((np.append(ys - 0.5, ys[-1] + 0.5) - y) / s))
    if shape is not None:
        okx, oky = (xs >= 0) & (xs < shape[1]), (ys >= 0) & (ys < shape[0])
        px, xs, py, ys = px[okx], xs[okx], py[oky], ys[oky]
    return np.outer(py, px), ys, xs


def mover_tracks(night_dir: str | Path, stems: list[str], reference: str) -> list[dict]:
    """The simulated movers as a registered export sees them.

    ``stems`` are the raw stems of the frames, in time order, and ``reference`` the raw
    stem of the frame whose grid they were registered onto. Per mover: ``k``, ``start``
    (x, y on that grid in the first frame), ``positions`` (in every frame), ``v`` (px/day)
    and ``per_frame`` (px per frame) of its sky motion, ``flux`` (e-) and ``ideal``: the
    matched-filter SNR of a perfect search, from the noiseless model, the true noise of
    the original pixels and the true PSF.
    """
    truth = load_truth(night_dir)
    cfg = truth.config
    frames = {fr["file"].removesuffix(".fits"): fr for fr in truth.frames}
    ref = np.array(frames[reference]["offset"])
    flat = truth.flat.astype(np.float64)
    dark = truth.dark_rate * cfg.science_exptime
    n = len(cfg.movers)
    pos: list[list[tuple[float, float]]] = [[] for _ in range(n)]
    ideal2 = np.zeros(n)
    for stem in stems:  # each frame's model read once
        model = load_frame_truth(night_dir, stem)["model"]
        var = (flat * model + dark + cfg.read_noise**2) / flat**2
        shift = np.array(frames[stem]["offset"]) - ref
        for k, (mx, my, _) in enumerate(frames[stem]["movers"]):
            pos[k].append((mx - shift[0], my - shift[1]))
            p, ys, xs = psf_stamp(mx, my, frames[stem].get("psf_sigma", cfg.psf_sigma),
                                  model.shape)
            ideal2[k] += np.sum((cfg.movers[k][2] * p) ** 2 / var[np.ix_(ys, xs)])
    tracks = []
    for k, (vx, vy, flux) in enumerate(cfg.movers):
        tracks.append({"k": k, "start": np.array(pos[k][0]), "positions": np.array(pos[k]),
                       "v": np.array([vx, vy]) * 86400.0 / cfg.cadence_s,
                       "per_frame": float(np.hypot(vx, vy)), "flux": flux,
                       "ideal": float(np.sqrt(ideal2[k]))})
    return tracks


def add_sources(image: np.ndarray, xs, ys, fluxes, sigma: float) -> None:
    """Add pixel-integrated Gaussian sources (:func:`psf_stamp`) to ``image`` in place
    (clipped at edges)."""
    half = int(np.ceil(5 * sigma))
    ny, nx = image.shape
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        if not (-half <= x < nx + half and -half <= y < ny + half):
            continue
        stamp, rows, cols = psf_stamp(x, y, sigma, (ny, nx), half)
        if rows.size == 0 or cols.size == 0:
            continue
        image[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] += f * stamp


def moving_light(movers, n_frames: int, size: int, sigma: float
                 ) -> tuple[np.ndarray, list[list[tuple[float, float]]]]:
    """The light of linear movers alone, frame by frame: ``movers`` are ``(x0, y0, vx, vy,
    flux)`` (px, px per frame, e- per frame). Returns the stack ``(frame, y, x)`` of
    pixel-integrated Gaussians of σ ``sigma`` and each mover's positions."""
    light = np.zeros((n_frames, size, size))
    tracks = []
    for x0, y0, vx, vy, flux in movers:
        pos = [(x0 + vx * i, y0 + vy * i) for i in range(n_frames)]
        for i, (x, y) in enumerate(pos):
            add_sources(light[i], [x], [y], [flux], sigma)
        tracks.append(pos)
    return light, tracks


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float = -1.5):
    """Fluxes with dN/dF ∝ F^slope between lo and hi."""
    a = slope + 1.0
    u = rng.random(n)
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def make_static_truth(cfg: SimConfig, rng: np.random.Generator) -> Truth:
    """Bias, dark current, flat (vignetting, dust, PRNU, dead pixels and columns), stars."""
    n = cfg.size
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    cx = cy = (n - 1) / 2.0
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * cx**2)
    flat = 1.0 - cfg.vignetting * r2
    for _ in range(cfg.n_dust):
        dx, dy = rng.uniform(0.1 * n, 0.9 * n, 2)
        radius = rng.uniform(0.02, 0.06) * n
        depth = rng.uniform(0.02, 0.05)
        r = np.hypot(xx - dx, yy - dy)
        flat *= 1.0 - depth * np.exp(-0.5 * ((r - radius) / (0.25 * radius)) ** 2)
    flat *= 1.0 + cfg.prnu * rng.standard_normal((n, n))
    dead = rng.random((n, n)) < cfg.dead_fraction
    flat[dead] *= rng.uniform(0.0, 0.4, dead.sum())
    cols = rng.choice(np.arange(n // 10, n - n // 10), cfg.dead_columns, replace=False)
    for c in cols:
        flat[:, c] *= rng.uniform(0.5, 0.7)
        dead[:, c] = True
    flat /= np.median(flat[~dead])

    bias = cfg.bias_level + 2.0 * np.sin(np.arange(n) / 7.0)[None, :] * np.ones((n, 1))
    dark_rate = np.full((n, n), cfg.dark_rate)
    hot = rng.random((n, n)) < cfg.hot_fraction
    lo, hi = np.log(cfg.hot_rate[0]), np.log(cfg.hot_rate[1])
    dark_rate[hot] = np.exp(rng.uniform(lo, hi, hot.sum()))

    n_stars = rng.poisson(cfg.star_density * n * n)
    stars = np.column_stack(
        [
            rng.uniform(-5, n + 5, n_stars),
            rng.uniform(-5, n + 5, n_stars),
            _power_law(rng, n_stars, *cfg.star_flux),
        ]
    )
    return Truth(
        config=cfg,
        bias=bias.astype(np.float32),
        dark_rate=dark_rate.astype(np.float32),
        flat=flat.astype(np.float32),
        illumination=np.ones((n, n), np.float32),
        hot=hot,
        dead=dead,
        stars=stars,
    )


def _warm_pixels(cfg: SimConfig, truth: Truth, rng: np.random.Generator) -> np.ndarray:
    """Charge (e- per science frame) of ``cfg.n_warm`` warm pixels, away from the edges
    and from the hot and dead pixels (which the mask flags anyway), and of the
    ``cfg.warm_corner`` last pixels of row 0; 0 elsewhere."""
    n = cfg.size
    free = ~(truth.hot | truth.dead)
    free[:4], free[-4:], free[:, :4], free[:, -4:] = False, False, False, False
    picks = rng.choice(np.flatnonzero(free), cfg.n_warm, replace=False)
    warm = np.zeros((n, n), np.float32)
    warm.flat[picks] = cfg.warm_charge * rng.uniform(0.5, 1.5, cfg.n_warm)
    if cfg.warm_corner:  # adjacent, on the frame's edge: a cosmic-ray track each frame
        warm[0, n - cfg.warm_corner:] = cfg.warm_charge * rng.uniform(0.5, 1.5,
                                                                      cfg.warm_corner)
    return warm


def _illumination(cfg: SimConfig, amplitude: float, angle: float) -> np.ndarray:
    """Linear twilight gradient across the field, mean 1."""
    n = cfg.size
    yy, xx = np.mgrid[0:n, 0:n] / max(n - 1, 1) - 0.5
    return 1.0 + amplitude * (np.cos(angle) * xx + np.sin(angle) * yy)


def cosmic_rays(shape: tuple[int, int], n_events: int, rng: np.random.Generator) -> np.ndarray:
    """Image of cosmic-ray charge (e-): short straight tracks and compact blobs."""
    ny, nx = shape
    cr = np.zeros(shape, np.float32)
    for _ in range(n_events):
        length = rng.integers(1, 7)
        angle = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        steps = np.linspace(0, length, 2 * length + 1)
        xs = np.clip((x0 + steps * np.cos(angle)).astype(int), 0, nx - 1)
        ys = np.clip((y0 + steps * np.sin(angle)).astype(int), 0, ny - 1)
        energy = rng.uniform(400, 6000)
        for x, y in set(zip(xs.tolist(), ys.tolist(), strict=True)):
            cr[y, x] += energy * rng.uniform(0.6, 1.4)
    return cr


def _to_adu(electrons: np.ndarray, bias: np.ndarray, cfg: SimConfig) -> np.ndarray:
    adu = np.rint(electrons / cfg.gain + bias)
    return np.clip(adu, 0, 65535).astype(np.uint16)


def _header(cfg: SimConfig, kind: str, exptime: float, mjd: float, extra: dict) -> fits.Header:
    h = fits.Header()
    t = Time(mjd, format="mjd", scale="utc")
    h["TELESCOP"] = ("ASTEP", "Antarctic Search for Transiting ExoPlanets")
    h["INSTRUME"] = ("ASTEP-CAM", "simulated camera")
    h["OBSERVAT"] = ("Concordia", "Dome C, Antarctica")
    h["OBJECT"] = ("SIMFIELD" if kind == "SCIENCE" else kind, "target")
    h["ACQTYPE"] = (kind, "acquisition type")
    h["IMAGETYP"] = ({"SCIENCE": "LIGHT", "SKYFLAT": "FLAT"}.get(kind, kind), "frame type")
    h["EXPTIME"] = (float(exptime), "[s] exposure time")
    h["FILTER"] = (cfg.filter, "filter")
    h["DATE-OBS"] = (t.isot, "UTC start of exposure")
    h["MJD-OBS"] = (float(mjd), "[d] MJD (UTC) start of exposure")
    h["GAIN"] = (cfg.gain, "[e-/ADU] detector gain")
    h["RDNOISE"] = (cfg.read_noise, "[e-] read noise")
    h["SATURATE"] = (65535.0, "[ADU] saturation level")
    h["CCD-TEMP"] = (-60.0, "[C] detector temperature")
    h["SIMULATD"] = (True, "frame made by astep_dask.testing")
    h["SIMSEED"] = (cfg.seed, "simulation seed")
    for key, value in extra.items():
        h[key] = value
    for key in cfg.omit_keys:
        h.remove(key, ignore_missing=True)
    return h


def wcs_cards(cfg: SimConfig, offset: tuple[float, float]) -> dict:
    """The celestial WCS of a science frame whose stars sit ``offset`` (x, y px) from the
    reference grid: the reference frame's centre (``cfg.wcs_center``) at its pixel there,
    north up, east left (TAN, CD matrix); empty without a centre."""
    if cfg.wcs_center is None:
        return {}
    c, d = (cfg.size + 1) / 2.0, cfg.pixel_scale / 3600.0  # FITS centre pixel, deg/px
    return {"WCSAXES": 2, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CUNIT1": "deg",
            "CUNIT2": "deg", "CRPIX1": c + float(offset[0]), "CRPIX2": c + float(offset[1]),
            "CRVAL1": float(cfg.wcs_center[0]), "CRVAL2": float(cfg.wcs_center[1]),
            "CD1_1": -d, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": d, "RADESYS": "ICRS"}


def _write_raw(path: Path, adu: np.ndarray, header: fits.Header, cfg: SimConfig,
               overscan: np.ndarray | None) -> None:
    n = cfg.size
    if overscan is not None:
        adu = np.hstack([adu, overscan])
        header["BIASSEC"] = (f"[{n + 1}:{n + cfg.overscan},1:{n}]", "overscan region")
        header["TRIMSEC"] = (f"[1:{n},1:{n}]", "data region")
        header["DATASEC"] = (f"[1:{n},1:{n}]", "data region")
    hdu = fits.PrimaryHDU(data=adu, header=header)
    atomic_write(fits.HDUList([hdu]), path, checksum=False)


class _Camera:
    """Turns electrons into raw files: noise, bias (and overscan), ADU, headers."""

    def __init__(self, cfg: SimConfig, truth: Truth, night: Path):
        self.cfg, self.truth, self.night = cfg, truth, night
        self.cams = night / f"{cfg.date}-{SCIENCE_FOLDER}"
        self.flats = night / f"{cfg.date}-{FLAT_FOLDER}"

    def expose(self, rng: np.random.Generator, signal_e: np.ndarray | None, exptime: float,
               extra_e: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        cfg, truth = self.cfg, self.truth
        mean = truth.dark_rate.astype(np.float64) * exptime
        if signal_e is not None:
            mean = mean + signal_e
        e = rng.poisson(mean).astype(np.float64)
        if extra_e is not None:
            e += extra_e
        e += rng.normal(0.0, cfg.read_noise, e.shape)
        offset = rng.normal(0.0, 3.0) if cfg.overscan else 0.0
        adu = _to_adu(e, truth.bias + offset, cfg)
        overscan = None
        if cfg.overscan:
            o = rng.normal(0.0, cfg.read_noise, (cfg.size, cfg.overscan))
            overscan = _to_adu(o, np.float64(cfg.bias_level + offset), cfg)
        return adu, overscan

    def write(self, folder: Path, name: str, kind: str, exptime: float, mjd: float,
              adu: np.ndarray, overscan: np.ndarray | None, extra: dict | None = None) -> Path:
        path = folder / name
        _write_raw(path, adu, _header(self.cfg, kind, exptime, mjd, extra or {}), self.cfg,
                   overscan)
        return path


def _name(date: str, mjd: float, kind: str) -> str:
    t = Time(mjd, format="mjd", scale="utc").strftime("%Y%m%dT%H%M%S")
    return f"ASTEP_{t}_{kind}.fits"


def _twilight(cfg: SimConfig, cam: _Camera, truth: Truth, rng_flat: np.random.Generator,
              rng_dark: np.random.Generator, rng_bias: np.random.Generator, t: float) -> None:
    """Write the twilight flats (sky fading through the series, each with its own
    illumination gradient and a few stars), then the flats' darks and any bias frames."""
    n = cfg.size
    illum_sum = np.zeros((n, n))
    flat_stars: list[list[float]] = []
    levels = np.geomspace(*cfg.flat_levels, max(cfg.n_flats, 1))
    for i in range(cfg.n_flats):
        amp = cfg.flat_gradient * rng_flat.uniform(0.8, 1.2)
        illum = _illumination(cfg, amp, angle=0.6 + rng_flat.normal(0, 0.1))
        illum_sum += illum
        level_e = (levels[i] - cfg.bias_level) * cfg.gain
        sky = level_e * illum
        stars = np.zeros((n, n))
        sx, sy = rng_flat.uniform(0, n, cfg.flat_stars), rng_flat.uniform(0, n, cfg.flat_stars)
        sf = _power_law(rng_flat, cfg.flat_stars, 2e4, 5e5)
        add_sources(stars, sx, sy, sf, cfg.psf_sigma * 1.5)
        flat_stars += [[i, x, y, f] for x, y, f in zip(sx, sy, sf, strict=True)]
        adu, osc = cam.expose(rng_flat, truth.flat * (sky + stars), cfg.flat_exptime)
        cam.write(cam.flats, _name(cfg.date, t, "SKYFLAT"), "SKYFLAT", cfg.flat_exptime, t, adu,
                  osc)
        t += (cfg.flat_exptime + 20) / 86400
    truth.illumination = (illum_sum / max(cfg.n_flats, 1)).astype(np.float32)
    truth.flat_stars = np.array(flat_stars, dtype=float).reshape(-1, 4)
    for _ in range(cfg.n_darks):
        adu, osc = cam.expose(rng_dark, None, cfg.flat_exptime)
        cam.write(cam.flats, _name(cfg.date, t, "DARK"), "DARK", cfg.flat_exptime, t, adu, osc)
        t += (cfg.flat_exptime + 5) / 86400
    for _ in range(cfg.n_bias):
        adu, osc = cam.expose(rng_bias, None, 0.0)
        cam.write(cam.cams, _name(cfg.date, t, "BIAS"), "BIAS", 0.0, t, adu, osc)
        t += 5 / 86400


def _science(cfg: SimConfig, cam: _Camera, truth: Truth, rng_sci: np.random.Generator,
             rng_cr: np.random.Generator, rng_mov: np.random.Generator, t: float,
             tfolder: Path) -> float:
    """Write the science frames (a tracked field drifting slowly, movers, cosmic rays) with
    each frame's truth; return the time after the last one."""
    n = cfg.size
    frames = []
    movers0 = rng_mov.uniform(0.2 * n, 0.8 * n, (len(cfg.movers), 2))
    seeing = np.full(cfg.n_science, cfg.psf_sigma)
    if cfg.seeing_scatter > 0:  # a stream of its own: steady nights stay as they were
        rng_see = np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(10)[9])
        seeing *= np.exp(rng_see.normal(0.0, cfg.seeing_scatter, cfg.n_science))
    for i in range(cfg.n_science):
        offset = np.array(cfg.drift) * i + (rng_sci.normal(0, cfg.jitter, 2) if i else 0.0)
        angle = cfg.sky_gradient_angle + 2 * np.pi * cfg.sky_gradient_turns * i / max(
            cfg.n_science, 1)
        model = cfg.sky * _illumination(cfg, cfg.sky_gradient, angle)
        add_sources(model, truth.stars[:, 0] + offset[0], truth.stars[:, 1] + offset[1],
                    truth.stars[:, 2], float(seeing[i]))
        mover_pos = []
        for (vx, vy, flux), (x0, y0) in zip(cfg.movers, movers0, strict=True):
            mx, my = x0 + vx * i + offset[0], y0 + vy * i + offset[1]
            add_sources(model, [mx], [my], [flux], float(seeing[i]))
            mover_pos.append([mx, my, flux])
        n_cr = rng_cr.poisson(cfg.cr_per_mpix * n * n / 1e6)
        cr = cosmic_rays((n, n), n_cr, rng_cr)
        extra = cr if truth.warm is None else cr + truth.warm
        adu, osc = cam.expose(rng_sci, truth.flat * model, cfg.science_exptime, extra_e=extra)
        name = _name(cfg.date, t, "SCIENCE")
        cam.write(cam.cams, name, "SCIENCE", cfg.science_exptime, t, adu, osc,
                  extra=wcs_cards(cfg, offset))
        stem = name.removesuffix(".fits")
        np.savez_compressed(tfolder / f"{stem}.npz", model=model.astype(np.float32), cr=cr,
                            saturated=adu >= 65535)
        frames.append({
            "file": name, "mjd": t, "offset": offset.tolist(), "movers": mover_pos,
            "n_cr": int(n_cr), "sky": cfg.sky, "psf_sigma": float(seeing[i]),
            "sky_gradient": [cfg.sky_gradient, float(angle)],
        })
        t += cfg.cadence_s / 86400
    truth.frames = frames
    return t


def simulate_night(root: str | Path, cfg: SimConfig | None = None) -> Path:
    """Write one synthetic night under ``root`` and return its night folder.

    Twilight flats and their darks (and bias frames, when asked) at 18:00 UTC, science
    frames from 18:30, then the science darks; each kind draws from its own random stream
    of ``cfg.seed``, so a night is the same on every machine. The truth is written to
    ``ROOT/DATE/truth/``; see :func:`load_truth`.

    Raises
    ------
    ArchiveError
        When ``ROOT/DATE`` already holds files: a second night written into it would mix
        with the first, and its truth would no longer describe the frames.
    """
    cfg = cfg or SimConfig()
    night = Path(root) / cfg.date
    if night.is_dir() and (n := sum(1 for p in night.rglob("*") if not p.is_dir())):
        raise ArchiveError(f"{night} already holds {n} files: simulating into it would mix "
                           "two nights; choose another ROOT or --date, or remove it first")
    seeds = np.random.SeedSequence(cfg.seed).spawn(8)
    rng_static, rng_dark, rng_flat, rng_sci, rng_cr, rng_bias, rng_bad, rng_mov = (
        np.random.default_rng(s) for s in seeds
    )
    truth = make_static_truth(cfg, rng_static)
    if cfg.n_warm or cfg.warm_corner:  # a stream of its own: the others stay as they were
        truth.warm = _warm_pixels(cfg, truth, np.random.default_rng(
            np.random.SeedSequence(cfg.seed).spawn(9)[8]))
    cam = _Camera(cfg, truth, night)
    start = Time(f"{cfg.date}T18:00:00", scale="utc").mjd
    tfolder = night / TRUTH_FOLDER
    tfolder.mkdir(parents=True, exist_ok=True)
    _twilight(cfg, cam, truth, rng_flat, rng_dark, rng_bias, start)
    science_start = start + 1800 / 86400
    t = _science(cfg, cam, truth, rng_sci, rng_cr, rng_mov, science_start, tfolder)
    for exptime in ((cfg.science_exptime,) if cfg.science_darks else ()) + tuple(
            cfg.extra_dark_exptimes):
        for _ in range(cfg.n_darks):
            adu, osc = cam.expose(rng_dark, None, exptime)
            cam.write(cam.cams, _name(cfg.date, t, "DARK"), "DARK", exptime, t, adu, osc)
            t += (exptime + 5) / 86400
    if cfg.bad_files:
        write_bad_files(cam, rng_bad, science_start)
    truth.save(tfolder)
    return night


BAD_FILES = {  # unusable from their headers: listed by the inventory
    "bad_empty_SCIENCE.fits": "empty file",
    "bad_truncated_SCIENCE.fits": "truncated",
    "bad_noexptime_SCIENCE.fits": "no EXPTIME",
    "bad_shape_SCIENCE.fits": "differs from the night's majority",
    "bad_notfits_SCIENCE.fits": "not a readable FITS image",
    "bad_nodate_SCIENCE.fits": "no DATE-OBS or MJD-OBS",
    "bad_unknown.fits": "unknown frame type",
    "bad_duplicate_SCIENCE.fits": "duplicate of ASTEP_",
}


BAD_FRAMES = {  # unusable from their pixels or the night's masters: fail at calibration
    "bad_allzero_SCIENCE.fits": "same value",
    "bad_nan_SCIENCE.fits": "all NaN",
    "bad_filter_SCIENCE.fits": "no master flat for filter 'V'",
}


BAD_FLATS = {"bad_saturated_SKYFLAT.fits": "near saturation"}  # rejected from the master flat


def write_bad_files(cam: _Camera, rng: np.random.Generator, mjd: float) -> None:
    """Add one broken file of each kind in :data:`BAD_FILES`, :data:`BAD_FRAMES` and
    :data:`BAD_FLATS`, and store two good science frames compressed (gzip and fpack),
    which must calibrate exactly like the plain files."""
    cfg, folder = cam.cfg, cam.cams
    t = cfg.science_exptime
    (folder / "bad_empty_SCIENCE.fits").write_bytes(b"")
    adu, _ = cam.expose(rng, np.full((cfg.size, cfg.size), cfg.sky), t)
    good = cam.write(folder, "bad_truncated_SCIENCE.fits", "SCIENCE", t, mjd - 0.01, adu, None)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    for name, key in (("bad_noexptime_SCIENCE.fits", "EXPTIME"),
                      ("bad_nodate_SCIENCE.fits", "DATE-OBS"),
                      ("bad_unknown.fits", "ACQTYPE")):
        path = cam.write(folder, name, "SCIENCE", t, mjd - 0.02, adu, None)
        with fits.open(path, mode="update") as hdul:
            del hdul[0].header[key]
            if key == "DATE-OBS":
                del hdul[0].header["MJD-OBS"]
            if key == "ACQTYPE":
                del hdul[0].header["IMAGETYP"]
    small = adu[: cfg.size // 2, : cfg.size // 2]
    cam.write(folder, "bad_shape_SCIENCE.fits", "SCIENCE", t, mjd - 0.03, small, None)
    (folder / "bad_notfits_SCIENCE.fits").write_text("this is not a FITS file\n" * 200)
    science = sorted(folder.glob("ASTEP_*_SCIENCE.fits"))
    (folder / "bad_duplicate_SCIENCE.fits").write_bytes(science[0].read_bytes())
    cam.write(folder, "bad_allzero_SCIENCE.fits", "SCIENCE", t, mjd - 0.04,
              np.zeros_like(adu), None)
    nan = fits.PrimaryHDU(np.full(adu.shape, np.nan, np.float32),
                          header=_header(cfg, "SCIENCE", t, mjd - 0.05, {}))
    atomic_write(fits.HDUList([nan]), folder / "bad_nan_SCIENCE.fits")
    cam.write(folder, "bad_filter_SCIENCE.fits", "SCIENCE", t, mjd - 0.06, adu, None,
              extra={"FILTER": "V"})
    sat = np.full(adu.shape, 65535, np.uint16)
    cam.write(cam.flats, "bad_saturated_SKYFLAT.fits", "SKYFLAT", cfg.flat_exptime,
              mjd - 0.07, sat, None)
    # Two good frames stored compressed, as archives sometimes hold them.
    gz, fz = science[-2], science[-1]
    with fits.open(gz) as hdul:
        hdul.writeto(gz.with_name(gz.name + ".gz"))
    with fits.open(fz) as hdul:
        comp = fits.CompImageHDU(hdul[0].data, header=hdul[0].header, compression_type="RICE_1")
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(fz.with_name(fz.name[:-5] + ".fits.fz"))
    gz.unlink()
    fz.unlink()
