"""Database engine and sessions, created lazily once per process (after a worker forks).

Stale pooled connections (Postgres restarted, connection killed) are found at checkout without a round
trip: a connection whose socket is readable while idle has been closed by the server (or holds a message
it sent unasked), and only then — or after `PING_AFTER_IDLE_SECONDS` unused — is it pinged. SQLAlchemy's
`pool_pre_ping` pinged on every checkout: one extra round trip per transaction, 12-14% of the transcribe
worker's samples in P1/P2 (docs/benchmarks.md). A connection that still dies mid-statement invalidates
the whole pool (SQLAlchemy's disconnect handling), and the writes after a paid answer retry through an
outage (`durable`).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

from core.backoff import backoff_delay
from core.settings import get_settings

# How long writes that must not be lost wait for Postgres to come back (a restart takes seconds).
DB_OUTAGE_SECONDS = 60.0
DB_RETRY_BASE_SECONDS = 0.2

P = ParamSpec("P")
R = TypeVar("R")
log = logging.getLogger(__name__)


def durable(fn: Callable[P, R]) -> Callable[P, R]:
    """Retry `fn` (one idempotent transaction) while Postgres is unreachable, up to DB_OUTAGE_SECONDS.

    For writes whose loss costs more than a wait: the worker's writes after a paid provider answer, and
    the API's release of an idempotency key (a key left "in progress" would refuse the client's retry).
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        deadline = time.monotonic() + DB_OUTAGE_SECONDS
        retry = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except exc.OperationalError:
                retry += 1
                # Back within a second (the sweeper must not guess first), jittered so that a fleet's
                # writers do not all reconnect at the same instant.
                delay = backoff_delay(retry, base=DB_RETRY_BASE_SECONDS, cap=1.0)
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("database unreachable during %s; retrying in %.1f s", fn.__name__, delay)
                time.sleep(delay)

    return wrapper


_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# A pooled connection unused for longer than this is pinged at checkout (NAT/firewall idle drops send no
# FIN, so its socket would not look readable).
PING_AFTER_IDLE_SECONDS = 30.0
_CHECKED_IN = "voxq_checked_in"


def _socket_readable(dbapi_conn: Any) -> bool:
    """True when the idle connection's socket has something to read: EOF or an unasked server message."""
    fileno = getattr(dbapi_conn, "fileno", None)
    if fileno is None:
        return True  # cannot tell: ping
    try:
        poller = select.poll()
        poller.register(fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except Exception:  # a closed connection or a bad descriptor: ping
        return True


def _watch_pool(engine: Engine) -> None:
    """Ping a pooled connection at checkout only when it may be stale (see the module docstring)."""

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        checked_in = record.info.get(_CHECKED_IN)
        if checked_in is None:
            return  # fresh from connect()
        if time.monotonic() - checked_in < PING_AFTER_IDLE_SECONDS and not _socket_readable(dbapi_conn):
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
            dbapi_conn.rollback()  # the ping's SELECT opened a transaction; the session starts its own
        except Exception as error:
            raise exc.DisconnectionError(f"stale pooled connection: {type(error).__name__}") from error
        if not alive:
            raise exc.DisconnectionError("stale pooled connection")


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """A new engine that survives a Postgres restart (stale connections found at checkout, see above)."""
    engine = create_engine(
        url,
        # An error's text must not carry the statement's parameters (transcripts, prompts, filenames):
        # it reaches logs and tracebacks. core.logs also cuts what the server puts in the message.
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 10} if url.startswith("postgresql") else {},
    )
    _watch_pool(engine)
    return engine


def get_engine() -> Engine:
    """The process's engine; a forked child gets its own instead of sharing the parent's sockets."""
    global _engine, _engine_pid, _sessionmaker
    if _engine is None or _engine_pid != os.getpid():
        settings = get_settings()
        _engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
        _engine_pid = os.getpid()
        _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def dispose_engine() -> None:
    """Drop the process's engine (after fork, or when settings change in tests)."""
    global _engine, _engine_pid, _sessionmaker
    if _engine is not None and _engine_pid == os.getpid():
        _engine.dispose()
    _engine = None
    _engine_pid = None
    _sessionmaker = None


def get_sessionmaker() -> sessionmaker[Session]:
    """The process's session factory."""
    get_engine()
    assert _sessionmaker is not None
    return _sessionmaker


@contextmanager
def session_scope() -> Iterator[Session]:
    """A short transaction: commit on success, roll back on error, always close."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None) -> object:
    """An Alembic config pointing at voxq's migrations and the given (or configured) database."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().database_url).replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Run `alembic upgrade` to `revision`."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)  # type: ignore[arg-type]


def downgrade(url: str | None = None, revision: str = "base") -> None:
    """Run `alembic downgrade` to `revision`."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)  # type: ignore[arg-type]


def ping() -> None:
    """Raise unless the database answers."""
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))
