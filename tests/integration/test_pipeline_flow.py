"""The pipeline's shape through real Celery workers and the fake provider: bad files, dedupe, packing,
chunk stitching, budget stop, priority, redelivery and the sweeper."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import Attempt, Group, Job
from core.statuses import AttemptOutcome, BatchStatus, JobStatus
from tests.audio_fixtures import sequence, silence, wav_bytes
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import (
    PRIMARY,
    SECOND,
    Pipeline,
    WorkerFactory,
    assert_costs_match_billing,
    hosted_env,
    tones,
)
from tests.support import Stack, celery_worker, child_pids, wait_until
from worker.audio import encode_flac


def send(stack: Stack, task: str, queue: str, **kwargs: Any) -> None:
    """Send a task from another process, as the API or beat would."""
    code = (
        "import json, sys; from worker.app import app; "
        f"app.send_task({task!r}, kwargs=json.loads(sys.argv[1]), queue={queue!r})"
    )
    import json

    subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], env=stack.child_env(), check=True, timeout=60
    )


def test_bad_files_fail_with_a_code_and_the_rest_go_on(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    garbage = pipeline.job(tenant, batch, b"this is not audio at all" * 100, filename="x.mp3")
    empty = pipeline.job(tenant, batch, b"", filename="empty.wav")
    too_long = pipeline.job(tenant, batch, wav_bytes(sequence([(440, 8.0)])), filename="long.wav")
    silent = pipeline.job(tenant, batch, wav_bytes(silence(3.0)), filename="silent.wav")
    good = pipeline.job(tenant, batch, tones(440))
    jobs = [garbage, empty, too_long, silent, good]
    with worker(VOXQ_MAX_AUDIO_SECONDS="5"):
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs)
    assert (rows[garbage].status, rows[garbage].error_code) == ("failed", "unsupported_media")
    assert (rows[empty].status, rows[empty].error_code) == ("failed", "empty_audio")
    assert (rows[too_long].status, rows[too_long].error_code) == ("failed", "audio_too_long")
    assert all(rows[j].error_message for j in (garbage, empty, too_long))
    # Silence is transcribed as nothing, without paying anyone.
    assert rows[silent].status == "succeeded"
    silent_transcript = pipeline.transcript(silent)
    assert silent_transcript is not None and silent_transcript.text == ""
    assert pipeline.attempts(silent) == []
    assert rows[good].status == "succeeded"
    assert pipeline.transcript(good).text == "tone440"  # type: ignore[union-attr]
    assert len(fake_openai.billing_log()) == 1
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_identical_audio_is_transcribed_once(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    first_batch = pipeline.batch(tenant)
    audio = tones(510, 620)
    # The same samples in another container (FLAC): dedupe is on decoded PCM, not on file bytes.
    pcm = (np.clip(sequence([(510, 0.8), (620, 0.8)], gap=1.0), -1, 1) * 32767).astype(np.int16)
    same_audio_as_flac = encode_flac(pcm)
    assert same_audio_as_flac != audio
    a = pipeline.job(tenant, first_batch, audio)
    b = pipeline.job(tenant, first_batch, same_audio_as_flac, filename="b.flac")
    other_tenant = pipeline.tenant()
    other_batch = pipeline.batch(other_tenant)
    c = pipeline.job(other_tenant, other_batch, audio)
    with worker():
        pipeline.submit([a, b])
        pipeline.submit([c])
        rows = pipeline.wait_terminal([a, b, c])
        # Later, the same audio again in a new batch of the first tenant: reused from the finished job.
        later_batch = pipeline.batch(tenant)
        d = pipeline.job(tenant, later_batch, audio, filename="d.wav")
        pipeline.submit([d])
        rows.update(pipeline.wait_terminal([d]))
    assert all(r.status == "succeeded" for r in rows.values())
    leader = a if rows[a].deduplicated_from_id is None else b
    follower = b if leader == a else a
    assert rows[follower].deduplicated_from_id == leader
    assert rows[d].deduplicated_from_id in (a, b)
    assert rows[c].deduplicated_from_id is None  # another tenant never shares
    for job in (follower, d):
        assert rows[job].cost_usd == 0
        assert pipeline.attempts(job) == []
        assert pipeline.transcript(job).text == "tone510 tone620"  # type: ignore[union-attr]
    # One provider call for tenant 1 and one for tenant 2.
    assert len(fake_openai.billing_log()) == 2
    assert_costs_match_billing(pipeline, fake_openai)


def test_short_files_are_packed_and_sent_concurrently(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=0.5)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, batch, tones(200 + 10 * i)) for i in range(20)]
    with worker(concurrency=1):
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs)
    assert all(r.status == "succeeded" for r in rows.values())
    with Session(pipeline.engine) as s:
        groups = {j.group_id for j in s.execute(select(Job).where(Job.id.in_(jobs))).scalars()}
        sizes = [g.job_count for g in s.execute(select(Group).where(Group.id.in_(groups))).scalars()]
    # One transcribe task for twenty files, and many requests in flight at once from one process.
    assert len(groups) == 1 and sizes == [20]
    assert fake_openai.max_in_flight >= 10
    for i, job in enumerate(jobs):
        assert pipeline.transcript(job).text == f"tone{200 + 10 * i}"  # type: ignore[union-attr]


def test_long_file_is_chunked_at_silences_and_stitched_in_order(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    freqs = [300, 450, 600, 750, 900, 1050, 1200, 1350]
    lead, tone_s, gap = 0.5, 1.0, 1.5
    audio = wav_bytes(sequence([(f, tone_s) for f in freqs], gap=gap, lead=lead))
    tenant = pipeline.tenant()
    whisper_batch = pipeline.batch(tenant, models=[SECOND])
    tokens_batch = pipeline.batch(tenant, models=[PRIMARY], prompt="Tones.")
    timed = pipeline.job(tenant, whisper_batch, audio)
    prompted = pipeline.job(tenant, tokens_batch, audio)
    with worker(VOXQ_MAX_CHUNK_SECONDS="3", VOXQ_SHORT_FILE_SECONDS="2"):
        pipeline.submit([timed])
        pipeline.submit([prompted])
        rows = pipeline.wait_terminal([timed, prompted])
    assert all(r.status == "succeeded" for r in rows.values())
    expected = " ".join(f"tone{f}" for f in freqs)
    for job in (timed, prompted):
        transcript = pipeline.transcript(job)
        assert transcript is not None and transcript.text == expected
    chunks = pipeline.chunks(timed)
    assert len(chunks) >= 3
    answers = pipeline.answers(timed)  # every chunk's paid answer is kept, and only those
    assert sorted(answers) == sorted(f"chunk:{c.index}" for c in chunks)
    assert all(a.end_seconds <= b.start_seconds + 1e-6 for a, b in itertools.pairwise(chunks))
    # Segment times are in the ORIGINAL file's time, though silences were collapsed before sending.
    segments = pipeline.transcript(timed).segments or []  # type: ignore[union-attr]
    assert [s["text"] for s in segments] == [f"tone{f}" for f in freqs]
    for i, seg in enumerate(segments):
        start = lead + i * (tone_s + gap)
        assert seg["start"] == pytest.approx(start, abs=0.08)
        assert seg["end"] == pytest.approx(start + tone_s, abs=0.08)
    # Odd chunks were prompted with the batch prompt and the previous chunk's text, even chunks (sent
    # at once in the first wave, VOXQ_CHUNK_CONTEXT=alternate) with the batch prompt only.
    costs = sorted(pipeline.costs(prompted), key=lambda c: c.created_at)
    attempts = {a.id: a for a in pipeline.attempts(prompted)}
    by_index = sorted(costs, key=lambda c: attempts[c.attempt_id].chunk_index or 0)
    first_prompt_tokens = by_index[0].input_text_tokens or 0
    assert first_prompt_tokens <= 2  # "Tones." only
    assert all((c.input_text_tokens or 0) == first_prompt_tokens for c in by_index[2::2])
    assert all((c.input_text_tokens or 0) > first_prompt_tokens for c in by_index[1::2])
    # Far less audio was sent than the file holds: long silences were collapsed.
    sent = sum(a.audio_seconds or 0 for a in pipeline.attempts(timed))
    assert sent == pytest.approx(rows[timed].speech_seconds, abs=0.01)
    assert sent < 0.7 * rows[timed].duration_seconds  # type: ignore[operator]


def test_budget_stops_new_calls_and_skips_the_rest(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    from worker.budget import bound_usd, estimate_usd

    tenant = pipeline.tenant()
    audio = [tones(300 + 10 * i) for i in range(10)]
    # Room for one call's reservation (the most it can cost) on top of about three files' real cost.
    per_file = estimate_usd(PRIMARY, 1.4)
    budget = (bound_usd(PRIMARY, 1.4) + per_file * Decimal("3.5")).quantize(Decimal("0.00000001"))
    batch = pipeline.batch(tenant, budget_usd=budget)
    jobs = [pipeline.job(tenant, batch, a) for a in audio]
    with worker(VOXQ_FALLBACK_MODELS=""):
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs)
    statuses = [r.status for r in rows.values()]
    succeeded = statuses.count("succeeded")
    skipped = [r for r in rows.values() if r.status == "skipped"]
    assert succeeded >= 1 and skipped
    assert succeeded + len(skipped) == len(jobs)
    assert all(r.error_code == "budget_exceeded" for r in skipped)
    assert all(pipeline.attempts(r.id) == [] for r in skipped)  # no call was started for them
    b = pipeline.batch_row(batch)
    assert b.cost_usd <= budget and b.committed_usd <= budget
    assert len(fake_openai.billing_log()) == succeeded
    assert b.status == BatchStatus.COMPLETED.value


def test_high_priority_batches_are_transcribed_first(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    normal = pipeline.batch(tenant, priority="normal", prompt="normal")
    high = pipeline.batch(tenant, priority="high", prompt="high")
    normal_jobs = [pipeline.job(tenant, normal, tones(300 + 10 * i)) for i in range(3)]
    high_jobs = [pipeline.job(tenant, high, tones(700 + 10 * i)) for i in range(3)]
    # Prepare both (normal first) with a worker that does not transcribe...
    with worker(concurrency=1, queues="ingest.high,ingest"):
        pipeline.submit(normal_jobs, priority="normal")
        pipeline.submit(high_jobs, priority="high")

        def grouped() -> bool:
            rows = pipeline.jobs(normal_jobs + high_jobs).values()
            return all(r.group_id is not None for r in rows)

        wait_until(grouped, timeout=60, what="jobs grouped")
    # ...then one transcribing process: the high queue is drained before the normal one.
    with worker(concurrency=1, queues="transcribe.high,transcribe,transcribe.low"):
        pipeline.wait_terminal(normal_jobs + high_jobs)
    high_done = max(a.ended_at for j in high_jobs for a in pipeline.attempts(j))  # type: ignore[type-var]
    normal_started = min(a.started_at for j in normal_jobs for a in pipeline.attempts(j))
    assert high_done <= normal_started  # type: ignore[operator]


def test_redelivered_group_task_gives_one_transcript_and_honest_attempts(
    stack: Stack, pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=1.5)
    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant), tones(880))
    with worker(concurrency=1, queues="ingest"):
        pipeline.submit([job])
        wait_until(lambda: pipeline.jobs([job])[job].group_id, timeout=60, what="job grouped")
    group_id = pipeline.jobs([job])[job].group_id
    # The broker delivers the same group task a second time (e.g. a visibility-timeout redelivery).
    send(stack, "voxq.transcribe.group", "transcribe", group_id=str(group_id))
    with worker(concurrency=2, queues="transcribe"):
        pipeline.wait_terminal([job])
        wait_until(
            lambda: [a.outcome for a in pipeline.attempts(job)].count("success") == 2,
            timeout=30,
            what="both runs closed their attempts",
        )
    assert len(pipeline.transcripts(job)) == 1
    attempts = pipeline.attempts(job)
    assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCESS.value] * 2
    # Both calls were billed and both are on the job's bill: honest, not hidden.
    assert_costs_match_billing(pipeline, fake_openai)
    row = pipeline.jobs([job])[job]
    assert row.cost_usd == sum((c.usd for c in pipeline.costs(job)), Decimal(0))
    assert row.status == JobStatus.SUCCEEDED.value


def test_sweeper_requeues_expired_leases_resends_lost_jobs_and_gives_up_at_the_limit(
    stack: Stack, pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    revived = pipeline.job(tenant, batch, tones(990))
    hopeless = pipeline.job(tenant, batch, tones(330))
    lost = pipeline.job(tenant, batch, tones(660))  # queued long ago; its prepare message was lost
    past = datetime.now(UTC) - timedelta(minutes=5)
    dead_attempt = uuid.uuid4()
    with Session(pipeline.engine) as s, s.begin():
        # A worker claimed both, opened a call for one, and died.
        s.execute(
            update(Job)
            .where(Job.id == revived)
            .values(status="processing", lease_owner="dead:1", lease_expires_at=past, run_count=1)
        )
        s.execute(
            update(Job)
            .where(Job.id == hopeless)
            .values(status="processing", lease_owner="dead:1", lease_expires_at=past, run_count=5)
        )
        s.execute(update(Job).where(Job.id == lost).values(queued_at=datetime.now(UTC) - timedelta(hours=3)))
        s.add(
            Attempt(
                id=dead_attempt,
                tenant_id=tenant,
                job_id=revived,
                model=PRIMARY,
                provider="openai",
                audio_seconds=60.0,
            )
        )
    with worker():
        send(stack, "voxq.maintenance.sweep", "maintenance")
        rows = pipeline.wait_terminal([revived, hopeless, lost])
    assert rows[revived].status == "succeeded" and rows[revived].run_count == 2
    assert pipeline.transcript(revived).text == "tone990"  # type: ignore[union-attr]
    assert (rows[hopeless].status, rows[hopeless].error_code) == ("failed", "too_many_attempts")
    assert rows[lost].status == "succeeded" and rows[lost].run_count == 1
    with Session(pipeline.engine) as s:
        dead = s.execute(select(Attempt).where(Attempt.id == dead_attempt)).scalar_one()
    assert dead.outcome == AttemptOutcome.ABANDONED.value
    # The dead call may have been billed: it carries an estimated cost, on the job's bill too.
    (estimate,) = [c for c in pipeline.costs(revived) if c.attempt_id == dead_attempt]
    assert estimate.estimated and estimate.usd > 0
    assert rows[revived].cost_usd == sum((c.usd for c in pipeline.costs(revived)), Decimal(0))
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_twins_waiting_on_a_failed_leader_share_its_failure(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(PRIMARY, [{"kind": "invalid_file", "message": "Audio file is corrupted (leader)"}])
    fake_openai.script(SECOND, [{"kind": "invalid_file", "message": "still corrupted"}])
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    audio = tones(810)
    jobs = [pipeline.job(tenant, batch, audio, filename=f"{i}.wav") for i in range(3)]
    with worker():
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs)
    assert [r.status for r in rows.values()] == ["failed"] * 3
    assert {r.error_code for r in rows.values()} == {"invalid_audio"}
    assert {r.error_message for r in rows.values()} == {"Audio file is corrupted (leader)"}
    leaders = [j for j in jobs if rows[j].deduplicated_from_id is None]
    assert len(leaders) == 1
    # Only the leader ever called a provider: one try on each model.
    assert len(pipeline.attempts()) == 2 and all(a.job_id == leaders[0] for a in pipeline.attempts())
    assert pipeline.batch_row(batch).status == BatchStatus.FAILED.value


def test_identical_audio_prepared_by_concurrent_tasks_is_still_transcribed_once(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=1.0)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    audio = tones(1230, 460)
    jobs = [pipeline.job(tenant, batch, audio, filename=f"{i}.wav") for i in range(6)]
    with worker(concurrency=2):
        for job in jobs:  # one prepare task each: two worker processes race on the same audio
            pipeline.submit([job])
        rows = pipeline.wait_terminal(jobs)
    assert all(r.status == "succeeded" for r in rows.values())
    assert len(fake_openai.billing_log()) == 1
    assert sum(1 for r in rows.values() if r.deduplicated_from_id is None) == 1
    assert {pipeline.transcript(j).text for j in jobs} == {"tone1230 tone460"}  # type: ignore[union-attr]


def test_a_worker_killed_mid_call_is_recovered_and_the_lost_call_accounted(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_openai.configure(PRIMARY, latency=3.0)
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(940))
    with celery_worker(stack, concurrency=1, env=hosted_env()) as proc:
        pipeline.submit([job])
        wait_until(lambda: pipeline.attempts(job), timeout=60, what="the first call in flight")
        (child,) = child_pids(proc.pid)
        os.kill(child, signal.SIGKILL)  # the pool process dies mid-call; its task message is requeued
        rows = pipeline.wait_terminal([job], timeout=90)
    assert rows[job].status == JobStatus.SUCCEEDED.value
    assert len(pipeline.transcripts(job)) == 1
    lost, done = pipeline.attempts(job)
    assert (lost.outcome, done.outcome) == (AttemptOutcome.PENDING.value, AttemptOutcome.SUCCESS.value)
    # The sweeper closes the lost call once no live call could still be waiting on it, and charges an
    # estimate for it: the provider may have billed it.
    from core.settings import reset_settings_cache
    from worker.sweeper import sweep

    monkeypatch.setenv("VOXQ_PROVIDER_TIMEOUT_SECONDS", "1")
    reset_settings_cache()
    wait_until(lambda: sweep().abandoned_attempts, timeout=30, interval=1.0, what="lost attempt abandoned")
    lost, done = pipeline.attempts(job)
    assert lost.outcome == AttemptOutcome.ABANDONED.value
    costs = {c.attempt_id: c for c in pipeline.costs(job)}
    assert set(costs) == {lost.id, done.id}
    assert costs[lost.id].estimated and costs[lost.id].usd > 0
    billed = {e["request_id"] for e in fake_openai.billing_log()}
    assert str(done.id) in billed and billed <= {str(lost.id), str(done.id)}
    assert pipeline.jobs([job])[job].cost_usd == costs[lost.id].usd + costs[done.id].usd


def test_a_threaded_worker_runs_several_groups_on_one_client(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, latency=1.5)
    tenant = pipeline.tenant()
    jobs: list[uuid.UUID] = []
    for prompt in ("a", "b", "c"):  # three batches with different options: three groups
        batch = pipeline.batch(tenant, prompt=prompt)
        jobs += [pipeline.job(tenant, batch, tones(300 + 10 * len(jobs) + i)) for i in range(15)]
    env = hosted_env(VOXQ_DATABASE_POOL_SIZE="16")
    with celery_worker(stack, concurrency=1, queues="ingest", env=env, name="prep"):
        pipeline.submit(jobs)  # prepared by a prefork worker...
        wait_until(lambda: all(j.group_id for j in pipeline.jobs(jobs).values()), timeout=60, what="grouped")
    # ...then one process with a thread pool takes all three groups at once.
    with celery_worker(stack, pool="threads", concurrency=3, queues="transcribe", env=env, name="threads"):
        rows = pipeline.wait_terminal(jobs, timeout=60)
    assert all(r.status == "succeeded" for r in rows.values())
    assert len({r.group_id for r in rows.values()}) == 3
    assert fake_openai.max_in_flight > 15  # more than any one group holds
    assert len({a.worker for j in jobs for a in pipeline.attempts(j)}) == 1  # one process did it all
