"""Cancelling or deleting a dedupe leader hands its followers back to the queue: they are transcribed on
their own and their batches complete (issue #16, item 3). Run through the real prepare and transcribe
stages in this process, with the API in its own process."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Tenant
from core.statuses import BatchStatus, JobStatus
from tests.api_helpers import ApiServer, make_key
from tests.pipeline_support import Pipeline, tones

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _prepare(job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    from worker.prepare import prepare_jobs

    return prepare_jobs(job_ids, owner="test:1").groups


def _transcribe(groups: list[uuid.UUID]) -> None:
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    rt = get_runtime()
    for group in groups:
        rt.run(transcribe_group(rt, group))


def _tenant(name: str) -> uuid.UUID:
    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == name))
    assert tenant_id is not None
    return tenant_id


ACTIONS: dict[str, Callable[[httpx.Client, uuid.UUID, uuid.UUID], httpx.Response]] = {
    "cancel job": lambda c, job, _: c.post(f"/v1/jobs/{job}/cancel"),
    "delete job": lambda c, job, _: c.delete(f"/v1/jobs/{job}"),
    "cancel batch": lambda c, _, batch: c.post(f"/v1/batches/{batch}/cancel"),
}


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_ending_a_leader_from_the_api_hands_its_followers_back(
    api: ApiServer, pipeline: Pipeline, action: str
) -> None:
    key = make_key("acme")
    tenant = _tenant("acme")
    leader_batch, other_batch = pipeline.batch(tenant), pipeline.batch(tenant)
    leader = pipeline.job(tenant, leader_batch, tones(480))
    same_batch = pipeline.job(tenant, leader_batch, tones(480), filename="twin.wav")
    elsewhere = pipeline.job(tenant, other_batch, tones(480), filename="twin2.wav")
    leader_groups = _prepare([leader])
    assert _prepare([same_batch, elsewhere]) == []  # both follow the leader in flight
    rows = pipeline.jobs([same_batch, elsewhere])
    assert {r.deduplicated_from_id for r in rows.values()} == {leader}

    with api.client(key) as c:
        assert ACTIONS[action](c, leader, leader_batch).status_code in (200, 204)
    rows = pipeline.jobs([leader, same_batch, elsewhere])
    assert rows[leader].status == JobStatus.CANCELLED.value
    followers = [same_batch, elsewhere] if action != "cancel batch" else [elsewhere]
    for follower in followers:  # back in the queue, on their own, with a prepare task sent
        assert rows[follower].status == JobStatus.QUEUED.value
        assert rows[follower].deduplicated_from_id is None

    _transcribe(leader_groups)  # the leader's own run finds nothing left to do
    groups = _prepare(followers)
    assert len(groups) == 1  # the first follower leads now, the other follows it
    _transcribe(groups)
    rows = pipeline.jobs(followers)
    assert {r.status for r in rows.values()} == {JobStatus.SUCCEEDED.value}
    assert all(pipeline.transcript(j).text == "tone480" for j in followers)  # type: ignore[union-attr]
    assert pipeline.batch_row(other_batch).status == BatchStatus.COMPLETED.value
    if action != "cancel batch":
        assert pipeline.batch_row(leader_batch).status == BatchStatus.COMPLETED.value


def _leader_and_followers(pipeline: Pipeline) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    """(leader, follower, the follower's batch): the leader prepared, the follower waiting for it."""
    tenant = pipeline.tenant()
    leader = pipeline.job(tenant, pipeline.batch(tenant), tones(530))
    other_batch = pipeline.batch(tenant)
    follower = pipeline.job(tenant, other_batch, tones(530), filename="twin.wav")
    _prepare([leader])
    assert _prepare([follower]) == []
    assert pipeline.jobs([follower])[follower].deduplicated_from_id == leader
    return leader, follower, other_batch


def _finished_long_ago(pipeline: Pipeline, job_id: uuid.UUID) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from core.models import Job

    with Session(pipeline.engine) as s, s.begin():
        s.execute(
            update(Job).where(Job.id == job_id).values(finished_at=datetime.now(UTC) - timedelta(minutes=5))
        )


def test_the_sweeper_resolves_followers_of_a_leader_whose_worker_died_after_it_ended(
    pipeline: Pipeline,
) -> None:
    from worker import completion
    from worker.store.claims import end_job
    from worker.sweeper import sweep

    succeeded, follower_ok, batch_ok = _leader_and_followers(pipeline)
    # The worker committed the leader's transcript and died before resolving its followers.
    assert completion.succeed_job(
        succeeded,
        group_id=None,
        text_="tone530",
        segments=[],
        language=None,
        model="gpt-4o-mini-transcribe",
        attempt_id=None,
        provenance={},
    )
    _finished_long_ago(pipeline, succeeded)
    sweep()
    row = pipeline.jobs([follower_ok])[follower_ok]
    assert row.status == JobStatus.SUCCEEDED.value and row.deduplicated_from_id == succeeded
    assert pipeline.transcript(follower_ok).text == "tone530"  # type: ignore[union-attr]
    assert pipeline.batch_row(batch_ok).status == BatchStatus.COMPLETED.value

    failed, follower_failed, _ = _leader_and_followers(pipeline)
    assert end_job(failed, status=JobStatus.FAILED, code="unsupported_media", message="bad")
    _finished_long_ago(pipeline, failed)
    sweep()
    row = pipeline.jobs([follower_failed])[follower_failed]
    assert row.status == JobStatus.FAILED.value and row.error_code == "unsupported_media"


def test_followers_of_a_leader_whose_transcript_is_gone_are_handed_back(pipeline: Pipeline) -> None:
    from sqlalchemy import delete, update
    from sqlalchemy.orm import Session

    from core.models import Job, Transcript
    from worker import completion

    leader, follower, _ = _leader_and_followers(pipeline)
    with Session(pipeline.engine) as s, s.begin():  # succeeded, then deleted before its followers were seen
        s.execute(update(Job).where(Job.id == leader).values(status="succeeded"))
        s.execute(delete(Transcript).where(Transcript.job_id == leader))
    completion.job_finished(leader, pipeline.jobs([leader])[leader].batch_id)
    row = pipeline.jobs([follower])[follower]
    assert row.status == JobStatus.QUEUED.value and row.deduplicated_from_id is None
