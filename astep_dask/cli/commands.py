"""The ``astep-dask`` subcommands: each turns parsed arguments into a call of the public
API, prints what a user needs and returns the exit code (see :mod:`astep_dask.cli`).

Each command imports its stage's modules when it runs, so that ``astep-dask --help`` and
``inspect`` stay quick.
"""


from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from astep_dask.cli.progress import PhaseProgress
from astep_dask.io.arrange import arrange_night
from astep_dask.io.layout import Inventory, format_table, scan
from astep_dask.io.products import MANIFEST

if TYPE_CHECKING:
    from distributed import Client

    from astep_dask.config import Settings

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130
EPILOG = """exit codes:
  0  complete
  1  failed: nothing done, or a bad input (the one-line error says why)
  2  usage: an option, argument or setting refused (the line names it and its range)
  3  partial: some frames or nights were unusable; each is named with its reason
  130 interrupted (Ctrl-C, SIGTERM from scancel or a walltime); re-run to resume
"""


def cmd_simulate(args: argparse.Namespace) -> int:
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


def cmd_arrange(args: argparse.Namespace) -> int:
    done = arrange_night(args.source, args.root, args.date, copy=args.copy)
    how = "copied" if args.copy else "linked"
    print(f"night {done.night.name}  ({done.night})")
    for folder, files in sorted(done.placed.items()):
        print(f"  {folder}: {len(files)} files {how}")
    if done.left_out:
        print(f"  left out ({len(done.left_out)}):")
        for path, why in done.left_out:
            print(f"    {path}: {why}")
    print(f"next: astep-dask calibrate {done.night}")
    return EXIT_PARTIAL if done.left_out else EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    inventories = scan(args.path)
    if args.json:
        print(json.dumps([inv.to_dict() for inv in inventories], indent=2))
    else:
        for inv in inventories:
            span = inv.time_span()
            usable = sum(f.usable for f in inv.frames)
            print(f"night {inv.night}  ({inv.root})")
            print(f"  {len(inv.frames)} files, {usable} usable"
                  + (f", {span[0]} .. {span[1]} UTC" if span else ""))
            print(format_table(inv.groups(), ["folder", "type", "exptime", "filter", "count"]))
            for text, n, example in distinct_notes(inv):
                files = f"{n} files, e.g. {example}" if n > 1 else f"1 file: {example}"
                print(f"  note: {text} ({files})")
            if inv.problems:
                print(f"  unusable files ({len(inv.problems)}):")
                for f in inv.problems:
                    print(f"    {f.path}: {f.problem}")
            print()
    if not any(f.usable for inv in inventories for f in inv.frames):
        print(f"astep-dask: error: {args.path}: no usable FITS frame found", file=sys.stderr)
        return EXIT_FAILED
    # Partial, as for every command (README, exit codes): some files cannot be used.
    return EXIT_PARTIAL if any(inv.problems for inv in inventories) else EXIT_OK


def distinct_notes(inv: Inventory) -> list[tuple[str, int, str]]:
    """The inventory's notes on usable files, each once: ``(note, how many files, the
    first file's name)``, the most frequent first (a night whose 96 frames lack GAIN
    gives one line, not 96)."""
    seen: dict[str, list] = {}
    for f in inv.frames:
        if f.usable and f.note:
            for text in dict.fromkeys(t.strip() for t in f.note.split("; ") if t.strip()):
                entry = seen.setdefault(text, [0, f.path.name])
                entry[0] += 1
    return sorted(((t, n, ex) for t, (n, ex) in seen.items()), key=lambda e: -e[1])


def _settings(args: argparse.Namespace) -> Settings:
    """The run's settings: the settings file, then the options, checked against this
    machine (:class:`~astep_dask.errors.SettingsError`, exit 2, for what is refused)."""
    from astep_dask.config import load_settings
    from astep_dask.errors import SettingsError
    from astep_dask.run.cluster import check_layout

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
    if getattr(args, "security", None):
        if not args.scheduler:
            raise SettingsError("--security is for joining a --scheduler; the clusters "
                                "astep-dask starts make their own credentials")
        cluster["security"] = str(args.security)
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
    if getattr(args, "catalog", None):
        groups["astrometry"] = {"catalog": str(args.catalog)}
    settings = settings.replace(**groups)
    check_layout(settings.cluster)  # before anything starts: exit 2 for what cannot fit
    return settings


