"""One typed place for every setting of the pipeline.

Settings are grouped by the stage that reads them. Every stage receives the whole
:class:`Settings` object (or its own group), never loose literals. A TOML file with the
same table and key names overrides the defaults::

    [combine]
    sigma = 3.0
    [mask]
    hot_sigma = 5.0
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astep_dask.errors import SettingsError

__all__ = [
    "AstrometrySettings",
    "BackgroundSettings",
    "ClusterSettings",
    "CombineSettings",
    "CosmicSettings",
    "DetectorSettings",
    "FlatSettings",
    "IllumSettings",
    "KbmodSettings",
    "MaskSettings",
    "MasterSettings",
    "MatchSettings",
    "OutputSettings",
    "QaSettings",
    "ResumeSettings",
    "SearchSettings",
    "Settings",
    "SettingsError",
    "SiteSettings",
    "StarSettings",
    "TemplateSettings",
    "load_settings",
    "machine_cores",
    "parse_memory",
    "validate_group",
]


@dataclass(frozen=True)
class StarSettings:
    """How stars are found and measured."""

    psf_sigma: float = 1.5  # px, first guess: detection filter and centroid window
    nsigma: float = 5.0  # detection threshold on the PSF-smoothed frame
    max_stars: int = 400  # brightest kept
    box: int = 0  # half-size of the measuring box; 0: ceil(3.5 σ_w)
    min_width_ratio: float = 0.5  # narrower than this × the median width: not a star
    max_width_ratio: float = 1.5  # wider: a blend or a galaxy


@dataclass(frozen=True)
class MatchSettings:
    """How a frame's stars are matched to the reference's and a translation fitted."""

    n_bright: int = 60  # stars of each list that vote for the integer offset
    max_shift: float | None = None  # px; None: any offset
    match_radius: float = 1.5  # px, after applying the voted offset
    clip: float = 4.0  # rejection threshold (normalised residuals)
    floor: float = 0.01  # px, added in quadrature to every position error
    min_matches: int = 5


@dataclass(frozen=True)
class CombineSettings:
    """Robust combination of frames into a master."""

    method: str = "sigclip"  # "sigclip" (clipped mean) or "median"
    sigma_low: float = 3.0
    sigma_high: float = 3.0
    iterations: int = 3
    memory_budget_mb: float = 256.0  # MB for one strip of every frame and its working copies,
    # per worker thread
    min_frames: int = 3
    noise_clip: bool = True  # clip with the frames' Poisson + read noise (GAIN, RDNOISE)
    # Exposure times within max(exptime_rtol x t, exptime_atol s) of a group's shortest are
    # one exposure: flats or darks at 10.00 s and 10.01 s make one master (its EXPTIMES card
    # lists the times it holds), and a frame uses the dark of its group unscaled.
    exptime_rtol: float = 0.01
    exptime_atol: float = 0.05


@dataclass(frozen=True)
class MasterSettings:
    """Where masters may come from besides the night's own frames."""

    fallback: bool = False  # take a missing master from the nearest night's output
    reuse_foreign: bool = False  # reuse master files written by other tools


@dataclass(frozen=True)
class FlatSettings:
    """Sky-flat screening and normalisation."""

    central_fraction: float = 0.5  # side of the central box used for each flat's level
    level_row_step: int = 8  # ... of which every n-th row (a 2048² flat: 65k pixels)
    min_level_adu: float = 3000.0  # below this a flat has too little signal
    max_level_fraction: float = 0.8  # above this fraction of saturation it is rejected


@dataclass(frozen=True)
class IllumSettings:
    """The illumination correction ("night-sky flat"): the master flat divided by the
    large-scale pattern of the night's own flat-fielded, star-masked science sky."""

    enabled: bool = True
    min_frames: int = 20  # usable science frames needed; fewer: another night's or none
    max_frames: int = 200  # science frames read (evenly spread in time); 0: all
    row_step: int = 4  # every n-th row of a frame is read (the sky is smooth)
    block: int = 64  # px, side of a block of the sky grid
    star_sigma: float = 4.0  # star (and cosmic-ray) pixels: above the local sky by this
    star_grow: int = 3  # px by which star pixels are grown (halos)
    min_block_fraction: float = 0.2  # a block with fewer usable pixels is left out
    sky_ratio: float = 2.0  # frames whose sky rate is this far off the median: rejected
    gradient_sigma: float = 4.0  # own gradient off the night's by this many robust sigmas
    gradient_floor: float = 0.003  # ... and by at least this (peak to peak): rejected
    structure_factor: float = 3.0  # grid scatter above this x the median: clouds
    clip_sigma: float = 3.0  # per-block clipping over frames
    method: str = "poly"  # "poly" (2-D polynomial) or "smooth" (Gaussian on the grid)
    order: int = 2  # total degree of the polynomial
    smooth_blocks: float = 3.0  # Gaussian sigma, in blocks, of method "smooth"

    def __post_init__(self):
        validate_group("illum", self)  # types, ranges and words, as every group's
        if self.block < 4:
            raise SettingsError(f"[illum] block = {self.block}: must be >= 4")


