"""The sweeper finishes a batch whose batch check was lost (its worker died after ending the last job).

Real Postgres and Redis; the sweeper and the store are real code.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from core.db import session_scope
from core.models import Batch, Job
from core.statuses import BatchStatus, JobStatus
from tests.pipeline_support import processing_job_rows
from tests.support import Stack
from worker.sweeper import BATCH_CHECK_GRACE_SECONDS, sweep


def _batch_with_ended_job(*, submitted_ago: float, job_status: JobStatus) -> uuid.UUID:
    rows = processing_job_rows(lease_owner="gone:1", lease_expires_at=datetime.now(UTC) + timedelta(hours=1))
    with session_scope() as s:
        s.execute(
            update(Job)
            .where(Job.id == rows.job_id)
            .values(status=job_status.value, lease_owner=None, lease_expires_at=None)
        )
        s.execute(
            update(Batch)
            .where(Batch.id == rows.batch_id)
            .values(submitted_at=datetime.now(UTC) - timedelta(seconds=submitted_ago))
        )
    return rows.batch_id


def _status(batch_id: uuid.UUID) -> str:
    with session_scope() as s:
        return str(s.execute(select(Batch.status).where(Batch.id == batch_id)).scalar_one())


def test_a_batch_whose_jobs_all_ended_is_finished_once(stack: Stack) -> None:
    old = BATCH_CHECK_GRACE_SECONDS + 60
    done = _batch_with_ended_job(submitted_ago=old, job_status=JobStatus.SUCCEEDED)
    failed = _batch_with_ended_job(submitted_ago=old, job_status=JobStatus.FAILED)
    # Still live, or just submitted (its own worker is about to check it): left alone.
    live = _batch_with_ended_job(submitted_ago=old, job_status=JobStatus.PROCESSING)
    recent = _batch_with_ended_job(submitted_ago=1, job_status=JobStatus.SUCCEEDED)

    report = sweep()
    assert {done, failed} <= set(report.finished_batches)
    assert not {live, recent} & set(report.finished_batches)
    assert _status(done) == BatchStatus.COMPLETED.value
    assert _status(failed) == BatchStatus.FAILED.value
    assert _status(live) == BatchStatus.PROCESSING.value
    assert _status(recent) == BatchStatus.PROCESSING.value
    # A second sweep finds nothing more to finish for these (the finish is a compare-and-set).
    again = sweep()
    assert not {done, failed, live, recent} & set(again.finished_batches)
