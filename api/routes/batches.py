"""Batches: create, list, inspect, add files (multipart, presigned, imports), submit, cancel, retry."""

from __future__ import annotations

import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool

from api import service
from api.deps import SessionDep, SessionRoute, StorageDep, TenantContext, TenantDep
from api.ingest import (
    AcceptedFile,
    Received,
    accept_files,
    clean_filename,
    incoming_key,
    ingest_multipart,
)
from api.locks import object_lock
from api.probe import ProbeResult, probe_s3_object
from api.problems import COMMON_PROBLEMS, UPLOAD_PROBLEMS, Problem, from_voxq_error, problem_responses
from api.schemas import (
    BatchCreate,
    BatchOut,
    BatchPage,
    ImportCreate,
    ImportOut,
    JobPage,
    PresignedUploadCreate,
    PresignedUploadOut,
    RejectedJob,
    SubmitOut,
    UploadOut,
)
from core import metrics
from core.db import session_scope
from core.errors import AudioError
from core.models import Batch, Job
from core.settings import get_settings
from core.statuses import JOB_TERMINAL, BatchStatus, JobStatus
from core.storage import Storage, content_key, parse_s3_uri

# Objects of one import request checked at once (S3 round trips, not CPU).
IMPORT_PARALLELISM = 8

router = APIRouter(
    prefix="/v1/batches", tags=["batches"], responses=COMMON_PROBLEMS, route_class=SessionRoute
)

MULTIPART_FILES_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            }
        },
    }
}


@router.post("", status_code=201, response_model=BatchOut)
def create_batch(body: BatchCreate, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """Create a batch; add files to it, then submit (or set `auto_submit`)."""
    service.check_webhook(body)
    batch = service.new_batch(tenant, body, auto_submit=body.auto_submit)
    session.add(batch)
    session.commit()
    return service.batch_out(batch, {})


@router.get("", response_model=BatchPage)
def list_batches(
    tenant: TenantDep,
    session: SessionDep,
    status: BatchStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = service.DEFAULT_PAGE,
) -> BatchPage:
    """The tenant's batches, newest first, optionally of one status; pass `next_cursor` back as `cursor`."""
    after = service.decode_cursor(cursor)
    query = select(Batch).where(Batch.tenant_id == tenant.tenant_id)
    if status is not None:
        query = query.where(Batch.status == status.value)
    if after is not None:
        query = query.where(Batch.id < after)
    batches = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)).all())
    more = len(batches) > limit
    batches = batches[:limit]
    counts = service.status_counts(session, [b.id for b in batches])
    return BatchPage(
        items=[service.batch_out(b, counts[b.id]) for b in batches],
        next_cursor=service.encode_cursor(batches[-1].id) if more else None,
    )


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """A batch's status, counts per job status, progress, audio and billed seconds, and cost so far."""
    return service.load_batch_out(session, service.get_batch(session, tenant, batch_id))


@router.get("/{batch_id}/jobs", response_model=JobPage)
def list_jobs(
    batch_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = service.DEFAULT_PAGE,
) -> JobPage:
    """A batch's jobs in upload order, optionally only those in one status."""
    service.get_batch(session, tenant, batch_id)
    after = service.decode_cursor(cursor)
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
    attempts = service.attempt_counts(session, [j.id for j in jobs])
    return JobPage(
        items=[service.job_out(j, attempts.get(j.id, 0)) for j in jobs],
        next_cursor=service.encode_cursor(jobs[-1].id) if more else None,
    )


@router.post(
    "/{batch_id}/files",
    status_code=201,
    response_model=UploadOut,
    openapi_extra=MULTIPART_FILES_BODY,
    responses=UPLOAD_PROBLEMS,
)
async def upload_files(
    batch_id: uuid.UUID, request: Request, tenant: TenantDep, storage: StorageDep
) -> JSONResponse:
    """Upload one or many `file` parts; each is streamed to S3, probed, and becomes one job."""
    await run_in_threadpool(service.check_accepting, tenant, batch_id)
    return await ingest_multipart(
        request,
        tenant.tenant_id,
        storage,
        allowed_fields=frozenset(),
        finish=partial(_add_files, tenant, storage, batch_id),
    )


