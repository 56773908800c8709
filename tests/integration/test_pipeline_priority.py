"""Priority at the ingest stage: a high batch submitted after a big normal one is prepared first (its own
`ingest.high` queue) and, by a worker consuming every queue, transcribed before the normal batch is even
prepared."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import Group, Job
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, WorkerFactory, tones


def group_created(pipeline: Pipeline, jobs: list[uuid.UUID]) -> dict[uuid.UUID, object]:
    with Session(pipeline.engine) as s:
        rows = s.execute(
            select(Job.id, Group.created_at).join(Group, Group.id == Job.group_id).where(Job.id.in_(jobs))
        ).all()
    return {job_id: created for job_id, created in rows}


def test_a_high_batch_submitted_after_a_big_normal_one_is_prepared_and_transcribed_first(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    normal = pipeline.batch(tenant, priority="normal")
    high = pipeline.batch(tenant, priority="high")
    normal_jobs = [pipeline.job(tenant, normal, tones(300 + 10 * i)) for i in range(8)]
    high_job = pipeline.job(tenant, high, tones(900))
    # Eight prepare tasks of the normal batch wait in the broker, then the high batch's one.
    for job in normal_jobs:
        pipeline.submit([job], priority="normal")
    pipeline.submit([high_job], priority="high")
    # One worker, one slot, consuming every queue in the production order.
    with worker(concurrency=1):
        rows = pipeline.wait_terminal([*normal_jobs, high_job])
    assert all(r.status == "succeeded" for r in rows.values())
    created = group_created(pipeline, [*normal_jobs, high_job])
    assert created[high_job] < min(created[j] for j in normal_jobs)  # prepared first
    # ...and transcribed before any normal job was prepared: its whole path runs first.
    (high_attempt,) = pipeline.attempts(high_job)
    assert high_attempt.ended_at is not None
    assert high_attempt.ended_at < min(created[j] for j in normal_jobs)  # type: ignore[operator]
