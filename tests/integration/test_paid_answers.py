"""Every paid answer is kept and reused: a job requeued after its provider answered never pays again.

Real Celery worker, real sweeper code, the fake OpenAI server (whose billing log is the provider's bill).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Job, JobAnswer
from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, Pipeline, WorkerFactory, tones
from tests.support import wait_until


def _transcription_requests(fake: FakeOpenAI) -> list[dict[str, object]]:
    return [r for r in fake.request_log() if r.get("request_id")]


def test_a_requeued_job_reuses_the_answer_its_lost_run_paid_for(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=3.0)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(520, 1450))
    # One worker process: run 2 (sent by the sweeper) starts only once run 1's task has ended.
    with worker(concurrency=1):
        pipeline.submit([job])
        wait_until(lambda: pipeline.attempts(job), timeout=60, what="run 1's call in flight")
        # Run 1's lease runs out while its call is in flight (its worker looked dead): the sweeper
        # requeues the job (new run, new group), so run 1 has lost its compare-and-set.
        from worker.sweeper import sweep

        with Session(pipeline.engine) as s, s.begin():
            s.execute(
                update(Job).where(Job.id == job).values(lease_expires_at=datetime.now(UTC) - timedelta(1))
            )
        assert sweep().requeued == [job]
        rows = pipeline.wait_terminal([job], timeout=90)

    first = pipeline.attempts(job)[0]
    # Run 1's answer arrived after it lost the job: it was kept anyway, and run 2 used it.
    with Session(pipeline.engine) as s:
        (kept,) = s.execute(select(JobAnswer).where(JobAnswer.job_id == job)).scalars()
    assert (kept.piece, kept.attempt_id, kept.text, kept.model) == (
        "whole",
        first.id,
        "tone520 tone1450",
        PRIMARY,
    )
    assert rows[job].status == JobStatus.SUCCEEDED.value and rows[job].run_count == 2
    assert len(_transcription_requests(fake_openai)) == 1  # run 2 made no provider request
    assert [e["request_id"] for e in fake_openai.billing_log()] == [str(first.id)]
    assert [a.id for a in pipeline.attempts(job)] == [first.id]
    assert first.outcome == AttemptOutcome.SUCCESS.value
    (transcript,) = pipeline.transcripts(job)
    assert transcript.attempt_id == first.id and transcript.text == "tone520 tone1450"
    assert transcript.segments and transcript.segments == kept.segments
