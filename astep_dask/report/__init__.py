"""Quality reports of calibrated nights and seasons, and the pipeline's flow chart.

- :mod:`~astep_dask.report.metrics`: per-frame measurements (sky, noise, stars, FWHM,
  masked fractions, trails) and the rules that flag outlier frames;
- :mod:`~astep_dask.report.figures`: the PNG figures (masters, mask, time series, frames);
- :mod:`~astep_dask.report.html`: the report page;
- :mod:`~astep_dask.report.night`: a night's report, end to end (:func:`night_report`);
- :mod:`~astep_dask.report.season`: trends across the nights of a season;
- :mod:`~astep_dask.report.graph`: the flow chart of a night's real task graph.

What a notebook needs is here, e.g.::

    from astep_dask import report

    folder = report.night_report(night, client, out=out).out_dir
    qa = report.load_report(folder)
    report.fig_timeseries(qa["frames"])
"""

from astep_dask.io.products import master_files, read_manifest
from astep_dask.report.figures import (
    draw_image,
    fig_flagged,
    fig_frame,
    fig_illum,
    fig_mask,
    fig_master,
    fig_raw_vs_calibrated,
    fig_timeseries,
    master_figures,
    save_figure,
    write_plots,
    zscale_limits,
)
from astep_dask.report.graph import (
    collapse,
    flow_chart,
    flow_graph,
    layers,
    night_graph,
    render,
    to_dot,
)
from astep_dask.report.html import render_html
from astep_dask.report.metrics import (
    REASONS,
    block_reduce,
    elongated,
    find_streak,
    flag_frames,
    mask_fractions,
    measure_file,
    measure_planes,
    plane_gradient,
    relative_fluxes,
)
from astep_dask.report.night import (
    assemble_report,
    calibrated_paths,
    load_report,
    night_report,
    report_summary,
    submit_measures,
)
from astep_dask.report.season import (
    fig_flat_ratios,
    fig_illum_season,
    fig_season,
    flat_ratios,
    season_rows,
)

__all__ = [
    "REASONS", "assemble_report", "block_reduce", "calibrated_paths", "collapse",
    "draw_image", "elongated", "fig_flagged", "fig_flat_ratios", "fig_frame", "fig_illum",
    "fig_illum_season", "fig_mask",
    "fig_master", "fig_raw_vs_calibrated", "fig_season", "fig_timeseries", "find_streak",
    "flag_frames", "flat_ratios", "flow_chart", "flow_graph", "layers", "load_report",
    "mask_fractions", "master_figures", "master_files", "measure_file", "measure_planes",
    "night_graph", "night_report", "plane_gradient", "read_manifest", "relative_fluxes",
    "render", "render_html", "report_summary", "save_figure", "season_rows",
    "submit_measures", "to_dot", "write_plots", "zscale_limits",
]
