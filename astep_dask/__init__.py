"""astep-dask: distributed calibration of ASTEP frames with dask, xarray and astropy.

The public API, in the order of a night's stages (:data:`STAGES`)::

    import astep_dask as ad

    night = ad.simulate_night("demo", ad.SimConfig(size=256))     # or a real night folder
    inventory = ad.scan_night(night)                              # headers only
    darks = ad.open_stack(inventory.select(ad.FrameType.DARK))    # lazy (frame, y, x)
    settings = ad.load_settings()                                 # or a TOML file
    with ad.connect(settings.cluster) as client:                  # LocalCluster by default
        result = ad.calibrate_night(night, client, settings)      # masters + frames
        ad.export_night(night, client, settings)                  # KBMOD input
        ad.search_night(night, client, settings)                  # first-look search
        ad.night_report(night, client=client)                     # QA report
    frames = ad.open_calibrated(night)                            # lazy sci, var, mask
    header, sci, var, mask = ad.read_calibrated(result.out_dir / result.frames[0]["output"])

A season: ``ad.calibrate_season(ad.select_nights(root), client, settings, out)``, then
``ad.season_table`` and ``ad.write_season_report``. ``ad.settings_conflicts`` says which
settings of a night's existing products differ from a run's, before the run replaces them.
The report's figures (``ad.fig_*``, ``ad.load_report``, ``ad.season_rows``) are what the
notebooks draw; they use nothing but these names.

The products read with astropy and ccdproc too (``CCDData.read(f, hdu="SCI",
hdu_uncertainty="VAR", hdu_mask="MASK")``, ``ImageFileCollection(out, ext="SCI")``): see
the README's "From Python".

Subpackages, lowest layer first: :mod:`~astep_dask.core` (numpy in, numpy out),
:mod:`~astep_dask.io` (archive, stacks, FITS), :mod:`~astep_dask.masters`,
:mod:`~astep_dask.run` (cluster, night, season), the products :mod:`~astep_dask.kbmod` and
:mod:`~astep_dask.report`, and :mod:`~astep_dask.testing` (synthetic nights).
"""

from importlib import import_module
from typing import TYPE_CHECKING

from astep_dask.version import __version__

# The public API, by the module that defines each name. Imported on first use (PEP 562),
# so that ``astep-dask --help``, ``inspect`` and every dask worker that unpickles a task
# of ``astep_dask.run.frames`` import only what they use, not the products' modules.
_WHERE = {
    "Settings": "astep_dask.config",
    "load_settings": "astep_dask.config",
    "ArchiveError": "astep_dask.errors",
    "CalibrationError": "astep_dask.errors",
    "RunError": "astep_dask.errors",
    "open_calibrated": "astep_dask.io.calibrated",
    "read_calibrated": "astep_dask.io.fitsio",
    "read_image": "astep_dask.io.fitsio",
    "FrameType": "astep_dask.io.layout",
    "Inventory": "astep_dask.io.layout",
    "find_nights": "astep_dask.io.layout",
    "scan_night": "astep_dask.io.layout",
    "master_files": "astep_dask.io.products",
    "output_dir": "astep_dask.io.products",
    "read_manifest": "astep_dask.io.products",
    "open_stack": "astep_dask.io.stack",
    "search_night": "astep_dask.kbmod.search",
    "export_night": "astep_dask.kbmod.stage",
    "MasterBuilder": "astep_dask.masters.builder",
    "fig_flagged": "astep_dask.report.figures",
    "fig_frame": "astep_dask.report.figures",
    "fig_mask": "astep_dask.report.figures",
    "fig_master": "astep_dask.report.figures",
    "fig_raw_vs_calibrated": "astep_dask.report.figures",
    "fig_timeseries": "astep_dask.report.figures",
    "flow_chart": "astep_dask.report.graph",
    "load_report": "astep_dask.report.night",
    "night_report": "astep_dask.report.night",
    "fig_flat_ratios": "astep_dask.report.season",
    "fig_illum_season": "astep_dask.report.season",
    "fig_season": "astep_dask.report.season",
    "season_rows": "astep_dask.report.season",
    "connect": "astep_dask.run.cluster",
    "calibrate_night": "astep_dask.run.night",
    "settings_conflicts": "astep_dask.run.night",
    "StageResult": "astep_dask.run.results",
    "SeasonResult": "astep_dask.run.season",
    "calibrate_season": "astep_dask.run.season",
    "season_table": "astep_dask.run.season",
    "select_nights": "astep_dask.run.season",
    "write_season_report": "astep_dask.run.season",
    "STAGES": "astep_dask.run.stages",
    "SimConfig": "astep_dask.testing.simulate",
    "simulate_night": "astep_dask.testing.simulate",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from astep_dask.config import Settings, load_settings
    from astep_dask.errors import ArchiveError, CalibrationError, RunError
    from astep_dask.io.calibrated import open_calibrated
    from astep_dask.io.fitsio import read_calibrated, read_image
    from astep_dask.io.headers import FrameType
    from astep_dask.io.layout import Inventory, find_nights, scan_night
    from astep_dask.io.products import master_files, output_dir, read_manifest
    from astep_dask.io.stack import open_stack
    from astep_dask.kbmod.search import search_night
    from astep_dask.kbmod.stage import export_night
    from astep_dask.masters.builder import MasterBuilder
    from astep_dask.report.figures import (
        fig_flagged,
        fig_frame,
        fig_mask,
        fig_master,
        fig_raw_vs_calibrated,
        fig_timeseries,
    )
    from astep_dask.report.graph import flow_chart
    from astep_dask.report.night import load_report, night_report
    from astep_dask.report.season import (
        fig_flat_ratios,
        fig_illum_season,
        fig_season,
        season_rows,
    )
    from astep_dask.run.cluster import connect
    from astep_dask.run.night import calibrate_night, settings_conflicts
    from astep_dask.run.results import StageResult
    from astep_dask.run.season import (
        SeasonResult,
        calibrate_season,
        season_table,
        select_nights,
        write_season_report,
    )
    from astep_dask.run.stages import STAGES
    from astep_dask.testing.simulate import SimConfig, simulate_night


def __getattr__(name: str):
    """Import a public name from its module the first time it is asked for."""
    if name not in _WHERE:
        raise AttributeError(f"module 'astep_dask' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__all__ = [
    "STAGES",
    "ArchiveError",
    "CalibrationError",
    "FrameType",
    "Inventory",
    "MasterBuilder",
    "RunError",
    "SeasonResult",
    "Settings",
    "SimConfig",
    "StageResult",
    "__version__",
    "calibrate_night",
    "calibrate_season",
    "connect",
    "export_night",
    "fig_flagged",
    "fig_flat_ratios",
    "fig_frame",
    "fig_illum_season",
    "fig_mask",
    "fig_master",
    "fig_raw_vs_calibrated",
    "fig_season",
    "fig_timeseries",
    "find_nights",
    "flow_chart",
    "load_report",
    "load_settings",
    "master_files",
    "night_report",
    "open_calibrated",
    "open_stack",
    "output_dir",
    "read_calibrated",
    "read_image",
    "read_manifest",
    "scan_night",
    "search_night",
    "season_rows",
    "season_table",
    "select_nights",
    "settings_conflicts",
    "simulate_night",
    "write_season_report",
]
