"""A lone job's completion write is retried, and a paid answer is kept even when it fails for good
(issue #16, item 5).

The stages run in this process against the real Postgres, Valkey and SeaweedFS and the fake provider.
Postgres itself refuses: the test holds a lock on `transcripts` until the completion's statement waits for
it, then terminates that backend (`pg_terminate_backend`, what a failover or an operator does); or a CHECK
constraint refuses the job's transcript for a while.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from core.models import Job
from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, tones
from tests.support import wait_until

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _prepared(pipeline: Pipeline, freq: int) -> tuple[uuid.UUID, uuid.UUID]:
    from worker.prepare import prepare_jobs

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(freq))
    report = prepare_jobs([job], owner="test:prep")
    assert report.grouped == 1
    return job, report.groups[0]


def _run_group(group: uuid.UUID) -> dict[str, int]:
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    rt = get_runtime()
    return rt.run(transcribe_group(rt, group))


def _assert_paid_once(pipeline: Pipeline, job: uuid.UUID, fake: FakeOpenAI) -> None:
    attempts = pipeline.attempts(job)
    assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCESS.value]
    costs = pipeline.costs(job)
    assert [c.attempt_id for c in costs] == [attempts[0].id]
    assert len(fake.billing_log()) == 1
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.attempt_id == attempts[0].id
    assert pipeline.jobs([job])[job].status == JobStatus.SUCCEEDED.value


def test_a_lone_jobs_completion_survives_its_backend_being_terminated(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    job, group = _prepared(pipeline, 410)
    result: list[dict[str, int]] = []
    with pipeline.engine.connect() as holder, pipeline.engine.connect() as admin:
        holder.execute(text("LOCK TABLE transcripts IN ACCESS EXCLUSIVE MODE"))
        run = threading.Thread(target=lambda: result.append(_run_group(group)))
        run.start()

        def waiting_completion() -> int | None:
            pid = admin.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE '%transcripts%' AND pid <> pg_backend_pid()"
                )
            ).scalar()
            admin.rollback()
            return int(pid) if pid is not None else None

        pid = wait_until(waiting_completion, timeout=30, what="the completion waiting for its lock")
        assert admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar() is True
        admin.commit()
        holder.rollback()  # the lock goes; the retried write goes through
        run.join(60)
    assert result == [{"succeeded": 1}]
    _assert_paid_once(pipeline, job, fake_openai)


def test_a_completion_that_fails_for_good_still_closes_and_keeps_the_paid_answer(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.prepare import prepare_jobs
    from worker.sweeper import sweep

    job, group = _prepared(pipeline, 420)
    constraint = f"no_transcript_{job.hex[:12]}"
    with pipeline.engine.begin() as c:  # Postgres refuses this job's transcript for now
        c.execute(
            text(f"ALTER TABLE transcripts ADD CONSTRAINT {constraint} CHECK (job_id <> '{job}') NOT VALID")
        )
    try:
        assert _run_group(group) == {"error": 1}
        # The answer was paid for: its attempt is closed with its cost and the answer is kept.
        attempts = pipeline.attempts(job)
        assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCESS.value]
        assert len(pipeline.costs(job)) == 1 and len(pipeline.answers(job)) == 1
        assert pipeline.jobs([job])[job].status == JobStatus.PROCESSING.value
    finally:
        with pipeline.engine.begin() as c:
            c.execute(text(f"ALTER TABLE transcripts DROP CONSTRAINT IF EXISTS {constraint}"))
    # The next run (the lease ran out, the sweeper requeued the job) reuses the answer: nothing is paid again.
    with pipeline.engine.begin() as c:
        c.execute(
            update(Job).where(Job.id == job).values(lease_expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    assert job in sweep().requeued
    report = prepare_jobs([job], owner="test:prep2")
    assert report.grouped == 1
    assert _run_group(report.groups[0]) == {"succeeded": 1}
    _assert_paid_once(pipeline, job, fake_openai)
    with pipeline.engine.connect() as c:
        assert c.execute(select(Job.run_count).where(Job.id == job)).scalar() == 2
