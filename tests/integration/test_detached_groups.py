"""Group tasks that return before their calls end (`worker.transcribe.start_group`), on real workers.

A threads-pool worker's group task returns once every job of its group holds a provider slot; the thread
claims its next group while the calls are in flight. Here: two groups overlap on one thread; the task
messages are acked while the calls are still in flight; the leases of the detached jobs are renewed; a
SIGKILLed process loses no job (the sweeper re-runs them once their leases end: one transcript each,
every call an attempt, every lost call an estimated cost); a warm shutdown waits for the calls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from contextlib import AbstractContextManager
from decimal import Decimal

import redis

from core.statuses import AttemptOutcome, BatchStatus, GroupStatus, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, Pipeline, hosted_env, tones
from tests.support import Stack, celery_worker, wait_until

JOBS_PER_GROUP = 4


def _grouped_jobs(
    stack: Stack, pipeline: Pipeline, groups: int = 2
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """`groups` batches (different prompts: one group each) of `JOBS_PER_GROUP` jobs, prepared and grouped
    by a prefork ingest worker; their ids and their batches' ids."""
    tenant = pipeline.tenant()
    jobs: list[uuid.UUID] = []
    batches: list[uuid.UUID] = []
    for g in range(groups):
        batch = pipeline.batch(tenant, prompt=f"group {g}")
        batches.append(batch)
        jobs += [pipeline.job(tenant, batch, tones(400 + 40 * g + 7 * i)) for i in range(JOBS_PER_GROUP)]
    with celery_worker(stack, concurrency=1, queues="ingest", env=hosted_env(), name="prep"):
        pipeline.submit(jobs)
        wait_until(lambda: all(j.group_id for j in pipeline.jobs(jobs).values()), timeout=60, what="grouped")
    assert len({j.group_id for j in pipeline.jobs(jobs).values()}) == groups
    return jobs, batches


