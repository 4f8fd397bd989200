"""The argument parser of ``astep-dask``: one function per subcommand, shared option
groups, and the top-level help that lists the stages in order
(:data:`~astep_dask.run.stages.STAGES`).
"""

from __future__ import annotations

import argparse
import textwrap
from datetime import date
from pathlib import Path

from astep_dask.cli.commands import (
    EPILOG,
    cmd_arrange,
    cmd_calibrate,
    cmd_graph,
    cmd_inspect,
    cmd_kbmod,
    cmd_plan,
    cmd_report,
    cmd_search,
    cmd_season,
    cmd_simulate,
    cmd_verify,
)
from astep_dask.run.stages import STAGES
from astep_dask.version import __version__

__all__ = ["build_parser", "count", "night_date", "positive"]


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (workers, threads)."""
    return _whole(text, 1)


def count(text: str) -> int:
    """An argparse type: a whole number of at least 0 (retries)."""
    return _whole(text, 0)


def night_date(text: str) -> str:
    """An argparse type: a calendar date written ``YYYY-MM-DD`` (a night's name)."""
    try:
        ok = date.fromisoformat(text).isoformat() == text
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD")
    return text


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is less than {least}")
    return value


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a LocalCluster sized to this machine)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="join a running dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--cluster", choices=["local", "slurm", "pbs"],
                   help="start a cluster of this kind (slurm/pbs: dask-jobqueue, see deploy/)")
    g.add_argument("--workers", type=positive, metavar="N",
                   help="local workers (default, when no layout option is given: one "
                   "in-process worker up to 4 cores, else processes of 2 threads as the "
                   "memory allows; with --processes alone: one per core)")
    g.add_argument("--threads", type=positive, metavar="N",
                   help="threads per local worker (default: the cores shared among workers)")
    g.add_argument("--processes", action="store_true",
                   help="local workers as separate processes, not threads of this one: a "
                   "crashed worker is restarted and its frames retried (more memory and "
                   "start-up time)")
    g.add_argument("--retries", type=count, metavar="N",
                   help="extra attempts of a frame whose worker died (with --processes or a "
                   "batch cluster; a joined --scheduler keeps its own allowed-failures), "
                   "after which that frame fails and the night goes on; an error of the "
                   "frame itself is never retried (default 2)")
    g.add_argument("--dashboard-address", metavar="ADDR",
                   help="dashboard address of a cluster we start: 'auto' (default: "
                   "127.0.0.1:8787 for a local cluster, this machine only, reached through "
                   "an SSH tunnel; none for --cluster slurm|pbs), 'off', or an address "
                   "(127.0.0.1:8787 to have a batch run's; :8787 opens it on every "
                   "interface). Every user of the machine can read it")
    g.add_argument("--security", type=Path, metavar="FILE",
                   help="TLS credentials to join a tls:// --scheduler: a TOML or YAML file "
                   "with ca, cert, key (PEM paths); default: dask config "
                   "distributed.comm.tls.*")


