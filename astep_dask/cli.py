"""The ``astep-dask`` command line.

Exit codes (the same for every subcommand):

  0  complete: everything asked for was done
  1  nothing done: bad arguments, a missing or unreadable night, an unwritable output
  3  partial: some frames or nights could not be used (each is named, with the reason)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .layout import ArchiveError, format_table, scan

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PARTIAL = 3

EPILOG = """exit codes:
  0  complete
  1  nothing done (the one-line error says why)
  3  partial: some frames or nights were unusable; each is named with its reason
"""


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import SimConfig, simulate_night

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="astep-dask",
        description="Calibrate ASTEP nights with dask: inventory, masters, science frames, "
        "KBMOD-ready output.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"astep-dask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="write a synthetic night with known truth in the archive layout",
        description="Write a synthetic ASTEP night (uint16 FITS, archive layout) under ROOT, "
        "with the truth that made it in ROOT/DATE/truth/.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "inspect",
        help="list a night's (or season's) frames by folder, type, exposure and filter",
        description="Read every FITS header of a night folder ROOT/YYYY-MM-DD/ or of every "
        "night under a season root, and print counts per folder x type x exposure x filter, "
        "the time span, and each unusable file with its reason. Reads headers only.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", type=Path, help="a night folder or a season root")
    p.add_argument("--json", action="store_true", help="print the full inventory as JSON")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``astep-dask`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ArchiveError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"astep-dask: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
