"""What the routes do to Postgres, in short transactions: tenant-scoped lookups, job creation, queueing.

Every lookup filters by tenant, so another tenant's id is simply "not found".
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api import enqueue
from api.deps import TenantContext
from api.ingest import AcceptedFile
from api.problems import RETRY, Problem, not_found
from api.schemas import BatchOptions, BatchOut, JobBrief, JobError, JobOut, StatusCounts
from core import metrics
from core.db import get_engine, get_sessionmaker, session_scope
from core.models import Attempt, Batch, Job
from core.settings import get_settings
from core.statuses import JOB_TERMINAL, BatchStatus, JobStatus
from core.webhook_security import WebhookRefused, WebhookUnresolvable, check_url

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


def get_job(session: Session, tenant: TenantContext, job_id: uuid.UUID) -> Job:
    """The tenant's (not deleted) job, or 404."""
    job = session.scalar(
        select(Job).where(Job.id == job_id, Job.tenant_id == tenant.tenant_id, Job.deleted_at.is_(None))
    )
    if job is None:
        raise not_found("job")
    return job


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


def batch_out(batch: Batch, counts: dict[str, int]) -> BatchOut:
    """The API view of a batch."""
    total = sum(counts.values())
    terminal = sum(n for s, n in counts.items() if s in JOB_TERMINAL)
    return BatchOut(
        id=batch.id,
        name=batch.name,
        status=batch.status,
        profile=batch.profile,
        language=batch.language,
        priority=batch.priority,
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
        cost_usd=float(batch.cost_usd or 0),
        created_at=batch.created_at,
        submitted_at=batch.submitted_at,
        completed_at=batch.completed_at,
    )


def load_batch_out(session: Session, batch: Batch) -> BatchOut:
    """A batch's view with fresh counts."""
    return batch_out(batch, status_counts(session, [batch.id])[batch.id])


def attempt_counts(session: Session, job_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many provider calls each job has had."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(Attempt.job_id, func.count()).where(Attempt.job_id.in_(job_ids)).group_by(Attempt.job_id)
    ).all()
    return {job_id: int(n) for job_id, n in rows if job_id is not None}


def job_out(job: Job, attempts: int) -> JobOut:
    """The API view of a job."""
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
        cost_usd=float(job.cost_usd or Decimal(0)),
        error=error,
        deduplicated_from=job.deduplicated_from_id,
        created_at=job.created_at,
        uploaded_at=job.uploaded_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def read_job_out(tenant: TenantContext, job_id: uuid.UUID) -> JobOut:
    """The tenant's job with its attempt count, in one statement outside a transaction (the polled read).

    One SELECT is its own snapshot, so autocommit saves the BEGIN and ROLLBACK round trips; the
    connection goes back to the pool before the answer is built. Blocking: call from a worker thread.
    """
    attempts = select(func.count()).where(Attempt.job_id == Job.id).scalar_subquery()
    with get_sessionmaker()() as session:
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        row = session.execute(
            select(Job, attempts).where(
                Job.id == job_id, Job.tenant_id == tenant.tenant_id, Job.deleted_at.is_(None)
            )
        ).first()
    if row is None:
        raise not_found("job")
    return job_out(row[0], int(row[1]))


def load_job_out(session: Session, job: Job) -> JobOut:
    """A job's view with its attempt count."""
    return job_out(job, attempt_counts(session, [job.id]).get(job.id, 0))


def job_brief(job: Job) -> JobBrief:
    """The short view an upload answers with."""
    return JobBrief(id=job.id, filename=job.filename, status=job.status, bytes=job.bytes, sha256=job.sha256)


def check_webhook(options: BatchOptions) -> None:
    """422 `webhook_url_forbidden` when the webhook URL points at a non-public address (SSRF guard).

    A host that does not resolve now is accepted: DNS may be transiently down, and every delivery
    checks the URL again (and every redirect hop) before sending anything.
    """
    if not options.webhook_url:
        return
    try:
        check_url(str(options.webhook_url), allow_private=get_settings().webhook_allow_private)
    except WebhookUnresolvable:
        return
    except WebhookRefused as exc:
        raise Problem(422, "webhook_url_forbidden", exc.message) from None


def new_batch(tenant: TenantContext, options: BatchOptions, *, auto_submit: bool) -> Batch:
    """A batch row from validated options (not yet added to a session)."""
    return Batch(
        tenant_id=tenant.tenant_id,
        name=options.name,
        profile=options.profile,
        language=options.language,
        prompt=options.prompt,
        models=list(options.models) if options.models else None,
        webhook_url=str(options.webhook_url) if options.webhook_url else None,
        budget_usd=options.budget_usd,
        priority=options.priority,
        auto_submit=auto_submit,
        metadata_=options.metadata,
        status=BatchStatus.OPEN.value,
    )


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


def add_jobs(session: Session, batch: Batch, accepted: Iterable[AcceptedFile]) -> list[Job]:
    """Create one `uploaded` job per accepted file (flushed, not committed)."""
    now = datetime.now(UTC)
    jobs = []
    for item in accepted:
        job = Job(
            tenant_id=batch.tenant_id,
            batch_id=batch.id,
            object_key=item.object_key,
            filename=item.received.filename,
            bytes=item.received.size,
            sha256=item.received.sha256,
            content_type=item.received.content_type,
            duration_seconds=item.probe.duration_seconds,
            codec=item.probe.codec,
            sample_rate=item.probe.sample_rate,
            channels=item.probe.channels,
            status=JobStatus.UPLOADED.value,
            priority=batch.priority,
            uploaded_at=now,
        )
        session.add(job)
        jobs.append(job)
    session.flush()
    for job in jobs:
        metrics.UPLOADED_BYTES.inc(job.bytes or 0)
        metrics.AUDIO_SUBMITTED_SECONDS.inc(job.duration_seconds or 0.0)
    return jobs


def mark_queued(
    session: Session, batch: Batch, from_statuses: Sequence[str], job_ids: Sequence[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Compare-and-set jobs of `batch` from `from_statuses` to `queued`; the batch becomes processing."""
    now = datetime.now(UTC)
    query = (
        update(Job)
        .where(Job.batch_id == batch.id, Job.status.in_(list(from_statuses)), Job.deleted_at.is_(None))
        .values(
            status=JobStatus.QUEUED.value,
            queued_at=now,
            error_code=None,
            error_message=None,
            finished_at=None,
            priority=batch.priority,
        )
        .returning(Job.id)
    )
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    ids = list(session.scalars(query).all())
    if ids:
        session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.status != BatchStatus.CANCELLED.value)
            .values(
                status=BatchStatus.PROCESSING.value,
                submitted_at=func.coalesce(Batch.submitted_at, now),
                completed_at=None,
            )
        )
    return ids


def enqueue_or_revert(job_ids: Sequence[uuid.UUID], priority: str, revert_to: str) -> None:
    """Send the committed `queued` jobs to the workers; if the broker is down, put them back and 503."""
    if not job_ids:
        return
    try:
        enqueue.enqueue_jobs(job_ids, priority=priority)
    except Exception as exc:
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(list(job_ids)), Job.status == JobStatus.QUEUED.value)
                .values(status=revert_to, queued_at=None)
            )
        raise Problem(
            503, "queue_unavailable", "the job queue is unreachable; submit again later", headers=RETRY
        ) from exc
