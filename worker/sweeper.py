"""The sweeper (Celery beat, every 30 s): recovers work whose worker died.

- A job `processing` whose lease has expired lost its worker (killed, host gone, or a task lost by the
  broker). With `run_count < VOXQ_JOB_MAX_ATTEMPTS` it goes back to `queued` and is sent to `prepare`
  again (prepare is cheap and idempotent, and its claim increments `run_count`); at the limit it fails
  with `too_many_attempts`, so a file that crashes workers cannot loop forever.
- Attempts still `pending` for a job whose run the sweeper just ended, or older than the task time limit
  (no live task can still be waiting on them), become `abandoned`.
All in a few set-based statements; `FOR UPDATE SKIP LOCKED` lets two sweepers run without stepping on
each other.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update

from core.db import session_scope
from core.models import Attempt, Job
from core.settings import get_settings
from core.statuses import AttemptOutcome, JobStatus
from worker import completion, dispatch, records


@dataclass
class SweepReport:
    """What one sweep did."""

    requeued: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    abandoned_attempts: int = 0


def sweep(*, limit: int = 1000) -> SweepReport:
    """Re-queue or fail jobs with expired leases; abandon orphaned attempts."""
    settings = get_settings()
    report = SweepReport()
    ts = records.now()
    by_priority: dict[str, list[uuid.UUID]] = {}
    with session_scope() as session:
        expired = session.execute(
            select(Job.id, Job.run_count, Job.priority, Job.batch_id)
            .where(Job.status == JobStatus.PROCESSING.value, Job.lease_expires_at < ts)
            .order_by(Job.lease_expires_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        requeue = [r for r in expired if r.run_count < settings.job_max_attempts]
        give_up = [r for r in expired if r.run_count >= settings.job_max_attempts]
        if requeue:
            session.execute(
                update(Job)
                .where(Job.id.in_([r.id for r in requeue]), Job.status == JobStatus.PROCESSING.value)
                .values(
                    status=JobStatus.QUEUED.value,
                    lease_owner=None,
                    lease_expires_at=None,
                    group_id=None,
                    queued_at=ts,
                )
            )
            for r in requeue:
                by_priority.setdefault(r.priority, []).append(r.id)
            report.requeued = [r.id for r in requeue]
        ended = [r.id for r in expired]
        if ended:
            result = session.execute(
                update(Attempt)
                .where(Attempt.job_id.in_(ended), Attempt.outcome == AttemptOutcome.PENDING.value)
                .values(outcome=AttemptOutcome.ABANDONED.value, ended_at=ts, error_code="worker_lost")
            )
            report.abandoned_attempts += int(result.rowcount)  # type: ignore[attr-defined]
        stale = ts - timedelta(seconds=settings.task_time_limit + settings.provider_timeout_seconds)
        result = session.execute(
            update(Attempt)
            .where(Attempt.outcome == AttemptOutcome.PENDING.value, Attempt.started_at < stale)
            .values(outcome=AttemptOutcome.ABANDONED.value, ended_at=ts, error_code="worker_lost")
        )
        report.abandoned_attempts += int(result.rowcount)  # type: ignore[attr-defined]
    for r in give_up:
        if records.end_job(
            r.id,
            status=JobStatus.FAILED,
            code="too_many_attempts",
            message=f"gave up after {r.run_count} runs whose workers did not finish",
        ):
            completion.job_finished(r.id, r.batch_id)
            report.failed.append(r.id)
    for priority, ids in by_priority.items():
        dispatch.send_prepare(ids, priority=priority)
    return report
