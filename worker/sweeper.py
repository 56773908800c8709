"""The sweeper (Celery beat, every 30 s): recovers work whose worker died.

- A job `processing` whose lease has expired lost its worker (killed, host gone, or a task lost by the
  broker). With `run_count < VOXQ_JOB_MAX_ATTEMPTS` it goes back to `queued` and is sent to `prepare`
  again (prepare is cheap and idempotent, and its claim increments `run_count`); at the limit it fails
  with `too_many_attempts`, so a file that crashes workers cannot loop forever.
- A job in the local stage (lease owner `core.names.LOCAL_LEASE_PREFIX`…) goes back to the local queue,
  never into the hosted chain again (which would pay again for what the hosted models could not do): one
  still waiting there (its message lost, or a backlog longer than its lease) is sent again without
  counting a run; one whose local run died counts a run, up to the same limit.
- A job still `queued` one broker visibility timeout after it was queued lost its `prepare` message
  (e.g. the task failed while Postgres was down and was acked): `prepare` is sent again.
- A batch still `processing` whose jobs have all ended (submitted at least a minute ago) lost its batch
  check: the worker that ended its last job died between that commit and the check, and a redelivered
  group task claims no job. It is finished here (by the same compare-and-set, so once) and its webhook
  queued.
- Attempts still `pending` for a job whose run the sweeper just ended, or hosted ones pending for more
  than twice the provider timeout (the row is written when the call starts, so no live call is that old;
  local ones: the task time limit), become `abandoned` — by compare-and-set on `pending`, so an attempt
  its worker closed first is left alone.

Billing of an abandoned hosted call (decision; core/billing.py has the whole story): whether the provider
billed it is unknowable here — it may have answered and billed just before the worker died (the
two-generals window between the provider's bill and our commit). So, in the same transaction as the
abandon, it is charged a conservative estimate (list price x duration, `estimated`, the attempt marked
`settlement = unsettled`): budgets stay safe, the bill may be high for a while but never silently low.
The truth replaces the estimate later, adding only the difference to the totals: a late answer from a
worker that was alive after all (`worker.store.attempts.close_attempt`), or `voxq billing settle` against the
provider's per-request usage export (billed: exact cost; absent from an export covering the call:
estimate removed, attempt stays `abandoned`, marked `not_billed`).
All in a few set-based statements; `FOR UPDATE SKIP LOCKED` lets two sweepers run without stepping on
each other.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update

from core import billing
from core.db import session_scope
from core.models import Attempt, Batch, Job
from core.names import LOCAL_LEASE_PREFIX, LOCAL_MODEL, LOCAL_QUEUE_OWNER
from core.settings import Settings, get_settings
from core.statuses import AttemptOutcome, BatchStatus, JobStatus
from worker import budget, completion, dispatch
from worker.store.claims import end_job
from worker.store.sql import LIVE_VALUES, now

_ABANDONED_COLUMNS = (
    Attempt.id,
    Attempt.tenant_id,
    Attempt.job_id,
    Attempt.model,
    Attempt.provider,
    Attempt.audio_seconds,
)


_ABANDON = {
    "outcome": AttemptOutcome.ABANDONED.value,
    "error_code": "worker_lost",
    "error_message": "the worker died during the call; cost estimated until settled",
}


@dataclass
class SweepReport:
    """What one sweep did."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    local: list[uuid.UUID] = field(default_factory=list)  # sent to the local queue again
    resent: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    abandoned_attempts: int = 0
    finished_batches: list[uuid.UUID] = field(default_factory=list)


# A batch's own worker checks it the moment its last job ends; the sweeper only looks after this long.
BATCH_CHECK_GRACE_SECONDS = 60.0


