"""What the routes change in Postgres, in short transactions: new batches and jobs, queueing, cancel, delete.

The only place that builds `Job` rows and auto-submits. Every write starts from a tenant-scoped lookup
(`api.queries`), so another tenant's id is simply "not found". Status changes are compare-and-set.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from api import enqueue
from api.accept import AcceptedFile
from api.deps import TenantContext
from api.ingest import clean_filename
from api.locks import drop_inline_audio, object_locks
from api.probe import ProbeResult
from api.problems import RETRY, Problem
from api.queries import (
    batch_out,
    ensure_accepting,
    get_batch,
    get_job,
    job_brief,
    job_out,
    load_batch_out,
)
from api.schemas import (
    AlignOut,
    BatchCreate,
    BatchOptions,
    BatchOut,
    ImportOut,
    JobOut,
    PresignedUploadCreate,
    UploadOut,
)
from core import metrics
from core.db import session_scope
from core.dedupe import dedupe_lock_key, lock_dedupe_keys
from core.models import Batch, Job, JobAnswer, JobChunk, Transcript
from core.settings import get_settings
from core.statuses import (
    JOB_TERMINAL,
    AlignmentStatus,
    BatchStatus,
    JobStatus,
    Timestamps,
    effective_timestamps,
)
from core.storage import Storage, derived_key, derived_prefix
from core.webhook_security import WebhookRefused, WebhookUnresolvable, check_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Queued:
    """Jobs committed as `queued` that still have to reach the broker, with their batch's priority."""

    job_ids: list[uuid.UUID]
    priority: str


@dataclass(frozen=True)
class ImportedObject:
    """An object to import, checked: exists, size within limits, decodable audio."""

    uri: str
    key: str
    content_type: str | None
    size: int
    probe: ProbeResult


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
        prefer=options.prefer,
        timestamps=effective_timestamps(options.profile, options.timestamps).value,
        routing=options.routing,
        diarize=options.diarize,
        auto_submit=auto_submit,
        metadata_=options.metadata,
        status=BatchStatus.OPEN.value,
    )


def create_batch(session: Session, tenant: TenantContext, body: BatchCreate) -> BatchOut:
    """Commit a new open batch (its webhook URL checked first) and return its view."""
    check_webhook(body)
    batch = new_batch(tenant, body, auto_submit=body.auto_submit)
    session.add(batch)
    session.commit()
    return batch_out(batch, {})


def _job_row(
    batch: Batch,
    status: JobStatus,
    *,
    filename: str | None,
    size: int,
    content_type: str | None,
    sha256: str | None = None,
    object_key: str | None = None,
    source_uri: str | None = None,
    probe: ProbeResult | None = None,
    uploaded_at: datetime | None = None,
) -> Job:
    """A job row of `batch` (the one constructor of jobs): its audio, what the probe found, its status."""
    return Job(
        tenant_id=batch.tenant_id,
        batch_id=batch.id,
        object_key=object_key,
        source_uri=source_uri,
        filename=filename,
        bytes=size,
        sha256=sha256,
        content_type=content_type,
        duration_seconds=probe.duration_seconds if probe else None,
        codec=probe.codec if probe else None,
        sample_rate=probe.sample_rate if probe else None,
        channels=probe.channels if probe else None,
        status=status.value,
        priority=batch.priority,
        uploaded_at=uploaded_at,
    )


def _add(session: Session, jobs: list[Job]) -> list[Job]:
    session.add_all(jobs)
    session.flush()
    return jobs


def add_jobs(session: Session, batch: Batch, accepted: Iterable[AcceptedFile]) -> list[Job]:
    """Create one `uploaded` job per accepted file (flushed, not committed)."""
    now = datetime.now(UTC)
    jobs = _add(
        session,
        [
            _job_row(
                batch,
                JobStatus.UPLOADED,
                filename=item.received.filename,
                size=item.received.size,
                sha256=item.received.sha256,
                content_type=item.received.content_type,
                object_key=item.object_key,
                probe=item.probe,
                uploaded_at=now,
            )
            for item in accepted
        ],
    )
    for job in jobs:
        metrics.UPLOADED_BYTES.inc(job.bytes or 0)
        metrics.AUDIO_SUBMITTED_SECONDS.inc(job.duration_seconds or 0.0)
    return jobs


def _auto_submit(session: Session, batch: Batch, jobs: Sequence[Job]) -> list[uuid.UUID]:
    """Queue the batch's new jobs when it auto-submits; their in-session rows say so too."""
    if not batch.auto_submit:
        return []
    queued = mark_queued(session, batch, [JobStatus.UPLOADED.value], job_ids=[j.id for j in jobs])
    for job in jobs:
        if job.id in queued:
            job.status = JobStatus.QUEUED.value
    return queued


