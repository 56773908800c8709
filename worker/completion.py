"""Completion: what follows a job becoming terminal.

1. Its dedupe followers (jobs with identical audio that waited for it) are resolved: a succeeded leader's
   transcript is copied to them (zero cost); a failed leader's failure is theirs too (the audio is the
   same); a skipped or cancelled leader (budget or user action, not about the audio) sends them back to
   `queued` to be prepared again on their own. The followers are read under the same advisory lock that
   `records.dedupe` takes, so a follower attached at the last moment is never missed.
2. The batch is finished (completed/failed by CAS) if that was its last non-terminal job, and its webhook
   is queued. A group task checks its batches once, after all its jobs ended (`finish_batches`), instead
   of once per job: a batch is never done while a job of it in the same group is still running.
"""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import select, text

from core.db import session_scope
from core.models import Job
from core.statuses import JobStatus
from worker import dispatch, records

log = logging.getLogger(__name__)


def _lock_and_state(job_id: uuid.UUID) -> tuple[str, str | None, str | None, str, list[uuid.UUID]] | None:
    with session_scope() as session:
        job = session.execute(
            select(
                Job.status, Job.error_code, Job.error_message, Job.tenant_id, Job.fingerprint, Job.priority
            ).where(Job.id == job_id)
        ).first()
        if job is None:
            return None
        if job.fingerprint:
            session.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                {"k": f"{job.tenant_id}:{job.fingerprint}"},
            )
        followers = list(
            session.execute(
                select(Job.id).where(
                    Job.deduplicated_from_id == job_id, Job.status == JobStatus.PROCESSING.value
                )
            ).scalars()
        )
        return job.status, job.error_code, job.error_message, job.priority, followers


def job_finished(
    job_id: uuid.UUID,
    batch_id: uuid.UUID,
    *,
    check_batch: bool = True,
    succeeded: records.Succeeded | None = None,
) -> None:
    """Resolve followers and finish batches after `job_id` became terminal.

    With `succeeded` (what `records.succeed_job` returned: the job succeeded and its followers were read
    under the dedupe lock in that same transaction) the state is not read again.
    """
    state: tuple[str, str | None, str | None, str, list[uuid.UUID]] | None
    if succeeded is not None:
        state = (JobStatus.SUCCEEDED.value, None, None, "normal", succeeded.followers)
    else:
        state = _lock_and_state(job_id)
    batches = {batch_id} if check_batch else set()
    if state is not None:
        status, code, message, priority, followers = state
        ended: list[uuid.UUID] = []
        for follower in followers:
            if status == JobStatus.SUCCEEDED.value:
                if records.copy_transcript(follower, job_id):
                    ended.append(follower)
            elif status == JobStatus.FAILED.value and records.end_job(
                follower, status=JobStatus.FAILED, code=code, message=message
            ):
                ended.append(follower)
        # A follower may have followers of its own (a re-run leader that found another leader).
        for follower in ended:
            job_finished(follower, batch_id, check_batch=False)
        if followers and status not in (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value):
            requeued = records.release_followers(job_id)
            if requeued:
                dispatch.send_prepare(requeued, priority=priority)
        if followers:
            batches |= records.batches_of(followers)
    finish_batches(batches)


def finish_batches(batch_ids: set[uuid.UUID]) -> None:
    """Finish each of these batches that has no live job left (by CAS, once) and queue its webhook."""
    for bid in batch_ids:
        finish_batch(bid)


def finish_batch(batch_id: uuid.UUID) -> bool:
    """Finish this batch if no live job is left (by CAS, once) and queue its webhook; True if it did."""
    finished = records.finish_batch_if_done(batch_id)
    if finished is None:
        return False
    log.info("batch finished", extra={"batch_id": str(batch_id), "status": finished.status})
    if finished.webhook_url:
        dispatch.send_webhook(batch_id)
    return True
