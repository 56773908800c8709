"""Dedupe reuses only a transcript at least as good as the batch's first choice (issue #16, item 22e):
the prepare and transcribe stages in this process, the fake provider, the rules of core.dedupe."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import Job, Transcript
from core.statuses import JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, tones

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _prepare(job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    from worker.prepare import prepare_jobs

    return prepare_jobs(job_ids, owner="test:1").groups


def _run(job_ids: list[uuid.UUID]) -> None:
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    rt = get_runtime()
    for group in _prepare(job_ids):
        rt.run(transcribe_group(rt, group))


def test_a_finished_twin_is_reused_only_by_batches_whose_first_choice_wrote_it(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    audio = tones(610)
    first = pipeline.job(tenant, pipeline.batch(tenant, models=[SECOND]), audio)
    _run([first])
    assert pipeline.transcript(first).model == SECOND  # type: ignore[union-attr]
    other_first = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY, SECOND]), audio)
    same_first = pipeline.job(tenant, pipeline.batch(tenant, models=[SECOND, PRIMARY]), audio)
    local_first = pipeline.job(tenant, pipeline.batch(tenant, models=["local"]), audio)
    _run([other_first, same_first, local_first])
    rows = pipeline.jobs([other_first, same_first, local_first])
    assert {r.status for r in rows.values()} == {JobStatus.SUCCEEDED.value}
    # Its first choice did not write the twin's transcript: transcribed by its own first choice.
    assert rows[other_first].deduplicated_from_id is None
    assert pipeline.transcript(other_first).model == PRIMARY  # type: ignore[union-attr]
    assert rows[same_first].deduplicated_from_id == first  # reused, at no cost
    assert rows[local_first].deduplicated_from_id == first  # hosted beats local
    assert len(fake_openai.billing_log()) == 2


def test_a_local_transcript_is_never_reused_by_a_hosted_first_batch(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    audio = tones(720)
    made_locally = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY]), audio)
    _run([made_locally])
    with Session(pipeline.engine) as s, s.begin():  # as if the hosted chain had fallen back to local
        s.execute(update(Job).where(Job.id == made_locally).values(model="local:base"))
        s.execute(
            update(Transcript)
            .where(Transcript.job_id == made_locally)
            .values(model="local:base", provenance={"models": ["local:base"]})
        )
    hosted = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY, SECOND, "local"]), audio)
    _run([hosted])
    row = pipeline.jobs([hosted])[hosted]
    assert row.status == JobStatus.SUCCEEDED.value and row.deduplicated_from_id is None
    assert pipeline.transcript(hosted).model == PRIMARY  # type: ignore[union-attr]


def test_a_twin_in_flight_is_followed_only_with_the_same_first_choice(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    audio = tones(830)
    leader = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY, SECOND]), audio)
    _prepare([leader])
    other_first = pipeline.job(tenant, pipeline.batch(tenant, models=[SECOND]), audio)
    same_first = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY]), audio)
    local_first = pipeline.job(tenant, pipeline.batch(tenant, models=["local"]), audio)
    groups = _prepare([other_first, same_first, local_first])
    rows = pipeline.jobs([other_first, same_first, local_first])
    assert rows[other_first].deduplicated_from_id is None and len(groups) == 1  # leads on its own
    assert rows[same_first].deduplicated_from_id == leader
    assert rows[local_first].deduplicated_from_id == leader


def test_a_follower_takes_its_leaders_transcript_only_from_a_model_of_its_own_chain(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    audio = tones(940)
    leader = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY, SECOND]), audio)
    leader_groups = _prepare([leader])
    with_fallback = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY, SECOND]), audio)
    without = pipeline.job(tenant, pipeline.batch(tenant, models=[PRIMARY]), audio)
    assert _prepare([with_fallback, without]) == []  # both follow the leader (the same first choice)
    fake_openai.configure(PRIMARY, gone=True)  # the leader falls back to whisper-1
    rt = get_runtime()
    for group in leader_groups:
        rt.run(transcribe_group(rt, group))
    assert pipeline.transcript(leader).model == SECOND  # type: ignore[union-attr]
    rows = pipeline.jobs([with_fallback, without])
    assert rows[with_fallback].status == JobStatus.SUCCEEDED.value
    assert pipeline.transcript(with_fallback).model == SECOND  # type: ignore[union-attr]
    # whisper-1 is not in its chain: handed back, to be transcribed by its own chain.
    assert rows[without].status == JobStatus.QUEUED.value and rows[without].deduplicated_from_id is None