def _add_files(
    tenant: TenantContext, storage: Storage, batch_id: uuid.UUID, received: Received
) -> tuple[int, dict[str, Any]]:
    """Accept the received files into the batch (queued at once with `auto_submit`); blocking."""

    def record(accepted: list[AcceptedFile]) -> tuple[UploadOut, list[uuid.UUID], str]:
        with session_scope() as session:
            batch = service.get_batch(session, tenant, batch_id, lock=True)
            service.ensure_accepting(batch)
            jobs = service.add_jobs(session, batch, accepted)
            queued: list[uuid.UUID] = []
            if batch.auto_submit:
                queued = service.mark_queued(
                    session, batch, [JobStatus.UPLOADED.value], job_ids=[j.id for j in jobs]
                )
            for job in jobs:
                if job.id in queued:
                    job.status = JobStatus.QUEUED.value
            out = UploadOut(batch_id=batch_id, jobs=[service.job_brief(j) for j in jobs])
            return out, queued, batch.priority

    out, queued, priority = accept_files(storage, tenant.tenant_id, received, record)
    service.enqueue_or_revert(queued, priority, JobStatus.UPLOADED.value)
    return 201, jsonable_encoder(out)


@router.post(
    "/{batch_id}/uploads", status_code=201, response_model=PresignedUploadOut, responses=UPLOAD_PROBLEMS
)
def create_presigned_upload(
    batch_id: uuid.UUID,
    body: PresignedUploadCreate,
    tenant: TenantDep,
    session: SessionDep,
    storage: StorageDep,
) -> PresignedUploadOut:
    """A presigned PUT for one big file; the job is verified (size, hash, probe) at submit."""
    limit = get_settings().max_upload_bytes
    if body.bytes > limit:
        raise Problem(413, "file_too_large", f"a file may be at most {limit} bytes (VOXQ_MAX_UPLOAD_BYTES)")
    batch = service.get_batch(session, tenant, batch_id)
    service.ensure_accepting(batch)
    key = incoming_key(tenant.tenant_id)
    job = Job(
        tenant_id=tenant.tenant_id,
        batch_id=batch.id,
        object_key=key,
        filename=clean_filename(body.filename),
        bytes=body.bytes,
        sha256=body.sha256,
        content_type=body.content_type,
        status=JobStatus.PENDING_UPLOAD.value,
        priority=batch.priority,
    )
    session.add(job)
    session.commit()
    expires = get_settings().s3_presign_expiry_seconds
    url = storage.presign_put(key, expires=expires, content_type=body.content_type)
    headers = {"Content-Type": body.content_type} if body.content_type else {}
    return PresignedUploadOut(
        job_id=job.id,
        upload_url=url,
        headers=headers,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires),
    )


