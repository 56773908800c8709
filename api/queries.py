"""What the routes read from Postgres: tenant-scoped lookups, pages and the API views of rows.

Every lookup filters by tenant, so another tenant's id is simply "not found". Writes (new rows, queueing,
cancel, delete) are in `api.service`.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import bindparam, case, cast, func, select
from sqlalchemy.orm import Session
from sqlalchemy.types import Date, String

from api.deps import TenantContext
from api.problems import Problem, not_found
from api.schemas import (
    AttemptList,
    AttemptOut,
    BatchOut,
    BatchPage,
    GroupBy,
    JobBrief,
    JobError,
    JobOut,
    JobPage,
    StatusCounts,
    UsageRow,
)
from core.db import get_engine, get_sessionmaker, session_scope
from core.models import Attempt, Batch, CostRecord, Job, Transcript
from core.statuses import JOB_TERMINAL, AttemptOutcome, BatchStatus, JobStatus, effective_timestamps

MAX_PAGE = 200
DEFAULT_PAGE = 50


def encode_cursor(last_id: uuid.UUID) -> str:
    """An opaque cursor for the page after `last_id`."""
    return base64.urlsafe_b64encode(last_id.bytes).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> uuid.UUID | None:
    """The id a cursor points after; 400 `invalid_cursor` when it is not one of ours."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        return uuid.UUID(bytes=raw)
    except (binascii.Error, ValueError):
        raise Problem(400, "invalid_cursor", "the cursor is not valid; start again without one") from None


def get_batch(session: Session, tenant: TenantContext, batch_id: uuid.UUID, *, lock: bool = False) -> Batch:
    """The tenant's batch, or 404."""
    query = select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant.tenant_id)
    if lock:
        query = query.with_for_update()
    batch = session.scalar(query)
    if batch is None:
        raise not_found("batch")
    return batch


def batch_status(tenant: TenantContext, batch_id: uuid.UUID) -> str:
    """The tenant's batch's status now, in its own transaction (404 when it is not theirs)."""
    with session_scope() as session:
        return get_batch(session, tenant, batch_id).status


def get_job(session: Session, tenant: TenantContext, job_id: uuid.UUID) -> Job:
    """The tenant's (not deleted) job, or 404."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant.tenant_id, Job.deleted_at.is_(None))
    )
    if job is None:
        raise not_found("job")
    return job


def ensure_accepting(batch: Batch) -> None:
    """409 unless files may still be added to the batch."""
    _refuse_unless_accepting(batch.status)


def check_accepting(tenant: TenantContext, batch_id: uuid.UUID) -> None:
    """404 unless the tenant has this batch, 409 when it no longer takes files (as `get_batch` then
    `ensure_accepting`): the early check of every upload request, before its body is read.

    One SELECT in autocommit on a pooled connection (no BEGIN/ROLLBACK round trips, no ORM session):
    0.27 ms of CPU instead of 0.57. SQLAlchemy puts the connection's isolation level back when it
    returns to the pool."""
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        status = conn.execute(
            select(Batch.status).where(Batch.id == batch_id, Batch.tenant_id == tenant.tenant_id)
        ).scalar_one_or_none()
    if status is None:
        raise not_found("batch")
    _refuse_unless_accepting(status)


def _refuse_unless_accepting(status: str) -> None:
    if status == BatchStatus.CANCELLED.value:
        raise Problem(409, "batch_cancelled", "the batch was cancelled; create a new one")


def status_counts(session: Session, batch_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, int]]:
    """Live jobs per status for each batch."""
    out: dict[uuid.UUID, dict[str, int]] = {b: {} for b in batch_ids}
    if not batch_ids:
        return out
    rows = session.execute(
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(batch_ids), Job.deleted_at.is_(None))
        .group_by(Job.batch_id, Job.status)
    ).all()
    for batch_id, status, count in rows:
        out[batch_id][status] = int(count)
    return out


def estimated_costs(
    session: Session, *, batch_ids: Sequence[uuid.UUID] = (), job_ids: Sequence[uuid.UUID] = ()
) -> dict[uuid.UUID, Decimal]:
    """How much of each batch's (or job's) cost is an estimate (cost records marked `estimated`)."""
    key = CostRecord.batch_id if batch_ids else CostRecord.job_id
    ids = list(batch_ids or job_ids)
    if not ids:
        return {}
    rows = session.execute(
        select(key, func.sum(CostRecord.usd))
        .where(key.in_(ids), CostRecord.estimated.is_(True))
        .group_by(key)
    ).all()
    return {k: Decimal(usd) for k, usd in rows if k is not None}


def _split_cost(cost: Decimal | None, estimated: Decimal) -> tuple[float, float, float]:
    """(cost, billed, estimated) in USD: what the provider's usage priced, and what list prices guessed."""
    total = Decimal(cost or 0)
    return float(total), float(total - estimated), float(estimated)


