"""Quality reports of calibrated nights and seasons, and the pipeline's flow chart.

- :mod:`~astep_dask.report.metrics`: per-frame measurements (sky, noise, stars, FWHM,
  masked fractions, trails) and the rules that flag outlier frames;
- :mod:`~astep_dask.report.figures`: the PNG figures (masters, mask, time series, frames);
- :mod:`~astep_dask.report.html`: the report page;
- :mod:`~astep_dask.report.night`: a night's report, end to end (:func:`night_report`);
- :mod:`~astep_dask.report.season`: trends across the nights of a season;
- :mod:`~astep_dask.report.graph`: the flow chart of a night's real task graph.
"""

from astep_dask.io.products import master_files, read_manifest
from astep_dask.report.figures import (
    fig_flagged,
    fig_frame,
    fig_mask,
    fig_master,
    fig_raw_vs_calibrated,
    fig_timeseries,
    zscale_limits,
)
from astep_dask.report.graph import flow_chart, flow_graph, night_graph
from astep_dask.report.metrics import (
    block_reduce,
    elongated,
    find_streak,
    flag_frames,
    mask_fractions,
    measure_file,
    plane_gradient,
    relative_fluxes,
)
from astep_dask.report.night import (
    calibrated_paths,
    load_report,
    night_report,
    report_summary,
    submit_measures,
)
from astep_dask.report.season import fig_flat_ratios, fig_season, flat_ratios, season_rows

__all__ = [
    "block_reduce", "calibrated_paths", "elongated", "fig_flagged", "fig_flat_ratios",
    "fig_frame", "fig_mask", "fig_master", "fig_raw_vs_calibrated", "fig_season",
    "fig_timeseries", "find_streak", "flag_frames", "flat_ratios", "flow_chart", "flow_graph",
    "load_report", "mask_fractions", "master_files", "measure_file", "night_graph",
    "night_report", "plane_gradient", "read_manifest", "relative_fluxes", "report_summary",
    "season_rows", "submit_measures", "zscale_limits",
]
