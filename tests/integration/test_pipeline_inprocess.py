"""The prepare and transcribe stages called in this process (warnings are errors here, unlike in a worker)
against the real servers and the fake provider: the plain functions behind the Celery tasks."""

from __future__ import annotations

import pytest

from core.statuses import BatchStatus, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, Pipeline, assert_costs_match_billing, tones

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def test_prepare_then_transcribe_a_group_in_process(pipeline: Pipeline, fake_openai: FakeOpenAI) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, batch, tones(250 + 10 * i)) for i in range(12)]
    jobs.append(pipeline.job(tenant, batch, tones(250)))  # a twin of the first
    report = prepare_jobs(jobs, owner="test:1")
    assert (report.claimed, report.grouped, report.waiting, report.errors) == (13, 12, 1, 0)
    assert len(report.groups) == 1
    # A second prepare of the same ids claims nothing: the jobs are no longer queued.
    assert prepare_jobs(jobs, owner="test:2").claimed == 0
    rt = get_runtime()
    counts = rt.run(transcribe_group(rt, report.groups[0]))
    assert counts == {"succeeded": 12}
    rows = pipeline.jobs(jobs)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in rows.values())
    assert rows[jobs[-1]].deduplicated_from_id == jobs[0]
    # Running the group again finds nothing left to do and calls nobody.
    assert rt.run(transcribe_group(rt, report.groups[0])) == {}
    assert len(fake_openai.billing_log()) == 12
    assert_costs_match_billing(pipeline, fake_openai)
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_followers_of_followers_are_finished_with_the_leader(pipeline: Pipeline) -> None:
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from core.models import Job
    from worker import completion

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    leader, middle, last = (pipeline.job(tenant, batch, tones(300 + i)) for i in range(3))
    with Session(pipeline.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == leader).values(status="processing", fingerprint="f" * 64))
        # `middle` was a leader of its own once (it has a follower), then re-ran and followed `leader`.
        s.execute(
            update(Job)
            .where(Job.id == middle)
            .values(status="processing", fingerprint="f" * 64, deduplicated_from_id=leader)
        )
        s.execute(
            update(Job)
            .where(Job.id == last)
            .values(status="processing", fingerprint="f" * 64, deduplicated_from_id=middle)
        )
    assert completion.succeed_job(
        leader,
        group_id=None,
        text_="tone300",
        segments=[],
        language=None,
        model=PRIMARY,
        attempt_id=None,
        provenance={},
    )
    completion.job_finished(leader, batch)
    rows = pipeline.jobs([leader, middle, last])
    assert [rows[j].status for j in (leader, middle, last)] == ["succeeded"] * 3
    assert pipeline.transcript(last).text == "tone300"  # type: ignore[union-attr]
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_an_unexpected_prepare_error_hands_the_job_back_to_the_sweeper_soon(pipeline: Pipeline) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from core.models import Job
    from worker.prepare import prepare_jobs
    from worker.sweeper import sweep

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(300))
    with Session(pipeline.engine) as s, s.begin():
        # A source URI with no key: not a missing object but an error nobody planned for.
        s.execute(update(Job).where(Job.id == job).values(source_uri="s3://bucket-only/"))
    report = prepare_jobs([job], owner="test:1")
    assert (report.claimed, report.errors) == (1, 1)
    row = pipeline.jobs([job])[job]
    assert row.status == "processing" and row.run_count == 1
    assert row.lease_expires_at is not None
    assert row.lease_expires_at - datetime.now(UTC) < timedelta(seconds=61)  # not the 2-hour broker lease
    with Session(pipeline.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job).values(lease_expires_at=datetime.now(UTC)))
    assert sweep().requeued == [job]
    assert pipeline.jobs([job])[job].status == "queued"


def test_chunks_halved_for_the_upload_limit_keep_order_and_original_time(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.audio_fixtures import sequence, wav_bytes
    from worker.audio import chunks
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    freqs = [300, 500, 700, 900]
    lead, tone_s, gap = 0.5, 1.0, 1.5
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, models=["whisper-1"])
    job = pipeline.job(tenant, batch, wav_bytes(sequence([(f, tone_s) for f in freqs], gap=gap, lead=lead)))
    # One planned chunk whose FLAC is "too big": prepare halves it until each part fits.
    monkeypatch.setattr(chunks, "MAX_UPLOAD_BYTES", 12_000)
    report = prepare_jobs([job], owner="test:1")
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"succeeded": 1}
    attempts = pipeline.attempts(job)
    assert len(attempts) >= 2  # one planned chunk went out in several parts
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == "tone300 tone500 tone700 tone900"
    starts = [seg["start"] for seg in transcript.segments or [] if seg["text"]]
    for i, start in enumerate(starts):
        assert start == pytest.approx(lead + i * (tone_s + gap), abs=0.08)


def test_one_prepare_task_dedupes_its_files_as_if_one_after_the_other(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    english = pipeline.batch(tenant, language="en")
    french = pipeline.batch(tenant, language="fr")
    prompted = pipeline.batch(tenant, language="en", prompt="names: Carlos")
    done = pipeline.job(tenant, english, tones(410))
    first = prepare_jobs([done], owner="test:1")
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, first.groups[0])) == {"succeeded": 1}
    # One task: a twin of a finished job, two files of new audio with the same options, and the same new
    # audio under another language (twice) and under a prompt.
    copy = pipeline.job(tenant, english, tones(410), filename="copy.wav")
    lead = pipeline.job(tenant, english, tones(520), filename="lead.wav")
    wait = pipeline.job(tenant, english, tones(520), filename="wait.wav")
    fr_lead = pipeline.job(tenant, french, tones(520), filename="fr1.wav")
    fr_wait = pipeline.job(tenant, french, tones(520), filename="fr2.wav")
    prompt_lead = pipeline.job(tenant, prompted, tones(520), filename="p.wav")
    jobs = [copy, lead, wait, fr_lead, fr_wait, prompt_lead]
    report = prepare_jobs(jobs, owner="test:2")
    assert (report.claimed, report.deduplicated, report.waiting, report.grouped) == (6, 1, 2, 3)
    rows = pipeline.jobs(jobs)
    assert rows[copy].status == JobStatus.SUCCEEDED.value and rows[copy].deduplicated_from_id == done
    assert rows[wait].deduplicated_from_id == lead and rows[wait].lease_expires_at is None
    assert rows[fr_wait].deduplicated_from_id == fr_lead
    for leader in (lead, fr_lead, prompt_lead):
        assert rows[leader].deduplicated_from_id is None and rows[leader].group_id is not None
        assert rows[leader].lease_expires_at is not None
    # Every decided job has its fingerprint and probe, written with the decision.
    assert len({rows[j].fingerprint for j in (lead, wait, fr_lead, fr_wait, prompt_lead)}) == 1
    assert all(rows[j].duration_seconds and rows[j].time_map for j in jobs)
    for gid in report.groups:
        rt.run(transcribe_group(rt, gid))
    rows = pipeline.jobs(jobs)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in rows.values())
    assert len(fake_openai.billing_log()) == 4  # done, lead, fr_lead, prompt_lead
    assert_costs_match_billing(pipeline, fake_openai)