def batch_out(
    batch: Batch,
    counts: dict[str, int],
    estimated: Decimal = Decimal(0),
    routes: dict[str, int] | None = None,
) -> BatchOut:
    """The API view of a batch (`estimated`: the part of its cost that is an estimate; `routes`: jobs per
    route, read for a single batch's view only)."""
    cost, billed, guessed = _split_cost(batch.cost_usd, estimated)
    total = sum(counts.values())
    terminal = sum(n for s, n in counts.items() if s in JOB_TERMINAL)
    return BatchOut(
        id=batch.id,
        name=batch.name,
        status=batch.status,
        profile=batch.profile,
        language=batch.language,
        priority=batch.priority,
        prefer=batch.prefer,
        timestamps=effective_timestamps(batch.profile, batch.timestamps).value,
        routing=batch.routing or "chain",
        diarize=bool(batch.diarize),
        auto_submit=batch.auto_submit,
        models=batch.models,
        webhook_url=batch.webhook_url,
        budget_usd=float(batch.budget_usd) if batch.budget_usd is not None else None,
        metadata=batch.metadata_ or {},
        counts=StatusCounts(**{k: v for k, v in counts.items() if k in StatusCounts.model_fields}),
        total_jobs=total,
        progress=round(terminal / total, 4) if total else 0.0,
        audio_seconds=batch.audio_seconds or 0.0,
        billed_seconds=batch.billed_seconds or 0.0,
        cost_usd=cost,
        billed_usd=billed,
        estimated_usd=guessed,
        created_at=batch.created_at,
        submitted_at=batch.submitted_at,
        completed_at=batch.completed_at,
        routes=routes,
    )


def route_counts(session: Session, batch_id: uuid.UUID) -> dict[str, int]:
    """Live jobs per recorded route (`route_model`, the first model of each job's route), most first."""
    rows = session.execute(
        select(Job.route_model, func.count())
        .where(Job.batch_id == batch_id, Job.deleted_at.is_(None), Job.route_model.is_not(None))
        .group_by(Job.route_model)
        .order_by(func.count().desc(), Job.route_model)
    ).all()
    return {str(model): int(count) for model, count in rows}


def load_batch_out(session: Session, batch: Batch) -> BatchOut:
    """A batch's view with fresh counts and its jobs' routes."""
    estimated = estimated_costs(session, batch_ids=[batch.id]).get(batch.id, Decimal(0))
    counts = status_counts(session, [batch.id])[batch.id]
    return batch_out(batch, counts, estimated, route_counts(session, batch.id))


def batch_page(
    session: Session, tenant: TenantContext, status: BatchStatus | None, cursor: str | None, limit: int
) -> BatchPage:
    """One page of the tenant's batches, newest first, optionally of one status."""
    after = decode_cursor(cursor)
    query = select(Batch).where(Batch.tenant_id == tenant.tenant_id)
    if status is not None:
        query = query.where(Batch.status == status.value)
    if after is not None:
        query = query.where(Batch.id < after)
    batches = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)).all())
    more = len(batches) > limit
    batches = batches[:limit]
    counts = status_counts(session, [b.id for b in batches])
    estimated = estimated_costs(session, batch_ids=[b.id for b in batches])
    return BatchPage(
        items=[batch_out(b, counts[b.id], estimated.get(b.id, Decimal(0))) for b in batches],
        next_cursor=encode_cursor(batches[-1].id) if more else None,
    )


def attempt_counts(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many provider calls each job has had."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Attempt.job_id, func.count()).where(Attempt.job_id.in_(job_ids)).group_by(Attempt.job_id)
    ).all()
    return {job_id: int(n) for job_id, n in rows if job_id is not None}


