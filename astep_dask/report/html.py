"""The report's page, ``index.html``: one self-contained HTML file beside its PNG plots.

:func:`render_html` turns the content of ``qa.json`` (:func:`astep_dask.report.night.
assemble_report`, with the plot file names of :func:`astep_dask.report.figures.write_plots`)
into a page: the night's summary, the flagged frames with their reasons, the time series,
one calibrated frame, the masters and their figures, every frame's figures, and the files
not measured. Every text from the data is HTML-escaped; numbers are shown by
:func:`fmt_value` (also used by the terminal summary), so that a missing value reads "–".
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from astep_dask.io.products import QA_JSON

__all__ = ["CSS", "fmt_value", "render_html"]

_e = html.escape  # every text taken from the data goes through it (quotes included)
# The page runs no script and loads nothing from elsewhere: even a text that escaped
# escaping could not act (images and styles from the report's own folder only).
CSP = ("<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
       "img-src 'self'; style-src 'unsafe-inline'\">")


def fmt_value(value: object, digits: int = 3) -> str:
    """A value as the report shows it: a float to ``digits`` significant digits (4 beyond
    1e5), "–" for None, NaN or infinity, anything else as HTML-escaped text."""
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.4g}"
    return html.escape(str(value))


def _pct(value: float | None) -> float | None:
    """A fraction as a percentage; None stays None."""
    return None if value is None else 100.0 * value


CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #eee; } td.l { text-align: left; }
tr.flag td { background: #fde2e2; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid img { max-width: 610px; border: 1px solid #ddd; }
img.wide { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(report: dict) -> str:
    """The report's ``index.html`` (self-contained but for the PNGs beside it): one line
    of HTML per entry of the section helpers below, in the page's order."""
    out = _head(report)
    out += _flagged_section(report)
    out += _plots_section(report)
    out += _masters_section(report)
    out += _frames_section(report)
    out += _problems_section(report)
    out.append("</body></html>")
    return "\n".join(out)



def _head(report: dict) -> list[str]:
    """Page head, title, provenance note and the summary table."""
    s = report["summary"]
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>{CSP}"
           f"<title>QA {_e(report['night'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Night {_e(report['night'])}: quality report</h1>",
           f"<p class='note'>Output folder {_e(report['output'])}; generated "
           f"{_e(report['generated'])}; calibration status "
           f"{fmt_value(s.get('calibration_status'))}."
           f" Flagged frames are kept, never deleted. Data: <a href='{QA_JSON}'>{QA_JSON}</a>."
           "</p>"]
    flag_text = ", ".join(f"{k}: {v}" for k, v in s["flags"].items() if v) or "none"
    out.append("<table><tr><th>frames measured</th><th>flagged</th><th>flags</th>"
               "<th>median sky [e-]</th><th>median noise [e-]</th><th>median FWHM [px]</th>"
               "<th>failed in calibration</th><th>unusable files</th></tr>"
               f"<tr><td>{s['frames']}</td><td>{s['flagged']}</td><td class='l'>{_e(flag_text)}"
               f"</td><td>{fmt_value(s['median_sky'])}</td><td>{fmt_value(s['median_noise'])}"
               f"</td><td>{fmt_value(s['median_fwhm'])}</td><td>{s['failed_in_calibration']}"
               f"</td><td>{s['unusable_files']}</td></tr></table>")
    return out


def _flagged_section(report: dict) -> list[str]:
    """The flagged frames, one table row per flag, and their thumbnails."""
    plots = report.get("plots", {})
    flagged = [f for f in report["frames"] if f["flagged"]]
    out = ["<h2>Flagged frames</h2>"]
    if not flagged:
        return [*out, "<p>No frame flagged.</p>"]
    out.append("<table><tr><th>frame</th><th>time [UTC]</th><th>reason</th>"
               "<th>detail</th></tr>")
    for f in flagged:
        for fl in f["flags"]:
            out.append(f"<tr class='flag'><td class='l'>{_e(f['file'])}</td>"
                       f"<td>{_e(f.get('time') or '')}</td><td class='l'>{_e(fl['reason'])}"
                       f"</td><td class='l'>{_e(fl['detail'])}</td></tr>")
    out.append("</table>")
    if "flagged" in plots:
        out.append(f"<img class='wide' src='{_e(plots['flagged'])}' alt='flagged frames'>")
    return out


def _plots_section(report: dict) -> list[str]:
    """The time series and the calibrated frame shown, when drawn."""
    plots = report.get("plots", {})
    out = []
    if "timeseries" in plots:
        out.append("<h2>Per-frame figures</h2>"
                   f"<img class='wide' src='{_e(plots['timeseries'])}' alt='time series'>")
    if "frame" in plots:
        out.append(f"<h2>A calibrated frame: {_e(report['summary'].get('frame_shown', ''))}"
                   f"</h2><img class='wide' src='{_e(plots['frame'])}' alt='calibrated frame'>")
    return out