def sweep(*, limit: int = 1000) -> SweepReport:
    """Re-queue or fail jobs with expired leases; abandon orphaned attempts."""
    settings = get_settings()
    report = SweepReport()
    ts = now()
    by_priority: dict[str, list[uuid.UUID]] = {}
    with session_scope() as session:
        expired = _expired_jobs(session, ts, limit)
        local = [r for r in expired if _local_stage(r)]
        hosted = [r for r in expired if not _local_stage(r)]
        requeue = [r for r in hosted if r.run_count < settings.job_max_attempts]
        give_up = [r for r in expired if r.run_count >= settings.job_max_attempts and _counts_a_run(r)]
        report.requeued = _requeue(session, requeue, ts)
        ending = {r.id for r in give_up}
        back = [r for r in local if r.id not in ending]
        to_local = _back_to_local(session, back, ts + _local_wait(settings))
        report.local = [job_id for job_id, _ in to_local]
        for r in requeue:
            by_priority.setdefault(r.priority, []).append(r.id)
        resent = _resend_lost(session, ts, settings, limit)
        for job_id, priority in resent:
            by_priority.setdefault(priority, []).append(job_id)
        report.resent = [job_id for job_id, _ in resent]
        report.abandoned_attempts = _abandon_attempts(session, [r.id for r in expired], ts, settings)
        # A reservation whose worker died before its call's attempt row (no task outlives the limit).
        budget.release_stale(session, ts - timedelta(seconds=settings.task_time_limit + 60))
        stuck = _stuck_batches(session, ts, limit)
    for r in give_up:
        if end_job(
            r.id,
            status=JobStatus.FAILED,
            code="too_many_attempts",
            message=f"gave up after {r.run_count} runs whose workers did not finish",
        ):
            completion.job_finished(r.id, r.batch_id)
            report.failed.append(r.id)
    for priority, ids in by_priority.items():
        dispatch.send_prepare(ids, priority=priority)
    for job_id, group_id in to_local:
        dispatch.send_local(job_id, group_id)
    for batch_id in stuck:
        if completion.finish_batch(batch_id):
            report.finished_batches.append(batch_id)
    completion.resolve_stranded_followers()  # followers have no lease: their leader's end moves them
    completion.resend_stale_alignments()  # align tasks lost by the broker (worker/store/transcripts.py)
    return report


def _local_stage(job: Any) -> bool:
    """Whether an expired job was in the local stage (waiting for the local engine or run by it)."""
    return bool(job.group_id is not None and (job.lease_owner or "").startswith(LOCAL_LEASE_PREFIX))


def _counts_a_run(job: Any) -> bool:
    """Whether an expired lease means a run of the job was lost (not a wait in the local queue)."""
    return not (_local_stage(job) and job.lease_owner == LOCAL_QUEUE_OWNER)


def _local_wait(settings: Settings) -> timedelta:
    return timedelta(seconds=dispatch.local_wait_seconds(settings))