@router.post(
    "/{batch_id}/imports",
    status_code=201,
    response_model=ImportOut,
    responses=problem_responses(403, 413, 415),
)
def import_objects(
    batch_id: uuid.UUID, body: ImportCreate, tenant: TenantDep, storage: StorageDep
) -> ImportOut:
    """Add audio already in a bucket listed in `VOXQ_IMPORT_BUCKETS`, by reference (no re-upload)."""
    allowed = set(get_settings().import_buckets)
    with session_scope() as session:
        service.ensure_accepting(service.get_batch(session, tenant, batch_id))
    for uri in body.s3_uris:  # refuse foreign buckets before touching any object
        bucket, _ = parse_s3_uri(uri)
        if bucket not in allowed:
            raise Problem(403, "bucket_not_allowed", f"bucket {bucket!r} is not in VOXQ_IMPORT_BUCKETS")
    workers = max(1, min(IMPORT_PARALLELISM, len(body.s3_uris)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxq-import") as pool:
        futures = [pool.submit(_probe_import, storage, uri) for uri in body.s3_uris]
        found = [future.result() for future in futures]  # the first bad URI (in order) is reported
    now = datetime.now(UTC)
    with session_scope() as session:
        batch = service.get_batch(session, tenant, batch_id, lock=True)
        service.ensure_accepting(batch)
        jobs = []
        for uri, key, ctype, size, result in found:
            job = Job(
                tenant_id=tenant.tenant_id,
                batch_id=batch.id,
                source_uri=uri,
                filename=key.rsplit("/", 1)[-1],
                bytes=size,
                content_type=ctype or None,
                duration_seconds=result.duration_seconds,
                codec=result.codec,
                sample_rate=result.sample_rate,
                channels=result.channels,
                status=JobStatus.UPLOADED.value,
                priority=batch.priority,
                uploaded_at=now,
            )
            session.add(job)
            jobs.append(job)
        session.flush()
        queued: list[uuid.UUID] = []
        if batch.auto_submit:
            queued = service.mark_queued(session, batch, [JobStatus.UPLOADED.value], [j.id for j in jobs])
            for job in jobs:
                job.status = JobStatus.QUEUED.value
        priority = batch.priority
        out = ImportOut(batch_id=batch.id, jobs=[service.job_brief(j) for j in jobs])
    service.enqueue_or_revert(queued, priority, JobStatus.UPLOADED.value)
    return out


def _probe_import(storage: Storage, uri: str) -> tuple[str, str, str, int, ProbeResult]:
    """Check one object to import: exists, not empty, not too big, decodable audio."""
    bucket, key = parse_s3_uri(uri)
    head = storage.head(key, bucket=bucket)
    if head is None:
        raise Problem(422, "object_not_found", f"{uri} does not exist")
    size = int(head.get("ContentLength", 0))
    if size > get_settings().max_upload_bytes:
        raise Problem(413, "file_too_large", f"{uri} is larger than VOXQ_MAX_UPLOAD_BYTES")
    if size == 0:
        raise Problem(400, "empty_file", f"{uri} is empty")
    try:
        result = probe_s3_object(storage.client, bucket, key, size)
    except AudioError as exc:
        problem = from_voxq_error(exc)
        problem.detail = f"{uri}: {exc.message}"
        raise problem from exc
    return uri, key, str(head.get("ContentType") or ""), size, result


@router.post("/{batch_id}/submit", status_code=202, response_model=SubmitOut)
def submit_batch(batch_id: uuid.UUID, tenant: TenantDep, storage: StorageDep) -> SubmitOut:
    """Verify presigned uploads, then queue every uploaded job of the batch."""
    with session_scope() as session:
        batch = service.get_batch(session, tenant, batch_id)
        service.ensure_accepting(batch)
        pending = list(
            session.scalars(
                select(Job).where(
                    Job.batch_id == batch_id,
                    Job.status == JobStatus.PENDING_UPLOAD.value,
                    Job.deleted_at.is_(None),
                )
            ).all()
        )
    rejected: list[RejectedJob] = []
    waiting: list[uuid.UUID] = []
    for job in pending:
        verdict = _verify_presigned(storage, tenant, job)
        if verdict == "waiting":
            waiting.append(job.id)
        elif isinstance(verdict, RejectedJob):
            rejected.append(verdict)
    with session_scope() as session:
        batch = service.get_batch(session, tenant, batch_id, lock=True)
        service.ensure_accepting(batch)
        ids = service.mark_queued(session, batch, [JobStatus.UPLOADED.value])
        priority = batch.priority
        if not ids and not rejected and not waiting:
            has_jobs = session.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1))
            if has_jobs is None:
                raise Problem(409, "batch_empty", "the batch has no files to submit")
    service.enqueue_or_revert(ids, priority, JobStatus.UPLOADED.value)
    with session_scope() as session:
        status = service.get_batch(session, tenant, batch_id).status
    return SubmitOut(
        batch_id=batch_id,
        status=status,
        queued=len(ids),
        job_ids=ids,
        rejected=rejected,
        waiting_for_upload=waiting,
    )


