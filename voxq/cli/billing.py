"""`voxq billing settle`: settle estimated costs against the provider's per-request usage export."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `billing settle`."""
    billing = sub.add_parser("billing", help="billing operations (settlement against the provider's export)")
    billing_sub = billing.add_subparsers(dest="billing_command", metavar="SUBCOMMAND")
    settle = billing_sub.add_parser(
        "settle",
        help="settle abandoned calls' estimated costs against the provider's per-request usage export",
        description=(
            "Reads one provider's usage export ({request_id, model, usage} per billed request: a JSON "
            'list, {"data": [...]} or JSON lines) and considers only that provider\'s calls (--provider). '
            "Each unsettled estimate whose request is listed becomes the exact cost; with --since and "
            "--until (the time range the export covers), one absent from it is removed. Other providers' "
            "estimates are never touched: settle each provider's export with its own --provider. Billed "
            "requests voxq has no attempt for, that are another provider's calls, or recorded with other "
            "usage, are listed and make the command exit 1. Without --provider the export is taken as "
            "`openai`'s (the only provider of a setup without a providers file), and the command refuses "
            "(exit 2), naming them, when the range's unsettled estimates or the listed requests belong to "
            "another provider. Running it twice changes nothing."
        ),
    )
    settle.add_argument("--file", required=True, type=Path, help="the export (use - for standard input)")
    settle.add_argument(
        "--provider",
        metavar="NAME",
        help="whose export this is: a provider's name in the providers file ([providers.NAME]); only its "
        "calls are settled (default: openai, refused when another provider's calls are involved)",
    )
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
    if args.provider is not None and not _known_provider(args.provider):
        print(
            f"voxq billing settle: no provider {args.provider!r}: neither in the providers file nor on any "
            "recorded call",
            file=sys.stderr,
        )
        return 2
    provider = args.provider or _default_provider(export, args.since, args.until)
    if provider is None:
        return 2
    report = settle(
        export, provider=provider, since=args.since, until=args.until, grace_seconds=args.grace_seconds
    )
    for line in report.lines():
        print(line)
    if args.since is None:
        print("(no --since/--until: the export's range is unknown, so no estimate was judged not billed)")
    return 0 if report.ok else 1


def _default_provider(export: list[Any], since: datetime | None, until: datetime | None) -> str | None:
    """`openai` when no other provider's calls are involved; None (after saying why) when they are: whose
    export it is cannot be guessed, and a wrong guess would judge one account's calls by another's bill."""
    from core.billing import providers_involved
    from core.providers.config import OPENAI

    involved = providers_involved(export, since=since, until=until)
    if not [name for name in involved if name != OPENAI]:
        return OPENAI
    print(
        "voxq billing settle: an export covers one provider's calls, and this one may be any of "
        f"{', '.join(involved)} (unsettled estimates in the range or billed requests listed); "
        "say whose it is with --provider NAME",
        file=sys.stderr,
    )
    return None


def _known_provider(name: str) -> bool:
    """A configured provider, or one recorded calls name (a provider since removed from the file)."""
    from sqlalchemy import exists, select

    from core.db import session_scope
    from core.errors import ConfigError
    from core.models import Attempt
    from core.providers.config import load_catalogue
    from core.settings import get_settings

    try:
        if name in load_catalogue(get_settings()).providers:
            return True
    except ConfigError:
        pass  # an invalid providers file: the recorded calls decide
    with session_scope() as session:
        return bool(session.execute(select(exists().where(Attempt.provider == name))).scalar())