def _subcommand(sub, name: str, help: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 88),
                       epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _template_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KBMOD export: static-sky template (default: this night's frames)")
    g.add_argument("--template-nights", type=count, metavar="N",
                   help="build the template from the N nearest other nights of the same "
                   "field instead (slow movers then do not subtract themselves)")
    g.add_argument("--sky-only", action="store_true",
                   help="no template: the KBMOD files carry the registered, sky-subtracted "
                   "frames (for users who bring their own templates)")
    g.add_argument("--catalog", metavar="FILE",
                   help="reference catalog (FITS or CSV: RA, Dec in deg, magnitude) to fit "
                   "a WCS to the reference frame's stars when the frames carry none")


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads or writes a night's products: where, settings,
    cluster."""
    p.add_argument("--out", type=Path, help="output root (default: beside each raw night)")
    p.add_argument("--config", type=Path, help="settings file (TOML), see astep_dask/config.py")
    g = p.add_argument_group("what the run shows")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print only what went wrong (failed frames, unusable files, "
                   "errors; on stderr): no progress, no cluster messages, no summary; the "
                   "exit code says how the run ended")
    g.add_argument("--performance-report", action="store_true",
                   help="write dask's performance report of the run (task stream, worker "
                   "profiles) to performance-<stage>.html in the night's output folder")
    g.add_argument("--keep-dashboard", action="store_true",
                   help="keep the cluster and its dashboard up after the run, until Enter")
    _cluster_options(p)


def _calibration_options(p: argparse.ArgumentParser) -> None:
    """Options of the commands that calibrate (calibrate, season, graph) on top of
    :func:`_run_options`."""
    _run_options(p)
    p.add_argument("--no-cosmics", action="store_true", help="skip cosmic-ray detection")
    p.add_argument("--fallback-masters", action="store_true",
                   help="a night that cannot make a master takes it from the nearest night's "
                   "output (named in the headers as FALLBACK)")
    p.add_argument("--reuse-foreign-masters", action="store_true",
                   help="reuse master files written by other tools (no astep-dask provenance)")
    p.add_argument("--compress", action="store_true",
                   help="tile-compress the outputs: MASK lossless, SCI/VAR quantised to "
                   "noise/16 (about 3x smaller)")


def _add_simulate(sub) -> None:
    """The ``simulate`` subcommand."""
    p = _subcommand(
        sub, "simulate",
        help="write a synthetic night with known truth in the archive layout",
        description="Write a synthetic ASTEP night (uint16 FITS, archive layout) under ROOT, "
        "with the truth that made it in ROOT/DATE/truth/.",
        func=cmd_simulate,
    )
    p.add_argument("root", type=Path, help="archive root; the night goes to ROOT/DATE/")
    p.add_argument("--date", type=night_date, default="2026-06-15",
                   help="night date YYYY-MM-DD")
    p.add_argument("--size", type=positive, default=256, help="frame side in pixels")
    p.add_argument("--science", type=positive, default=12, help="number of science frames")
    p.add_argument("--darks", type=count, default=8, help="darks per exposure time")
    p.add_argument("--flats", type=count, default=9, help="number of sky flats")
    p.add_argument("--bias", type=count, default=0, help="number of bias frames (ASTEP: 0)")
    p.add_argument("--overscan", type=count, default=0, help="overscan columns (ASTEP: 0)")
    p.add_argument("--bad-files", action="store_true", help="add unusable files of each kind")
    p.add_argument("--seed", type=int, default=1, help="random seed")


def _add_arrange(sub) -> None:
    """The ``arrange`` subcommand."""
    p = _subcommand(
        sub, "arrange",
        help="arrange a camera's own folder of raw frames as an archive night (by header)",
        description="Make ROOT/DATE/DATE-CAMS/ and DATE-CAMS_SKYFLAT/ from a folder of raw "
        "FITS frames (searched recursively) with symbolic links to them (or copies), each "
        "file placed by its header: flats, and darks of a flat's exposure time that no "
        "science frame has, to -CAMS_SKYFLAT; the rest to -CAMS. The date is the evening "
        "the night began (first science frame's UTC time - 12 h) unless given. The raw "
        "files are only read. Unusable files are listed with the reason and left out. "
        "Then: astep-dask calibrate ROOT/DATE.",
        func=cmd_arrange,
    )
    p.add_argument("source", type=Path, help="the folder the camera wrote")
    p.add_argument("root", type=Path, help="archive root; the night goes to ROOT/DATE/")
    p.add_argument("--date", type=night_date, help="night date YYYY-MM-DD (default: from "
                   "the frames)")
    p.add_argument("--copy", action="store_true", help="copy the files instead of linking")


def _add_inspect(sub) -> None:
    """The ``inspect`` subcommand."""
    p = _subcommand(
        sub, "inspect",
        help="list a night's (or season's) frames by folder, type, exposure and filter",
        description="Read every FITS header of a night folder ROOT/YYYY-MM-DD/ or of every "
        "night under a season root, and print counts per folder x type x exposure x filter, "
        "the time span, and each unusable file with its reason. Reads headers only. Exit "
        "status 3 when some files are unusable, 1 when none is usable.",
        func=cmd_inspect,
    )
    p.add_argument("path", type=Path, help="a night folder or a season root")
    p.add_argument("--json", action="store_true", help="print the full inventory as JSON")


def _add_calibrate(sub) -> None:
    """The ``calibrate`` subcommand."""
    p = _subcommand(
        sub, "calibrate",
        help="build a night's masters and calibrate every science frame on a dask cluster",
        description="Calibrate one night: master darks/flats/bias and bad-pixel mask (reused "
        "when they exist with the same inputs and settings), then every science frame as one "
        "task on the cluster: overscan/trim, bias, dark, flat, gain, variance, mask, cosmic "
        "rays. Writes <raw stem>_CAL.fits (SCI e-, VAR e-^2, MASK bits) and manifest.json "
        "to NIGHT/NIGHT-CAMS_CAL/ or OUT/NIGHT/. Re-running resumes: frames already "
        "calibrated with the same provenance are skipped.",
        func=cmd_calibrate,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/")
    p.add_argument("--force", action="store_true", help="recalibrate frames already done")
    p.add_argument("--kbmod", action="store_true",
                   help="then write the KBMOD-ready export (as the kbmod command)")
    _template_options(p)
    _calibration_options(p)


def _add_kbmod(sub) -> None:
    """The ``kbmod`` subcommand."""
    p = _subcommand(
        sub, "kbmod",
        help="write a calibrated night in KBMOD's input layout (registered difference frames)",
        description="Read a night's calibrated frames (from `calibrate`), subtract a smooth "
        "sky background, measure each frame's sub-pixel offset to a reference frame from its "
        "stars and resample onto the reference grid (OUTPUT/kbmod/registered/); combine a "
        "static-sky template (this night's frames, each frame differenced against the "
        "template without itself, or --template-nights N other nights) and write, in "
        "OUTPUT/kbmod/, one <stem>_KBMOD.fits difference frame per frame in the layout "
        "KBMOD's loader reads (HDU1 science, HDU2 mask, HDU3 variance; MJD at mid-exposure "
        "in the primary header), DATE_TEMPLATE.fits, a night stack file, an offsets table "
        "and kbmod.json. One task per frame on the cluster; re-running skips frames already "
        "exported with the same provenance.",
        func=cmd_kbmod,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (calibrated)")
    p.add_argument("--force", action="store_true", help="redo frames already exported")
    _template_options(p)
    _run_options(p)


def _add_search(sub) -> None:
    """The ``search`` subcommand."""
    p = _subcommand(
        sub, "search",
        help="first-look shift-and-stack search for moving objects in a night's KBMOD export",
        description="Search the difference frames written by `kbmod` for point sources "
        "moving in straight lines: KBMOD's psi/phi matched-filter likelihood summed along "
        "every trajectory of a velocity grid (px/day; step from the PSF and the night's time "
        "span unless given), velocity blocks as tasks on the cluster, single-frame outliers "
        "rejected, results clustered. Writes OUTPUT/kbmod/search/DATE_CANDIDATES.csv (x, y "
        "at the first frame's time, vx, vy, flux, SNR, frames), PNG postage stamps of the "
        "best candidates and search.json. Settings: the [search] table of --config.",
        func=cmd_search,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (exported)")
    p.add_argument("--threshold", type=float, help="detection threshold, SNR (default 7)")
    p.add_argument("--vmax", type=float, metavar="PX_PER_DAY",
                   help="search |vx|, |vy| up to this (default 1200 px/day)")
    p.add_argument("--v-step", type=float, metavar="PX_PER_DAY",
                   help="velocity grid step (default: PSF sigma / night's time span)")
    p.add_argument("--show", type=count, default=10, help="candidates printed (default 10)")
    _run_options(p)


def _add_season(sub) -> None:
    """The ``season`` subcommand."""
    p = _subcommand(
        sub, "season",
        help="calibrate every night under a season root through one dask cluster",
        description="Calibrate every night ROOT/YYYY-MM-DD/ (optionally between --from and "
        "--to) through one dask cluster, several nights in flight at once, so that one "
        "night's masters are reduced while another night's frames are calibrated. Nights "
        "already complete for the same raw files and settings are skipped; a night that "
        "fails is reported with its reason and the season goes on. Writes season.json to "
        "OUT (or ROOT) and each night's products as `calibrate` does.",
        func=cmd_season,
    )
    p.add_argument("root", type=Path, help="season root holding YYYY-MM-DD/ nights")
    p.add_argument("--from", dest="start", metavar="DATE", type=night_date,
                   help="first night (YYYY-MM-DD)")
    p.add_argument("--to", dest="end", metavar="DATE", type=night_date,
                   help="last night (YYYY-MM-DD)")
    p.add_argument("--nights", type=positive, default=2,
                   help="nights in flight at once (default 2)")
    p.add_argument("--dry-run", action="store_true", help="list what would run, do nothing")
    _calibration_options(p)


def _add_report(sub) -> None:
    """The ``report`` subcommand."""
    p = _subcommand(
        sub, "report",
        help="write (or rewrite) a calibrated night's QA report: qa.json, plots, index.html",
        description="Measure every calibrated frame of a night (sky, noise, star FWHM, masked, "
        "saturated and cosmic-ray fractions, background gradient) and the masters, flag "
        "outlier frames (cloud, sky jump, trail, defocus; flagged, never deleted) and write "
        "OUTPUT/report/ with qa.json, PNG plots and index.html. Flags are not failures.",
        func=cmd_report,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (calibrated)")
    p.add_argument("--no-cluster", action="store_true", help="measure in this process")
    _run_options(p)


def _add_plan(sub) -> None:
    """The ``plan`` subcommand."""
    p = _subcommand(
        sub, "plan",
        help="what calibrate would do with a night, and why, without doing it",
        description="A dry run from metadata alone (headers, the manifest, the masters' "
        "headers, the status of every file): every master to build or reuse and every "
        "science frame to calibrate, leave (done) or fail, each with the reason, decided "
        "by the functions calibrate itself uses. Reads no pixel, starts no cluster, "
        "writes nothing.",
        func=cmd_plan,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/")
    p.add_argument("--out", type=Path, help="output root (default: beside the raw night)")
    p.add_argument("--config", type=Path, help="settings file (TOML), as for calibrate")
    p.add_argument("--force", action="store_true", help="plan as calibrate --force")
    p.add_argument("--no-cosmics", action="store_true", help="plan as calibrate --no-cosmics")
    p.add_argument("--json", action="store_true", help="the plan as JSON")


def _add_verify(sub) -> None:
    """The ``verify`` subcommand."""
    p = _subcommand(
        sub, "verify",
        help="hash every input and product of a night (or a season) again, on the cluster",
        description="A full scrub. A re-run trusts a file whose file-system status (size, "
        "times, inode) is the one recorded with its digest, and reads nothing; corruption "
        "that leaves the status alone (bit rot, a bad disk or copy) is found here: every "
        "raw file, master and calibrated frame the manifest records is read on the workers "
        "and hashed again, and those whose bytes differ are named (and whether their status "
        "changed). --repair moves damaged products aside (NAME.damaged) and calibrates the "
        "night again, which remakes them; damaged raw files are only named. Exit 0 when "
        "everything is as recorded (or repaired), 3 when something is damaged.",
        func=cmd_verify,
    )
    p.add_argument("path", type=Path, help="a night ROOT/YYYY-MM-DD/ or a season root")
    p.add_argument("--repair", action="store_true",
                   help="move damaged products aside and calibrate them again")
    _run_options(p)


def _add_graph(sub) -> None:
    """The ``graph`` subcommand."""
    p = _subcommand(
        sub, "graph",
        help="draw the pipeline's flow for a night from its real task graph",
        description="Build the night's dask graph (master reductions, one task per frame, "
        "outputs) without computing it, fold it to one node per stage with task counts, and "
        "draw it to an .svg, .png, .pdf or .dot file (Graphviz dot when installed, else "
        "matplotlib).",
        func=cmd_graph,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/")
    p.add_argument("-o", "--output", type=Path, required=True, help="flow.svg|png|pdf|dot")
    p.add_argument("--engine", choices=["auto", "dot", "matplotlib"], default="auto")
    p.add_argument("--no-report", action="store_true", help="leave the QA stage out")
    _calibration_options(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="astep-dask",
        description="Calibrate ASTEP nights with dask: inventory, masters, science frames, "
        "KBMOD-ready output.\n\nA night's stages, in order (the command that runs each):\n"
        + "\n".join(f"  {s.name:<10} {s.command:<10} {s.summary}" for s in STAGES),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"astep-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_simulate, _add_arrange, _add_inspect, _add_calibrate, _add_kbmod, _add_search,
                _add_season, _add_report, _add_plan, _add_verify, _add_graph):
        add(sub)
    return parser
