"""The model chain against the fake OpenAI server, through real Celery workers: retry and fallback rules,
circuit breaking, re-chunking, and cost records that match the provider's billing log exactly."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from core.errors import ModelUnavailable
from core.statuses import AttemptOutcome, JobStatus
from tests.audio_fixtures import sequence, wav_bytes
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import (
    PRIMARY,
    SECOND,
    Pipeline,
    WorkerFactory,
    assert_costs_match_billing,
    circuit_state,
    hosted_env,
    tones,
)
from tests.support import Stack, celery_worker, wait_until


def one_job(pipeline: Pipeline, data: bytes, **batch: Any) -> tuple[uuid.UUID, uuid.UUID]:
    tenant = pipeline.tenant()
    batch_id = pipeline.batch(tenant, **batch)
    return batch_id, pipeline.job(tenant, batch_id, data)


def outcomes(pipeline: Pipeline, job: uuid.UUID) -> list[tuple[str, str]]:
    return [(a.model, a.outcome) for a in pipeline.attempts(job)]


def test_rate_limit_with_retry_after_then_success(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(PRIMARY, [{"kind": "rate_limit", "retry_after_ms": 300}])
    _, job = one_job(pipeline, tones(440, 880))
    with worker():
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    attempts = pipeline.attempts(job)
    assert [(a.model, a.outcome, a.http_status) for a in attempts] == [
        (PRIMARY, AttemptOutcome.RETRIED.value, 429),
        (PRIMARY, AttemptOutcome.SUCCESS.value, 200),
    ]
    # The retry waited at least the server's Retry-After.
    gap = (attempts[1].started_at - attempts[0].ended_at).total_seconds()
    assert gap >= 0.29
    assert len(pipeline.costs(job)) == 1
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == "tone440 tone880"
    assert_costs_match_billing(pipeline, fake_openai)


def test_server_errors_past_max_retries_fall_back_to_next_model(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(PRIMARY, ["server_error"] * 3)  # max_retries=2 -> 3 tries
    _, job = one_job(pipeline, tones(500))
    with worker():
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    assert outcomes(pipeline, job) == [
        (PRIMARY, AttemptOutcome.RETRIED.value),
        (PRIMARY, AttemptOutcome.RETRIED.value),
        (PRIMARY, AttemptOutcome.FALLBACK.value),
        (SECOND, AttemptOutcome.SUCCESS.value),
    ]
    assert rows[job].model == SECOND
    assert_costs_match_billing(pipeline, fake_openai)


def test_insufficient_quota_opens_the_providers_circuit_and_one_probe_per_round_tries_it(
    stack: Stack, pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    """Issue #17: quota is the account's. The provider's circuit opens, SECOND (same provider) is never
    sent a request; with no other provider in the chain the job waits for the circuit to half-open, one
    probe of the account per round, and fails `no_model_available` after the last round."""
    fake_openai.exhaust_quota(PRIMARY)
    _, job = one_job(pipeline, tones(600))
    with worker(VOXQ_CIRCUIT_OPEN_SECONDS="1"):
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
        assert circuit_state(stack, "provider:openai") == "open"
    assert (rows[job].status, rows[job].error_code) == (JobStatus.FAILED.value, ModelUnavailable.code)
    assert "provider:openai circuit open" in (rows[job].error_message or "")
    assert not [r for r in fake_openai.request_log() if r.get("model") == SECOND]
    # The first call, then one probe per blocked round (MAX_BLOCKED_ROUNDS), each refused for quota.
    sent = [r for r in fake_openai.request_log() if r.get("model") == PRIMARY]
    assert [r["code"] for r in sent] == ["insufficient_quota"] * 4
    assert outcomes(pipeline, job) == [(PRIMARY, AttemptOutcome.FALLBACK.value)] * 4
    assert circuit_state(stack, PRIMARY) == "closed"  # the model itself was never blamed


def test_model_not_found_retires_the_model(
    stack: Stack, pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.retire(PRIMARY)
    _, job = one_job(pipeline, tones(650))
    with worker():
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    attempts = pipeline.attempts(job)
    assert [(a.model, a.outcome, a.error_code) for a in attempts] == [
        (PRIMARY, AttemptOutcome.FALLBACK.value, "model_not_found"),
        (SECOND, AttemptOutcome.SUCCESS.value, None),
    ]
    assert circuit_state(stack, f"openai:{PRIMARY}") == "retired"


def test_invalid_audio_gets_one_try_on_the_next_model_then_fails_with_the_message(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    third = "gpt-4o-transcribe"
    fake_openai.script(PRIMARY, [{"kind": "invalid_file", "message": "Audio file is corrupted (first)"}])
    fake_openai.script(SECOND, [{"kind": "invalid_file", "message": "Audio file is corrupted (second)"}])
    _, job = one_job(pipeline, tones(720))
    with worker(VOXQ_FALLBACK_MODELS=f"{SECOND},{third}"):
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.FAILED.value
    assert rows[job].error_code == "invalid_audio"
    assert rows[job].error_message == "Audio file is corrupted (first)"
    assert outcomes(pipeline, job) == [
        (PRIMARY, AttemptOutcome.FALLBACK.value),
        (SECOND, AttemptOutcome.FAILED.value),
    ]
    assert pipeline.costs(job) == []
    assert pipeline.transcript(job) is None


def test_413_rechunks_smaller_and_keeps_order(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.script(SECOND, ["too_large"])
    _, job = one_job(pipeline, tones(300, 400, 500, 600, 700, 800), models=[SECOND])
    with worker():
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    attempts = pipeline.attempts(job)
    assert [(a.outcome, a.http_status) for a in attempts] == [
        (AttemptOutcome.RETRIED.value, 413),
        (AttemptOutcome.SUCCESS.value, 200),
        (AttemptOutcome.SUCCESS.value, 200),
    ]
    # The two halves together carry all the audio, in order.
    assert attempts[1].audio_seconds + attempts[2].audio_seconds == pytest.approx(
        attempts[0].audio_seconds, abs=0.01
    )
    transcript = pipeline.transcript(job)
    assert transcript is not None
    assert transcript.text == "tone300 tone400 tone500 tone600 tone700 tone800"
    starts = [s["start"] for s in transcript.segments or []]
    assert starts == sorted(starts) and len(starts) == 6
    assert_costs_match_billing(pipeline, fake_openai)


def test_empty_transcript_for_speech_moves_to_the_next_model(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    # Quiet tones: above our VAD's floor (-50 dBFS) but below the fake's hearing (RMS 0.01): it answers "".
    quiet = wav_bytes(sequence([(440, 1.0)], gap=1.0) * 0.02)
    _, job = one_job(pipeline, quiet)
    with worker():
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job])
    assert rows[job].status == JobStatus.SUCCEEDED.value
    attempts = pipeline.attempts(job)
    assert [(a.model, a.outcome, a.error_code) for a in attempts] == [
        (PRIMARY, AttemptOutcome.FALLBACK.value, "empty_transcript"),
        (SECOND, AttemptOutcome.SUCCESS.value, None),
    ]
    # Both answers were billed and both are accounted for.
    assert len(pipeline.costs(job)) == 2
    assert_costs_match_billing(pipeline, fake_openai)


def test_cost_records_match_the_billing_log_under_random_faults(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(PRIMARY, faults={"server_error": 0.3, "rate_limit": 0.2}, retry_after_ms=50)
    fake_openai.configure(SECOND, faults={"server_error": 0.2})
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, batch, tones(300 + 20 * i)) for i in range(12)]
    with worker(VOXQ_MAX_RETRIES="3"):
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs, timeout=120)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in rows.values())
    assert_costs_match_billing(pipeline, fake_openai)
    # Job and batch totals are the sums of their cost records.
    costs = pipeline.costs()
    for job_id, row in rows.items():
        assert row.cost_usd == sum((c.usd for c in costs if c.job_id == job_id), Decimal(0))
    b = pipeline.batch_row(batch)
    assert b.cost_usd == sum((c.usd for c in costs), Decimal(0))
    assert b.committed_usd == b.cost_usd  # every reservation was settled
    assert b.status == "completed"
    for job_id in jobs:
        assert pipeline.transcript(job_id).text == f"tone{300 + 20 * jobs.index(job_id)}"  # type: ignore[union-attr]


def test_worker_start_warns_about_models_retiring_within_90_days(
    stack: Stack, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    from datetime import date, timedelta

    today = date.today()
    fake_openai.add_model(PRIMARY, shutdown_date=(today + timedelta(days=30)).isoformat())
    fake_openai.add_model(SECOND, shutdown_date=(today + timedelta(days=365)).isoformat())
    log = tmp_path / "worker.log"
    with celery_worker(stack, concurrency=1, queues="maintenance", env=hosted_env(), log_path=log):
        wait_until(lambda: "MODEL RETIRING" in log.read_text(errors="replace"), timeout=60, what="warning")
    lines = [line for line in log.read_text(errors="replace").splitlines() if "MODEL RETIRING" in line]
    assert len(lines) == 1 and PRIMARY in lines[0]
    assert (today + timedelta(days=30)).isoformat() in lines[0]


def test_an_open_circuit_delays_jobs_instead_of_failing_them(
    stack: Stack, pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI
) -> None:
    import time

    import redis.asyncio as aioredis

    from worker.circuit import CircuitBreaker

    async def trip() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            breaker = CircuitBreaker(client, failure_threshold=5, open_seconds=3)
            await breaker.trip(f"openai:{PRIMARY}", seconds=3)  # circuits are per chain entry
        finally:
            await client.aclose()

    _, job = one_job(pipeline, tones(560), models=[PRIMARY])
    with worker(VOXQ_CIRCUIT_OPEN_SECONDS="1"):
        asyncio.run(trip())
        tripped_at = time.time()
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job], timeout=60)
    assert rows[job].status == JobStatus.SUCCEEDED.value
    (attempt,) = pipeline.attempts(job)
    assert attempt.outcome == AttemptOutcome.SUCCESS.value
    assert attempt.started_at.timestamp() >= tripped_at + 2.5  # waited for the circuit to half-open
