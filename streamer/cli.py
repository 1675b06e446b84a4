"""The ``streamer`` command line: parse, load the configuration, call one function, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from streamer import __version__, clock
from streamer.errors import StreamerError, UsageError

if TYPE_CHECKING:
    from streamer.config import Config

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _date_arg(text: str) -> object:
    from streamer.config import parse_date

    try:
        return parse_date(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a date YYYY-MM-DD") from None


def _ccd_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a CCD number 1..16")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streamer",
        description="Stream ZTF data from IRSA, detrend it to aperture catalogues, and keep disk use within a budget.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="configuration file (default: $STREAMER_CONFIG, then ./config.toml)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("run", help="run the service as a daemon (backfill ranges, then follow new nights)")
    run.set_defaults(handler=_run)

    backfill = commands.add_parser("backfill", help="process a range of nights once, then exit")
    backfill.add_argument("--start", required=True, type=_date_arg, help="first night, YYYY-MM-DD (UT, inclusive)")
    backfill.add_argument("--end", required=True, type=_date_arg, help="last night, YYYY-MM-DD (UT, inclusive)")
    backfill.add_argument("--ccd", type=_ccd_arg, action="append", help="a CCD to process (repeatable; default all)")
    backfill.set_defaults(handler=_backfill)

    status = commands.add_parser("status", help="show the queue, the disk budget and recent errors (read-only)")
    status.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    status.set_defaults(handler=_status)

    explain = commands.add_parser("explain", help="why one file is kept, pinned or erasable, and its history (read-only)")
    explain.add_argument("name", metavar="NAME|PATH", help="the file's relpath, absolute path under the root, or file name")
    explain.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    explain.set_defaults(handler=_explain)

    report = commands.add_parser("report", help="write a night's QA page (HTML and PNG figures) and print its summary")
    report.add_argument("--night", required=True, type=_date_arg, help="the night, YYYY-MM-DD")
    report.add_argument("--out", metavar="DIR", help="where to write it (default: [report] directory/NIGHT, else ./streamer-report-NIGHT)")
    report.add_argument("--json", action="store_true", help="print report.json instead of the summary")
    report.set_defaults(handler=_report)

    starflat = commands.add_parser("starflat", help="each quadrant's relative response from stars measured on several quadrants")
    starflat.add_argument("--start", required=True, type=_date_arg, help="first night, YYYY-MM-DD")
    starflat.add_argument("--end", required=True, type=_date_arg, help="last night, YYYY-MM-DD (inclusive)")
    starflat.add_argument("--filter", choices=("zg", "zr", "zi"), help="one filter (default: each filter found)")
    starflat.add_argument("--radius", type=float, default=3.0, metavar="PX", help="aperture radius used, nearest of the catalogue's (default 3)")
    starflat.add_argument("--out", default="starflat", metavar="DIR", help="where the tables and maps go (default ./starflat)")
    starflat.set_defaults(handler=_starflat)

    reconcile = commands.add_parser("reconcile", help="compare the storage root with the ledger")
    reconcile.add_argument("--fix", action="store_true", help="register unknown files and remove orphan .part files")
    reconcile.add_argument("--erasable-list", metavar="FILE", help="write the read-only trees' files no consumer needs")
    reconcile.set_defaults(handler=_reconcile)

    demo = commands.add_parser("demo", help="simulate a night, serve it on loopback and backfill it under a small budget")
    demo.add_argument("--workdir", metavar="DIR", help="where to put everything (default: a new temporary directory)")
    demo.add_argument("--ccds", default="13,14", help="CCDs to simulate (default 13,14)")
    demo.add_argument("--exposures", type=int, default=4, help="science exposures per CCD (default 4)")
    demo.add_argument("--shape", choices=("full", "small"), default="full", help="frame size (default full)")
    demo.set_defaults(handler=_demo)

    sim = commands.add_parser("sim", help="the simulated IRSA archive (no configuration needed)")
    sim_commands = sim.add_subparsers(dest="sim_command", metavar="SIMCOMMAND", parser_class=_Parser)
    sim_commands.required = True
    generate = sim_commands.add_parser("generate", help="write a simulated night in IRSA's layout, with its truth")
    generate.add_argument("--out", required=True, metavar="DIR")
    generate.add_argument("--night", required=True, type=_date_arg, metavar="YYYY-MM-DD")
    generate.add_argument("--ccds", default="13", metavar="LIST", help="comma-separated CCD ids (default 13)")
    generate.add_argument("--exposures", type=int, default=5, metavar="N", help="science exposures (default 5)")
    generate.add_argument("--flats-per-led", type=int, default=5, metavar="K", help="flats per LED (default 5)")
    generate.add_argument("--biases", type=int, default=20, metavar="M", help="biases (default 20)")
    generate.add_argument("--seed", type=int, default=0, metavar="S")
    generate.add_argument("--shape", choices=("full", "small"), default="full")
    generate.add_argument("--jobs", type=int, default=1, metavar="N", help="files written in parallel (default 1)")
    generate.add_argument("--filters", default="zg,zr,zi", metavar="LIST", help="science filters in rotation (default zg,zr,zi)")
    generate.add_argument("--flat-filters", default="zg,zr,zi", metavar="LIST",
                          help='filters whose LED flats are taken, "" for none (default zg,zr,zi)')  # fmt: skip
    generate.add_argument("--pocket", default="off", metavar="MODEL", help='inject the pocket effect: "off" (default) or v0.1')
    generate.add_argument("--starflat", action="store_true",
                          help="a dithered starflat sequence with a per-quadrant response the flats do not see")  # fmt: skip
    generate.add_argument("--response-levels", action="store_true",
                          help="CCDs and amplifiers of different sensitivities under a focal-plane illumination")  # fmt: skip
    generate.set_defaults(handler=_sim_generate)
    serve = sim_commands.add_parser("serve", help="serve a directory laid out like IRSA over HTTP")
    serve.add_argument("--root", required=True, metavar="DIR")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    serve.add_argument("--faults", default="none", metavar="PROFILE", help="none, flaky, hostile or a TOML file of rates")
    serve.add_argument("--fault-seed", type=int, default=0, metavar="S")
    serve.add_argument("--require-login", action="store_true", help="serve data only to a logged-in session")
    serve.add_argument(
        "--arrival", action="store_true",
        help=f"searches find an exposure only once the clock (${clock.ENVIRONMENT_VARIABLE}) reaches it, a calibration after its night",
    )  # fmt: skip
    serve.add_argument("--username", default="ztfuser", help="the account the login accepts")
    serve.add_argument("--password-env", default="STREAMER_SIM_PASSWORD", help="variable holding the accepted password")
    serve.set_defaults(handler=_sim_serve)
    return parser


def _load(args: argparse.Namespace) -> Config:
    from streamer.config import find_config, load_config

    return load_config(find_config(args.config))


def _run(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.app import run_daemon

    return run_daemon(config)


def _backfill(args: argparse.Namespace) -> int:
    if args.start > args.end:
        raise UsageError(f"--start {args.start} is after --end {args.end}: expected start <= end")
    config = _load(args)
    from streamer.service.app import run_backfill

    return run_backfill(config, args.start, args.end, tuple(args.ccd or ()))


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.status import show

    return show(config, as_json=args.json)


def _explain(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.explain import show

    return show(config, args.name, as_json=args.json)


def _report(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.report import show

    return show(config, args.night, Path(args.out) if args.out else None, as_json=args.json)


def _starflat(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.starflat import run

    return run(config, args.start, args.end, args.filter, Path(args.out), args.radius)


def _reconcile(args: argparse.Namespace) -> int:
    config = _load(args)
    from streamer.service.reconcile import run

    return run(config, fix=args.fix, erasable_list=args.erasable_list)


def _demo(args: argparse.Namespace) -> int:
    from streamer.demo import run

    return run(workdir=args.workdir, ccds=_ccd_list(args.ccds), exposures=args.exposures, shape=args.shape)


def _ccd_list(text: str) -> tuple[int, ...]:
    try:
        ccds = tuple(_ccd_arg(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as err:
        raise UsageError(f"--ccds {text!r}: {err}") from None
    return ccds


def _sim_generate(args: argparse.Namespace) -> int:
    from streamer.sim.generate import main

    return main(args, ccds=_ccd_list(args.ccds))


def _sim_serve(args: argparse.Namespace) -> int:
    from streamer.sim.server import main

    return main(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except StreamerError as err:
        print(f"streamer: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("streamer: interrupted", file=sys.stderr)
        return 130
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
