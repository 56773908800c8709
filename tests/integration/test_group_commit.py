"""Group commit of completions (`worker.runtime.CompletionWriter` → `worker.completion.succeed_jobs`):
jobs answered at the same moment are written by one transaction, with the rules of one job each: every
answered attempt closed once with one cost record, the batch's totals exact, a job whose compare-and-set
is lost still gets its attempt's close, and a group whose transaction fails is written job by job instead.

Real Postgres; the writer and the store are the real code.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select, update

from core.db import session_scope
from core.models import Attempt, Batch, CostRecord, Job, JobAnswer, Tenant, Transcript
from core.pricing import PricedUsage
from core.statuses import AttemptOutcome, BatchStatus, JobStatus
from tests.pipeline_support import processing_job
from tests.support import Stack
from worker.completion import JobSuccess, Succeeded
from worker.runtime import CompletionWriter
from worker.store.answers import KeptAnswer
from worker.store.attempts import AttemptClose, PendingAttempt, open_attempts

MODEL = "gpt-4o-mini-transcribe"


def _batch_with_jobs(count: int) -> tuple[uuid.UUID, uuid.UUID, list[uuid.UUID]]:
    """A tenant, a processing batch and `count` processing jobs of 10 + i seconds, each with an attempt
    in flight (pending)."""
    with session_scope() as s:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        batch = Batch(tenant_id=tenant.id, status=BatchStatus.PROCESSING.value)
        s.add(batch)
        s.flush()
        jobs = [
            Job(
                tenant_id=tenant.id,
                batch_id=batch.id,
                object_key=f"k{i}",
                filename="a.wav",
                bytes=1,
                sha256=f"{i:064d}",
                status=JobStatus.PROCESSING.value,
                priority="normal",
                duration_seconds=10.0 + i,
                lease_owner="alive:1",
                lease_expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
            for i in range(count)
        ]
        s.add_all(jobs)
        s.flush()
        ids = [j.id for j in jobs]
        records_ = [
            PendingAttempt(
                id=uuid.uuid4(),
                tenant_id=tenant.id,
                job_id=j,
                chunk_index=None,
                model=MODEL,
                provider="openai",
                retry_number=0,
                audio_seconds=10.0,
                request_bytes=1,
                worker="w:1",
            )
            for j in ids
        ]
    open_attempts(records_)
    return tenant.id, batch.id, ids


def _success(tenant: uuid.UUID, batch: uuid.UUID, job: uuid.UUID, i: int) -> JobSuccess:
    with session_scope() as s:
        attempt = s.execute(select(Attempt.id).where(Attempt.job_id == job)).scalar_one()
    priced = PricedUsage(usd=Decimal("0.001") * (i + 1), billed_audio_seconds=10.0 + i, usage_type="duration")
    answer = KeptAnswer(
        job_id=job,
        index=None,
        start_seconds=0.0,
        end_seconds=10.0 + i,
        text=f"text {i}",
        segments=[{"start": 0.0, "end": 10.0 + i, "text": f"text {i}"}],
        language="en",
        model=MODEL,
        attempt_id=attempt,
    )
    close = AttemptClose(
        attempt_id=attempt,
        outcome=AttemptOutcome.SUCCESS,
        latency_ms=2000.0 + i,
        tenant_id=tenant,
        batch_id=batch,
        job_id=job,
        model=MODEL,
        http_status=200,
        priced=priced,
        usage={"type": "duration", "seconds": 10.0 + i},
        answer=answer,
    )
    return JobSuccess(
        job_id=job,
        group_id=None,
        text=f"text {i}",
        segments=answer.segments,
        language="en",
        model=MODEL,
        attempt_id=attempt,
        provenance={"attempt_ids": [str(attempt)]},
        close=close,
    )


async def _write_all(rows: list[JobSuccess]) -> list[Any]:
    writer = CompletionWriter()
    return await asyncio.gather(*(writer.succeed(r) for r in rows), return_exceptions=True)


def _state(batch: uuid.UUID) -> dict[str, Any]:
    with session_scope() as s:
        b = s.get(Batch, batch)
        assert b is not None
        attempts = list(s.execute(select(Attempt)).scalars())
        costs = list(s.execute(select(CostRecord)).scalars())
        return {
            "totals": (
                b.audio_seconds,
                b.billed_seconds,
                b.cost_usd.normalize(),
                b.committed_usd.normalize(),
            ),
            "attempts": {a.job_id: a for a in attempts},
            "costs": costs,
            "transcripts": {t.job_id: t for t in s.execute(select(Transcript)).scalars()},
            "answers": {a.job_id: a for a in s.execute(select(JobAnswer)).scalars()},
            "jobs": {j.id: j for j in s.execute(select(Job)).scalars()},
            "cost_txns": s.execute(select(func.count(func.distinct(CostRecord.created_at)))).scalar(),
        }


def test_answers_completed_together_share_one_transaction_with_exact_totals(stack: Stack) -> None:
    tenant, batch, jobs = _batch_with_jobs(40)
    lost, follower_of = jobs[5], jobs[7]
    with session_scope() as s:
        # Job 5 lost its run (the sweeper requeued it) while its answer was on the way.
        s.execute(update(Job).where(Job.id == lost).values(status=JobStatus.QUEUED.value))
        # Job 7 has a dedupe follower waiting for its transcript.
        s.execute(update(Job).where(Job.id == follower_of).values(fingerprint="f" * 64))
        follower = processing_job(
            tenant,
            batch,
            object_key="kf",
            filename="b.wav",
            sha256="f" * 64,
            fingerprint="f" * 64,
            deduplicated_from_id=follower_of,
        )
        s.add(follower)
        s.flush()
        follower_id = follower.id
    rows = [_success(tenant, batch, j, i) for i, j in enumerate(jobs)]

    results = asyncio.run(_write_all(rows))

    state = _state(batch)
    assert state["cost_txns"] == 1  # one transaction wrote every cost record (created_at = its start)
    won = [j for j in jobs if j != lost]
    for job, result in zip(jobs, results, strict=True):
        if job == lost:
            assert result is None
        else:
            assert isinstance(result, Succeeded)
            assert result.followers == ([follower_id] if job == follower_of else [])
    # Every attempt closed once, with one cost record; the lost job's too (its answer was paid for).
    assert {j: a.outcome for j, a in state["attempts"].items()} == dict.fromkeys(jobs, "success")
    assert all(a.ended_at is not None and a.http_status == 200 for a in state["attempts"].values())
    assert sorted(c.attempt_id for c in state["costs"]) == sorted(a.id for a in state["attempts"].values())
    assert set(state["answers"]) == set(jobs)  # kept for any later run, the lost job's included
    assert set(state["transcripts"]) == set(won)
    assert state["jobs"][lost].status == JobStatus.QUEUED.value
    assert all(state["jobs"][j].status == JobStatus.SUCCEEDED.value for j in won)
    for i, job in enumerate(jobs):
        assert state["jobs"][job].cost_usd.normalize() == (Decimal("0.001") * (i + 1)).normalize()
        assert state["jobs"][job].billed_seconds == 10.0 + i
    usd = sum((Decimal("0.001") * (i + 1) for i in range(40)), Decimal(0))
    audio = sum(10.0 + i for i, j in enumerate(jobs) if j != lost)
    billed = sum(10.0 + i for i in range(40))
    assert state["totals"] == (audio, billed, usd.normalize(), usd.normalize())

    # The same answers again (a redelivered task): nothing is billed twice, no job moves.
    again = asyncio.run(_write_all(rows))
    assert again == [None] * 40
    after = _state(batch)
    assert len(after["costs"]) == 40 and after["totals"] == state["totals"]


def test_a_failed_group_is_written_job_by_job_and_only_the_bad_row_fails(stack: Stack) -> None:
    tenant, batch, jobs = _batch_with_jobs(12)
    rows = [_success(tenant, batch, j, i) for i, j in enumerate(jobs)]
    assert rows[3].close is not None
    # A close whose attempt row does not exist: its cost record breaks the group's transaction.
    ghost = uuid.uuid4()
    bad_close = AttemptClose(**{**vars(rows[3].close), "attempt_id": ghost, "answer": None})
    rows[3] = JobSuccess(**{**vars(rows[3]), "close": bad_close, "attempt_id": None})

    results = asyncio.run(_write_all(rows))

    assert isinstance(results[3], Exception)
    assert all(isinstance(r, Succeeded) for i, r in enumerate(results) if i != 3)
    state = _state(batch)
    good = [j for i, j in enumerate(jobs) if i != 3]
    assert sorted(c.attempt_id for c in state["costs"]) == sorted(state["attempts"][j].id for j in good)
    assert state["attempts"][jobs[3]].outcome == AttemptOutcome.PENDING.value  # the sweeper's to settle
    assert set(state["transcripts"]) == set(good)
    usd = sum((Decimal("0.001") * (i + 1) for i in range(12) if i != 3), Decimal(0))
    audio = sum(10.0 + i for i in range(12) if i != 3)
    assert state["totals"] == (audio, audio, usd.normalize(), usd.normalize())