def _fallback_reason_of(job_id: Any) -> Any:
    """SQL: "<model>: <message>" of the job's latest attempt that moved it on to the next model."""
    return (
        select(func.concat(Attempt.model, ": ", func.coalesce(Attempt.error_message, Attempt.error_code)))
        .where(Attempt.job_id == job_id, Attempt.outcome == AttemptOutcome.FALLBACK.value)
        .order_by(Attempt.started_at.desc(), Attempt.id.desc())
        .limit(1)
        .scalar_subquery()
    )


def fallback_reasons(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Each job's `fallback_reason` (jobs that never moved on are absent)."""
    if not job_ids:
        return {}
    ids = select(Job.id.label("job_id")).where(Job.id.in_(job_ids)).subquery()
    rows = session.execute(select(ids.c.job_id, _fallback_reason_of(ids.c.job_id))).all()
    return {job_id: reason for job_id, reason in rows if reason is not None}


def job_out(
    job: Job, attempts: int, estimated: Decimal = Decimal(0), fallback_reason: str | None = None
) -> JobOut:
    """The API view of a job (`estimated`: the part of its cost that is an estimate; `fallback_reason`:
    why the job last moved on to the next model)."""
    cost, billed, guessed = _split_cost(job.cost_usd, estimated)
    error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
    return JobOut(
        id=job.id,
        batch_id=job.batch_id,
        filename=job.filename,
        status=job.status,
        bytes=job.bytes,
        sha256=job.sha256,
        content_type=job.content_type,
        source_uri=job.source_uri,
        duration_seconds=job.duration_seconds,
        codec=job.codec,
        sample_rate=job.sample_rate,
        channels=job.channels,
        model=job.model,
        attempts=attempts,
        billed_seconds=job.billed_seconds or 0.0,
        cost_usd=cost,
        billed_usd=billed,
        estimated_usd=guessed,
        error=error,
        fallback_reason=fallback_reason,
        route_model=job.route_model,
        route_reason=job.route_reason,
        deduplicated_from=job.deduplicated_from_id,
        created_at=job.created_at,
        uploaded_at=job.uploaded_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _polled_job_statement() -> Any:
    """The polled read's one statement: the job, its attempt count, the estimated part of its cost and
    its fallback reason, for bound `job_id`/`tenant_id`. Built once: building the three correlated
    subqueries on every call cost more Python time than the rest of the read (0.99 vs 0.39 ms of CPU per
    read measured side by side, issue #15's P4b)."""
    attempts = select(func.count()).where(Attempt.job_id == Job.id).scalar_subquery()
    estimated = (
        select(func.coalesce(func.sum(CostRecord.usd), 0))
        .where(CostRecord.job_id == Job.id, CostRecord.estimated.is_(True))
        .scalar_subquery()
    )
    return select(Job, attempts, estimated, _fallback_reason_of(Job.id)).where(
        Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id"), Job.deleted_at.is_(None)
    )


_POLLED_JOB = _polled_job_statement()


def read_job_out(tenant: TenantContext, job_id: uuid.UUID) -> JobOut:
    """The tenant's job with its attempt count, in one statement outside a transaction (the polled read).

    One SELECT is its own snapshot, so autocommit saves the BEGIN and ROLLBACK round trips; the
    connection goes back to the pool before the answer is built. Blocking: call from a worker thread.
    """
    with get_sessionmaker()() as session:
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        row = session.execute(_POLLED_JOB, {"job_id": job_id, "tenant_id": tenant.tenant_id}).first()
    if row is None:
        raise not_found("job")
    return job_out(row[0], int(row[1]), Decimal(row[2]), row[3])


def load_job_out(session: Session, job: Job) -> JobOut:
    """A job's view with its attempt count."""
    estimated = estimated_costs(session, job_ids=[job.id]).get(job.id, Decimal(0))
    reason = fallback_reasons(session, [job.id]).get(job.id)
    return job_out(job, attempt_counts(session, [job.id]).get(job.id, 0), estimated, reason)


def job_brief(job: Job) -> JobBrief:
    """The short view an upload answers with."""
    return JobBrief(id=job.id, filename=job.filename, status=job.status, bytes=job.bytes, sha256=job.sha256)


def job_page(
    session: Session,
    tenant: TenantContext,
    batch_id: uuid.UUID,
    status: JobStatus | None,
    cursor: str | None,
    limit: int,
) -> JobPage:
    """One page of a tenant's batch's live jobs in upload order, optionally of one status (404: no batch)."""
    get_batch(session, tenant, batch_id)
    after = decode_cursor(cursor)
    query = select(Job).where(
        Job.batch_id == batch_id, Job.tenant_id == tenant.tenant_id, Job.deleted_at.is_(None)
    )
    if status is not None:
        query = query.where(Job.status == status.value)
    if after is not None:
        query = query.where(Job.id > after)
    jobs = list(session.scalars(query.order_by(Job.id).limit(limit + 1)).all())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    attempts = attempt_counts(session, [j.id for j in jobs])
    estimated = estimated_costs(session, job_ids=[j.id for j in jobs])
    reasons = fallback_reasons(session, [j.id for j in jobs])
    return JobPage(
        items=[
            job_out(j, attempts.get(j.id, 0), estimated.get(j.id, Decimal(0)), reasons.get(j.id))
            for j in jobs
        ],
        next_cursor=encode_cursor(jobs[-1].id) if more else None,
    )


def pending_uploads(tenant: TenantContext, batch_id: uuid.UUID) -> list[Job]:
    """The batch's presigned uploads not verified yet (404/409 unless it takes files), detached."""
    with session_scope() as session:
        ensure_accepting(get_batch(session, tenant, batch_id))
        return list(
            session.scalars(
                select(Job).where(
                    Job.batch_id == batch_id,
                    Job.status == JobStatus.PENDING_UPLOAD.value,
                    Job.deleted_at.is_(None),
                )
            ).all()
        )


def find_transcript(session: Session, tenant: TenantContext, job: Job) -> Transcript | None:
    """The job's transcript, or that of the job whose audio it shares (a deduplicated job)."""
    transcript = session.scalar(select(Transcript).where(Transcript.job_id == job.id))
    if transcript is None and job.deduplicated_from_id is not None:
        transcript = session.scalar(
            select(Transcript).where(
                Transcript.job_id == job.deduplicated_from_id, Transcript.tenant_id == tenant.tenant_id
            )
        )
    return transcript


def attempt_list(session: Session, tenant: TenantContext, job_id: uuid.UUID) -> AttemptList:
    """Every provider call of the tenant's job, oldest first, with what each cost (404: no such job)."""
    job = get_job(session, tenant, job_id)
    rows = session.execute(
        select(Attempt, CostRecord.usd, CostRecord.estimated)
        .outerjoin(CostRecord, CostRecord.attempt_id == Attempt.id)
        .where(Attempt.job_id == job.id, Attempt.tenant_id == tenant.tenant_id)
        .order_by(Attempt.started_at, Attempt.id)
    ).all()
    return AttemptList(
        items=[
            AttemptOut(
                id=a.id,
                model=a.model,
                provider=a.provider,
                chunk_index=a.chunk_index,
                retry_number=a.retry_number,
                outcome=a.outcome,
                http_status=a.http_status,
                error_code=a.error_code,
                error_message=a.error_message,
                audio_seconds=a.audio_seconds,
                latency_ms=a.latency_ms,
                started_at=a.started_at,
                ended_at=a.ended_at,
                cost_usd=float(cost) if cost is not None else None,
                estimated=estimated,
            )
            for a, cost, estimated in rows
        ]
    )


def usage_rows(
    session: Session, tenant: TenantContext, start: datetime, end: datetime, group_by: GroupBy
) -> list[UsageRow]:
    """The tenant's costs from `start` (inclusive) to `end` (exclusive), summed per day, model or batch."""
    key: Any
    if group_by == "day":
        key = cast(cast(func.timezone("UTC", CostRecord.created_at), Date), String)
    elif group_by == "model":
        key = CostRecord.model
    else:
        key = func.coalesce(cast(CostRecord.batch_id, String), "none")
    rows = session.execute(
        select(
            key.label("key"),
            func.coalesce(func.sum(CostRecord.usd), 0),
            func.coalesce(func.sum(CostRecord.billed_audio_seconds), 0.0),
            func.count(),
            func.coalesce(func.sum(case((CostRecord.estimated, CostRecord.usd), else_=0)), 0),
        )
        .where(
            CostRecord.tenant_id == tenant.tenant_id,
            CostRecord.created_at >= start,
            CostRecord.created_at < end,
        )
        .group_by(key)
        .order_by(key)
    ).all()
    return [
        UsageRow(
            key=str(k),
            cost_usd=float(c),
            billed_seconds=float(s),
            records=int(n),
            billed_usd=float(Decimal(c) - Decimal(e)),
            estimated_usd=float(e),
        )
        for k, c, s, n, e in rows
    ]
