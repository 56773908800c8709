"""Lease renewal of a running group (`worker.transcribe.keep_leases` → `extend_leases`).

A lease left to run out makes the sweeper hand jobs that are still being transcribed to another worker.
The renewal loop must outlive a failed renewal; here the failure is a real one from Postgres (a CHECK
constraint that refuses this test's lease owner for a while), no mock.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, text, update

from core.db import session_scope
from core.models import Job
from core.statuses import JobStatus
from tests.pipeline_support import processing_job_rows
from tests.support import Stack
from worker.store.claims import extend_leases
from worker.transcribe import keep_leases


def _lease(job_id: uuid.UUID) -> tuple[str | None, datetime | None]:
    with session_scope() as s:
        row = s.execute(select(Job.lease_owner, Job.lease_expires_at).where(Job.id == job_id)).one()
    return row[0], row[1]


def test_extend_leases_renews_only_jobs_still_processing(stack: Stack) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=5)
    live = processing_job_rows(lease_owner="run:1", lease_expires_at=soon).job_id
    ended = processing_job_rows(lease_owner="run:1", lease_expires_at=soon).job_id
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == ended).values(status=JobStatus.SUCCEEDED.value))
    assert extend_leases([ended, live], owner="run:1", group_id=None, lease_seconds=600) == 1
    owner, expires = _lease(live)
    assert owner == "run:1" and expires is not None and expires > soon + timedelta(seconds=500)
    assert _lease(ended) == ("run:1", soon)


def test_lease_renewal_goes_on_after_a_failed_renewal(stack: Stack) -> None:
    owner = f"renew-{uuid.uuid4().hex[:8]}:1"
    start = datetime.now(UTC) + timedelta(seconds=30)
    job = processing_job_rows(lease_owner=owner, lease_expires_at=start).job_id
    constraint = f"no_{owner.split(':')[0].replace('-', '_')}"

    async def scenario() -> tuple[datetime | None, datetime | None]:
        with session_scope() as s:  # every renewal is refused by Postgres from now on
            check = f"CHECK (lease_owner <> '{owner}') NOT VALID"
            s.execute(text(f"ALTER TABLE jobs ADD CONSTRAINT {constraint} {check}"))
        renewer = asyncio.ensure_future(
            keep_leases([job], owner=owner, group_id=None, lease_seconds=600, every=0.2)
        )
        try:
            await asyncio.sleep(0.7)  # several renewals fail
            during = _lease(job)[1]
            with session_scope() as s:
                s.execute(text(f"ALTER TABLE jobs DROP CONSTRAINT {constraint}"))
            await asyncio.sleep(0.7)  # the next renewals succeed
            return during, _lease(job)[1]
        finally:
            renewer.cancel()
            with session_scope() as s:
                s.execute(text(f"ALTER TABLE jobs DROP CONSTRAINT IF EXISTS {constraint}"))

    during, after = asyncio.run(scenario())
    assert during == start  # refused: unchanged
    assert after is not None and after > start + timedelta(seconds=500)  # renewed once allowed again