@dataclass(frozen=True)
class MaskSettings:
    """Bad-pixel mask thresholds."""

    hot_sigma: float = 5.0  # dark excess over the robust level, in master-dark noise units
    dead_sigma: float = 5.0  # flat deficit relative to a smoothed flat, in flat noise units
    dead_floor: float = 0.05  # a deficit smaller than this fraction is never called dead
    smooth_box: int = 15  # box of the median filter that gives the smoothed flat
    column_sigma: float = 5.0  # column median deficit, in units of its own noise
    # A dead pixel (or column) is also BAD, unusable, when its response relative to the
    # smoothed flat is below this; above it the flat repairs it (noise in VAR): DEAD only.
    bad_response: float = 0.1


@dataclass(frozen=True)
class CosmicSettings:
    """Cosmic-ray detection with astroscrappy."""

    enabled: bool = True
    sigclip: float = 4.5
    sigfrac: float = 0.3
    objlim: float = 5.0
    niter: int = 4
    replace: bool = False  # keep astroscrappy's cleaned values in SCI
    protect_stars: bool = True  # unflag CR pixels that a PSF fit explains as star light
    # astroscrappy runs only on windows around groups of candidate pixels (0: whole frame);
    # candidates in 8-connected cells of this size (px) form one group.
    tile: int = 8
    reach: int = 4  # px around a group's candidates whose flags are kept (its core)
    margin: int = 10  # px of context around a core: covers astroscrappy's filter footprints
    candidate_sigma: float = 4.5  # candidate: excess over its 8 neighbours, in noise sigmas
    candidate_sharpness: float = 0.5  # ... and that excess over its excess above the sky
    openmp_threads: int = 1  # astroscrappy's OpenMP threads per calling thread (0: its own)
    # Warm pixels: flagged as cosmic rays in more than warm_fraction of a sample of the
    # night's science frames (warm_frames, spread in time; 0: no sample) and in at least
    # warm_min_count of them, they get the WARM bit in every frame's mask instead. A night
    # with fewer than warm_min_frames science frames gets no such sample (it would be a
    # large part of the night, read twice).
    warm_frames: int = 30
    warm_fraction: float = 0.05
    warm_min_count: int = 3
    warm_min_frames: int = 100


@dataclass(frozen=True)
class DetectorSettings:
    """Values normally read from the raw header. Gain and read noise: a frame's header
    wins, then these settings, then what the night's own frames measure (flat pairs,
    bias or dark pairs: :mod:`astep_dask.masters.detector`); None: not given."""

    gain: float | None = None  # e-/ADU, for frames without GAIN; None: measured
    read_noise: float | None = None  # e-, for frames without RDNOISE; None: measured
    saturation_adu: float = 65535.0  # raw level at and above which a pixel is saturated
    overscan: str = "auto"  # "auto" (BIASSEC/TRIMSEC headers), "none"


@dataclass(frozen=True)
class SiteSettings:
    """Where the telescope is, for frames whose header names no site (``SITELAT``/
    ``SITELONG``/``SITEELEV``, ``LATITUDE``/``LONGITUD``, ``OBSGEO-*``): the mid-exposure
    ``BJD_TDB``, ``CENTALT`` and ``AIRMASS`` of calibrated frames (:mod:`astep_dask.io.times`).
    Default: Concordia Station, Dome C, where ASTEP observes: 75°05'59" S, 123°19'56" E,
    3233 m (Wikipedia, "Concordia Station", infobox; the Italian programme PNRA gives
    75°06' S, 123°20' E, 3,233 m at www.polarnet.cnr.it); the KBMOD products' observatory
    when a frame records no site."""

    latitude: float = -75.099780  # deg, geodetic, north positive
    longitude: float = 123.332196  # deg, east positive
    elevation: float = 3233.0  # m above the WGS84 ellipsoid


@dataclass(frozen=True)
class OutputSettings:
    """How products are written."""

    compress: bool = False  # tile-compress SCI/VAR (quantised) and MASK (lossless)
    quantize_level: float = 16.0  # float quantisation step = pixel noise / this


