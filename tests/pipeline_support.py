"""Helpers for pipeline tests: tenants, batches and queued jobs written straight to Postgres and S3."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from core.models import Attempt, Batch, CostRecord, Job, JobAnswer, JobChunk, Tenant, Transcript
from core.statuses import JOB_TERMINAL, BatchStatus, JobStatus
from core.storage import Storage, content_key
from tests.audio_fixtures import sequence, wav_bytes
from tests.fakes.openai_server import FakeOpenAI
from tests.support import Stack, wait_until

PRIMARY = "gpt-4o-mini-transcribe"
SECOND = "whisper-1"

WorkerFactory = Callable[..., AbstractContextManager[Any]]


def hosted_env(**overrides: str) -> dict[str, str]:
    """Worker settings for hosted-chain tests: fast retries, a two-model chain, no local engine."""
    env = {
        "VOXQ_PRIMARY_MODEL": PRIMARY,
        "VOXQ_FALLBACK_MODELS": SECOND,
        "VOXQ_MAX_RETRIES": "2",
        "VOXQ_RETRY_BASE_SECONDS": "0.05",
        "VOXQ_RETRY_MAX_SECONDS": "0.2",
        "VOXQ_CIRCUIT_FAILURE_THRESHOLD": "50",
    }
    env.update(overrides)
    return env


def tones(*freqs: int, seconds: float = 0.8, gap: float = 1.0) -> bytes:
    """A WAV of tones separated by silence; the fake hears `tone<F> …` in order."""
    return wav_bytes(sequence([(f, seconds) for f in freqs], gap=gap))


async def held_slots(redis: Any, provider: str) -> int:
    """Slots of `provider`'s fleet-wide in-flight cap held now (leases not ended: worker.inflight)."""
    from core import names

    now_s, now_us = await redis.time()
    now_ms = int(now_s) * 1000 + int(now_us) // 1000
    return int(await redis.zcount(names.KEY_INFLIGHT + provider, f"({now_ms}", "+inf"))


def circuit_state(stack: Stack, model: str) -> str:
    """The circuit of a chain entry (its `provider:model` key; a bare name is openai's), or of a provider's
    account (`provider:<name>`)."""
    import redis.asyncio as aioredis

    from core.providers.config import ModelRef
    from worker.circuit import PROVIDER_KEY_PREFIX, CircuitBreaker

    key = model if model.startswith(PROVIDER_KEY_PREFIX) else str(ModelRef.of_entry(model))

    async def read() -> str:
        client = aioredis.Redis.from_url(stack.redis_url)
        try:
            return await CircuitBreaker(client, failure_threshold=5, open_seconds=30).state(key)
        finally:
            await client.aclose()

    return asyncio.run(read())


def assert_costs_match_billing(pipeline: Pipeline, fake: FakeOpenAI) -> None:
    """Every billed request has exactly one cost record with the same usage, and nothing else does."""
    billed = {entry["request_id"]: entry for entry in fake.billing_log()}
    costs = {str(c.attempt_id): c for c in pipeline.costs()}
    assert set(costs) == set(billed)
    for request_id, entry in billed.items():
        cost = costs[request_id]
        assert cost.model == entry["model"]
        usage = entry["usage"]
        assert cost.usage_type == usage["type"]
        if usage["type"] == "tokens":
            assert cost.input_tokens == usage["input_tokens"]
            assert cost.output_tokens == usage["output_tokens"]
            assert cost.input_audio_tokens == usage["input_token_details"]["audio_tokens"]
        else:
            assert cost.billed_audio_seconds == pytest.approx(usage["seconds"])
        assert cost.usd == Decimal(entry["usd"])  # what the provider says it charged


class JobRows(NamedTuple):
    """The ids `processing_job_rows` wrote."""

    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    job_id: uuid.UUID


def processing_job(
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    *,
    object_key: str = "k",
    filename: str = "a.wav",
    sha256: str = "0" * 64,
    **values: Any,
) -> Job:
    """A `processing` job row (not added to any session) with no audio behind it, for tests of the store."""
    return Job(
        tenant_id=tenant_id,
        batch_id=batch_id,
        object_key=object_key,
        filename=filename,
        bytes=1,
        sha256=sha256,
        status=JobStatus.PROCESSING.value,
        priority="normal",
        **values,
    )


def processing_job_rows(
    *,
    tenant_name: str | None = None,
    budget_usd: Decimal | None = None,
    lease_owner: str | None = None,
    lease_expires_at: datetime | None = None,
) -> JobRows:
    """A tenant, a `processing` batch and a `processing` job (no audio behind it), written through this
    process's database settings (`core.db`): for tests of records, the sweeper and settlement, no worker."""
    from core.db import session_scope

    with session_scope() as s:
        tenant = Tenant(name=tenant_name or f"t-{uuid.uuid4().hex[:8]}")
        s.add(tenant)
        s.flush()
        batch = Batch(tenant_id=tenant.id, status=BatchStatus.PROCESSING.value, budget_usd=budget_usd)
        s.add(batch)
        s.flush()
        job = processing_job(tenant.id, batch.id, lease_owner=lease_owner, lease_expires_at=lease_expires_at)
        s.add(job)
        s.flush()
        return JobRows(tenant.id, batch.id, job.id)


def pending_attempt_row(tenant_id: uuid.UUID, job_id: uuid.UUID, *, model: str, **values: Any) -> uuid.UUID:
    """A hosted call's attempt, still `pending` (as written before the call), through `core.db`; `values`
    sets other columns (`provider`, `openai` by default; `started_at`, `audio_seconds`, `worker`, ...)."""
    from core.db import session_scope

    with session_scope() as s:
        attempt = Attempt(tenant_id=tenant_id, job_id=job_id, model=model, **{"provider": "openai", **values})
        s.add(attempt)
        s.flush()
        return attempt.id