def record_uploads(
    tenant: TenantContext, batch_id: uuid.UUID, accepted: list[AcceptedFile]
) -> tuple[UploadOut, Queued]:
    """Commit one job per uploaded file into the tenant's batch (queued with `auto_submit`)."""
    with session_scope() as session:
        batch = get_batch(session, tenant, batch_id, lock=True)
        ensure_accepting(batch)
        jobs = add_jobs(session, batch, accepted)
        queued = _auto_submit(session, batch, jobs)
        out = UploadOut(batch_id=batch_id, jobs=[job_brief(j) for j in jobs])
        return out, Queued(queued, batch.priority)


def record_single_job(
    tenant: TenantContext, options: BatchOptions, accepted: list[AcceptedFile]
) -> tuple[JobOut, Queued]:
    """Commit a one-file, auto-submitting batch and its queued job."""
    with session_scope() as session:
        batch = new_batch(tenant, options, auto_submit=True)
        session.add(batch)
        session.flush()
        jobs = add_jobs(session, batch, accepted)
        queued = _auto_submit(session, batch, jobs)
        session.flush()
        session.refresh(jobs[0])
        return job_out(jobs[0], 0), Queued(queued, batch.priority)


def record_imports(
    tenant: TenantContext, batch_id: uuid.UUID, found: Sequence[ImportedObject]
) -> tuple[ImportOut, Queued]:
    """Commit one job per checked object to import (queued with `auto_submit`)."""
    now = datetime.now(UTC)
    with session_scope() as session:
        batch = get_batch(session, tenant, batch_id, lock=True)
        ensure_accepting(batch)
        rows = [
            _job_row(
                batch,
                JobStatus.UPLOADED,
                filename=item.key.rsplit("/", 1)[-1],
                size=item.size,
                content_type=item.content_type,
                source_uri=item.uri,
                probe=item.probe,
                uploaded_at=now,
            )
            for item in found
        ]
        jobs = _add(session, rows)
        queued = _auto_submit(session, batch, jobs)
        out = ImportOut(batch_id=batch.id, jobs=[job_brief(j) for j in jobs])
        return out, Queued(queued, batch.priority)


def add_presigned_job(
    session: Session, tenant: TenantContext, batch_id: uuid.UUID, body: PresignedUploadCreate, key: str
) -> Job:
    """Commit a `pending_upload` job for a file the client will PUT to `key` (404/409 on the batch)."""
    batch = get_batch(session, tenant, batch_id)
    ensure_accepting(batch)
    job = _job_row(
        batch,
        JobStatus.PENDING_UPLOAD,
        filename=clean_filename(body.filename),
        size=body.bytes,
        sha256=body.sha256,
        content_type=body.content_type,
        object_key=key,
    )
    _add(session, [job])
    session.commit()
    return job


def reject_presigned(job_id: uuid.UUID, code: str, message: str, now: datetime) -> None:
    """A presigned upload failed verification: its job fails (its object is already gone)."""
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.PENDING_UPLOAD.value)
            .values(
                status=JobStatus.FAILED.value,
                error_code=code,
                error_message=message,
                object_key=None,
                finished_at=now,
            )
        )


def mark_presigned_uploaded(
    job_id: uuid.UUID, key: str, sha256: str, result: ProbeResult, now: datetime
) -> bool:
    """A verified presigned upload becomes `uploaded` at its content key `key` (its bytes hash to `sha256`);
    False when another request did it first."""
    with session_scope() as session:
        updated = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.PENDING_UPLOAD.value)
            .values(
                status=JobStatus.UPLOADED.value,
                object_key=key,
                sha256=sha256,
                duration_seconds=result.duration_seconds,
                codec=result.codec,
                sample_rate=result.sample_rate,
                channels=result.channels,
                uploaded_at=now,
            )
        )
    return bool(updated.rowcount)  # type: ignore[attr-defined]


def object_in_use(tenant: TenantContext, object_key: str, *, besides: uuid.UUID | None = None) -> bool:
    """Whether a live (not deleted) job of the tenant, other than `besides`, has this audio object (call
    under the object's lock)."""
    query = select(func.count()).where(
        Job.tenant_id == tenant.tenant_id, Job.object_key == object_key, Job.deleted_at.is_(None)
    )
    if besides is not None:
        query = query.where(Job.id != besides)
    with session_scope() as session:
        return bool(session.scalar(query))


