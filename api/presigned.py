"""Presigned uploads, verified at submit: the verified version of the object becomes the job's audio.

A presigned PUT URL cannot be revoked: whoever holds it may PUT to `{tenant}/incoming/{uuid}` until it
expires, also after submit. So a job never keeps that key. Submit reads the object once, pinned to the
ETag its HEAD returned: its size, its SHA-256 (streamed, whatever the size; checked against the client's
when given), a probe; then it copies exactly that version (`CopySourceIfMatch`) to its content-addressed
key `content_key(tenant, sha256)` and deletes the incoming object. The job's audio is then immutable (no
URL names it) and outside `*/incoming/`, which the sweep of abandoned uploads cleans. A PUT after that
makes an object no job uses, which that sweep removes. An object replaced while it is being verified
(its ETag moved) stays waiting for upload: the next submit verifies whatever is there then.

Identical content is stored once per tenant, as for multipart uploads: the copy is skipped when the
content key exists, under the key's lock (api.locks) so a concurrent delete of a job with the same audio
cannot remove it in between.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from api import service
from api.deps import TenantContext
from api.locks import object_lock
from api.probe import ProbeResult, probe_s3_object
from api.schemas import RejectedJob
from core import metrics
from core.errors import AudioError
from core.models import Job
from core.storage import ObjectChanged, Storage, content_key

log = logging.getLogger(__name__)

# Presigned uploads of one submit verified at once (S3 reads and copies, not CPU).
VERIFY_PARALLELISM = 4
WAITING = "waiting"


@dataclass(frozen=True)
class Verdicts:
    """What submit found for the batch's presigned uploads."""

    rejected: list[RejectedJob]
    waiting: list[uuid.UUID]


def verify_all(storage: Storage, tenant: TenantContext, jobs: list[Job]) -> Verdicts:
    """Verify every pending presigned upload (a few at once); the rejected ones and those still waiting."""
    if not jobs:
        return Verdicts([], [])
    workers = max(1, min(VERIFY_PARALLELISM, len(jobs)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxq-verify") as pool:
        verdicts = list(pool.map(lambda job: verify(storage, tenant, job), jobs))
    return Verdicts(
        rejected=[v for v in verdicts if isinstance(v, RejectedJob)],
        waiting=[job.id for job, v in zip(jobs, verdicts, strict=True) if v == WAITING],
    )


def verify(storage: Storage, tenant: TenantContext, job: Job) -> RejectedJob | str | None:
    """Check one presigned upload and move it to its content key; None once the job is `uploaded`."""
    assert job.object_key is not None
    incoming = job.object_key
    head = storage.head(incoming)
    if head is None:
        return WAITING
    etag = str(head["ETag"])
    size = int(head.get("ContentLength", 0))
    try:
        code, message, sha256, result = _check(storage, job, incoming, etag, size)
        if code or result is None:
            service.reject_presigned(job.id, code, message, datetime.now(UTC))
            _delete_quietly(storage, incoming)
            return RejectedJob(job_id=job.id, code=code, message=message)
        if not _move(storage, tenant, job, incoming, etag, sha256, result):
            return None  # another submit verified it first
    except ObjectChanged:
        return WAITING  # replaced while we read it: verify the new version at the next submit
    metrics.UPLOADED_BYTES.inc(size)
    metrics.AUDIO_SUBMITTED_SECONDS.inc(result.duration_seconds)
    _delete_quietly(storage, incoming)
    return None


def _delete_quietly(storage: Storage, incoming: str) -> None:
    """Remove an incoming object no job uses any more; on failure the incoming sweep removes it later."""
    try:
        storage.delete(incoming)
    except Exception as exc:
        log.warning("presigned upload's incoming object left to the sweep (%s)", type(exc).__name__)


def _check(
    storage: Storage, job: Job, incoming: str, etag: str, size: int
) -> tuple[str, str, str, ProbeResult | None]:
    """(code, message, sha256, probe) of the version `etag`: an empty code when it is acceptable audio."""
    if size != job.bytes:
        return "size_mismatch", f"uploaded {size} bytes, declared {job.bytes}", "", None
    sha256 = storage.sha256_of(incoming, if_match=etag)
    if job.sha256 is not None and sha256 != job.sha256:
        return "sha256_mismatch", "the uploaded bytes do not match the declared sha256", sha256, None
    try:
        result = probe_s3_object(storage.client, storage.bucket, incoming, size)
    except AudioError as exc:
        return exc.code, exc.message, sha256, None
    return "", "", sha256, result


def _move(
    storage: Storage,
    tenant: TenantContext,
    job: Job,
    incoming: str,
    etag: str,
    sha256: str,
    result: ProbeResult,
) -> bool:
    """Copy version `etag` to its content key (unless that content is there) and mark the job uploaded
    at that key; False when another request marked it first."""
    key = content_key(str(tenant.tenant_id), sha256)
    with object_lock(key):  # see api.locks: an upload vs a delete of the same audio
        created = False
        if storage.head(key) is None:
            storage.copy(incoming, key, if_match=etag)
            created = True
        else:
            # The probe read ranges without a condition: the object must still be the version hashed.
            _same_version(storage, incoming, etag)
        updated = service.mark_presigned_uploaded(job.id, key, sha256, result, datetime.now(UTC))
        if not updated and created and not service.object_in_use(tenant, key):
            storage.delete(key)
    return updated


def _same_version(storage: Storage, key: str, etag: str) -> None:
    """Raise `ObjectChanged` unless `key` is still the version `etag`."""
    head = storage.head(key)
    if head is None or str(head["ETag"]) != etag:
        raise ObjectChanged(f"{key} changed since it was checked")