def _masters_section(report: dict) -> list[str]:
    """The masters' images and the table of their figures."""
    plots = report.get("plots", {})
    out = ["<h2>Masters and bad-pixel mask</h2><div class='grid'>"]
    for m in report["masters"]:
        if m["label"] in plots:
            out.append(f"<img src='{_e(plots[m['label']])}' alt='{_e(m['label'])}'>")
    out.append("</div>")
    out.append("<table><tr><th>master</th><th>file</th><th>frames</th><th>level</th>"
               "<th>scatter</th><th>pixel noise</th><th>1%–99%</th><th>unit</th>"
               "<th>hot px</th><th>dead px</th></tr>")
    for m in report["masters"]:
        rng = (f"{fmt_value(m.get('p01'), 5)}–{fmt_value(m.get('p99'), 5)}"
               if "p01" in m else "–")
        out.append(f"<tr><td class='l'>{_e(m['label'])}</td><td class='l'>{_e(m['file'])}</td>"
                   f"<td>{fmt_value(m.get('ncombine'))}</td>"
                   f"<td>{fmt_value(m.get('level'), 5)}</td>"
                   f"<td>{fmt_value(m.get('scatter'))}</td><td>{fmt_value(m.get('noise'))}</td>"
                   f"<td>{rng}</td><td>{fmt_value(m.get('unit'))}</td>"
                   f"<td>{fmt_value(m.get('n_hot'))}</td>"
                   f"<td>{fmt_value(m.get('n_dead'))}</td></tr>")
    out.append("</table>")
    for m in report["masters"]:
        if m.get("role") == "illum":
            amp = 100 * (m.get("amplitude") or float("nan"))
            noise = 100 * (m.get("correction_noise") or float("nan"))
            fb = (f"; taken from another night ({_e(str(m['fallback']))})"
                  if m.get("fallback") else "")
            out.append(f"<p>Illumination correction {_e(m.get('filter', ''))} (the master "
                       f"flat is divided by it): peak to peak {fmt_value(amp, 3)} % over "
                       f"the field, block noise {fmt_value(noise, 3)} %, from "
                       f"{fmt_value(m.get('ncombine'))} science frames "
                       f"({fmt_value(m.get('nreject'))} rejected){fb}.</p>")
    return out


def _frames_section(report: dict) -> list[str]:
    """Every frame's figures, flagged rows shaded."""
    out = ["<h2>All frames</h2><table><tr><th>frame</th><th>time [UTC]</th>"
           "<th>sky [e-]</th><th>noise [e-]</th><th>FWHM [px]</th><th>stars</th>"
           "<th>star flux</th><th>masked %</th><th>sat. %</th><th>CR %</th>"
           "<th>gradient %</th><th>flags</th></tr>"]
    for f in report["frames"]:
        cls = " class='flag'" if f["flagged"] else ""
        reasons = ", ".join(fl["reason"] for fl in f["flags"])
        out.append(
            f"<tr{cls}><td class='l'>{_e(f['file'])}</td><td>{_e(f.get('time') or '')}</td>"
            f"<td>{fmt_value(f.get('sky'), 4)}</td><td>{fmt_value(f.get('noise'))}</td>"
            f"<td>{fmt_value(f.get('fwhm'))}</td><td>{f.get('n_stars', '')}</td>"
            f"<td>{fmt_value(f.get('transparency'))}</td>"
            f"<td>{fmt_value(100 * f['frac_masked'])}</td>"
            f"<td>{fmt_value(100 * f['frac_saturated'])}</td>"
            f"<td>{fmt_value(100 * f['frac_cr'])}</td>"
            f"<td>{fmt_value(_pct(f.get('gradient')))}</td>"
            f"<td class='l'>{_e(reasons)}</td></tr>")
    out.append("</table>")
    return out


def _problems_section(report: dict) -> list[str]:
    """Files not measured: failed in calibration, unreadable, unusable raw files."""
    problems = ([(r["file"], r["reason"]) for r in report.get("failed", [])]
                + [(r["file"], r["reason"]) for r in report.get("unreadable", [])]
                + [(Path(r["path"]).name, r["reason"]) for r in report.get("unusable", [])])
    if not problems:
        return []
    out = ["<h2>Files not measured</h2><table><tr><th>file</th><th>reason</th></tr>"]
    out += [f"<tr><td class='l'>{_e(str(a))}</td><td class='l'>{_e(str(b))}</td></tr>"
            for a, b in problems]
    out.append("</table>")
    return out
