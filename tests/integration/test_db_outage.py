"""A paid provider answer is recorded even when Postgres restarts at that moment (core.db.durable).

Without the retry, the write fails, the attempt stays pending (later charged as an estimate) and the job
runs again, paying the provider a second time. Uses its own embedded Postgres, restarted mid-write.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import dispose_engine, session_scope, upgrade
from core.models import Attempt, CostRecord, Job, Tenant
from core.pricing import PricedUsage
from core.settings import reset_settings_cache
from core.statuses import AttemptOutcome
from tests.pipeline_support import pending_attempt_row, processing_job_rows
from voxq.embedded import EmbeddedPostgres
from worker.store import attempts


@pytest.fixture
def own_postgres(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedPostgres]:
    # not under pytest's basetemp: its mode is reset by other sessions, and Postgres runs as its own user
    work = Path(tempfile.mkdtemp(prefix="voxq-db-outage-"))
    server = EmbeddedPostgres(work / "postgres")
    server.start()
    try:
        url = server.create_database("voxq_outage")
        upgrade(url)
        monkeypatch.setenv("VOXQ_DATABASE_URL", url)
        reset_settings_cache()
        dispose_engine()
        yield server
    finally:
        dispose_engine()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        monkeypatch.undo()
        reset_settings_cache()


def test_a_paid_answer_is_recorded_through_a_postgres_restart(own_postgres: EmbeddedPostgres) -> None:
    tenant_id, batch_id, job_id = processing_job_rows(tenant_name="outage")
    attempt_id = pending_attempt_row(tenant_id, job_id, model="whisper-1")
    priced = PricedUsage(usd=Decimal("0.012"), billed_audio_seconds=2.0, usage_type="duration")
    own_postgres.stop()  # the database goes away just as the answer arrives
    errors: list[BaseException] = []

    def write() -> None:
        try:
            attempts.close_attempt(
                attempt_id,
                outcome=AttemptOutcome.SUCCESS,
                latency_ms=12.0,
                tenant_id=tenant_id,
                batch_id=batch_id,
                job_id=job_id,
                model="whisper-1",
                http_status=200,
                priced=priced,
            )
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(2.0)
    assert writer.is_alive()  # still waiting for the database, not failed
    own_postgres.start()
    writer.join(timeout=90)
    assert not writer.is_alive() and errors == []
    with session_scope() as s:
        row = s.get(Attempt, attempt_id)
        assert row is not None and row.outcome == AttemptOutcome.SUCCESS.value
        costs = list(s.execute(select(CostRecord).where(CostRecord.attempt_id == attempt_id)).scalars())
        assert [(c.usd.normalize(), c.estimated) for c in costs] == [(Decimal("0.012"), False)]
        job_row = s.get(Job, job_id)
        assert job_row is not None and job_row.cost_usd.normalize() == Decimal("0.012")


def test_a_pooled_connection_from_before_a_restart_is_replaced_at_checkout(
    own_postgres: EmbeddedPostgres,
) -> None:
    # core.db pings only connections that may be stale (no pre-ping round trip on every checkout): one
    # the server closed must still be noticed at checkout, not fail the first statement after a restart.
    from sqlalchemy import text

    from core.db import get_engine

    with session_scope() as s:
        first = s.execute(text("SELECT pg_backend_pid()")).scalar()
    assert get_engine().pool.checkedin() == 1  # pooled, idle, well under PING_AFTER_IDLE_SECONDS
    own_postgres.stop()
    own_postgres.start()
    with session_scope() as s:
        second = s.execute(text("SELECT pg_backend_pid()")).scalar()
    assert second != first


def test_an_idempotency_key_is_released_through_a_postgres_restart(own_postgres: EmbeddedPostgres) -> None:
    """A request that failed because Postgres went away must not leave its key "in progress": the
    client's retry with the same key would be refused with 409 for an hour."""
    from api.idempotency import IdempotencyStore, Outcome

    with session_scope() as s:
        tenant = Tenant(name="idem-outage")
        s.add(tenant)
        s.flush()
        tenant_id = tenant.id
    store = IdempotencyStore()
    assert store.begin(tenant_id, "k-1", "POST", "/v1/batches", "h").outcome is Outcome.NEW
    assert store.begin(tenant_id, "k-1", "POST", "/v1/batches", "h").outcome is Outcome.IN_PROGRESS
    own_postgres.stop()  # the request fails because the database went away; its finally releases the key
    errors: list[BaseException] = []

    def release() -> None:
        try:
            store.release(tenant_id, "k-1")
        except BaseException as exc:
            errors.append(exc)

    releaser = threading.Thread(target=release)
    releaser.start()
    time.sleep(2.0)
    assert releaser.is_alive()  # waiting for the database, not given up
    own_postgres.start()
    releaser.join(timeout=90)
    assert not releaser.is_alive() and errors == []
    # the client's retry with the same key runs (instead of 409 "still running")
    assert store.begin(tenant_id, "k-1", "POST", "/v1/batches", "h").outcome is Outcome.NEW