def _unacked(stack: Stack) -> int:
    """Task messages delivered to a worker and not acked yet (kombu's Redis `unacked` hash)."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return int(client.hlen("unacked"))
    finally:
        client.close()


def _threads_worker(stack: Stack, **env: str) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """One transcribe worker process with a one-thread pool (groups detach there)."""
    return celery_worker(
        stack, pool="threads", concurrency=1, queues="transcribe", env=hosted_env(**env), name="threads"
    )


def _assert_one_success_each(pipeline: Pipeline, jobs: list[uuid.UUID]) -> None:
    rows = pipeline.jobs(jobs)
    assert {r.status for r in rows.values()} == {JobStatus.SUCCEEDED.value}
    for job in jobs:
        assert len(pipeline.transcripts(job)) == 1
        assert [a.outcome for a in pipeline.attempts(job)].count(AttemptOutcome.SUCCESS.value) == 1
        assert rows[job].cost_usd == sum((c.usd for c in pipeline.costs(job)), Decimal(0))


def _group_statuses(pipeline: Pipeline, jobs: list[uuid.UUID]) -> set[str]:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from core.models import Group

    ids = {r.group_id for r in pipeline.jobs(jobs).values()}
    with Session(pipeline.engine) as s:
        return set(s.execute(select(Group.status).where(Group.id.in_(ids))).scalars())


def test_one_thread_runs_the_next_group_while_the_first_groups_calls_are_in_flight(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=2.0)
    jobs, batches = _grouped_jobs(stack, pipeline)
    with _threads_worker(stack):
        # One thread: both groups' calls are in flight at once only if the first task let its thread go.
        wait_until(
            lambda: fake_openai.in_flight == 2 * JOBS_PER_GROUP, timeout=60, what="both groups in flight"
        )
        assert _unacked(stack) == 0  # both tasks returned (acked) while their calls are in flight
        pipeline.wait_terminal(jobs, timeout=60)
        # The group's tail ran once its last job ended: groups done, batches finished.
        wait_until(lambda: _group_statuses(pipeline, jobs) == {GroupStatus.DONE.value}, what="groups done")
        wait_until(
            lambda: {pipeline.batch_row(b).status for b in batches} == {BatchStatus.COMPLETED.value},
            what="batches completed",
        )
    assert fake_openai.max_in_flight == 2 * JOBS_PER_GROUP
    _assert_one_success_each(pipeline, jobs)
    assert len(pipeline.attempts()) == len(jobs)
    billed = {e["request_id"] for e in fake_openai.billing_log()}
    assert billed == {str(a.id) for a in pipeline.attempts()}
    assert {str(c.attempt_id) for c in pipeline.costs()} == billed


def test_a_killed_worker_with_detached_groups_loses_no_job(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    lease = 6.0  # renewed every 2 s while the calls run
    fake_openai.configure(PRIMARY, latency=30.0)
    jobs, batches = _grouped_jobs(stack, pipeline)
    from core.settings import reset_settings_cache
    from worker.sweeper import sweep

    with _threads_worker(stack, VOXQ_JOB_LEASE_SECONDS=str(int(lease))) as proc:
        wait_until(
            lambda: fake_openai.in_flight == 2 * JOBS_PER_GROUP, timeout=60, what="both groups in flight"
        )
        assert _unacked(stack) == 0  # no task message left to redeliver: only the leases protect the jobs
        claimed = time.monotonic()
        # Past the first lease: the detached jobs' leases were renewed, the sweeper takes none of them.
        time.sleep(lease + 2)
        assert fake_openai.in_flight == 2 * JOBS_PER_GROUP
        assert not set(sweep().requeued) & set(jobs)
        os.killpg(proc.pid, signal.SIGKILL)  # the host dies with 8 calls in flight
        proc.wait(10)
    assert time.monotonic() - claimed < 30  # the calls were still in flight
    rows = pipeline.jobs(jobs)
    assert {r.status for r in rows.values()} == {JobStatus.PROCESSING.value}
    lost = {a.id for a in pipeline.attempts()}
    assert len(lost) == len(jobs)
    # Once the leases run out, the sweeper sends the jobs to be prepared and transcribed again.
    fake_openai.configure(PRIMARY, latency=0.2)
    reset_settings_cache()
    requeued: set[uuid.UUID] = set()
    deadline = time.monotonic() + 60
    while not set(jobs) <= requeued and time.monotonic() < deadline:
        requeued |= set(sweep().requeued)
        time.sleep(1)
    assert set(jobs) <= requeued
    with celery_worker(stack, concurrency=2, env=hosted_env(), name="again"):
        pipeline.wait_terminal(jobs, timeout=90)
        wait_until(
            lambda: {pipeline.batch_row(b).status for b in batches} == {BatchStatus.COMPLETED.value},
            what="batches completed",
        )
    _assert_one_success_each(pipeline, jobs)
    rows = pipeline.jobs(jobs)
    assert {r.run_count for r in rows.values()} == {2}
    # Every call is an attempt: the killed run's calls are abandoned, each charged an estimate (the
    # provider may have billed them); the rerun's answers are billed once each.
    attempts = pipeline.attempts()
    assert len(attempts) == 2 * len(jobs)
    abandoned = [a for a in attempts if a.id in lost]
    assert {a.outcome for a in abandoned} == {AttemptOutcome.ABANDONED.value}
    costs = {c.attempt_id: c for c in pipeline.costs()}
    assert set(costs) == {a.id for a in attempts}
    assert all(costs[a].estimated and costs[a].usd > 0 for a in lost)
    # The provider finished the killed run's calls after their client was gone and billed them too, as
    # OpenAI does: their estimates stand until `voxq billing settle` reads the export.
    wait_until(
        lambda: len(fake_openai.billing_log()) == len(attempts), timeout=60, what="the lost calls billed"
    )
    billed = {e["request_id"] for e in fake_openai.billing_log()}
    assert billed == {str(a.id) for a in attempts}
    assert not any(costs[uuid.UUID(b)].estimated for b in billed if uuid.UUID(b) not in lost)


def test_warm_shutdown_waits_for_detached_calls(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=4.0)
    jobs, batches = _grouped_jobs(stack, pipeline)
    with _threads_worker(stack) as proc:
        wait_until(
            lambda: fake_openai.in_flight == 2 * JOBS_PER_GROUP, timeout=60, what="both groups in flight"
        )
        assert _unacked(stack) == 0  # both tasks returned: the pool has nothing running
        proc.send_signal(signal.SIGTERM)  # warm shutdown
        assert proc.wait(60) == 0
        # The process ended after its calls did, and after closing their jobs and groups.
        assert fake_openai.in_flight == 0
        _assert_one_success_each(pipeline, jobs)
        assert _group_statuses(pipeline, jobs) == {GroupStatus.DONE.value}
        assert {pipeline.batch_row(b).status for b in batches} == {BatchStatus.COMPLETED.value}
    assert {a.outcome for a in pipeline.attempts()} == {AttemptOutcome.SUCCESS.value}
    assert len(pipeline.attempts()) == len(jobs)


def test_a_thread_stays_with_its_group_until_every_job_holds_a_slot(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=3.0)
    jobs, batches = _grouped_jobs(stack, pipeline, groups=3)
    in_flight = JOBS_PER_GROUP + 2  # the first group's calls and half of the second's
    with _threads_worker(stack, VOXQ_MAX_IN_FLIGHT=str(in_flight)):
        wait_until(lambda: fake_openai.in_flight == in_flight, timeout=60, what="the slots taken")
        time.sleep(1.0)
        # The second group's task still holds its thread (two of its jobs wait for a slot), so the third
        # group is not claimed: no call of it, its message not taken from the queue.
        assert fake_openai.in_flight == in_flight
        assert _unacked(stack) == 1
        rows = pipeline.jobs(jobs)
        by_group: dict[uuid.UUID | None, list[uuid.UUID]] = {}
        for job in jobs:
            by_group.setdefault(rows[job].group_id, []).append(job)
        calls = sorted(len([j for j in members if pipeline.attempts(j)]) for members in by_group.values())
        assert calls == [0, 2, JOBS_PER_GROUP]
        pipeline.wait_terminal(jobs, timeout=90)
        wait_until(
            lambda: {pipeline.batch_row(b).status for b in batches} == {BatchStatus.COMPLETED.value},
            what="batches completed",
        )
    assert fake_openai.max_in_flight == in_flight
    _assert_one_success_each(pipeline, jobs)