def submit_uploaded(tenant: TenantContext, batch_id: uuid.UUID, *, others: bool) -> Queued:
    """Queue every uploaded job of the batch; 409 `batch_empty` when it has none and `others` is False
    (no upload was rejected or is still awaited)."""
    with session_scope() as session:
        batch = get_batch(session, tenant, batch_id, lock=True)
        ensure_accepting(batch)
        ids = mark_queued(session, batch, [JobStatus.UPLOADED.value])
        if not ids and not others:
            has_jobs = session.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1))
            if has_jobs is None:
                raise Problem(409, "batch_empty", "the batch has no files to submit")
        return Queued(ids, batch.priority)


def retry_failed(tenant: TenantContext, batch_id: uuid.UUID) -> Queued:
    """Queue the batch's failed jobs again, those whose audio is still there."""
    with session_scope() as session:
        batch = get_batch(session, tenant, batch_id, lock=True)
        ensure_accepting(batch)
        retryable = select(Job.id).where(
            Job.batch_id == batch_id,
            Job.status == JobStatus.FAILED.value,
            (Job.object_key.is_not(None)) | (Job.source_uri.is_not(None)),
            Job.deleted_at.is_(None),
        )
        ids = mark_queued(
            session, batch, [JobStatus.FAILED.value], job_ids=list(session.scalars(retryable).all())
        )
        return Queued(ids, batch.priority)


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


def enqueue_or_revert(queued: Queued, revert_to: str) -> None:
    """Send the committed `queued` jobs to the workers; if the broker is down, put them back and 503."""
    if not queued.job_ids:
        return
    try:
        enqueue.enqueue_jobs(queued.job_ids, priority=queued.priority)
    except Exception as exc:
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(list(queued.job_ids)), Job.status == JobStatus.QUEUED.value)
                .values(status=revert_to, queued_at=None)
            )
        raise Problem(
            503, "queue_unavailable", "the job queue is unreachable; submit again later", headers=RETRY
        ) from exc


def cancel_batch(session: Session, tenant: TenantContext, batch_id: uuid.UUID) -> BatchOut:
    """Cancel every unfinished job of the batch, and the batch unless it already ended; its fresh view.

    Followers in other batches of the cancelled jobs go back to the queue (`_hand_back_followers`)."""
    batch = get_batch(session, tenant, batch_id, lock=True)
    now = datetime.now(UTC)
    ended = session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.status.not_in([s.value for s in JOB_TERMINAL]),
            Job.deleted_at.is_(None),
        )
        .values(status=JobStatus.CANCELLED.value, finished_at=now)
        .returning(*_ENDED)
    ).all()
    followers = _hand_back_followers(session, ended)
    if batch.status not in (BatchStatus.COMPLETED.value, BatchStatus.FAILED.value):
        batch.status = BatchStatus.CANCELLED.value
        batch.completed_at = now
    session.commit()
    _send_prepare(followers)
    return load_batch_out(session, batch)


def cancel_job(session: Session, tenant: TenantContext, job_id: uuid.UUID) -> Job:
    """Cancel the tenant's unfinished job (compare-and-set); 409 `job_not_cancellable` once it ended.

    Its dedupe followers go back to the queue (`_hand_back_followers`)."""
    job = get_job(session, tenant, job_id)
    ended = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.not_in([s.value for s in JOB_TERMINAL]))
        .values(status=JobStatus.CANCELLED.value, finished_at=datetime.now(UTC))
        .returning(*_ENDED)
    ).all()
    if not ended:
        raise Problem(409, "job_not_cancellable", f"the job is already {job.status}")
    followers = _hand_back_followers(session, ended)
    session.commit()
    _send_prepare(followers)
    session.refresh(job)
    return job


# What `_hand_back_followers` needs of each job a cancel or delete just ended.
_ENDED = (Job.id, Job.tenant_id, Job.fingerprint)


def _hand_back_followers(session: Session, ended: Sequence[Any]) -> dict[str, list[uuid.UUID]]:
    """Send the dedupe followers of jobs this transaction just ended back to `queued`; their ids by
    priority, for `_send_prepare` once committed.

    A follower waits for its leader's outcome with no lease of its own: a leader ended here (its worker's
    compare-and-set now fails, so it resolves nobody) would leave it `processing` forever. Handed back,
    each is prepared again: the first leads, the others follow it. The leaders' dedupe locks
    (core.dedupe) are taken after their rows, as worker.completion does, so a follower attached at the
    last moment is handed back too; a later decision sees the leader ended.
    """
    if not ended:
        return {}
    lock_dedupe_keys(session, (dedupe_lock_key(r.tenant_id, r.fingerprint) for r in ended if r.fingerprint))
    rows = session.execute(
        update(Job)
        .where(
            Job.deduplicated_from_id.in_([r.id for r in ended]),
            Job.status == JobStatus.PROCESSING.value,
        )
        .values(
            status=JobStatus.QUEUED.value,
            deduplicated_from_id=None,
            queued_at=datetime.now(UTC),
            lease_owner=None,
            lease_expires_at=None,
            group_id=None,
        )
        .returning(Job.id, Job.priority)
    ).all()
    by_priority: dict[str, list[uuid.UUID]] = {}
    for job_id, priority in rows:
        by_priority.setdefault(priority, []).append(job_id)
    return by_priority


