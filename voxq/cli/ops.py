"""Operator commands: `voxq top` (a live view of the fleet) and `voxq flower` (Flower, always with auth)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from decimal import Decimal

from core import names
from core.errors import ConfigError
from core.fleet import FleetSnapshot
from core.settings import PLACEHOLDER_SECRETS, Settings, get_settings
from core.statuses import JobStatus

CLEAR = "\x1b[2J\x1b[H"  # clear the screen, cursor home: enough for a redraw without curses

# Column order of job statuses in the frame: the lifecycle, then the endings.
_STATUS_ORDER = [s.value for s in JobStatus]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `top` and `flower`."""
    top = sub.add_parser("top", help="live view of queues, jobs, throughput, cost and circuits")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    top.add_argument("--once", action="store_true", help="print one frame and exit (1 if a source is down)")
    top.add_argument("--minutes", type=int, default=5, help="minutes of jobs/min history (default 5)")
    top.set_defaults(handler=run_top)

    flower = sub.add_parser("flower", help="run Flower behind basic auth (VOXQ_FLOWER_USER/PASSWORD)")
    flower.add_argument("--address", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)")
    flower.add_argument("--port", type=int, default=5555)
    flower.add_argument("--url-prefix", default="", help="when served behind a reverse proxy path")
    flower.set_defaults(handler=run_flower)


def _bar(value: int, peak: int, width: int = 20) -> str:
    if peak <= 0:
        return ""
    return "#" * max(1 if value else 0, round(width * value / peak))


def render_frame(snap: FleetSnapshot) -> str:
    """One screenful describing `snap` (plain text; the caller clears the screen)."""
    lines = [
        f"voxq top  {snap.taken_at:%Y-%m-%d %H:%M:%S} UTC   workers alive: {len(snap.workers)}"
        + (f" ({', '.join(snap.workers)})" if snap.workers else ""),
        "",
        "QUEUES (waiting)",
    ]
    peak = max(snap.queues.values(), default=0)
    for queue in names.ALL_QUEUES:
        if queue in snap.queues:
            depth = snap.queues[queue]
            lines.append(f"  {queue:<16} {depth:>8}  {_bar(depth, peak)}")
    lines += ["", "JOBS"]
    shown = [s for s in _STATUS_ORDER if s in snap.jobs] + sorted(set(snap.jobs) - set(_STATUS_ORDER))
    lines.append("  " + "  ".join(f"{s} {snap.jobs[s]}" for s in shown))
    lines.append(f"  in flight {snap.in_flight}")
    history = snap.finished_per_minute
    if history:
        avg = sum(history) / len(history)
        lines += [
            "",
            f"FINISHED/MIN  last {len(history)} min, oldest first: "
            + " ".join(str(n) for n in history)
            + f"   avg {avg:.1f}",
        ]
    cost = snap.cost_per_hour_usd.quantize(Decimal("0.0001"))
    lines += ["", f"COST/HOUR  ${cost} (cost records of the last 60 min)", ""]
    if snap.circuits:
        lines.append("CIRCUITS  " + "  ".join(f"{m}: {state}" for m, state in sorted(snap.circuits.items())))
    else:
        lines.append("CIRCUITS  all closed")
    for source, error in sorted(snap.errors.items()):
        lines.append(f"!! {source} unreadable ({error})")
    return "\n".join(lines) + "\n"


def run_top(args: argparse.Namespace) -> int:
    """Draw frames until Ctrl-C (or one with --once)."""
    from core.db import get_engine
    from core.fleet import redis_client, take_snapshot
    from core.settings import get_settings

    settings = get_settings()
    engine = get_engine()
    client = redis_client(settings.redis_url)
    try:
        while True:
            snap = take_snapshot(engine, client, minutes=max(1, args.minutes))
            frame = render_frame(snap)
            if args.once:
                sys.stdout.write(frame)
                sys.stdout.flush()
                return 1 if snap.errors else 0
            sys.stdout.write(CLEAR + frame)
            sys.stdout.flush()
            time.sleep(max(0.2, args.interval))
    except KeyboardInterrupt:
        return 0


def flower_command(args: argparse.Namespace) -> list[str]:
    """The `celery flower` command line (credentials travel in the environment, not in `ps`)."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "flower",
        f"--address={args.address}",
        f"--port={args.port}",
    ]
    if args.url_prefix:
        command.append(f"--url_prefix={args.url_prefix}")
    return command


def run_flower(args: argparse.Namespace) -> int:
    """Check the Flower password, then replace this process with Flower behind basic auth."""
    from pydantic import ValidationError

    from core.errors import ConfigError

    try:
        auth = flower_basic_auth()
    except ConfigError as exc:
        print(f"voxq flower: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        # Only the messages: pydantic's full text repeats the input values, secrets included.
        for error in exc.errors():
            print(f"voxq flower: invalid settings: {error['msg']}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["FLOWER_BASIC_AUTH"] = auth
    env.pop("FLOWER_UNAUTHENTICATED_API", None)  # the API must answer 401 without credentials
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, flower_command(args), env)  # noqa: S606 (argument list, no shell)


def flower_basic_auth(settings: Settings | None = None) -> str:
    """`user:password` for Flower's `--basic-auth`; raises ConfigError for a weak password outside dev."""
    settings = settings or get_settings()
    password = settings.flower_password.get_secret_value()
    weak = password.lower() in PLACEHOLDER_SECRETS or len(password) < 8
    if settings.environment != "dev" and weak:
        raise ConfigError(
            "VOXQ_FLOWER_PASSWORD must be a real password (8+ characters, not a placeholder) outside dev",
            code="flower_password_weak",
        )
    if not password:
        raise ConfigError(
            "VOXQ_FLOWER_PASSWORD is empty: Flower never runs without a password",
            code="flower_password_empty",
        )
    if ":" in settings.flower_user or "," in settings.flower_user or "," in password:
        raise ConfigError(
            "VOXQ_FLOWER_USER/PASSWORD may not contain ',' (or ':' in the user)", code="flower_auth_invalid"
        )
    return f"{settings.flower_user}:{password}"
