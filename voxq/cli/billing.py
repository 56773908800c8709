"""`voxq billing settle`: settle estimated costs against the provider's per-request usage export."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `billing settle`."""
    billing = sub.add_parser("billing", help="billing operations (settlement against the provider's export)")
    billing_sub = billing.add_subparsers(dest="billing_command", metavar="SUBCOMMAND")
    settle = billing_sub.add_parser(
        "settle",
        help="settle abandoned calls' estimated costs against the provider's per-request usage export",
        description=(
            "Reads the provider's usage export ({request_id, model, usage} per billed request: a JSON "
            'list, {"data": [...]} or JSON lines). Each unsettled estimate whose request is listed '
            "becomes the exact cost; with --since and --until (the time range the export covers), one "
            "absent from it is removed. Billed requests voxq has no attempt for, or recorded with other "
            "usage, are listed and make the command exit 1. Running it twice changes nothing."
        ),
    )
    settle.add_argument("--file", required=True, type=Path, help="the export (use - for standard input)")
    settle.add_argument("--since", type=_timestamp, help="start of the range the export covers (ISO 8601)")
    settle.add_argument("--until", type=_timestamp, help="end of the range the export covers (ISO 8601)")
    settle.add_argument(
        "--grace-seconds",
        type=float,
        default=None,
        help="how long after its start a call may still be billed (default 2 x provider timeout + 10)",
    )
    settle.set_defaults(handler=run_settle)

    def usage(_args: argparse.Namespace) -> int:
        billing.print_help()
        return 2

    billing.set_defaults(handler=usage)


def _timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def run_settle(args: argparse.Namespace) -> int:
    """Settle and print the report; exit 1 when a billed request is unknown or disagrees."""
    from core.billing import parse_export, settle

    raw = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
    try:
        export = parse_export(raw)
    except ValueError as exc:
        print(f"voxq billing settle: {exc}", file=sys.stderr)
        return 2
    if (args.since is None) != (args.until is None):
        print("voxq billing settle: give both --since and --until (or neither)", file=sys.stderr)
        return 2
    report = settle(export, since=args.since, until=args.until, grace_seconds=args.grace_seconds)
    for line in report.lines():
        print(line)
    if args.since is None:
        print("(no --since/--until: the export's range is unknown, so no estimate was judged not billed)")
    return 0 if report.ok else 1
