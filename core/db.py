"""Database engine and sessions, created lazily once per process (after a worker forks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings

_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """A new engine with pre-ping (survives a Postgres restart) and short connect timeouts."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 10} if url.startswith("postgresql") else {},
    )


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