def _send_prepare(by_priority: dict[str, list[uuid.UUID]]) -> None:
    """Send committed `queued` jobs to prepare; if the broker is down, the sweeper resends them later."""
    for priority, job_ids in by_priority.items():
        try:
            enqueue.enqueue_jobs(job_ids, priority=priority)
        except Exception as exc:
            log.warning(
                "%d handed-back job(s) wait for the sweeper's resend (%s)", len(job_ids), type(exc).__name__
            )


def delete_job(tenant: TenantContext, storage: Storage, job_id: uuid.UUID) -> None:
    """Delete a job's audio and transcript; its row stays (marked deleted) so cost records keep their job.

    None of its bytes is left: its upload (unless another live job of the tenant has the same content:
    it stays until that job is deleted too), its derived FLACs (whole file and chunks) in S3 and the copy
    kept in Redis for its transcribe task. Bytes go first: when storage fails (503), nothing has changed
    yet and deleting again works. A worker still preparing the job may write a FLAC after this: the
    storage sweep removes derived audio of deleted jobs.
    """
    with session_scope() as session:
        object_key = get_job(session, tenant, job_id).object_key
    # The object's lock keeps an upload of the same audio from committing a job that uses it between
    # our "who else uses it" count and the delete.
    with object_locks([object_key] if object_key else []):
        if object_key is not None and not object_in_use(tenant, object_key, besides=job_id):
            storage.delete(object_key)
        storage.delete_prefix(derived_prefix(tenant.tenant_id, job_id))
        drop_inline_audio(derived_key(tenant.tenant_id, job_id))
        _forget_job(tenant, job_id)


def _forget_job(tenant: TenantContext, job_id: uuid.UUID) -> None:
    """Mark the job deleted (cancelled if it was live), drop its transcript, answers and chunk plan, and
    hand its dedupe followers back to the queue."""
    now = datetime.now(UTC)
    with session_scope() as session:
        job = get_job(session, tenant, job_id)
        values: dict[str, Any] = {"deleted_at": now, "object_key": None, "filename": None}
        if job.status not in JOB_TERMINAL:
            values.update(status=JobStatus.CANCELLED.value, finished_at=now)
        ended = session.execute(
            update(Job).where(Job.id == job.id, Job.deleted_at.is_(None)).values(**values).returning(*_ENDED)
        ).all()
        followers = _hand_back_followers(session, ended)
        session.execute(delete(Transcript).where(Transcript.job_id == job.id))
        session.execute(delete(JobAnswer).where(JobAnswer.job_id == job.id))  # kept paid answers: text too
        session.execute(delete(JobChunk).where(JobChunk.job_id == job.id))
    _send_prepare(followers)


def request_alignment(
    session: Session, tenant: TenantContext, job_id: uuid.UUID, timestamps: str | None
) -> AlignOut:
    """Queue a new alignment of the tenant's succeeded job's transcript (409 unless it succeeded).

    The transcript's alignment becomes `pending` with a new token (one short transaction); the align task
    writes its result only while that token is the transcript's, so an older run never overwrites it."""
    job = get_job(session, tenant, job_id)
    if job.status != JobStatus.SUCCEEDED.value:
        raise Problem(409, "job_not_succeeded", f"the job is {job.status}; only a succeeded job is aligned")
    batch = session.get(Batch, job.batch_id)
    chosen = Timestamps(timestamps) if timestamps else None
    if chosen is None and batch is not None:
        chosen = effective_timestamps(batch.profile, batch.timestamps)
    if chosen in (None, Timestamps.NONE):
        chosen = Timestamps.SEGMENT
    token = str(uuid.uuid4())
    pending = {"status": AlignmentStatus.PENDING.value, "token": token, "timestamps": chosen.value}
    updated = session.execute(
        update(Transcript)
        .where(Transcript.job_id == job.id, Transcript.tenant_id == tenant.tenant_id)
        .values(alignment=pending)
        .returning(Transcript.id)
    ).first()
    if updated is None:
        raise Problem(409, "transcript_not_ready", "the job has no transcript of its own to align")
    session.commit()
    try:
        enqueue.enqueue_alignment(job.id, token)
    except Exception as exc:  # the request is recorded: the sweeper sends a pending alignment's task again
        log.warning("align task of job %s not sent (%s)", job.id, type(exc).__name__)
    return AlignOut(job_id=job.id, status=AlignmentStatus.PENDING.value, timestamps=chosen.value)