class Pipeline:
    """Creates rows and objects for pipeline tests and reads results back."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.engine: Engine = create_engine(stack.database_url)
        self.storage = Storage()

    def close(self) -> None:
        """Dispose the engine."""
        self.engine.dispose()

    def tenant(self, name: str | None = None) -> uuid.UUID:
        """A new tenant."""
        with Session(self.engine) as s, s.begin():
            t = Tenant(name=name or f"t-{uuid.uuid4().hex[:8]}")
            s.add(t)
            s.flush()
            return t.id

    def batch(self, tenant_id: uuid.UUID, **options: Any) -> uuid.UUID:
        """A new batch in `processing` (as the API leaves it after submit)."""
        with Session(self.engine) as s, s.begin():
            b = Batch(tenant_id=tenant_id, status=BatchStatus.PROCESSING.value, **options)
            s.add(b)
            s.flush()
            return b.id

    def job(
        self, tenant_id: uuid.UUID, batch_id: uuid.UUID, data: bytes, *, filename: str = "a.wav"
    ) -> uuid.UUID:
        """Upload `data` under its content key and add a `queued` job for it."""
        sha = hashlib.sha256(data).hexdigest()
        key = content_key(str(tenant_id), sha)
        self.storage.upload_bytes(data, key)
        with Session(self.engine) as s, s.begin():
            priority = s.execute(select(Batch.priority).where(Batch.id == batch_id)).scalar_one()
            j = Job(
                tenant_id=tenant_id,
                batch_id=batch_id,
                object_key=key,
                filename=filename,
                bytes=len(data),
                sha256=sha,
                status=JobStatus.QUEUED.value,
                priority=priority,
            )
            s.add(j)
            s.flush()
            return j.id

    def submit(self, job_ids: list[uuid.UUID], priority: str = "normal") -> None:
        """Send prepare tasks the way the API does."""
        from api.enqueue import enqueue_jobs, producer

        producer.cache_clear()
        enqueue_jobs(job_ids, priority=priority)

    def jobs(self, job_ids: list[uuid.UUID]) -> dict[uuid.UUID, Job]:
        """Current rows of these jobs."""
        with Session(self.engine) as s:
            return {j.id: j for j in s.execute(select(Job).where(Job.id.in_(job_ids))).scalars()}

    def wait_terminal(self, job_ids: list[uuid.UUID], timeout: float = 90) -> dict[uuid.UUID, Job]:
        """Wait until every job is terminal; return them."""
        terminal = {s.value for s in JOB_TERMINAL}

        def done() -> dict[uuid.UUID, Job] | None:
            rows = self.jobs(job_ids)
            ok = len(rows) == len(job_ids) and all(j.status in terminal for j in rows.values())
            return rows if ok else None

        return wait_until(done, timeout=timeout, interval=0.2, what="jobs terminal")

    def transcript(self, job_id: uuid.UUID) -> Transcript | None:
        """The job's transcript."""
        with Session(self.engine) as s:
            return s.execute(select(Transcript).where(Transcript.job_id == job_id)).scalar_one_or_none()

    def transcripts(self, job_id: uuid.UUID) -> list[Transcript]:
        """Every transcript row of the job (there must be at most one)."""
        with Session(self.engine) as s:
            return list(s.execute(select(Transcript).where(Transcript.job_id == job_id)).scalars())

    def attempts(self, job_id: uuid.UUID | None = None) -> list[Attempt]:
        """Attempts (of one job, or all), oldest first."""
        with Session(self.engine) as s:
            q = select(Attempt).order_by(Attempt.started_at, Attempt.id)
            if job_id is not None:
                q = q.where(Attempt.job_id == job_id)
            return list(s.execute(q).scalars())

    def chunks(self, job_id: uuid.UUID) -> list[JobChunk]:
        """The job's chunk plan, in index order."""
        with Session(self.engine) as s:
            q = select(JobChunk).where(JobChunk.job_id == job_id).order_by(JobChunk.index)
            return list(s.execute(q).scalars())

    def answers(self, job_id: uuid.UUID) -> dict[str, JobAnswer]:
        """The job's kept paid answers, by piece (`whole` or `chunk:<index>`)."""
        with Session(self.engine) as s:
            return {
                a.piece: a for a in s.execute(select(JobAnswer).where(JobAnswer.job_id == job_id)).scalars()
            }

    def keep_chunk_answer(self, job_id: uuid.UUID, index: int, text: str, *, model: str = PRIMARY) -> None:
        """Keep an answer for one chunk of a prepared job, as an earlier run that paid for it would have
        (the chunk's bounds from the job's time map: the same piece of the same plan)."""
        from worker.audio import TimeMap

        start, end = TimeMap.from_json(self.jobs([job_id])[job_id].time_map).chunks[index]
        with Session(self.engine) as s, s.begin():
            s.add(
                JobAnswer(
                    job_id=job_id,
                    piece=f"chunk:{index}",
                    start_seconds=start,
                    end_seconds=end,
                    text=text,
                    segments=[],
                    model=model,
                )
            )

    def costs(self, job_id: uuid.UUID | None = None) -> list[CostRecord]:
        """Cost records (of one job, or all)."""
        with Session(self.engine) as s:
            q = select(CostRecord)
            if job_id is not None:
                q = q.where(CostRecord.job_id == job_id)
            return list(s.execute(q).scalars())

    def batch_row(self, batch_id: uuid.UUID) -> Batch:
        """The batch row."""
        with Session(self.engine) as s:
            return s.execute(select(Batch).where(Batch.id == batch_id)).scalar_one()


def usd(value: Decimal | str | float) -> Decimal:
    """A Decimal for comparisons."""
    return Decimal(str(value))
