"""Batches: create, list, inspect, add files (multipart, presigned, imports), submit, cancel, retry."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api import presigned, queries, service
from api.accept import accept_files
from api.deps import SessionDep, SessionRoute, StorageDep, TenantContext, TenantDep
from api.ingest import Received, incoming_key, ingest_multipart
from api.probe import probe_s3_object
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
    SubmitOut,
    UploadOut,
)
from core import import_grants
from core.db import session_scope
from core.errors import AudioError
from core.settings import get_settings
from core.statuses import BatchStatus, JobStatus
from core.storage import Storage, parse_s3_uri

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
    return service.create_batch(session, tenant, body)


@router.get("", response_model=BatchPage)
def list_batches(
    tenant: TenantDep,
    session: SessionDep,
    status: BatchStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = queries.DEFAULT_PAGE,
) -> BatchPage:
    """The tenant's batches, newest first, optionally of one status; pass `next_cursor` back as `cursor`."""
    return queries.batch_page(session, tenant, status, cursor, limit)


@router.get("/{batch_id}", response_model=BatchOut)
def get_batch(batch_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """A batch's status, counts per job status, progress, audio and billed seconds, and cost so far."""
    return queries.load_batch_out(session, queries.get_batch(session, tenant, batch_id))


@router.get("/{batch_id}/jobs", response_model=JobPage)
def list_jobs(
    batch_id: uuid.UUID,
    tenant: TenantDep,
    session: SessionDep,
    status: JobStatus | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = queries.DEFAULT_PAGE,
) -> JobPage:
    """A batch's jobs in upload order, optionally only those in one status."""
    return queries.job_page(session, tenant, batch_id, status, cursor, limit)


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
    await run_in_threadpool(queries.check_accepting, tenant, batch_id)
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
    record = partial(service.record_uploads, tenant, batch_id)
    out, queued = accept_files(storage, tenant.tenant_id, received, record)
    service.enqueue_or_revert(queued, JobStatus.UPLOADED.value)
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
    key = incoming_key(tenant.tenant_id)
    job = service.add_presigned_job(session, tenant, batch_id, body, key)
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
    """Add audio already in S3, by reference (no re-upload): objects under the tenant's import grants."""
    queries.check_accepting(tenant, batch_id)
    _check_grants(tenant, body.s3_uris)
    workers = max(1, min(IMPORT_PARALLELISM, len(body.s3_uris)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxq-import") as pool:
        futures = [pool.submit(_probe_import, storage, uri) for uri in body.s3_uris]
        found = [future.result() for future in futures]  # the first bad URI (in order) is reported
    out, queued = service.record_imports(tenant, batch_id, found)
    service.enqueue_or_revert(queued, JobStatus.UPLOADED.value)
    return out


def _check_grants(tenant: TenantContext, uris: list[str]) -> None:
    """403 `bucket_not_allowed` unless the tenant's import grants cover every URI (checked before any
    object is touched; see core/import_grants.py)."""
    objects = [parse_s3_uri(uri) for uri in uris]
    with session_scope() as session:
        outside = import_grants.refused(session, tenant.tenant_id, objects)
    if outside:
        bucket, key = outside[0]
        raise Problem(
            403,
            "bucket_not_allowed",
            f"s3://{bucket}/{key} is outside this tenant's import grants (an operator grants them: "
            "voxq imports grant)",
        )


def _probe_import(storage: Storage, uri: str) -> service.ImportedObject:
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
    return service.ImportedObject(uri, key, str(head.get("ContentType") or "") or None, size, result)


@router.post("/{batch_id}/submit", status_code=202, response_model=SubmitOut)
def submit_batch(batch_id: uuid.UUID, tenant: TenantDep, storage: StorageDep) -> SubmitOut:
    """Verify presigned uploads, then queue every uploaded job of the batch."""
    verdicts = presigned.verify_all(storage, tenant, queries.pending_uploads(tenant, batch_id))
    queued = service.submit_uploaded(tenant, batch_id, others=bool(verdicts.rejected or verdicts.waiting))
    service.enqueue_or_revert(queued, JobStatus.UPLOADED.value)
    return SubmitOut(
        batch_id=batch_id,
        status=queries.batch_status(tenant, batch_id),
        queued=len(queued.job_ids),
        job_ids=queued.job_ids,
        rejected=verdicts.rejected,
        waiting_for_upload=verdicts.waiting,
    )


@router.post("/{batch_id}/cancel", response_model=BatchOut)
def cancel_batch(batch_id: uuid.UUID, tenant: TenantDep, session: SessionDep) -> BatchOut:
    """Cancel every job not finished yet; workers check the status before writing results."""
    return service.cancel_batch(session, tenant, batch_id)


@router.post("/{batch_id}/retry-failed", status_code=202, response_model=SubmitOut)
def retry_failed(batch_id: uuid.UUID, tenant: TenantDep) -> SubmitOut:
    """Queue the batch's failed jobs again (presigned uploads that failed verification cannot be retried)."""
    queued = service.retry_failed(tenant, batch_id)
    service.enqueue_or_revert(queued, JobStatus.FAILED.value)
    return SubmitOut(
        batch_id=batch_id,
        status=queries.batch_status(tenant, batch_id),
        queued=len(queued.job_ids),
        job_ids=queued.job_ids,
    )
