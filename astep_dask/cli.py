"""The ``astep-dask`` command line.

Exit codes (the same for every subcommand):

  0  complete: everything asked for was done
  1  nothing done: bad arguments, a missing or unreadable night, an unwritable output
  3  partial: some frames or nights could not be used (each is named, with the reason)
  130 interrupted (SIGINT/SIGTERM): finished frames are kept; re-run to resume
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

from astep_dask.errors import ArchiveError
from astep_dask.io.layout import format_table, scan
from astep_dask.run.stages import STAGES
from astep_dask.version import __version__

EXIT_OK = 0


EXIT_FAILED = 1


EXIT_PARTIAL = 3


EXIT_INTERRUPTED = 130


EPILOG = """exit codes:
  0  complete
  1  nothing done (the one-line error says why)
  3  partial: some frames or nights were unusable; each is named with its reason
  130 interrupted (Ctrl-C, SIGTERM from scancel or a walltime); re-run to resume
"""


def _cmd_simulate(args: argparse.Namespace) -> int:
    from astep_dask.testing.simulate import SimConfig, simulate_night

    cfg = SimConfig(
        date=args.date,
        size=args.size,
        n_science=args.science,
        n_darks=args.darks,
        n_flats=args.flats,
        n_bias=args.bias,
        overscan=args.overscan,
        bad_files=args.bad_files,
        seed=args.seed,
    )
    night = simulate_night(args.root, cfg)
    print(f"simulated night written to {night} (truth in {night / 'truth'})")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    inventories = scan(args.path)
    if args.json:
        import json

        print(json.dumps([inv.to_dict() for inv in inventories], indent=2))
    else:
        for inv in inventories:
            span = inv.time_span()
            usable = sum(f.usable for f in inv.frames)
            print(f"night {inv.night}  ({inv.root})")
            print(f"  {len(inv.frames)} files, {usable} usable"
                  + (f", {span[0]} .. {span[1]} UTC" if span else ""))
            print(format_table(inv.groups(), ["folder", "type", "exptime", "filter", "count"]))
            notes = [f for f in inv.frames if f.note and f.usable]
            for f in notes:
                print(f"  note: {f.path.name}: {f.note}")
            if inv.problems:
                print(f"  unusable files ({len(inv.problems)}):")
                for f in inv.problems:
                    print(f"    {f.path}: {f.problem}")
            print()
    if not any(f.usable for inv in inventories for f in inv.frames):
        print(f"astep-dask: error: {args.path}: no usable FITS frame found", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _settings(args: argparse.Namespace):
    from astep_dask.config import load_settings

    settings = load_settings(args.config)
    cluster = {}
    if args.scheduler:
        cluster["scheduler"] = args.scheduler
    if args.cluster:
        cluster["kind"] = args.cluster
    if args.workers:
        cluster["n_workers"] = args.workers
    if args.threads:
        cluster["threads_per_worker"] = args.threads
    if args.processes:
        cluster["processes"] = True
    if args.retries is not None:
        cluster["retries"] = args.retries
    if args.dashboard_address:
        cluster["dashboard_address"] = args.dashboard_address
    groups: dict = {"cluster": cluster}
    masters = {}
    if getattr(args, "reuse_foreign_masters", False):
        masters["reuse_foreign"] = True
    if getattr(args, "fallback_masters", False):
        masters["fallback"] = True
    groups["masters"] = masters
    if getattr(args, "no_cosmics", False):
        groups["cosmics"] = {"enabled": False}
    if getattr(args, "compress", False):
        groups["output"] = {"compress": True}
    template = {}
    if getattr(args, "template_nights", None) is not None:
        template["nights"] = args.template_nights
    if getattr(args, "sky_only", False):
        template["enabled"] = False
    groups["template"] = template
    return settings.replace(**groups)


def _summary(result) -> str:
    c = result.counts
    lines = [
        f"night {result.night}: {result.status}  "
        f"({c['done']} calibrated, {c['skipped']} already done, {c['failed']} failed, "
        f"{c['unusable']} unusable files) in {result.finished - result.started:.1f} s",
        f"  output: {result.out_dir}",
    ]
    done = [r for r in result.frames if r["status"] == "done"]
    if done:
        rows = [{"frame": r["output"], "sky e-": f"{r['sky']:.1f}", "noise e-": f"{r['noise']:.1f}",
                 "masked": r["n_masked"], "CR px": r["n_cr"], "sat px": r["n_saturated"],
                 "s": f"{r['t_total']:.2f}"} for r in done]
        lines.append(format_table(rows, list(rows[0])))
    for note in result.masters.get("notes", []):
        lines.append(f"  note: {note}")
    for r in result.masters.get("rejected", []):
        lines.append(f"  rejected flat: {r['path']}: {r['reason']}")
    for r in result.frames:
        if r["status"] == "failed":
            lines.append(f"  failed: {r['file']}: {r['reason']}")
    for u in result.unusable:
        lines.append(f"  unusable: {u['path']}: {u['reason']}")
    if result.error:
        lines.append(f"  error: {result.error}")
    return "\n".join(lines)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from astep_dask.errors import RunError
    from astep_dask.io.layout import scan_night
    from astep_dask.io.products import check_writable, output_dir
    from astep_dask.run.cluster import connect
    from astep_dask.run.night import calibrate_night, print_progress

    settings = _settings(args)
    night = args.night
    inv = scan_night(night)  # raises a one-line ArchiveError before any work
    try:
        check_writable(output_dir(night, args.out))
    except RunError as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    start = [time.perf_counter()]
    with connect(settings.cluster, log=lambda m: print(m, file=sys.stderr)) as client:
        try:
            result = calibrate_night(
                night, client, settings, out=args.out, force=args.force, inventory=inv,
                progress=lambda d, t, r: print_progress(d, t, r, start),
            )
        except RunError as exc:
            print(f"astep-dask: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(_summary(result))
        status = result.status
        if args.kbmod and status != "failed":
            status = _worst(status, _kbmod(night, client, settings, args, start))
    return _exit(status)


def _exit(status: str) -> int:
    return {"complete": EXIT_OK, "partial": EXIT_PARTIAL}.get(status, EXIT_FAILED)


def _worst(a: str, b: str) -> str:
    order = ["complete", "partial", "failed"]
    return max(a, b, key=order.index)


def _kbmod(night: Path, client, settings, args: argparse.Namespace, start: list[float]) -> str:
    """Run the KBMOD export of a calibrated night, print its summary, return its status."""
    import time

    from astep_dask.errors import RunError
    from astep_dask.kbmod.stage import export_night
    from astep_dask.run.night import print_progress

    start[0] = time.perf_counter()
    try:
        res = export_night(night, client, settings, out=args.out, force=args.force,
                           progress=lambda d, t, r: print_progress(d, t, r, start))
    except RunError as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return "failed"
    counts = ", ".join(f"{v} {k}" for k, v in res.get("counts", {}).items())
    print(f"kbmod {res['night']}: {res['status']}  ({counts})  -> {res.get('kbmod_dir')}")
    tpl = res.get("template")
    if tpl:
        nights = f", nights {', '.join(tpl['nights'])}" if tpl.get("nights") else ""
        print(f"  template: {tpl.get('file')} ({tpl.get('mode')}: {tpl.get('frames')} frames"
              f"{nights}); KBMOD files are difference frames, registered frames in "
              f"{res.get('registered_dir')}")
        for skipped in tpl.get("skipped_nights", []):
            print(f"  template: night left out: {skipped}")
        if tpl.get("error"):
            print(f"  template error: {tpl['error']}")
    elif res.get("registered_dir") is None and res.get("status") != "failed":
        print("  sky-only: KBMOD files are the registered, sky-subtracted frames (no template)")
    if res.get("error"):
        print(f"  error: {res['error']}")
    for row in res.get("frames", []):
        if row.get("status") == "failed":
            print(f"  failed: {row.get('file')}: {row.get('reason')}")
    return res["status"]


def _cmd_kbmod(args: argparse.Namespace) -> int:
    import time

    from astep_dask.io.layout import find_nights
    from astep_dask.run.cluster import connect

    settings = _settings(args)
    night = find_nights(args.night)[0]
    with connect(settings.cluster, log=lambda m: print(m, file=sys.stderr)) as client:
        return _exit(_kbmod(night, client, settings, args, [time.perf_counter()]))


def _cmd_search(args: argparse.Namespace) -> int:
    import time

    from astep_dask.errors import RunError
    from astep_dask.io.layout import find_nights
    from astep_dask.kbmod.candidates import read_candidates
    from astep_dask.kbmod.search import search_night
    from astep_dask.run.cluster import connect
    from astep_dask.run.night import print_progress

    settings = _settings(args)
    search = {}
    if args.threshold is not None:
        search["threshold"] = args.threshold
    if args.vmax is not None:
        search.update(vx_min=-args.vmax, vx_max=args.vmax, vy_min=-args.vmax, vy_max=args.vmax)
    if args.v_step is not None:
        search["v_step"] = args.v_step
    settings = settings.replace(search=search)
    night = find_nights(args.night)[0]
    start = [time.perf_counter()]
    with connect(settings.cluster, log=lambda m: print(m, file=sys.stderr)) as client:
        try:
            csv = search_night(night, client, settings, out=args.out,
                               progress=lambda d, t, r: print_progress(d, t, r, start))
        except RunError as exc:
            print(f"astep-dask: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
    summary = json.loads((csv.parent / "search.json").read_text())
    rows = read_candidates(csv)
    g = summary["grid"]
    print(f"search {summary['night']}: {len(rows)} candidate(s) at SNR >= "
          f"{summary['settings']['threshold']:g} over {g['n_searched']} velocities "
          f"(step {g['step']:.1f} px/day), {summary['n_frames']} frames, "
          f"{summary['wall_seconds']:.1f} s  -> {csv}")
    for note in summary.get("notes", []):
        print(f"  note: {note}")
    if rows:
        shown = [{"rank": i + 1, "x": f"{r['x']:.1f}", "y": f"{r['y']:.1f}",
                  "vx px/d": f"{r['vx']:.0f}", "vy px/d": f"{r['vy']:.0f}",
                  "flux e-": f"{r['flux']:.0f}", "SNR": f"{r['snr']:.1f}",
                  "frames": r["n_frames"]} for i, r in enumerate(rows[:args.show])]
        print(format_table(shown, list(shown[0])))
    return EXIT_OK


def _cmd_season(args: argparse.Namespace) -> int:
    from astep_dask.run.cluster import connect
    from astep_dask.run.season import calibrate_season, dry_run, select_nights, write_season_report

    settings = _settings(args)
    nights = select_nights(args.root, args.start, args.end)
    if not nights:
        print(f"astep-dask: error: {args.root}: no night between {args.start or 'the first'} "
              f"and {args.end or 'the last'}", file=sys.stderr)
        return EXIT_FAILED
    if args.dry_run:
        plan = dry_run(nights, settings, args.out)
        columns = ["night", "action", "science", "darks", "flats", "unusable", "output"]
        print(format_table(plan, columns))
        return EXIT_OK
    report_dir = args.out if args.out is not None else args.root
    from astep_dask.errors import RunError
    from astep_dask.io.products import check_writable

    try:
        check_writable(report_dir)
    except RunError as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    with connect(settings.cluster, log=lambda m: print(m, file=sys.stderr)) as client:
        result = calibrate_season(nights, client, settings, out=args.out, in_flight=args.nights)
    path = write_season_report(result, report_dir)
    rows = [{"night": n.night, "status": n.status, "frames": n.done, "failed": n.failed,
             "s": f"{n.seconds:.1f}", "reason": n.reason[:80]} for n in result.nights]
    print(format_table(rows, ["night", "status", "frames", "failed", "s", "reason"]))
    d = result.to_dict()
    print(f"season {result.status}: {d['counts']}, {d['frames_calibrated']} frames in "
          f"{d['wall_seconds']:.1f} s (nights summed: {d['sum_night_seconds']:.1f} s); "
          f"report: {path}")
    return _exit(result.status)


def _cmd_report(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.report.night import load_report, night_report, report_summary
    from astep_dask.run.cluster import connect

    settings = _settings(args)
    night = find_nights(args.night)[0]
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.no_cluster:
        folder = night_report(night, args.out, None, settings=settings.qa, log=log)
    else:
        with connect(settings.cluster, log=log) as client:
            folder = night_report(night, args.out, client, settings=settings.qa, log=log)
    print(report_summary(load_report(folder), folder))
    return EXIT_OK


def _cmd_graph(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.report.graph import flow_chart

    settings = _settings(args)
    night = find_nights(args.night)[0]
    path = flow_chart(night, args.output, out=args.out, settings=settings, engine=args.engine,
                      report=not args.no_report)
    print(f"flow chart written to {path}")
    return EXIT_OK


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (default: a LocalCluster sized to this machine)")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="join a running dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--cluster", choices=["local", "slurm", "pbs"],
                   help="start a cluster of this kind (slurm/pbs: dask-jobqueue, see deploy/)")
    g.add_argument("--workers", type=int,
                   help="local workers (default: 1, or one per core with --processes)")
    g.add_argument("--threads", type=int,
                   help="threads per local worker (default: the cores shared among workers)")
    g.add_argument("--processes", action="store_true",
                   help="local workers as separate processes, not threads of this one: a "
                   "crashed worker is restarted and its frames retried (more memory and "
                   "start-up time)")
    g.add_argument("--retries", type=int,
                   help="extra attempts of a frame whose worker process died (with "
                   "--processes or a scheduler; default 2)")
    g.add_argument("--dashboard-address", help="dashboard address of a local cluster (:8787)")


def _subcommand(sub, name: str, help: str, description: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=textwrap.fill(description, 88),
                       epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=func)
    return p


def _template_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KBMOD export: static-sky template (default: this night's frames)")
    g.add_argument("--template-nights", type=int, metavar="N",
                   help="build the template from the N nearest other nights of the same "
                   "field instead (slow movers then do not subtract themselves)")
    g.add_argument("--sky-only", action="store_true",
                   help="no template: the KBMOD files carry the registered, sky-subtracted "
                   "frames (for users who bring their own templates)")


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that reads or writes a night's products: where, settings,
    cluster."""
    p.add_argument("--out", type=Path, help="output root (default: beside each raw night)")
    p.add_argument("--config", type=Path, help="settings file (TOML), see astep_dask/config.py")
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

    p = _subcommand(
        sub, "simulate",
        help="write a synthetic night with known truth in the archive layout",
        description="Write a synthetic ASTEP night (uint16 FITS, archive layout) under ROOT, "
        "with the truth that made it in ROOT/DATE/truth/.",
        func=_cmd_simulate,
    )
    p.add_argument("root", type=Path, help="archive root; the night goes to ROOT/DATE/")
    p.add_argument("--date", default="2026-06-15", help="night date YYYY-MM-DD")
    p.add_argument("--size", type=int, default=256, help="frame side in pixels")
    p.add_argument("--science", type=int, default=12, help="number of science frames")
    p.add_argument("--darks", type=int, default=8, help="darks per exposure time")
    p.add_argument("--flats", type=int, default=9, help="number of sky flats")
    p.add_argument("--bias", type=int, default=0, help="number of bias frames (ASTEP: 0)")
    p.add_argument("--overscan", type=int, default=0, help="overscan columns (ASTEP: 0)")
    p.add_argument("--bad-files", action="store_true", help="add unusable files of each kind")
    p.add_argument("--seed", type=int, default=1, help="random seed")

    p = _subcommand(
        sub, "inspect",
        help="list a night's (or season's) frames by folder, type, exposure and filter",
        description="Read every FITS header of a night folder ROOT/YYYY-MM-DD/ or of every "
        "night under a season root, and print counts per folder x type x exposure x filter, "
        "the time span, and each unusable file with its reason. Reads headers only.",
        func=_cmd_inspect,
    )
    p.add_argument("path", type=Path, help="a night folder or a season root")
    p.add_argument("--json", action="store_true", help="print the full inventory as JSON")

    p = _subcommand(
        sub, "calibrate",
        help="build a night's masters and calibrate every science frame on a dask cluster",
        description="Calibrate one night: master darks/flats/bias and bad-pixel mask (reused "
        "when they exist with the same inputs and settings), then every science frame as one "
        "task on the cluster: overscan/trim, bias, dark, flat, gain, variance, mask, cosmic "
        "rays. Writes <raw stem>_CAL.fits (SCI e-, VAR e-^2, MASK bits) and manifest.json "
        "to NIGHT/NIGHT-CAMS_CAL/ or OUT/NIGHT/. Re-running resumes: frames already "
        "calibrated with the same provenance are skipped.",
        func=_cmd_calibrate,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/")
    p.add_argument("--force", action="store_true", help="recalibrate frames already done")
    p.add_argument("--kbmod", action="store_true",
                   help="then write the KBMOD-ready export (as the kbmod command)")
    _template_options(p)
    _calibration_options(p)

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
        func=_cmd_kbmod,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (calibrated)")
    p.add_argument("--force", action="store_true", help="redo frames already exported")
    _template_options(p)
    _run_options(p)

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
        func=_cmd_search,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (exported)")
    p.add_argument("--threshold", type=float, help="detection threshold, SNR (default 7)")
    p.add_argument("--vmax", type=float, metavar="PX_PER_DAY",
                   help="search |vx|, |vy| up to this (default 1200 px/day)")
    p.add_argument("--v-step", type=float, metavar="PX_PER_DAY",
                   help="velocity grid step (default: PSF sigma / night's time span)")
    p.add_argument("--show", type=int, default=10, help="candidates printed (default 10)")
    _run_options(p)

    p = _subcommand(
        sub, "season",
        help="calibrate every night under a season root through one dask cluster",
        description="Calibrate every night ROOT/YYYY-MM-DD/ (optionally between --from and "
        "--to) through one dask cluster, several nights in flight at once, so that one "
        "night's masters are reduced while another night's frames are calibrated. Nights "
        "already complete for the same raw files and settings are skipped; a night that "
        "fails is reported with its reason and the season goes on. Writes season.json to "
        "OUT (or ROOT) and each night's products as `calibrate` does.",
        func=_cmd_season,
    )
    p.add_argument("root", type=Path, help="season root holding YYYY-MM-DD/ nights")
    p.add_argument("--from", dest="start", metavar="DATE", help="first night (YYYY-MM-DD)")
    p.add_argument("--to", dest="end", metavar="DATE", help="last night (YYYY-MM-DD)")
    p.add_argument("--nights", type=int, default=2, help="nights in flight at once (default 2)")
    p.add_argument("--dry-run", action="store_true", help="list what would run, do nothing")
    _calibration_options(p)

    p = _subcommand(
        sub, "report",
        help="write (or rewrite) a calibrated night's QA report: qa.json, plots, index.html",
        description="Measure every calibrated frame of a night (sky, noise, star FWHM, masked, "
        "saturated and cosmic-ray fractions, background gradient) and the masters, flag "
        "outlier frames (cloud, sky jump, trail, defocus; flagged, never deleted) and write "
        "OUTPUT/report/ with qa.json, PNG plots and index.html. Flags are not failures.",
        func=_cmd_report,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/ (calibrated)")
    p.add_argument("--no-cluster", action="store_true", help="measure in this process")
    _run_options(p)

    p = _subcommand(
        sub, "graph",
        help="draw the pipeline's flow for a night from its real task graph",
        description="Build the night's dask graph (master reductions, one task per frame, "
        "outputs) without computing it, fold it to one node per stage with task counts, and "
        "draw it to an .svg, .png, .pdf or .dot file (Graphviz dot when installed, else "
        "matplotlib).",
        func=_cmd_graph,
    )
    p.add_argument("night", type=Path, help="night folder ROOT/YYYY-MM-DD/")
    p.add_argument("-o", "--output", type=Path, required=True, help="flow.svg|png|pdf|dot")
    p.add_argument("--engine", choices=["auto", "dot", "matplotlib"], default="auto")
    p.add_argument("--no-report", action="store_true", help="leave the QA stage out")
    _calibration_options(p)
    return parser


def _interrupt(signum: int, frame: object) -> None:
    """First SIGTERM/SIGINT: stop (the cluster is closed on the way out); later ones are
    ignored so that they cannot cut that cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``astep-dask`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # scancel and batch walltimes send SIGTERM: treat it as Ctrl-C.
        previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    else:  # pragma: no cover - called from a thread (signals only work in the main one)
        previous = {}
    try:
        return args.func(args)
    except (ArchiveError, FileNotFoundError, PermissionError, ValueError, RuntimeError) as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("astep-dask: interrupted; finished frames are kept, re-run to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