TABLE_ROWS = 20  # a night with more calibrated frames gets its figures summarised


def _figures(rows: list[dict]) -> list[str]:
    """The calibrated frames' figures in a few lines: median and range of each."""
    import numpy as np

    def span(key: str, fmt: str) -> str:
        v = np.array([r[key] for r in rows if r.get(key) is not None], float)
        if not v.size:
            return "n/a"
        return (f"median {format(np.median(v), fmt)} "
                f"(from {format(v.min(), fmt)} to {format(v.max(), fmt)})")

    return [f"  {len(rows)} frames calibrated:",
            f"    median e-      {span('median', '.1f')}",
            f"    MAD sigma e-   {span('mad_sigma', '.1f')}",
            f"    masked px      {span('n_masked', '.0f')}",
            f"    CR px          {span('n_cr', '.0f')}",
            f"    sat px         {span('n_saturated', '.0f')}",
            f"    s per frame    {span('t_total', '.2f')}"]


def _grouped(word: str, rows: list[dict], key: str = "reason", most: int = 2) -> list[str]:
    """``  word: file: why`` per frame, or one line for all the frames with the same
    ``row[key]`` when more than ``most`` have it (a filter with no flat fails a night)."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        by_reason.setdefault(str(r[key]), []).append(r["file"])
    lines = []
    for reason, files in by_reason.items():
        if len(files) > most:
            lines.append(f"  {word}: {len(files)} frames ({files[0]} ... {files[-1]}): {reason}")
        else:
            lines += [f"  {word}: {f}: {reason}" for f in files]
    return lines


def _summary(result) -> str:
    c = result.counts
    lines = [
        f"night {result.night}: {result.status}  "
        f"({c['done']} calibrated, {c['skipped']} already done, {c['failed']} failed, "
        f"{c['unusable']} unusable files) in {result.finished - result.started:.1f} s",
        f"  output: {result.out_dir}",
    ]
    done = [r for r in result.frames if r["status"] == "done"]
    if done and len(done) <= TABLE_ROWS:
        rows = [{"frame": r["output"], "median e-": f"{r['median']:.1f}",
                 "MAD sigma e-": f"{r['mad_sigma']:.1f}",
                 "masked": r["n_masked"], "CR px": r["n_cr"], "sat px": r["n_saturated"],
                 "s": f"{r['t_total']:.2f}"} for r in done]
        lines.append(format_table(rows, list(rows[0])))
    elif done:
        lines += [*_figures(done), f"  per-frame figures: {result.out_dir / MANIFEST}"]
    for note in result.details.get("masters", {}).get("notes", []):
        lines.append(f"  note: {note}")
    for r in result.details.get("masters", {}).get("rejected", []):
        lines.append(f"  rejected flat: {r['path']}: {r['reason']}")
    lines += _grouped("note", [r for r in result.frames if r.get("note")], "note")
    return "\n".join(lines + _problems(result))


def _problems(result) -> list[str]:
    """The summary's lines that name what went wrong (all that ``--quiet`` prints)."""
    lines = _grouped("failed", [r for r in result.frames
                                if r["status"] == "failed" and not r.get("not_attempted")])
    if waiting := [r for r in result.frames if r.get("not_attempted")]:
        lines.append(f"  not calibrated: {len(waiting)} frames, the night stopped at the "
                     "error above; re-run to resume")
    for u in result.unusable:
        lines.append(f"  unusable: {u['path']}: {u['reason']}")
    if result.error:
        lines.append(f"  error: {result.error}")
    return lines


