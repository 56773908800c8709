"""The upload routes' early batch check (`queries.check_accepting`) against real Postgres."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, text, update

from api import queries, service
from api.deps import TenantContext
from api.problems import Problem
from api.schemas import BatchOptions
from core.db import get_engine, session_scope
from core.models import Batch, Tenant
from core.statuses import BatchStatus
from tests.support import Stack


def _tenant_with_batch(name: str, status: BatchStatus) -> tuple[TenantContext, uuid.UUID]:
    with session_scope() as session:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        context = TenantContext(tenant_id=tenant.id, key_id=uuid.uuid4())
        batch = service.new_batch(context, BatchOptions(), auto_submit=False)
        batch.status = status.value
        session.add(batch)
        session.flush()
        return context, batch.id


@pytest.mark.parametrize("status", [BatchStatus.OPEN, BatchStatus.PROCESSING, BatchStatus.COMPLETED])
def test_a_batch_that_takes_files_passes(stack: Stack, status: BatchStatus) -> None:
    tenant, batch_id = _tenant_with_batch("a", status)
    assert queries.check_accepting(tenant, batch_id) is None  # no problem raised: files may be added
    # The answer is read from the batch's row as it is now: once cancelled, the same call refuses.
    with session_scope() as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.CANCELLED.value))
    with pytest.raises(Problem) as info:
        queries.check_accepting(tenant, batch_id)
    assert (info.value.status, info.value.code) == (409, "batch_cancelled")


def test_unknown_other_tenants_and_cancelled_batches_are_refused_as_before(stack: Stack) -> None:
    tenant, _ = _tenant_with_batch("a", BatchStatus.OPEN)
    other, others_batch = _tenant_with_batch("b", BatchStatus.OPEN)
    _, cancelled = _tenant_with_batch("c", BatchStatus.CANCELLED)
    cancelled_owner = TenantContext(tenant_id=_owner(cancelled), key_id=uuid.uuid4())
    for who, batch_id, status, code in [
        (tenant, uuid.uuid4(), 404, "not_found"),
        (tenant, others_batch, 404, "not_found"),  # another tenant's batch does not exist for this one
        (cancelled_owner, cancelled, 409, "batch_cancelled"),
    ]:
        with pytest.raises(Problem) as info:
            queries.check_accepting(who, batch_id)
        assert info.value.status == status and info.value.code == code
        # The same answers as the route's locked check after the body (get_batch + ensure_accepting).
        with session_scope() as session, pytest.raises(Problem) as again:
            queries.ensure_accepting(queries.get_batch(session, who, batch_id))
        assert (again.value.status, again.value.code) == (status, code)
    queries.check_accepting(other, others_batch)


def _owner(batch_id: uuid.UUID) -> uuid.UUID:
    with session_scope() as session:
        owner = session.scalar(select(Batch.tenant_id).where(Batch.id == batch_id))
        assert owner is not None
        return owner


def test_the_autocommit_check_leaves_pooled_connections_transactional(stack: Stack) -> None:
    tenant, batch_id = _tenant_with_batch("a", BatchStatus.OPEN)
    engine = get_engine()
    engine.dispose()  # one pooled connection from here on: the check's, then the session's below
    queries.check_accepting(tenant, batch_id)
    assert engine.pool.checkedin() == 1
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False  # type: ignore[union-attr]
    name = f"rolled-back-{uuid.uuid4().hex}"
    with pytest.raises(RuntimeError), session_scope() as session:
        session.execute(
            text("INSERT INTO tenants (id, name) VALUES (:id, :name)"), {"id": uuid.uuid4(), "name": name}
        )
        raise RuntimeError("roll back")
    with session_scope() as session:
        assert session.scalar(select(Tenant.id).where(Tenant.name == name)) is None
    assert engine.pool.checkedin() == 1
