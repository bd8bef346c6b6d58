"""Command-line interface: argument parsing only; every command calls the library.

Exit codes: 0 success; 2 bad input or usage (one message naming the path, key or flag and the
fix); 1 internal failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from shardfix.errors import ReconcileConflictError, ShardfixError
from shardfix.io.text import EscapingFormatter, cap_message, printable, strict_json
from shardfix.options import OPTION_BY_NAME, OPTIONS, ConvertOptions, Option
from shardfix.version import __version__

log = logging.getLogger("shardfix")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # usage errors: exit 2 with one line
        self.exit(2, f"shardfix: error: {message} (see {self.prog} --help)\n")


def add_option(container: argparse.ArgumentParser | argparse._ArgumentGroup, o: Option, *, help: str | None = None) -> None:
    """Add one option's flag (and its ``off_flag``) as :data:`shardfix.options.OPTIONS` describes it.

    Args:
        container: the parser or argument group to add to.
        o: the option.
        help: a command's own help text, where the option means something narrower there.
    """
    help = help or o.help
    if o.kind == "bool":
        container.add_argument(o.flag, dest=o.name, action="store_true" if o.sets else "store_false",
                               default=o.default, help=help)
        if o.off_flag:
            container.add_argument(o.off_flag, dest=o.name, action="store_false" if o.sets else "store_true",
                                   help=o.off_help)
        return
    container.add_argument(o.flag, dest=o.name, type=int if o.kind == "int" else str, default=o.default,
                           choices=list(o.choices) if o.choices else None, help=help)


def _add_group(p: argparse.ArgumentParser, group: str) -> None:
    g = p.add_argument_group(group)
    for o in OPTIONS:
        if o.group == group:
            add_option(g, o)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardfix", description="Turn distributed-training checkpoints into clean safetensors.")
    parser.add_argument("--version", action="version", version=f"shardfix {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (and show tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="describe a checkpoint (metadata only)")
    p.add_argument("src")
    p.add_argument("--json", action="store_true")
    add_option(p, OPTION_BY_NAME["target_config"], help="HF config.json giving heads and head_dim")
    add_option(p, OPTION_BY_NAME["profile"])
    add_option(p, OPTION_BY_NAME["trust_pickle"])
    add_option(p, OPTION_BY_NAME["follow_symlinks"])
    p.add_argument("--no-evidence", action="store_true",
                   help="metadata only: do not read embedding moments and small vectors for evidence")

    p = sub.add_parser("plan", help="print the conversion plan without reading tensor data")
    p.add_argument("src")
    p.add_argument("--json", action="store_true")
    _add_group(p, "reconcile")
    for o in OPTIONS:
        if o.plan and o.group != "reconcile":
            add_option(p, o)

    p = sub.add_parser("convert", help="convert a checkpoint into safetensors plus a report")
    p.add_argument("src", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--job", help="run a job file (TOML) locally")
    _add_group(p, "reconcile")
    _add_group(p, "run")

    p = sub.add_parser("verify", help="re-read an output directory and check it against its report")
    p.add_argument("out")
    p.add_argument("--against", help="also recompute every tensor from this source")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of the --against source (runs code in it; never read from the report)")
    p.add_argument("--json", action="store_true")

    addr_help = "Ray job server URL, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)"
    p = sub.add_parser("submit", help="submit a job file to a Ray cluster's job server")
    p.add_argument("job", help="job file (TOML)")
    p.add_argument("--address", help=addr_help)
    p.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit with its status")
    p.add_argument("--submission-id", help="id for the job (default: shardfix-NAME-TIME-RANDOM)")
    p = sub.add_parser("status", help="show a submitted job's status")
    p.add_argument("job_id")
    p.add_argument("--address", help=addr_help)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("logs", help="print a submitted job's log")
    p.add_argument("job_id")
    p.add_argument("--address", help=addr_help)
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    p = sub.add_parser("stop", help="stop a submitted job")
    p.add_argument("job_id")
    p.add_argument("--address", help=addr_help)
    return parser


def _options(args: argparse.Namespace) -> ConvertOptions:
    names = set(ConvertOptions.field_names())
    kw: dict[str, Any] = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ConvertOptions(**kw)


def cmd_inspect(args: argparse.Namespace) -> int:
    from shardfix.api import inspect_source
    from shardfix.inspect import format_inspection

    opts = ConvertOptions(trust_pickle=args.trust_pickle, follow_symlinks=args.follow_symlinks)
    info = inspect_source(args.src, opts, profile=args.profile, target_config=args.target_config,
                          evidence=not args.no_evidence)
    print(strict_json(info) if args.json else printable(format_inspection(info)))
    if info["architecture"].get("problems"):
        raise ReconcileConflictError(info["architecture"]["problems"])
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shardfix.api import plan_conversion

    plan = plan_conversion(args.src, _options(args))
    print(strict_json(plan.to_dict()) if args.json else printable(plan.summary()))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from shardfix.api import convert
    from shardfix.report import summarize

    if args.job:
        from shardfix.jobs import load_job

        if args.src or args.out:
            raise ShardfixError("convert --job FILE takes no SRC or OUT: the job file names them")
        job = load_job(args.job)
        src, out, opts = job.source, job.output, job.options
    else:
        if not args.src or not args.out:
            raise ShardfixError("convert needs SRC and OUT (or --job FILE)")
        src, out, opts = args.src, args.out, _options(args)
    report = convert(src, out, opts)
    print(printable(summarize(report)))
    for w in report.get("warnings") or []:  # on stderr too: a pipeline that keeps only stderr still sees them
        print(f"shardfix: warning: {printable(cap_message(w))}", file=sys.stderr)
    print(f"wrote {out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from shardfix.verify import verify_output

    problems, stats = verify_output(args.out, args.against, trust_pickle=args.trust_pickle)
    if args.json:
        print(strict_json({"ok": not problems, "problems": problems, **stats}))
    else:
        for p in problems:
            print(f"problem: {printable(p)}")
        verdict = "OK" if not problems else f"{len(problems)} problem(s)"
        print(f"verify {args.out}: {verdict} ({stats['files']} files, {stats['tensors']} tensors, "
              f"{stats['bytes']:,} bytes re-read" + (", compared with the source" if args.against else "") + ")")
    return 0 if not problems else 1


def _print_status(info: dict[str, Any]) -> None:
    line = f"{info['submission_id']}: {info['status']}"
    if info.get("driver_exit_code") is not None:
        line += f" (exit {info['driver_exit_code']})"
    print(line)
    if info.get("message"):
        print(f"  {info['message'].strip().splitlines()[0]}")


def cmd_submit(args: argparse.Namespace) -> int:
    from shardfix import jobs

    job_id = jobs.submit(args.job, args.address, submission_id=args.submission_id)
    url = jobs.job_server_address(args.address)
    print(f"submitted {job_id} to {url}")
    if not args.wait:
        print(f"follow it with: shardfix logs {job_id} --address {url} --follow")
        return 0
    sys.stdout.flush()
    jobs.follow_logs(job_id, args.address)
    info = jobs.wait(job_id, args.address)
    _print_status(info)
    return jobs.exit_code_of(info)


def cmd_status(args: argparse.Namespace) -> int:
    from shardfix import jobs

    info = jobs.job_info(args.job_id, args.address)
    if args.json:
        print(strict_json(info))
    else:
        _print_status(info)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from shardfix import jobs

    if args.follow:
        jobs.follow_logs(args.job_id, args.address)
    else:
        sys.stdout.write(jobs.job_logs(args.job_id, args.address))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from shardfix import jobs

    stopped = jobs.stop(args.job_id, args.address)
    print(f"{args.job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0


COMMANDS = {"inspect": cmd_inspect, "plan": cmd_plan, "convert": cmd_convert, "verify": cmd_verify,
            "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr)
    for h in logging.getLogger().handlers:  # log lines carry key names: escape them like every other output
        h.setFormatter(EscapingFormatter("shardfix: %(message)s"))
    for noisy in ("ray", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except ShardfixError as e:
        print(f"shardfix: error: {printable(cap_message(str(e)))}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader (e.g. `| head`) stopped reading: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("shardfix: interrupted; rerun convert with --resume to finish", file=sys.stderr)
        return 130
    except Exception as e:  # an internal failure: exit 1, traceback only when asked
        if args.verbose or os.environ.get("SHARDFIX_DEBUG"):
            raise
        print(f"shardfix: internal error: {type(e).__name__}: {printable(cap_message(str(e)))} (rerun with -v for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