def _show(args: argparse.Namespace, text: str, problems: list[str] = ()) -> None:
    """Print a command's summary; with ``--quiet`` only its ``problems`` (on stderr)."""
    if not getattr(args, "quiet", False):
        print(text)
    elif problems:
        print("\n".join(problems), file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from astep_dask.errors import RunError
    from astep_dask.io.layout import check_night, scan_night
    from astep_dask.io.products import check_writable, output_dir
    from astep_dask.run.night import calibrate_night, current_result, load_index

    settings = _settings(args)
    night = args.night
    check_night(night)  # raises a one-line ArchiveError before any work
    try:
        check_writable(output_dir(night, args.out))
    except RunError as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not (args.force or args.kbmod) and (done := current_result(night, args.out, settings)):
        _show(args, _summary(done), _problems(done))  # nothing to do: no cluster started
        return _exit(done.status)

    def inventory():
        load_index(output_dir(night, args.out))  # unchanged files: headers only
        return scan_night(night)

    with _cluster_during(settings, args, inventory) as (client, inv):
        progress = _progress(args)  # its clock starts once the cluster is up
        try:
            with _performance(args, output_dir(night, args.out), "calibrate"):
                result = calibrate_night(night, client, settings, out=args.out,
                                         force=args.force, inventory=inv, progress=progress)
        except RunError as exc:
            print(f"astep-dask: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            progress.close()
        _show(args, _summary(result), _problems(result))
        status = result.status
        if args.kbmod and status != "failed":
            status = _worst(status, _kbmod(night, client, settings, args))
        _keep_dashboard(args, client)
    return _exit(status)


@contextlib.contextmanager
def _cluster_during(settings: Settings, args: argparse.Namespace, work: Callable[[], T]
                    ) -> Iterator[tuple[Client, T]]:
    """The run's cluster (:func:`~astep_dask.run.cluster.connect`) and ``work()``'s
    result: ``work`` (the inventory, which reads every raw file's header) runs on a thread
    while the cluster starts here, so that neither waits for the other.

    The cluster starts and closes in the calling (main) thread: starting a batch cluster
    imports dask-jobqueue, which sets a signal handler, and signal handlers can only be
    set there. An error of either is raised once both are over; a cluster that started
    is closed.
    """
    from astep_dask.run.cluster import connect

    with ThreadPoolExecutor(1, "inventory") as pool:
        done = pool.submit(work)
        try:
            with connect(settings.cluster, log=_log(args)) as client:
                result = done.result()
                yield client, result
        finally:
            done.cancel()
            wait([done])  # never leave the inventory running behind an error


def _progress(args: argparse.Namespace, label: str = "frames") -> PhaseProgress:
    """The command's progress display (bars on a terminal, a line per tenth otherwise)."""
    return PhaseProgress(label, quiet=getattr(args, "quiet", False))


def _log(args: argparse.Namespace):
    """Where the cluster's one-line messages go: stderr, or nowhere with --quiet."""
    if getattr(args, "quiet", False):
        return lambda m: None
    return lambda m: print(m, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _performance(args: argparse.Namespace, folder: Path, stage: str):
    """With ``--performance-report``, dask's performance report of the stage (task stream,
    worker profiles, bandwidth) written to ``folder/performance-<stage>.html``."""
    if not getattr(args, "performance_report", False):
        yield
        return
    from distributed import performance_report

    from astep_dask.io.fitsio import atomic_path

    path = folder / f"performance-{stage}.html"
    with atomic_path(path) as tmp, performance_report(filename=str(tmp)):
        yield
    print(f"  performance report: {path}", file=sys.stderr)


def _keep_dashboard(args: argparse.Namespace, client) -> None:
    """With ``--keep-dashboard``, keep the cluster (and its dashboard) up until Enter or
    Ctrl-C, so that the run can be looked at before it goes."""
    if not getattr(args, "keep_dashboard", False):
        return
    link = getattr(client, "dashboard_link", None) or "(this cluster has no dashboard)"
    print(f"dashboard kept at {link}; press Enter (or Ctrl-C) to close the cluster",
          file=sys.stderr, flush=True)
    try:
        sys.stdin.readline()
    except KeyboardInterrupt:
        pass


def _exit(status: str) -> int:
    return {"complete": EXIT_OK, "partial": EXIT_PARTIAL}.get(status, EXIT_FAILED)


def _worst(a: str, b: str) -> str:
    order = ["complete", "partial", "failed"]
    return max(a, b, key=order.index)


def _kbmod(night: Path, client, settings, args: argparse.Namespace) -> str:
    """Run the KBMOD export of a calibrated night, print its summary, return its status."""
    from astep_dask.errors import RunError
    from astep_dask.io.products import output_dir
    from astep_dask.kbmod.stage import export_night

    progress = _progress(args, "export")
    try:
        with _performance(args, output_dir(night, args.out), "kbmod"):
            res = export_night(night, client, settings, out=args.out, force=args.force,
                               progress=progress)
    except RunError as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return "failed"
    finally:
        progress.close()
    c = res.counts
    c["failed"] += c.pop("unusable")  # an unreadable calibrated file counts as failed here
    counts = ", ".join(f"{v} {k}" for k, v in c.items())
    lines = [f"kbmod {res.night}: {res.status}  ({counts})  -> {res.out_dir}"]
    tpl = res.details.get("template")
    if tpl:
        nights = f", nights {', '.join(tpl['nights'])}" if tpl.get("nights") else ""
        lines.append(f"  template: {tpl.get('file')} ({tpl.get('mode')}: {tpl.get('frames')} "
                     f"frames{nights}); KBMOD files are difference frames, registered frames "
                     f"in {res.details.get('registered_dir')}")
        lines += [f"  template: night left out: {n}" for n in tpl.get("skipped_nights", [])]
    elif res.details.get("registered_dir") is None and res.status != "failed":
        lines.append("  sky-only: KBMOD files are the registered, sky-subtracted frames "
                     "(no template)")
    if res.details.get("workunit"):
        lines.append(f"  WorkUnit: {res.details['workunit']}")
    fit = res.details.get("wcs_fit")
    if fit and fit.get("status") == "fitted":
        lines.append(f"  WCS fitted to {Path(str(fit['catalog'])).name}: {fit['n_stars']} "
                     f"stars, rms {float(fit['rms_px']):.3f} px")
    elif fit:
        lines.append(f"  no WCS: {fit['reason']}")
    problems = [f"  template error: {tpl['error']}"] if tpl and tpl.get("error") else []
    if res.error:
        problems.append(f"  error: {res.error}")
    problems += [f"  failed: {Path(u['path']).name}: {u['reason']}"  # first, as in kbmod.json
                 for u in res.unusable]
    problems += [f"  failed: {row.get('file')}: {row.get('reason')}" for row in res.frames
                 if row.get("status") == "failed"]
    _show(args, "\n".join(lines + problems), problems)
    return res.status


def cmd_kbmod(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.run.cluster import connect

    settings = _settings(args)
    night = find_nights(args.night)[0]
    with connect(settings.cluster, log=_log(args)) as client:
        status = _kbmod(night, client, settings, args)
        _keep_dashboard(args, client)
    return _exit(status)


def cmd_search(args: argparse.Namespace) -> int:
    from astep_dask.errors import RunError
    from astep_dask.io.layout import find_nights
    from astep_dask.kbmod.candidates import read_candidates
    from astep_dask.kbmod.search import search_night
    from astep_dask.run.cluster import connect

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
    progress = _progress(args, "search")
    with connect(settings.cluster, log=_log(args)) as client:
        try:
            res = search_night(night, client, settings, out=args.out, progress=progress)
        except RunError as exc:
            print(f"astep-dask: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            progress.close()
        _keep_dashboard(args, client)
    summary, csv = res.details["summary"], res.details["candidates"]
    rows = read_candidates(csv)
    g = summary["grid"]
    lines = [f"search {summary['night']}: {len(rows)} candidate(s) at SNR >= "
             f"{summary['settings']['threshold']:g} over {g['n_searched']} velocities "
             f"(step {g['step']:.1f} px/day), {summary['n_frames']} frames, "
             f"{summary['wall_seconds']:.1f} s  -> {csv}"]
    lines += [f"  note: {note}" for note in summary.get("notes", [])]
    if rows:
        shown = [{"rank": i + 1, "x": f"{r['x']:.1f}", "y": f"{r['y']:.1f}",
                  "vx px/d": f"{r['vx']:.0f}", "vy px/d": f"{r['vy']:.0f}",
                  "flux e-": f"{r['flux']:.0f}", "SNR": f"{r['snr']:.1f}",
                  "frames": r["n_frames"]} for i, r in enumerate(rows[:args.show])]
        lines.append(format_table(shown, list(shown[0])))
    _show(args, "\n".join(lines))
    return EXIT_OK


def cmd_season(args: argparse.Namespace) -> int:
    from astep_dask.run.cluster import connect
    from astep_dask.run.season import (
        calibrate_season,
        dry_run,
        season_table,
        select_nights,
        write_season_report,
    )

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
    with connect(settings.cluster, log=_log(args)) as client:
        result = calibrate_season(nights, client, settings, out=args.out, in_flight=args.nights,
                                  log=_log(args))
        _keep_dashboard(args, client)
    path = write_season_report(result, report_dir)
    # Counts from each night's manifest, with their sums in the TOTAL row.
    rows = season_table(result)
    text = (f"{format_table(rows, list(rows[0]))}\nseason {result.status}: "
            f"{len(result.nights)} nights in {result.finished - result.started:.1f} s; "
            f"report: {path}")
    problems = [f"  failed: night {n.night}: {n.reason}" for n in result.nights
                if n.status in ("failed", "partial")]
    _show(args, text, problems)
    return _exit(result.status)


def cmd_report(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.report.night import load_report, night_report, report_summary
    from astep_dask.run.cluster import connect

    settings = _settings(args)
    night = find_nights(args.night)[0]
    progress = _progress(args, "report")
    try:
        if args.no_cluster:
            result = night_report(night, None, settings, args.out, progress=progress)
        else:
            with connect(settings.cluster, log=_log(args)) as client:
                result = night_report(night, client, settings, args.out, progress=progress)
                _keep_dashboard(args, client)
    finally:
        progress.close()
    _show(args, report_summary(load_report(result.out_dir), result.out_dir))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from astep_dask.config import load_settings
    from astep_dask.io.layout import check_night
    from astep_dask.run.plan import plan_night

    settings = load_settings(args.config)
    if args.no_cosmics:
        settings = settings.replace(cosmics={"enabled": False})
    check_night(args.night)
    plan = plan_night(args.night, settings, out=args.out, force=args.force)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.text())
    return EXIT_PARTIAL if plan.unusable else EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.run.cluster import connect
    from astep_dask.run.verify import verify_many

    settings = _settings(args)
    nights = find_nights(args.path)
    with connect(settings.cluster, log=_log(args)) as client:
        progress = _progress(args, "verify")
        try:
            checks = verify_many(nights, client, settings, args.out, args.repair, progress)
        finally:
            progress.close()
    lines, problems = [], []
    for c in checks:
        repaired = f", {len(c.repaired)} repaired" if c.repaired else ""
        lines.append(f"verify {c.night}: {c.status}  ({c.checked} files, "
                     f"{c.bytes_read / 1e6:.0f} MB read, {len(c.damaged)} damaged{repaired}) "
                     f"in {c.seconds:.1f} s")
        for d in c.damaged:
            fixed = " (repaired)" if d.path in c.repaired else ""
            problems.append(f"  damaged {d.kind}: {d.path}: {d.reason}{fixed}")
        if c.error:
            problems.append(f"  error: {c.error}")
    _show(args, "\n".join(lines + problems), problems)
    statuses = [c.status for c in checks]
    return _exit("failed" if statuses and all(s == "failed" for s in statuses) else
                 "partial" if any(s != "complete" for s in statuses) else "complete")


def cmd_graph(args: argparse.Namespace) -> int:
    from astep_dask.io.layout import find_nights
    from astep_dask.report.graph import flow_chart

    settings = _settings(args)
    night = find_nights(args.night)[0]
    path = flow_chart(night, args.output, out=args.out, settings=settings, engine=args.engine,
                      report=not args.no_report)
    print(f"flow chart written to {path}")
    return EXIT_OK
