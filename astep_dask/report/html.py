"""report.html: TODO docstring."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from astep_dask.io.products import QA_JSON
from astep_dask.report.metrics import _pct

# --------------------------------------------------------------------------- HTML


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.4g}"
    return html.escape(str(value))


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
    """The report's ``index.html`` (self-contained but for the PNGs beside it)."""
    s = report["summary"]
    plots = report.get("plots", {})
    e = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>QA {e(report['night'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Night {e(report['night'])}: quality report</h1>",
           f"<p class='note'>Output folder {e(report['output'])}; generated "
           f"{e(report['generated'])}; calibration status {_fmt(s.get('calibration_status'))}."
           f" Flagged frames are kept, never deleted. Data: <a href='{QA_JSON}'>{QA_JSON}</a>."
           "</p>"]
    flag_text = ", ".join(f"{k}: {v}" for k, v in s["flags"].items() if v) or "none"
    out.append("<table><tr><th>frames measured</th><th>flagged</th><th>flags</th>"
               "<th>median sky [e-]</th><th>median noise [e-]</th><th>median FWHM [px]</th>"
               "<th>failed in calibration</th><th>unusable files</th></tr>"
               f"<tr><td>{s['frames']}</td><td>{s['flagged']}</td><td class='l'>{e(flag_text)}"
               f"</td><td>{_fmt(s['median_sky'])}</td><td>{_fmt(s['median_noise'])}</td>"
               f"<td>{_fmt(s['median_fwhm'])}</td><td>{s['failed_in_calibration']}</td>"
               f"<td>{s['unusable_files']}</td></tr></table>")
    flagged = [f for f in report["frames"] if f["flagged"]]
    out.append("<h2>Flagged frames</h2>")
    if flagged:
        out.append("<table><tr><th>frame</th><th>time [UTC]</th><th>reason</th>"
                   "<th>detail</th></tr>")
        for f in flagged:
            for fl in f["flags"]:
                out.append(f"<tr class='flag'><td class='l'>{e(f['file'])}</td>"
                           f"<td>{e(f.get('time') or '')}</td><td class='l'>{e(fl['reason'])}"
                           f"</td><td class='l'>{e(fl['detail'])}</td></tr>")
        out.append("</table>")
        if "flagged" in plots:
            out.append(f"<img class='wide' src='{plots['flagged']}' alt='flagged frames'>")
    else:
        out.append("<p>No frame flagged.</p>")
    if "timeseries" in plots:
        out.append("<h2>Per-frame figures</h2>"
                   f"<img class='wide' src='{plots['timeseries']}' alt='time series'>")
    if "frame" in plots:
        out.append(f"<h2>A calibrated frame: {e(s.get('frame_shown', ''))}</h2>"
                   f"<img class='wide' src='{plots['frame']}' alt='calibrated frame'>")
    out.append("<h2>Masters and bad-pixel mask</h2><div class='grid'>")
    for m in report["masters"]:
        if m["label"] in plots:
            out.append(f"<img src='{plots[m['label']]}' alt='{e(m['label'])}'>")
    out.append("</div>")
    out.append("<table><tr><th>master</th><th>file</th><th>frames</th><th>level</th>"
               "<th>scatter</th><th>pixel noise</th><th>1%–99%</th><th>unit</th>"
               "<th>hot px</th><th>dead px</th></tr>")
    for m in report["masters"]:
        rng = (f"{_fmt(m.get('p01'), 5)}–{_fmt(m.get('p99'), 5)}" if "p01" in m else "–")
        out.append(f"<tr><td class='l'>{e(m['label'])}</td><td class='l'>{e(m['file'])}</td>"
                   f"<td>{_fmt(m.get('ncombine'))}</td><td>{_fmt(m.get('level'), 5)}</td>"
                   f"<td>{_fmt(m.get('scatter'))}</td><td>{_fmt(m.get('noise'))}</td>"
                   f"<td>{rng}</td><td>{_fmt(m.get('unit'))}</td><td>{_fmt(m.get('n_hot'))}</td>"
                   f"<td>{_fmt(m.get('n_dead'))}</td></tr>")
    out.append("</table>")
    out.append("<h2>All frames</h2><table><tr><th>frame</th><th>time [UTC]</th>"
               "<th>sky [e-]</th><th>noise [e-]</th><th>FWHM [px]</th><th>stars</th>"
               "<th>star flux</th><th>masked %</th><th>sat. %</th><th>CR %</th>"
               "<th>gradient %</th><th>flags</th></tr>")
    for f in report["frames"]:
        cls = " class='flag'" if f["flagged"] else ""
        reasons = ", ".join(fl["reason"] for fl in f["flags"])
        out.append(
            f"<tr{cls}><td class='l'>{e(f['file'])}</td><td>{e(f.get('time') or '')}</td>"
            f"<td>{_fmt(f.get('sky'), 4)}</td><td>{_fmt(f.get('noise'))}</td>"
            f"<td>{_fmt(f.get('fwhm'))}</td><td>{f.get('n_stars', '')}</td>"
            f"<td>{_fmt(f.get('transparency'))}</td>"
            f"<td>{_fmt(100 * f['frac_masked'])}</td><td>{_fmt(100 * f['frac_saturated'])}</td>"
            f"<td>{_fmt(100 * f['frac_cr'])}</td><td>{_fmt(_pct(f.get('gradient')))}</td>"
            f"<td class='l'>{e(reasons)}</td></tr>")
    out.append("</table>")
    problems = ([(r["file"], r["reason"]) for r in report.get("failed", [])]
                + [(r["file"], r["reason"]) for r in report.get("unreadable", [])]
                + [(Path(r["path"]).name, r["reason"]) for r in report.get("unusable", [])])
    if problems:
        out.append("<h2>Files not measured</h2><table><tr><th>file</th><th>reason</th></tr>")
        out += [f"<tr><td class='l'>{e(str(a))}</td><td class='l'>{e(str(b))}</td></tr>"
                for a, b in problems]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