def _back_to_local(session: Any, jobs: list[Any], expires: datetime) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Hand expired local-stage jobs to the local queue again (by CAS on their expired lease), counting a
    run for each whose local run died; (job id, group id) of each."""
    handed: list[tuple[uuid.UUID, uuid.UUID]] = []
    for r in jobs:
        row = session.execute(
            update(Job)
            .where(
                Job.id == r.id,
                Job.status == JobStatus.PROCESSING.value,
                Job.lease_owner == r.lease_owner,
                Job.lease_expires_at == r.lease_expires_at,
            )
            .values(
                lease_owner=LOCAL_QUEUE_OWNER,
                lease_expires_at=expires,
                run_count=Job.run_count + (1 if _counts_a_run(r) else 0),
            )
            .returning(Job.id, Job.group_id)
        ).first()
        if row is not None:
            handed.append((row.id, row.group_id))
    return handed


def _expired_jobs(session: Any, ts: datetime, limit: int) -> list[Any]:
    """Processing jobs whose lease has run out (their worker is gone), locked; the oldest lease first."""
    return list(
        session.execute(
            select(
                Job.id,
                Job.run_count,
                Job.priority,
                Job.batch_id,
                Job.group_id,
                Job.lease_owner,
                Job.lease_expires_at,
            )
            .where(Job.status == JobStatus.PROCESSING.value, Job.lease_expires_at < ts)
            .order_by(Job.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
    )


def _requeue(session: Any, jobs: list[Any], ts: datetime) -> list[uuid.UUID]:
    """Send these expired jobs back to `queued` (by CAS on processing); their ids."""
    if jobs:
        session.execute(
            update(Job)
            .where(Job.id.in_([r.id for r in jobs]), Job.status == JobStatus.PROCESSING.value)
            .values(
                status=JobStatus.QUEUED.value,
                lease_owner=None,
                lease_expires_at=None,
                group_id=None,
                queued_at=ts,
            )
        )
    return [r.id for r in jobs]


def _resend_lost(session: Any, ts: datetime, settings: Settings, limit: int) -> list[tuple[uuid.UUID, str]]:
    """Jobs whose prepare message was lost, marked queued again now: (id, priority) of each."""
    # A job still `queued` a whole visibility timeout after it was queued has lost its prepare message
    # (a redelivery would have come by then): send it again. Claiming is by CAS, so a message that
    # was merely slow is harmless.
    lost_cutoff = ts - timedelta(seconds=settings.celery_visibility_timeout)
    lost = select(Job.id).where(
        Job.status == JobStatus.QUEUED.value,
        Job.deleted_at.is_(None),
        or_(
            Job.queued_at < lost_cutoff,
            and_(Job.queued_at.is_(None), Job.created_at < lost_cutoff),
        ),
    )
    resent = session.execute(
        update(Job)
        .where(Job.id.in_(lost.limit(limit).with_for_update(skip_locked=True).scalar_subquery()))
        .values(queued_at=ts)
        .returning(Job.id, Job.priority)
    ).all()
    return [(job_id, priority) for job_id, priority in resent]


def _abandon_attempts(session: Any, ended: list[uuid.UUID], ts: datetime, settings: Settings) -> int:
    """Abandon the pending attempts of ended runs and stale ones, charging each hosted one its estimate;
    how many."""
    abandoned: list[Any] = []
    if ended:
        abandoned += session.execute(
            update(Attempt)
            .where(Attempt.job_id.in_(ended), Attempt.outcome == AttemptOutcome.PENDING.value)
            .values(**_ABANDON, ended_at=ts)
            .returning(*_ABANDONED_COLUMNS)
        ).all()
    # A hosted attempt is written when its call starts, so one pending past twice the provider timeout
    # has no live caller; a local one may legitimately run for many minutes.
    hosted_stale = ts - timedelta(seconds=2 * settings.provider_timeout_seconds + 10)
    local_stale = ts - timedelta(seconds=settings.task_time_limit + 60)
    abandoned += session.execute(
        update(Attempt)
        .where(
            Attempt.outcome == AttemptOutcome.PENDING.value,
            or_(
                and_(Attempt.provider != LOCAL_MODEL, Attempt.started_at < hosted_stale),
                Attempt.started_at < local_stale,
            ),
        )
        .values(**_ABANDON, ended_at=ts)
        .returning(*_ABANDONED_COLUMNS)
    ).all()
    # The estimate is charged with the abandon, in one transaction: a late answer (which locks the
    # attempt row) finds either a pending attempt or an abandoned one with its estimate, never between.
    for a in abandoned:
        if a.provider != LOCAL_MODEL and a.job_id is not None:
            billing.charge_estimate(
                session,
                attempt_id=a.id,
                job_id=a.job_id,
                model=a.model,
                audio_seconds=a.audio_seconds or 0.0,
                provider=a.provider,
            )
    return len(abandoned)


def _stuck_batches(session: Any, ts: datetime, limit: int) -> list[uuid.UUID]:
    """Processing batches submitted over a grace period ago whose jobs have all ended (lost batch check)."""
    return list(
        session.execute(
            select(Batch.id)
            .where(
                Batch.status == BatchStatus.PROCESSING.value,
                Batch.submitted_at < ts - timedelta(seconds=BATCH_CHECK_GRACE_SECONDS),
                ~select(Job.id).where(Job.batch_id == Batch.id, Job.status.in_(LIVE_VALUES)).exists(),
            )
            .limit(limit)
        ).scalars()
    )
