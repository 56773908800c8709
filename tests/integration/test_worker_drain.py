"""A pool child Celery terminates (SIGTERM: it cancels the running task when the broker connection is
lost) keeps the answers of the calls in flight before it dies (worker.signals, `Runtime.drain`).

The provider bills an answer it sent whether or not voxq keeps it; a child that died at once lost those
answers, and the next run of their jobs paid again ("jobs paid twice" in the chaos run). A real prefork
worker, the fake provider answering after 1 s, SIGTERM to the child while its calls are in flight.
"""

from __future__ import annotations

import os
import signal

from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, Pipeline, WorkerFactory, tones
from tests.support import child_pids, wait_until

JOBS = 8


def test_a_terminated_pool_child_keeps_the_answers_in_flight(
    pipeline: Pipeline, fake_openai: FakeOpenAI, worker: WorkerFactory
) -> None:
    fake_openai.configure(PRIMARY, latency=1.0)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, batch, tones(500 + 10 * i)) for i in range(JOBS)]
    with worker(concurrency=1) as proc:
        (child,) = wait_until(lambda: child_pids(proc.pid) or None, timeout=60, what="the pool child")
        pipeline.submit(jobs)
        wait_until(lambda: fake_openai.in_flight >= JOBS, timeout=60, what="every job's call in flight")
        os.kill(child, signal.SIGTERM)  # what Celery does to the child when the broker connection drops
        wait_until(lambda: child not in child_pids(proc.pid), timeout=30, what="the child's end")
    billed = {e["request_id"] for e in fake_openai.billing_log()}
    attempts = pipeline.attempts()
    # Every call in flight finished and was kept before the child died: nothing pending, nothing lost.
    assert [a for a in attempts if a.outcome == AttemptOutcome.PENDING.value] == []
    assert billed == {str(a.id) for a in attempts if a.outcome == AttemptOutcome.SUCCESS.value}
    assert len(billed) == JOBS
    assert {str(c.attempt_id) for c in pipeline.costs()} == billed
    rows = pipeline.jobs(jobs)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in rows.values())
