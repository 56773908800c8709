"""A job handed to the local engine keeps its lease (issue #16, item 4), and a stale run never touches a
requeued job's lease (item 8).

The stages run in this process against the real servers, the fake provider and the real local engine,
with leases of a second or two: a wait in the local queue, or a local run, longer than the lease must not
send the job back into the (paid) hosted chain; the sweeper hands an expired local-stage job back to the
local queue instead, and the local run renews its lease while it goes on.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from core.db import session_scope
from core.ids import uuid7
from core.models import Group, Job
from core.names import LOCAL_QUEUE_OWNER
from core.settings import reset_settings_cache
from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, Pipeline, hosted_env, processing_job_rows
from tests.support import REPO_ROOT, Stack
from worker.store.claims import extend_leases, release_soon

LOCAL = "local:whisper-base"


@pytest.fixture
def short_leases(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A hosted chain ending in `local`, with leases (and the broker's visibility timeout) of 1-2 s."""
    env = hosted_env(
        VOXQ_FALLBACK_MODELS="local",
        VOXQ_JOB_LEASE_SECONDS="1",
        VOXQ_CELERY_VISIBILITY_TIMEOUT="1",
        VOXQ_LOCAL_CPU_THREADS="2",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    yield
    reset_settings_cache()


def _job(pipeline: Pipeline, sample: str = "voicemail-school.mp3") -> uuid.UUID:
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, language="en")
    data = (REPO_ROOT / "samples" / sample).read_bytes()
    return pipeline.job(tenant, batch, data, filename=sample)


def _hand_off(pipeline: Pipeline, job: uuid.UUID) -> uuid.UUID:
    """Prepare the job and run its group: the primary's quota is gone, so it goes to `local`."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    report = prepare_jobs([job], owner="test:prep")
    assert report.grouped == 1
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"handoff": 1}
    return report.groups[0]


def _assert_hosted_chain_ran_once(pipeline: Pipeline, job: uuid.UUID, fake: FakeOpenAI) -> None:
    attempts = pipeline.attempts(job)
    assert [(a.model, a.outcome) for a in attempts] == [
        (PRIMARY, AttemptOutcome.FALLBACK.value),
        (LOCAL, AttemptOutcome.SUCCESS.value),
    ]
    assert len([r for r in fake.request_log() if r.get("model") == PRIMARY]) == 1
    row = pipeline.jobs([job])[job]
    assert row.status == JobStatus.SUCCEEDED.value and row.model == LOCAL and row.run_count == 1


@pytest.mark.usefixtures("short_leases")
def test_a_wait_in_the_local_queue_past_the_lease_keeps_the_job_out_of_the_hosted_chain(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.local import transcribe_local
    from worker.sweeper import sweep

    fake_openai.exhaust_quota(PRIMARY)
    job = _job(pipeline)
    group = _hand_off(pipeline, job)
    assert pipeline.jobs([job])[job].status == JobStatus.PROCESSING.value
    time.sleep(2.5)  # the local queue is slow: longer than any lease of the run
    report = sweep()
    # Not requeued into the hosted chain: sent to the local queue again, no run counted.
    assert job not in report.requeued and job not in report.failed
    assert report.local == [job]
    row = pipeline.jobs([job])[job]
    assert row.lease_owner == LOCAL_QUEUE_OWNER
    assert row.status == JobStatus.PROCESSING.value and row.group_id == group and row.run_count == 1
    assert transcribe_local(job, group, worker="test:local") == JobStatus.SUCCEEDED.value
    _assert_hosted_chain_ran_once(pipeline, job, fake_openai)


@pytest.mark.usefixtures("short_leases")
def test_a_local_run_longer_than_the_lease_renews_it(pipeline: Pipeline, fake_openai: FakeOpenAI) -> None:
    from worker.local import transcribe_local
    from worker.sweeper import SweepReport, sweep

    fake_openai.exhaust_quota(PRIMARY)
    # The 72 s podcast clip: its local run takes several 1 s leases however fast this machine is.
    job = _job(pipeline, "podcast-clip.ogg")
    group = _hand_off(pipeline, job)
    result: list[str] = []
    run = threading.Thread(target=lambda: result.append(transcribe_local(job, group, worker="test:local")))
    started = time.monotonic()
    run.start()
    reports: list[SweepReport] = []
    while run.is_alive():  # the sweeper ticks all through the local run
        reports.append(sweep())
        time.sleep(0.2)
    run.join()
    assert time.monotonic() - started > 2, "the local run was shorter than its lease: nothing was tested"
    assert result == [JobStatus.SUCCEEDED.value]
    assert not [r.requeued for r in reports if r.requeued]  # never sent back into the hosted chain
    assert not any(r.failed or r.local for r in reports)
    _assert_hosted_chain_ran_once(pipeline, job, fake_openai)


@pytest.mark.usefixtures("short_leases")
def test_a_dead_local_run_goes_back_to_the_local_queue_not_the_hosted_chain(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.local import transcribe_local
    from worker.sweeper import sweep

    fake_openai.exhaust_quota(PRIMARY)
    job = _job(pipeline)
    group = _hand_off(pipeline, job)
    with session_scope() as s:  # a local run took the job, then its worker died
        s.execute(
            update(Job)
            .where(Job.id == job)
            .values(
                lease_owner="local:dead-host:1", lease_expires_at=datetime.now(UTC) - timedelta(seconds=1)
            )
        )
    report = sweep()
    assert report.local == [job] and not report.requeued
    row = pipeline.jobs([job])[job]
    assert row.lease_owner == LOCAL_QUEUE_OWNER and row.run_count == 2  # the dead run counts
    assert transcribe_local(job, group, worker="test:local") == JobStatus.SUCCEEDED.value
    # A duplicate message of the same hand-off finds the job ended and does nothing.
    assert transcribe_local(job, group, worker="test:local2") == "not_claimed"
    assert len([r for r in fake_openai.request_log() if r.get("model") == PRIMARY]) == 1


def test_a_stale_run_neither_renews_nor_shortens_a_requeued_jobs_lease(stack: Stack) -> None:
    """Item 8: `extend_leases` and `release_soon` compare-and-set on the lease owner and the run token."""
    later = datetime.now(UTC) + timedelta(seconds=600)
    job = processing_job_rows(lease_owner="new-run:2", lease_expires_at=later).job_id
    with session_scope() as s:  # requeued and claimed again by another run (its own group)
        row = s.execute(select(Job.tenant_id, Job.batch_id).where(Job.id == job)).one()
        new_group = uuid7()
        s.add(
            Group(
                id=new_group, tenant_id=row.tenant_id, batch_id=row.batch_id, key="k", duration_class="short"
            )
        )
        s.flush()
        s.execute(update(Job).where(Job.id == job).values(group_id=new_group))
    stale_group = uuid.uuid4()
    # The old run (another owner, the old group) renews and then gives the job up after an error.
    assert extend_leases([job], owner="old-run:1", group_id=stale_group, lease_seconds=5) == 0
    assert not release_soon(job, owner="old-run:1", group_id=stale_group, after_seconds=1)
    # The same owner with a stale run token touches nothing either.
    assert extend_leases([job], owner="new-run:2", group_id=stale_group, lease_seconds=5) == 0
    with session_scope() as s:
        owner, expires = s.execute(select(Job.lease_owner, Job.lease_expires_at).where(Job.id == job)).one()
    assert (owner, expires) == ("new-run:2", later)
    # The run that holds it does.
    assert extend_leases([job], owner="new-run:2", group_id=new_group, lease_seconds=5) == 1
    assert release_soon(job, owner="new-run:2", group_id=new_group, after_seconds=1)