@dataclass(frozen=True)
class ResumeSettings:
    """How a re-run decides which products it can keep (none of this changes a product,
    so it is in no provenance hash)."""

    # Check the data checksums of masters and calibrated frames (and that no byte is
    # missing) before a re-run trusts them. It reads each product whole; a damaged one is
    # remade and the run says so. (KBMOD files are always checked.)
    verify: bool = True


@dataclass(frozen=True)
class KbmodSettings:
    """The KBMOD export: background, stars, registration, products."""

    mesh: int = 64  # background mesh (px)
    bkg_sigma: float = 3.0  # clipping within a mesh
    bkg_iterations: int = 5
    bkg_filter: int = 3  # median filter of the mesh grid
    source_sigma: float = 4.0  # source exclusion threshold for the background
    source_grow: int = 4  # px by which excluded sources are grown
    psf_sigma_guess: float = 1.5  # px: detection filter and centroid window
    detect_sigma: float = 5.0  # star detection threshold
    max_stars: int = 400  # brightest stars kept per frame
    match_radius: float = 1.5  # px, star matching after the voted integer offset
    max_shift: float = 0.0  # px, largest offset searched; 0: any
    min_matches: int = 5  # fewer matched stars: the frame fails
    variance: str = "area"  # "area" (for matched filters, default) or "pixel"
    # Registration's interpolation (core.register): "overlap" (2 x 2 bilinear: widens the
    # PSF by up to 0.25 px², which costs a matched filter < 2 % of its SNR once VAR carries
    # FILTVARF) or "cubic" (Keys, 4 x 4 taps: no widening, but masks grow by 2 px: on the
    # test nights it lost more than it gained; for undersampled PSFs, sigma < 0.8 px)
    resampling: str = "overlap"
    reference: str = ""  # stem of the reference frame; "": chosen automatically
    stack_images: bool = True  # the night stack file holds image cubes (else table only)
    folder: str = "kbmod"  # sub-folder of the night's output folder
    # The WorkUnit is sharded (one file per frame, KBMOD's to_sharded_fits layout, in
    # kbmod/workunit/) when its images exceed this many MB; 0: always one file.
    workunit_shard_mb: float = 4096.0

    def background(self) -> BackgroundSettings:
        """The background estimator's settings (:class:`BackgroundSettings`)."""
        return BackgroundSettings(mesh=self.mesh, sigma=self.bkg_sigma,
                                  iterations=self.bkg_iterations, filter_size=self.bkg_filter,
                                  source_sigma=self.source_sigma, source_grow=self.source_grow)

    def stars(self) -> StarSettings:
        """The star finder's settings (:class:`StarSettings`)."""
        return StarSettings(psf_sigma=self.psf_sigma_guess, nsigma=self.detect_sigma,
                            max_stars=self.max_stars)

    def match(self) -> MatchSettings:
        """The offset fit's settings (:class:`MatchSettings`)."""
        return MatchSettings(match_radius=self.match_radius,
                             max_shift=self.max_shift or None, min_matches=self.min_matches)

    def digest(self) -> str:
        """Short stable hash of the settings that shape a frame's output (not the folder,
        nor what the stack file holds, nor the reference request, checked on its own)."""
        data = dataclasses.asdict(self)
        for key in ("folder", "stack_images", "reference", "workunit_shard_mb"):
            data.pop(key)
        text = json.dumps(sorted(data.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AstrometrySettings:
    """A WCS for frames that have none, which the KBMOD export needs for sky coordinates:
    a first guess from the pointing (header keywords, or these settings when set), refined
    by matching the reference frame's stars to a reference catalog (``--catalog``) and
    fitting a TAN WCS."""

    catalog: str = ""  # FITS or CSV table with RA, Dec (deg) and a magnitude; "": no fit
    ra: float = -1.0  # deg, field centre; < 0: from the header (RA, OBJCTRA, CRVAL1)
    dec: float = -100.0  # deg; < -90: from the header (DEC, OBJCTDEC, CRVAL2)
    pixel_scale: float = 0.0  # arcsec/px; 0: from the header (PIXSCALE, SECPIX), else 1.3
    rotation: float = 0.0  # deg: position angle of the frame's +y axis, north through east
    flip: bool = False  # True: east to the right (x grows eastwards) instead of the left
    search_radius: float = 30.0  # px: largest error of the first guess's pointing
    match_radius: float = 1.0  # px: final star-to-catalog matching radius
    max_stars: int = 200  # brightest catalog stars and frame stars used
    min_stars: int = 6  # fewer matched stars: no WCS

    def digest(self) -> str:
        """Short stable hash of the settings (and the catalog's name)."""
        text = json.dumps(sorted(dataclasses.asdict(self).items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TemplateSettings:
    """How the static-sky template and the difference frames are made."""

    enabled: bool = True  # False: the KBMOD files carry the sky-only science plane
    nights: int = 0  # 0: this night's frames (leave-one-out); N: the N nearest other nights
    max_frames: int = 200  # frames combined, evenly spread in time (0: all)
    sigma: float = 3.0  # clipping threshold, in each frame's own noise
    iterations: int = 3
    min_frames: int = 2  # fewer kept frames at a pixel: NO_DATA in the template
    grow: float = 1.5  # a pixel above the centre rejects its frame within this × PSF σ
    # A window of 1, 3, 7, ... consecutive frames whose matched-filter contrast against the
    # other frames is above this SNR holds a mover: its frames are left out of the template
    # at the mover's pixels, so a slow mover does not subtract itself. 0: off.
    mover_sigma: float = 4.0
    # A frame's template also leaves out the template frames taken within the time a mover
    # this slow (px/day) needs to move 2.5 PSF σ, each side: a slow mover too faint for
    # mover_sigma then keeps more of its light (on benchmarks/yield.py's night, 250-305 e-
    # movers at 483 px/day: 0.81/0.54 of their flux kept with 0, 0.89/0.68 with 400), but
    # the frames' templates then share noise, and KBMOD's likelihood, which takes frames as
    # independent, is over-dispersed (std on random trajectories 0.975 with 0, 1.055 with
    # 1000, 1.089 with 400). At least half of the template's frames stay; each difference
    # task reads those frames too. 0 (default): leave-one-out only. For faint slow movers,
    # a template from other nights (nights = N) is the cure.
    near_speed: float = 0.0
    # A faint slow mover is below mover_sigma in every window of frames at a pixel, but
    # summed along its track over the night it is seen: linear tracks up to track_reach
    # PSF σ long over the template's time span (:func:`~astep_dask.kbmod.template.
    # moving_tracks`) whose matched-filter SNR is above track_sigma have their frames left
    # out of the template along the track, as a run. The SNR counts the residual from a
    # centre that still holds part of the mover, so noise alone is below 1 σ on slow tracks
    # and 5 σ is rarely reached (false marks only leave frames out: a slightly noisier
    # template there). Only for a template of the night's own frames, and with
    # mover_sigma > 0 (it is the third pass of that rejection). 0: off. The work grows as
    # track_reach cubed.
    track_sigma: float = 5.0
    track_reach: float = 24.0
    saturation_halo: float = 2.0  # SUSPECT within this × PSF FWHM of a saturated pixel
    psf_match: bool = True  # match PSFs (False: frames and template as they are)
    # The template's PSF: "snr" (default) the width that maximises the night's summed
    # matched-filter SNR² (kbmod.kernels.template_target): frames of bad seeing are left
    # out of the template, which is convolved to their PSF instead of blurring every frame
    # to theirs; "widest": every frame and the template at the set's largest PSF variance.
    psf_target: str = "snr"
    residual_floor: float = 0.05  # model error of a static source, fraction of |template|
    # The difference frames' variance: the frame's Poisson term from the template (the
    # scene) rather than from each pixel's own value, whose noise biases KBMOD's
    # likelihood low (kbmod.difference.model_variance). False: the frame's VAR as it is.
    model_variance: bool = True
    # Bytes one combination task holds (kbmod.template.blocks: strips of rows, or square
    # tiles of a wide frame; at least the overlap's 3 x 3 blocks, ~1.2 GB for 200 frames
    # and the track search's overlap at PSF σ 1.1)
    memory_mb: float = 1024.0

    def digest(self, template: bool = False) -> str:
        """Short stable hash of everything that shapes the template and the differences;
        ``template``: of what shapes the template alone (not ``model_variance``, which
        only the difference frames use), so a change to that remakes the differences
        and keeps the template."""
        data = dataclasses.asdict(self)
        data.pop("memory_mb")
        if template:
            data.pop("model_variance")
        return hashlib.sha256(json.dumps(sorted(data.items())).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SearchSettings:
    """The first-look search: velocity grid, detection and products."""

    vx_min: float = -1200.0  # px/day on the reference grid
    vx_max: float = 1200.0
    vy_min: float = -1200.0
    vy_max: float = 1200.0
    v_step: float = 0.0  # px/day; 0: step_psf × PSF σ / time span of the night
    step_psf: float = 1.0
    min_speed: float = 0.0  # px/day: slower grid velocities are not searched
    threshold: float = 7.0  # SNR
    min_frames: int = 0  # frames left after outlier rejection; 0: half the night's frames
    outlier_sigma: float = 4.0  # per-frame flux rejection, in its own error
    outlier_fraction: float = 0.2  # relative flux variation allowed on top of the noise
    cluster_radius: float = 0.0  # px; 0: two PSF FWHM
    tile: int = 1024  # px, side of a tile of start positions
    memory_mb: float = 2000.0  # psi and phi of one tile (all frames, with margins) at most
    frame_start: int = 0  # search the frames from this one (time order) ...
    frame_count: int = 0  # ... this many of them (0: to the end): a part of a long night
    velocities_per_task: int = 0  # 0: about four tasks per worker thread and tile
    max_candidates: int = 1000  # rows of the CSV, highest SNR first
    stamps: int = 20  # PNG postage stamps of the best candidates
    stamp_size: int = 21  # px
    folder: str = "search"  # sub-folder of the export folder


@dataclass(frozen=True)
class QaSettings:
    """Measures and outlier thresholds of the per-night QA report."""

    mesh: int = 64  # px, sky background mesh
    psf_sigma_guess: float = 1.5  # px, star detection filter and centroid window
    detect_sigma: float = 5.0  # star detection threshold
    max_stars: int = 400  # brightest stars kept per frame
    min_snr: float = 20.0  # stars that give the PSF width and the flux ratios
    match_radius: float = 1.5  # px, star matching to the reference frame
    min_matches: int = 5  # fewer matched stars: no flux ratio for the frame
    cloud_drop: float = 0.3  # star flux below (1 - this) x the night's median: cloud
    sky_jump: float = 1.5  # sky off its neighbours' median by this factor: sky jump
    sky_window: int = 3  # neighbours on each side for the sky jump
    defocus_jump: float = 1.3  # FWHM at or above this x the night's median: defocus
    outlier_sigma: float = 5.0  # ... and above the median by this many robust sigmas
    trail_sigma: float = 3.0  # streak pixels: smoothed residual above this (sigma)
    trail_coverage: float = 0.5  # fraction of its path across the frame a streak covers
    trail_min_length: float = 0.25  # shortest streak, as a fraction of the frame's side
    trail_elongation: float = 2.5  # pieces of a streak: length / width at least this
    trail_scale: int = 512  # the streak search works on a frame binned to this side
    thumbnail: int = 800  # px, largest side of an image drawn in a figure

    def background(self) -> BackgroundSettings:
        """Settings of the sky background estimate (:class:`BackgroundSettings`)."""
        return BackgroundSettings(mesh=self.mesh)

    def stars(self) -> StarSettings:
        """Settings of the star finder (:class:`StarSettings`)."""
        return StarSettings(psf_sigma=self.psf_sigma_guess, nsigma=self.detect_sigma,
                            max_stars=self.max_stars)

    def match(self) -> MatchSettings:
        """Settings of the match to the reference frame (:class:`MatchSettings`)."""
        return MatchSettings(match_radius=self.match_radius, min_matches=self.min_matches)


@dataclass(frozen=True)
class ClusterSettings:
    """Where the work runs."""

    kind: str = "local"  # local, slurm, pbs
    scheduler: str | None = None
    # Local workers: threads of the command's own process (no start-up, masters held
    # once, nothing pickled) or, with processes = true, separate processes (a crash or a
    # leak stays in one worker, which its nanny restarts and whose frames are retried).
    # None of the three set: chosen from the machine (run.cluster.default_layout): threads
    # of one process up to 4 cores, processes of 2 threads above (measured on 16 cores).
    # See README, "Worker layout".
    # The counts are bounded here (_RANGES) and, against this machine or the batch job,
    # by run.cluster.check_layout before anything starts: a typo of 100000 workers must
    # not start until the node runs out of memory.
    processes: bool = False
    n_workers: int | None = None  # None: 1 in-process worker, or one process per core
    threads_per_worker: int = 0  # 0: the cores shared among the workers
    # Memory a local worker may use before dask spills, pauses and restarts it: "auto"
    # (the machine's memory shared among the workers), "none", or a size ("4 GiB").
    memory_limit: str = "auto"
    frames_in_flight: int = 0  # 0: two per worker thread; at most 8 per thread
    retries: int = 2  # extra attempts of a frame whose worker died
    # Seconds to reach a --scheduler and hear it answer as a dask scheduler: past this,
    # the address is reported as wrong (refused, unroutable, silent, not dask, TLS).
    connect_timeout: float = 10.0
    # Seconds a batch cluster (slurm, pbs) may take to start its first worker job; past
    # this the run stops and says what squeue/qstat said of the jobs. 0: wait for ever
    # (a driver that is itself a batch job then waits until its walltime).
    job_start_timeout: float = 1800.0
    # Dashboard of a cluster we start. "auto": a local cluster's on the loopback interface
    # (127.0.0.1:8787; tunnel to it with SSH, see deploy/README.md), none for a batch
    # cluster (slurm, pbs: an unattended job); "off": none; else the address, e.g.
    # "127.0.0.1:8787" to have a batch run's, ":8787" for every interface. Every user of
    # the machine can read a dashboard (task names, file paths, worker logs; it runs no
    # code). A busy port makes dask pick another.
    dashboard_address: str = "auto"
    # Clusters we start with worker processes or batch jobs talk TLS with credentials made
    # for the run (nobody else can connect and run code). false only to measure its cost.
    tls: bool = True
    # TOML/YAML file with ca, cert, key (PEM paths) to join a TLS --scheduler; None: the
    # dask configuration's distributed.comm.tls.* (if any).
    security: str | None = None
    min_jobs: int = 0  # dask-jobqueue adaptive scaling bounds
    max_jobs: int = 10


@dataclass(frozen=True)
class Settings:
    """Every setting of a run. Immutable; derive variants with :meth:`replace`."""

    combine: CombineSettings = field(default_factory=CombineSettings)
    masters: MasterSettings = field(default_factory=MasterSettings)
    flat: FlatSettings = field(default_factory=FlatSettings)
    illum: IllumSettings = field(default_factory=IllumSettings)
    mask: MaskSettings = field(default_factory=MaskSettings)
    cosmics: CosmicSettings = field(default_factory=CosmicSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    site: SiteSettings = field(default_factory=SiteSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    resume: ResumeSettings = field(default_factory=ResumeSettings)
    kbmod: KbmodSettings = field(default_factory=KbmodSettings)
    template: TemplateSettings = field(default_factory=TemplateSettings)
    astrometry: AstrometrySettings = field(default_factory=AstrometrySettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    qa: QaSettings = field(default_factory=QaSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            validate_group(f.name, getattr(self, f.name))

    def replace(self, **groups: Any) -> Settings:
        """Return a copy with some groups (or fields of groups, given as dicts) replaced.

        Raises
        ------
        ValueError
            When a value has the wrong type or is out of range, naming ``[table] key``.
        """
        changes = {}
        for name, value in groups.items():
            current = getattr(self, name)
            if isinstance(value, dict):
                value = dataclasses.replace(current, **value)
            changes[name] = value
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict, for manifests and hashing."""
        return dataclasses.asdict(self)

    def digest(self, *groups: str) -> str:
        """Short stable hash of the named groups (all groups when none are named).

        Kept once computed (the settings are immutable): every frame's provenance asks
        for the same hash, and a night of thousands of frames would otherwise spend
        seconds turning the settings into JSON."""
        memo = self.__dict__.setdefault("_digests", {})
        if groups not in memo:
            data = self.to_dict()
            chosen = {g: data[g] for g in (groups or tuple(data))}
            text = json.dumps(chosen, sort_keys=True)
            memo[groups] = hashlib.sha256(text.encode()).hexdigest()[:16]
        return memo[groups]


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity): what the defaults that depend on
    the machine (the local cluster's layout, the inventory's reader threads) are sized
    from."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def load_settings(path: str | Path | None = None) -> Settings:
    """Read settings from a TOML file; missing tables and keys keep their defaults.

    Raises
    ------
    SettingsError
        (a ``ValueError``) When the file is not valid TOML, or names a table or key that
        does not exist, or gives a value of the wrong type or out of range: one line
        naming the file (and the table and key).
    FileNotFoundError
        When there is no such file.
    """
    settings = Settings()
    if path is None:
        return settings
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    except IsADirectoryError:
        raise SettingsError(f"{path}: a folder, not a settings file") from None
    groups: dict[str, dict[str, Any]] = {}
    for table, values in data.items():
        if table not in settings.to_dict() or not isinstance(values, dict):
            raise SettingsError(f"{path}: unknown settings table [{table}]")
        known = {f.name for f in dataclasses.fields(getattr(settings, table))}
        unknown = set(values) - known
        if unknown:
            raise SettingsError(f"{path}: unknown key(s) in [{table}]: "
                                f"{', '.join(sorted(unknown))}")
        groups[table] = values
    try:
        return settings.replace(**groups)
    except ValueError as exc:
        raise SettingsError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------- validation
# What a value may be beyond its type. Numbers are finite and >= 0 unless listed here;
# "pos": > 0; "frac": in [0, 1]; "any": any finite number; a tuple: the allowed words.
_RULES: dict[str, str | tuple[str, ...]] = {
    "combine.method": ("sigclip", "median"),
    "combine.sigma_low": "pos", "combine.sigma_high": "pos", "combine.iterations": "pos",
    "combine.memory_budget_mb": "pos", "combine.min_frames": "pos",
    "flat.central_fraction": "frac", "flat.level_row_step": "pos",
    "flat.max_level_fraction": "frac",
    "mask.hot_sigma": "pos", "mask.dead_sigma": "pos", "mask.dead_floor": "frac",
    "mask.smooth_box": "pos", "mask.column_sigma": "pos",
    "cosmics.sigclip": "pos", "cosmics.sigfrac": "pos", "cosmics.objlim": "pos",
    "cosmics.niter": "pos", "cosmics.candidate_sigma": "pos",
    "cosmics.warm_fraction": "frac",
    "detector.gain": "pos", "detector.read_noise": "pos", "detector.saturation_adu": "pos",
    "detector.overscan": ("auto", "none"),
    "output.quantize_level": "pos",
    "site.latitude": "any", "site.longitude": "any", "site.elevation": "any",
    "kbmod.mesh": "pos", "kbmod.bkg_sigma": "pos", "kbmod.bkg_filter": "pos",
    "kbmod.psf_sigma_guess": "pos", "kbmod.detect_sigma": "pos", "kbmod.max_stars": "pos",
    "kbmod.match_radius": "pos", "kbmod.min_matches": "pos",
    "kbmod.variance": ("area", "pixel"), "kbmod.resampling": ("overlap", "cubic"),
    "template.sigma": "pos", "template.min_frames": "pos", "template.memory_mb": "pos",
    "template.psf_target": ("snr", "widest"), "template.near_speed": "any",
    "search.vx_min": "any", "search.vx_max": "any", "search.vy_min": "any",
    "search.vy_max": "any", "search.step_psf": "pos", "search.threshold": "pos",
    "search.outlier_sigma": "pos", "search.tile": "pos", "search.memory_mb": "pos",
    "search.stamp_size": "pos",
    "qa.mesh": "pos", "qa.psf_sigma_guess": "pos", "qa.detect_sigma": "pos",
    "qa.max_stars": "pos", "qa.match_radius": "pos", "qa.cloud_drop": "frac",
    "qa.trail_coverage": "frac", "qa.trail_min_length": "frac", "qa.trail_scale": "pos",
    "qa.thumbnail": "pos", "qa.sky_window": "pos",
    "illum.method": ("poly", "smooth"), "illum.min_frames": "pos", "illum.row_step": "pos",
    "illum.block": "pos", "illum.star_sigma": "pos", "illum.min_block_fraction": "frac",
    "illum.sky_ratio": "pos", "illum.gradient_sigma": "pos", "illum.clip_sigma": "pos",
    "illum.structure_factor": "pos", "mask.bad_response": "frac",
    "astrometry.ra": "any", "astrometry.dec": "any", "astrometry.rotation": "any",
    "astrometry.search_radius": "pos", "astrometry.match_radius": "pos",
    "astrometry.max_stars": "pos", "astrometry.min_stars": "pos",
    "cluster.kind": ("local", "slurm", "pbs"), "cluster.n_workers": "pos",
    "cluster.max_jobs": "pos", "cluster.connect_timeout": "pos",
}

# Inclusive bounds of counts and sizes whose upper end matters: a typo must be refused,
# not tried until the machine runs out of memory (the machine-dependent bounds are in
# run.cluster.check_layout). Generous: no real night, node or cluster comes near them.
_RANGES: dict[str, tuple[float, float]] = {
    "cluster.n_workers": (1, 4096),
    "detector.gain": (0.01, 100),  # e-/ADU (io.headers.GAIN_RANGE)
    "detector.read_noise": (0.01, 1000),  # e- (io.headers.RDNOISE_RANGE)
    "cluster.threads_per_worker": (0, 1024),
    "cluster.frames_in_flight": (0, 100_000),
    "cluster.retries": (0, 100),
    "cluster.connect_timeout": (0.1, 600),
    "cluster.job_start_timeout": (0, 7 * 86400),
    "cluster.min_jobs": (0, 10_000),
    "cluster.max_jobs": (1, 10_000),
    "combine.iterations": (1, 100),
    "site.latitude": (-90, 90),
    "site.longitude": (-180, 360),
    "site.elevation": (-500, 10_000),
    "combine.memory_budget_mb": (1, 1_048_576),
    "combine.min_frames": (1, 100_000),
    "combine.exptime_rtol": (0, 0.2),
    "combine.exptime_atol": (0, 10),
    "cosmics.niter": (1, 100),
    "cosmics.openmp_threads": (0, 1024),
    "cosmics.warm_frames": (0, 10_000),
    "cosmics.warm_fraction": (0.001, 1),
    "cosmics.warm_min_count": (2, 10_000),
    "cosmics.warm_min_frames": (1, 100_000),
    "template.max_frames": (0, 100_000),
    "template.mover_sigma": (0, 100),
    "template.track_sigma": (0, 100),
    "template.track_reach": (0, 64),
    "template.memory_mb": (1, 1_048_576),
    "search.memory_mb": (1, 1_048_576),
    "search.tile": (16, 65_536),
    "search.max_candidates": (0, 10_000_000),
    "search.stamps": (0, 10_000),
    "illum.max_frames": (0, 100_000),
}


def validate_group(table: str, group: Any) -> None:
    """Check every value of one settings group against its type and its rule.

    Raises
    ------
    ValueError
        ``[table] key = value: why`` for the first value that is not allowed.
    """
    hints = typing.get_type_hints(type(group))
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        where = f"[{table}] {f.name} = {value!r}"
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        if value is None and type(None) in kinds:
            continue
        kind = next(k for k in kinds if k is not type(None))
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise SettingsError(f"{where}: expected {_WORDS.get(kind, kind.__name__)}")
        rule = _RULES.get(f"{table}.{f.name}", "nonneg")
        if isinstance(rule, tuple):
            if value not in rule:
                raise SettingsError(f"{where}: expected one of {', '.join(rule)}")
        elif kind in (int, float):
            why = _out_of_range(float(value), rule)
            bounds = _RANGES.get(f"{table}.{f.name}")
            if not why and bounds and not bounds[0] <= value <= bounds[1]:
                why = f"must be between {bounds[0]:g} and {bounds[1]:g}"
            if why:
                raise SettingsError(f"{where}: {why}")
        elif kind is str and f"{table}.{f.name}" in _PARSED:
            why = _PARSED[f"{table}.{f.name}"](value)
            if why:
                raise SettingsError(f"{where}: {why}")
    if table == "cluster" and group.min_jobs > group.max_jobs:
        raise SettingsError(f"[cluster] min_jobs = {group.min_jobs}: must be <= max_jobs "
                            f"({group.max_jobs})")


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}

MIN_WORKER_MEMORY = 256 * 1024**2  # bytes: below this a worker cannot hold one frame's work


def parse_memory(text: str) -> int | None:
    """Bytes of a memory size written as dask writes them (``"4 GiB"``, ``"8GB"``,
    ``"2e9"``), ``0`` for ``"auto"`` (the caller's default), ``None`` for ``"none"``/``"0"``
    (no limit).

    Raises
    ------
    ValueError
        When ``text`` is not a size.
    """
    word = text.strip().lower()
    if word == "auto":
        return 0
    if word in ("none", "0", ""):
        return None
    from dask.utils import parse_bytes  # dask's own reading: what the workers get

    try:
        return int(parse_bytes(word))
    except (ValueError, TypeError):
        raise ValueError(f"{text!r} is not a memory size (e.g. '4 GiB', 'auto', "
                         "'none')") from None


def _memory_limit(text: str) -> str:
    """Why a ``memory_limit`` setting is refused, or ""."""
    try:
        size = parse_memory(text)
    except ValueError as exc:
        return str(exc)
    if size and size < MIN_WORKER_MEMORY:
        return f"at least {MIN_WORKER_MEMORY // 1024**2} MiB per worker"
    return ""


# String settings read as something else: what makes them refused.
_PARSED = {"cluster.memory_limit": _memory_limit}


def _out_of_range(x: float, rule: str) -> str:
    """Why a number breaks its rule, or ""."""
    if not math.isfinite(x):
        return "expected a finite number"
    if rule == "pos" and x <= 0:
        return "must be > 0"
    if rule == "nonneg" and x < 0:
        return "must be >= 0"
    if rule == "frac" and not 0 <= x <= 1:
        return "must be between 0 and 1"
    return ""


@dataclass(frozen=True)
class BackgroundSettings:
    """How the background is estimated (defaults suit ASTEP frames)."""

    mesh: int = 64  # pixels on a side of a mesh (the frame is split evenly)
    sigma: float = 3.0  # clipping threshold within a mesh (robust sigmas)
    iterations: int = 5  # clipping iterations
    filter_size: int = 3  # median filter of the mesh grid (1: none)
    min_valid: float = 0.25  # fraction of a mesh's pixels that must be usable
    source_sigma: float = 4.0  # detection threshold for source exclusion (smoothed image)
    source_smooth: float = 1.5  # Gaussian sigma (px) of the detection smoothing
    source_grow: int = 4  # radius (px) by which detected sources are grown
    source_passes: int = 1  # number of source-exclusion passes after the first estimate
