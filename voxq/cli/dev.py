"""`voxq dev` (the embedded stack), `voxq migrate` (compose's one-shot) and `voxq worker-health`."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from datetime import UTC, datetime, timedelta


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `dev`, `migrate` and `worker-health`."""
    dev = sub.add_parser(
        "dev",
        help="run the embedded stack (Postgres, Valkey, SeaweedFS, API, workers, beat, Flower) on 127.0.0.1",
    )
    add_stack_arguments(dev)
    dev.set_defaults(handler=run_dev)

    migrate = sub.add_parser("migrate", help="wait for the database, then run `alembic upgrade head`")
    migrate.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the database")
    migrate.set_defaults(handler=run_migrate)

    health = sub.add_parser(
        "worker-health", help="exit 0 when this host's Celery worker answers a ping or its heartbeat is fresh"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for ping replies")
    health.add_argument("--max-age", type=float, default=120.0, help="freshest heartbeat accepted (s)")
    health.add_argument("--any", action="store_true", help="accept any worker, not just this host's")
    health.set_defaults(handler=run_worker_health)


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `voxq dev` and `voxq demo` share."""
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("VOXQ_DATA_DIR", ".voxq"),
        help="where data, logs and dev secrets live (default .voxq)",
    )
    parser.add_argument("--api-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--flower-port", type=int, default=5555, help="0 picks a free port")


def run_dev(args: argparse.Namespace) -> int:
    """Start the stack, print how to reach it, supervise until Ctrl-C or SIGTERM, stop it in order."""
    from core.errors import ConfigError
    from voxq.devstack import DevStack, install_stop_handlers

    stack = DevStack(args.data_dir, api_port=args.api_port, flower_port=args.flower_port)
    install_stop_handlers(stack)
    try:
        info = stack.start()
    except ConfigError as exc:
        print(f"voxq dev: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("voxq dev stopped while starting.", flush=True)
        return 0
    print(info.describe(), flush=True)
    print("Ctrl-C stops everything.", flush=True)
    stack.run()
    print("voxq dev stopped.", flush=True)
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    """Wait until the database answers (compose starts us beside it), then upgrade to head."""
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import dispose_engine, ping, upgrade

    deadline = time.monotonic() + args.timeout
    while True:
        try:
            ping()
            break
        except SQLAlchemyError as exc:
            dispose_engine()
            if time.monotonic() > deadline:
                # The exception class only: its text can contain the URL.
                print(f"voxq migrate: database not reachable ({type(exc).__name__})", file=sys.stderr)
                return 1
            time.sleep(1.0)
    upgrade()
    dispose_engine()
    print("voxq migrate: database at head", flush=True)
    return 0


def run_worker_health(args: argparse.Namespace) -> int:
    """Exit 0 when a worker on this host answers a Celery ping, or wrote a fresh heartbeat row."""
    host = socket.gethostname()
    if _ping_ok(host, args.timeout, any_host=args.any) or _heartbeat_ok(
        host, args.max_age, any_host=args.any
    ):
        return 0
    print(f"voxq worker-health: no live worker{'' if args.any else ' on ' + host}", file=sys.stderr)
    return 1


def _ping_ok(host: str, timeout: float, *, any_host: bool) -> bool:
    # A bare app on the broker: core must not import the worker package.
    from celery import Celery

    from core.settings import get_settings

    app = Celery("voxq-health", broker=get_settings().redis_url)
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_max_retries = 1
    # The node names `voxq dev` and compose give workers; `limit=1` returns at the first answer.
    destination = None if any_host else [f"worker@{host}", f"local@{host}"]
    try:
        # Fail fast when the broker is down (kombu would retry for seconds): the heartbeat decides then.
        with app.connection_for_write() as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0, timeout=max(1, int(timeout))
            )
        replies = app.control.ping(destination=destination, timeout=timeout, limit=1) or []
    except Exception:  # broker down or refusing: fall back to the heartbeat row
        return False
    finally:
        app.close()
    return any(reply for reply in replies)


def _heartbeat_ok(host: str, max_age: float, *, any_host: bool) -> bool:
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import session_scope
    from core.models import WorkerHeartbeat

    since = datetime.now(UTC) - timedelta(seconds=max_age)
    query = select(func.count()).select_from(WorkerHeartbeat).where(WorkerHeartbeat.last_seen_at >= since)
    if not any_host:
        query = query.where(WorkerHeartbeat.worker.in_([host, f"worker@{host}", f"local@{host}"]))
    try:
        with session_scope() as session:
            return bool(session.scalar(query))
    except SQLAlchemyError:
        return False
