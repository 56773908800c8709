"""The storage sweep: leftovers of uploads that never finished, and derived audio of jobs that ended.

Run hourly by beat (`voxq.maintenance.sweep_storage`) and on demand by `voxq sweep-uploads`.

Uploads (`sweep_incoming`): the API streams each upload to `{tenant}/incoming/{uuid}` and removes it
itself, also on errors and client disconnects. Only a process killed mid-upload (or a cleanup that failed
because storage was down) leaves something behind: an incomplete S3 multipart upload (invisible, but
stored) or a temporary object; both are removed once a day old. Presigned uploads also live under
`incoming/` until submit verifies them and moves them to their content key (api.presigned); until then
they belong to a `pending_upload` job and are kept while the job exists. A PUT to a presigned URL after
submit leaves an object no job uses: swept like any leftover. An object a job still names is never
removed, whatever the job's status (before that move existed, verified uploads stayed at their
incoming key).

Derived audio (`sweep_derived`): prepare stores each leader's normalised FLAC (whole file, or one per
chunk) under `{tenant}/derived/{job}…` for the transcribe stage. It is an intermediate product: once the
job has ended (succeeded, failed, skipped, cancelled) or was deleted, nothing reads it (a dedupe follower
reads its leader's transcript, never its audio; kept answers live in Postgres), and any later run of the
job (retry-failed, a sweeper requeue) is prepared again from its upload, which rebuilds the FLACs. So the
sweep removes the derived objects of ended, deleted and unknown jobs; objects written in the last
`older_than` are left alone. DELETE /v1/jobs/{id} removes a job's derived audio at once (api.service).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from core.models import Job, Tenant
from core.statuses import JOB_TERMINAL
from core.storage import DERIVED, Storage, derived_job_id

INCOMING = "/incoming/"
INCOMING_MAX_AGE = timedelta(hours=24)  # an upload may legitimately take hours
DERIVED_MIN_AGE = timedelta(minutes=10)
_TERMINAL = {s.value for s in JOB_TERMINAL}


@dataclass(frozen=True)
class SweepResult:
    """What one sweep of abandoned uploads removed."""

    aborted_multipart_uploads: int
    deleted_objects: int


@dataclass(frozen=True)
class StorageSweep:
    """What one storage sweep removed."""

    aborted_multipart_uploads: int
    deleted_incoming: int
    deleted_derived: int


def sweep_storage(
    storage: Storage,
    *,
    incoming_older_than: timedelta = INCOMING_MAX_AGE,
    derived_older_than: timedelta = DERIVED_MIN_AGE,
) -> StorageSweep:
    """Sweep abandoned uploads and ended jobs' derived audio (see the module docstring)."""
    uploads = sweep_incoming(storage, incoming_older_than)
    derived = sweep_derived(storage, derived_older_than)
    return StorageSweep(uploads.aborted_multipart_uploads, uploads.deleted_objects, derived)


def _tenant_ids() -> list[str]:
    with session_scope() as session:
        return [str(t) for t in session.scalars(select(Tenant.id)).all()]


def sweep_incoming(storage: Storage, older_than: timedelta = INCOMING_MAX_AGE) -> SweepResult:
    """Abort multipart uploads and delete temporary objects under `*/incoming/` older than `older_than`."""
    cutoff = datetime.now(UTC) - older_than
    aborted = 0
    paginator = storage.client.get_paginator("list_multipart_uploads")
    for uploads_page in paginator.paginate(Bucket=storage.bucket):
        for upload in uploads_page.get("Uploads", []):
            if INCOMING in upload["Key"] and upload["Initiated"] < cutoff:
                storage.client.abort_multipart_upload(
                    Bucket=storage.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                aborted += 1
    with session_scope() as session:
        in_use = set(session.scalars(select(Job.object_key).where(Job.object_key.contains(INCOMING))).all())
    deleted = 0
    objects = storage.client.get_paginator("list_objects_v2")
    for tenant_id in _tenant_ids():
        for page in objects.paginate(Bucket=storage.bucket, Prefix=f"{tenant_id}{INCOMING}"):
            for obj in page.get("Contents", []):
                if obj["LastModified"] < cutoff and obj["Key"] not in in_use:
                    storage.delete(obj["Key"])
                    deleted += 1
    return SweepResult(aborted, deleted)


def sweep_derived(storage: Storage, older_than: timedelta = DERIVED_MIN_AGE) -> int:
    """Delete derived FLACs (written over `older_than` ago) of jobs that ended, were deleted or are
    unknown; how many objects were deleted."""
    cutoff = datetime.now(UTC) - older_than
    deleted = 0
    objects = storage.client.get_paginator("list_objects_v2")
    for tenant_id in _tenant_ids():
        for page in objects.paginate(Bucket=storage.bucket, Prefix=f"{tenant_id}/{DERIVED}/"):
            old = [obj["Key"] for obj in page.get("Contents", []) if obj["LastModified"] < cutoff]
            doomed = _of_ended_jobs(old)
            storage.delete_many(doomed)
            deleted += len(doomed)
    return deleted


def _of_ended_jobs(keys: list[str]) -> list[str]:
    """The keys among these whose job no longer needs its derived audio."""
    owners = {key: derived_job_id(key) for key in keys}
    ids = {job_id for job_id in owners.values() if job_id is not None}
    live: set[uuid.UUID] = set()
    if ids:
        with session_scope() as session:
            rows: list[Any] = list(
                session.execute(select(Job.id, Job.status, Job.deleted_at).where(Job.id.in_(ids))).all()
            )
        live = {r.id for r in rows if r.deleted_at is None and r.status not in _TERMINAL}
    return [key for key, job_id in owners.items() if job_id is not None and job_id not in live]
