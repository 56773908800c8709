"""`voxq migrate` and `voxq worker-health` (what compose and k8s run) against real servers and workers."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import create_engine, inspect, text

from core.models import Base
from migrations import MIGRATION_LOCK_ID
from tests.support import REPO_ROOT, Stack, celery_worker, run_voxq, wait_until
from voxq.embedded import create_database, drop_database, free_port


def test_migrate_brings_a_new_database_to_head(stack: Stack, postgres_admin_url: str) -> None:
    name = f"voxq_cli_mig_{uuid.uuid4().hex[:8]}"
    url = create_database(postgres_admin_url, name)
    engine = create_engine(url)
    try:
        result = run_voxq(["migrate", "--timeout", "30"], stack.child_env(VOXQ_DATABASE_URL=url))
        assert result.returncode == 0, result.stderr
        assert "database at head" in result.stdout
        assert {t.name for t in Base.metadata.sorted_tables} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        # Idempotent: compose runs it on every `up`.
        assert run_voxq(["migrate"], stack.child_env(VOXQ_DATABASE_URL=url)).returncode == 0
    finally:
        engine.dispose()
        drop_database(postgres_admin_url, name)


# Sessions of this database waiting for an advisory lock.
WAITING_FOR_THE_LOCK = text(
    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def test_concurrent_migrates_take_turns_on_a_fresh_database(stack: Stack, postgres_admin_url: str) -> None:
    """Two replicas' init containers run `voxq migrate` at once: both succeed, the schema is made once.

    Without the advisory lock the two race to create the same tables and one fails (IntegrityError on
    Postgres' catalog) nearly every time.
    """
    name = f"voxq_cli_race_{uuid.uuid4().hex[:8]}"
    url = create_database(postgres_admin_url, name)
    engine = create_engine(url)
    env = stack.child_env(VOXQ_DATABASE_URL=url)
    try:
        # The test holds the lock first, so both runs are certainly waiting at the same time.
        with engine.connect() as holder:
            holder.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "voxq.cli", "migrate", "--timeout", "30"],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]

            def waiting() -> int:
                with engine.connect() as conn:
                    return int(conn.execute(WAITING_FOR_THE_LOCK).scalar_one())

            wait_until(lambda: waiting() == 2, timeout=60, interval=0.2, what="both migrates to wait")
            assert {t.name for t in Base.metadata.sorted_tables}.isdisjoint(inspect(engine).get_table_names())
            holder.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            holder.commit()
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        for code, out, err in results:
            assert code == 0, err[-2000:]
            assert "database at head" in out
        assert {t.name for t in Base.metadata.sorted_tables} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert len(conn.execute(text("SELECT version_num FROM alembic_version")).all()) == 1
    finally:
        engine.dispose()
        drop_database(postgres_admin_url, name)


def test_migrate_waits_then_gives_up_without_printing_the_url(stack: Stack) -> None:
    url = f"postgresql+psycopg://voxq:hunter2-secret@127.0.0.1:{free_port()}/voxq"
    began = time.monotonic()
    result = run_voxq(["migrate", "--timeout", "2"], stack.child_env(VOXQ_DATABASE_URL=url))
    assert result.returncode == 1
    assert time.monotonic() - began >= 2  # it waited for the database before giving up
    assert "database not reachable" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_worker_health_fails_without_a_worker(stack: Stack) -> None:
    result = run_voxq(["worker-health", "--timeout", "1"], stack.child_env())
    assert result.returncode == 1
    assert "no live worker" in result.stderr


def test_worker_health_answers_for_a_real_worker_on_this_host(stack: Stack) -> None:
    with celery_worker(stack, queues="maintenance", concurrency=1, name="worker"):
        wait_until(
            lambda: run_voxq(["worker-health", "--timeout", "2"], stack.child_env()).returncode == 0,
            timeout=60,
            interval=1,
            what="worker-health to see the worker",
        )
    # Gone (warm shutdown done): no ping answer (heartbeats aside, hence --max-age 0).
    gone = run_voxq(["worker-health", "--timeout", "1", "--max-age", "0"], stack.child_env())
    assert gone.returncode == 1


def test_worker_health_accepts_a_fresh_heartbeat_when_ping_fails(stack: Stack) -> None:
    host = socket.gethostname()
    broken_broker = {"VOXQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    engine = create_engine(stack.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO worker_heartbeats (worker, pid, queues, started_at, last_seen_at)"
                    " VALUES (:w, 1, '[]', :t, :t)"
                ),
                {"w": host, "t": datetime.now(UTC)},
            )
        assert run_voxq(["worker-health", "--timeout", "1"], stack.child_env(**broken_broker)).returncode == 0
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE worker_heartbeats SET last_seen_at = :t WHERE worker = :w"),
                {"w": host, "t": datetime.now(UTC) - timedelta(minutes=10)},
            )
        stale = run_voxq(
            ["worker-health", "--timeout", "1", "--max-age", "60"], stack.child_env(**broken_broker)
        )
        assert stale.returncode == 1
    finally:
        engine.dispose()
