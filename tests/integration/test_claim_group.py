"""A group's claim (`claim_group_run`): one statement, one round trip, against real Postgres.

The lease is taken by compare-and-set on the group's still-processing jobs only, the group is marked
running (once: a done group stays done), and each claimed job comes back with its chunk plan (in index
order), its kept answers and its batch's options.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import event, select, update

from core.db import get_engine, session_scope
from core.models import Group, Job
from core.statuses import GroupStatus, JobStatus
from tests.pipeline_support import pending_attempt_row, processing_job, processing_job_rows
from tests.support import Stack
from worker.store.answers import KeptAnswer, keep_answer, stored_answer
from worker.store.batches import load_batches
from worker.store.claims import claim_group, claim_group_run, finish_group
from worker.store.groups import GroupPlan, assign_groups, save_chunks

SOON = datetime.now(UTC) + timedelta(seconds=5)


def _sibling(of: uuid.UUID, **values: Any) -> uuid.UUID:
    """Another job of the same batch as job `of`."""
    with session_scope() as s:
        first = s.get(Job, of)
        assert first is not None
        job = processing_job(
            first.tenant_id, first.batch_id, object_key="k2", filename="b.wav", sha256="1" * 64, **values
        )
        s.add(job)
        s.flush()
        return job.id


def _group(tenant_id: uuid.UUID, batch_id: uuid.UUID, jobs: list[uuid.UUID]) -> uuid.UUID:
    plan = GroupPlan(tenant_id, batch_id, "k", "short", [(j, 15.0) for j in jobs], ["m"], "normal")
    (gid,) = assign_groups([plan])
    return gid


def _lease(job_id: uuid.UUID) -> tuple[str | None, datetime | None]:
    with session_scope() as s:
        row = s.execute(select(Job.lease_owner, Job.lease_expires_at).where(Job.id == job_id)).one()
    return row[0], row[1]


def _group_status(gid: uuid.UUID) -> str:
    with session_scope() as s:
        return str(s.execute(select(Group.status).where(Group.id == gid)).scalar_one())


@contextmanager
def _statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_claim_group_run_leases_processing_jobs_and_loads_plan_answers_and_batch(stack: Stack) -> None:
    rows = processing_job_rows(lease_owner="old:1", lease_expires_at=SOON, budget_usd=Decimal("12.50"))
    chunked = rows.job_id
    plain = _sibling(chunked, lease_owner="old:1", lease_expires_at=SOON, duration_seconds=15.0)
    ended = _sibling(chunked, lease_owner="old:1", lease_expires_at=SOON)
    gid = _group(rows.tenant_id, rows.batch_id, [chunked, plain, ended])
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == ended).values(status=JobStatus.SUCCEEDED.value))
        s.execute(update(Job).where(Job.id == chunked).values(time_map={"v": 1}, speech_seconds=9.5))
    # Chunks saved out of order; answers for one chunk (kept by an earlier run) and the whole plain job.
    save_chunks(
        chunked,
        [
            {"index": 1, "start_seconds": 600.0, "end_seconds": 1200.0, "object_key": "c1"},
            {"index": 0, "start_seconds": 0.0, "end_seconds": 600.0, "object_key": "c0"},
        ],
    )
    attempt = pending_attempt_row(rows.tenant_id, chunked, model="m")
    segments = [{"start": 0.25, "end": 1.5, "text": "hi"}]
    keep_answer(KeptAnswer(chunked, 1, 590.125, 1190.0, "one", segments, "en", "m", attempt))
    plain_attempt = pending_attempt_row(rows.tenant_id, plain, model="m2")
    keep_answer(KeptAnswer(plain, None, 0.0, 14.5, "whole", [], None, "m2", plain_attempt))

    with _statements() as seen:
        jobs, batches = claim_group_run(gid, owner="new:1", lease_seconds=600)
    assert len(seen) == 1  # one round trip

    assert [j.id for j in jobs] == sorted([chunked, plain])  # the ended job is not claimed
    by_id = {j.id: j for j in jobs}
    c, p = by_id[chunked], by_id[plain]
    assert (c.tenant_id, c.batch_id, c.time_map, c.speech_seconds) == (
        rows.tenant_id,
        rows.batch_id,
        {"v": 1},
        9.5,
    )
    assert c.chunks == [{"index": 0, "object_key": "c0"}, {"index": 1, "object_key": "c1"}]
    assert c.answers == {
        "chunk:1": {
            "start_seconds": 590.125,
            "end_seconds": 1190.0,
            "text": "one",
            "segments": segments,
            "language": "en",
            "model": "m",
            "attempt_id": attempt,
        }
    }
    assert isinstance(c.answers["chunk:1"]["attempt_id"], uuid.UUID)
    assert (p.duration_seconds, p.time_map, p.chunks) == (15.0, {}, [])
    assert p.answers["whole"]["attempt_id"] == plain_attempt and p.answers["whole"]["language"] is None
    # The stored answer is found for the same bounds, as before.
    assert stored_answer(c, 1, 590.125, 1190.0) is not None

    assert batches == load_batches({rows.batch_id})
    assert batches[rows.batch_id].budget_usd == Decimal("12.50")

    for job in (chunked, plain):
        owner, expires = _lease(job)
        assert owner == "new:1" and expires is not None and expires > SOON + timedelta(seconds=500)
    assert _lease(ended) == ("old:1", SOON)
    assert _group_status(gid) == GroupStatus.RUNNING.value
    # `claim_group` (the local worker's) is the same claim without the batches.
    assert [j.id for j in claim_group(gid, owner="new:2", lease_seconds=600)] == sorted([chunked, plain])


def test_claim_group_run_only_these_jobs(stack: Stack) -> None:
    rows = processing_job_rows(lease_owner="old:1", lease_expires_at=SOON)
    other = _sibling(rows.job_id, lease_owner="old:1", lease_expires_at=SOON)
    gid = _group(rows.tenant_id, rows.batch_id, [rows.job_id, other])
    jobs, batches = claim_group_run(gid, owner="new:1", lease_seconds=600, only=[other])
    assert [j.id for j in jobs] == [other] and list(batches) == [rows.batch_id]
    assert _lease(rows.job_id) == ("old:1", SOON)
    assert _lease(other)[0] == "new:1"
    jobs, batches = claim_group_run(gid, owner="new:1", lease_seconds=600, only=[])
    assert (jobs, batches) == ([], {})


def test_claim_group_run_of_an_ended_group_claims_nothing_and_keeps_it_done(stack: Stack) -> None:
    rows = processing_job_rows(lease_owner="old:1", lease_expires_at=SOON)
    gid = _group(rows.tenant_id, rows.batch_id, [rows.job_id])
    with session_scope() as s:
        s.execute(update(Job).where(Job.id == rows.job_id).values(status=JobStatus.SUCCEEDED.value))
    finish_group(gid)
    assert _group_status(gid) == GroupStatus.DONE.value
    assert claim_group_run(gid, owner="new:1", lease_seconds=600) == ([], {})
    assert _group_status(gid) == GroupStatus.DONE.value
    assert _lease(rows.job_id) == ("old:1", SOON)
