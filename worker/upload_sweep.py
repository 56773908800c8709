"""Leftovers of uploads that never finished: swept so they do not take space forever.

The API streams each upload to `{tenant}/incoming/{uuid}` and removes it itself, also on errors and
client disconnects. Only a process killed mid-upload leaves something behind: an incomplete S3
multipart upload (invisible, but stored) or a temporary object. Presigned uploads also live under
`incoming/` until submit verifies them and moves them to their content key (api.presigned); until then
they belong to a `pending_upload` job and are kept while the job exists. A PUT to a presigned URL after
submit leaves an object no job uses: swept like any leftover. An object a job still names is never
removed, whatever the job's status (before that move existed, verified uploads stayed at their
incoming key).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from core.db import session_scope
from core.models import Job, Tenant
from core.storage import Storage

INCOMING = "/incoming/"


@dataclass(frozen=True)
class SweepResult:
    """What one sweep removed."""

    aborted_multipart_uploads: int
    deleted_objects: int


def sweep_incoming(storage: Storage, older_than: timedelta = timedelta(hours=24)) -> SweepResult:
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
        tenant_ids = [str(t) for t in session.scalars(select(Tenant.id)).all()]
        in_use = set(session.scalars(select(Job.object_key).where(Job.object_key.contains(INCOMING))).all())
    deleted = 0
    objects = storage.client.get_paginator("list_objects_v2")
    for tenant_id in tenant_ids:
        for page in objects.paginate(Bucket=storage.bucket, Prefix=f"{tenant_id}{INCOMING}"):
            for obj in page.get("Contents", []):
                if obj["LastModified"] < cutoff and obj["Key"] not in in_use:
                    storage.delete(obj["Key"])
                    deleted += 1
    return SweepResult(aborted, deleted)