def _verify_presigned(storage: Storage, tenant: TenantContext, job: Job) -> RejectedJob | str | None:
    """Check a presigned upload: present, declared size, hash if given, decodable audio."""
    assert job.object_key is not None
    head = storage.head(job.object_key)
    if head is None:
        return "waiting"
    size = int(head.get("ContentLength", 0))
    code, message = "", ""
    result = None
    if size != job.bytes:
        code, message = "size_mismatch", f"uploaded {size} bytes, declared {job.bytes}"
    elif job.sha256 is not None:
        digest = hashlib.sha256()
        for chunk in storage.iter_chunks(job.object_key):
            digest.update(chunk)
        if digest.hexdigest() != job.sha256:
            code, message = "sha256_mismatch", "the uploaded bytes do not match the declared sha256"
    if not code:
        try:
            result = probe_s3_object(storage.client, storage.bucket, job.object_key, size)
        except AudioError as exc:
            code, message = exc.code, exc.message
    now = datetime.now(UTC)
    if code or result is None:
        storage.delete(job.object_key)
        with session_scope() as session:
            session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.PENDING_UPLOAD.value)
                .values(
                    status=JobStatus.FAILED.value,
                    error_code=code,
                    error_message=message,
                    object_key=None,
                    finished_at=now,
                )
            )
        return RejectedJob(job_id=job.id, code=code, message=message)
    key = job.object_key
    with ExitStack() as locked:
        if job.sha256 is not None:
            key = content_key(str(tenant.tenant_id), job.sha256)
            locked.enter_context(object_lock(key))  # see api.locks: an upload vs a delete of the same audio
            if storage.head(key) is None:
                storage.copy(job.object_key, key)
        updated = _mark_presigned_uploaded(job, key, result, now)
    if updated:
        metrics.UPLOADED_BYTES.inc(size)
        metrics.AUDIO_SUBMITTED_SECONDS.inc(result.duration_seconds)
        if key != job.object_key:
            storage.delete(job.object_key)
    return None


def _mark_presigned_uploaded(job: Job, key: str, result: ProbeResult, now: datetime) -> bool:
    with session_scope() as session:
        updated = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status == JobStatus.PENDING_UPLOAD.value)
            .values(
                status=JobStatus.UPLOADED.value,
                object_key=key,
                duration_seconds=result.duration_seconds,
                codec=result.codec,
                sample_rate=result.sample_rate,
                channels=result.channels,
                uploaded_at=now,
            )
        )
    return bool(updated.rowcount)  # type: ignore[attr-defined]


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel_batch(batch_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """Cancel every job not finished yet; workers check the status before writing results."""
    batch = service.get_batch(session, tenant, batch_id, lock=True)
    now = datetime.now(UTC)
    session.execute(
        update(Job)
        .where(
            Job.batch_id == batch_id,
            Job.status.not_in([s.value for s in JOB_TERMINAL]),
            Job.deleted_at.is_(None),
        )
        .values(status=JobStatus.CANCELLED.value, finished_at=now)
    )
    if batch.status not in (BatchStatus.COMPLETED.value, BatchStatus.FAILED.value):
        batch.status = BatchStatus.CANCELLED.value
        batch.completed_at = now
    session.commit()
    return service.load_batch_out(session, batch)


@router.post("/{batch_id}/retry-failed", status_code=202, response_model=SubmitOut)
def retry_failed(batch_id: uuid.UUID, tenant: TenantDep) -> SubmitOut:
    """Queue the batch's failed jobs again (presigned uploads that failed verification cannot be retried)."""
    with session_scope() as session:
        batch = service.get_batch(session, tenant, batch_id, lock=True)
        service.ensure_accepting(batch)
        retryable = select(Job.id).where(
            Job.batch_id == batch_id,
            Job.status == JobStatus.FAILED.value,
            (Job.object_key.is_not(None)) | (Job.source_uri.is_not(None)),
            Job.deleted_at.is_(None),
        )
        ids = service.mark_queued(
            session, batch, [JobStatus.FAILED.value], job_ids=list(session.scalars(retryable).all())
        )
        priority = batch.priority
    service.enqueue_or_revert(ids, priority, JobStatus.FAILED.value)
    with session_scope() as session:
        status = service.get_batch(session, tenant, batch_id).status
    return SubmitOut(batch_id=batch_id, status=status, queued=len(ids), job_ids=ids)
