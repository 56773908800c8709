"""Claims and leases: which worker holds which job, for how long, and how a held job ends.

- A job is claimed `queued → processing` in bulk (one `UPDATE … RETURNING`), with a lease
  (`lease_owner`, `lease_expires_at`) and `run_count + 1` (the attempt counter lives in Postgres).
- The transcribe stage claims a group's still-processing jobs (`claim_group_run`): a job whose
  `group_id` is no longer the group's (requeued, ended) is not claimed.
- A job ends (`end_job`) by compare-and-set on `processing` (and, given one, its group).
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, update

from core import metrics
from core.billing import add_batch_totals
from core.db import durable, session_scope
from core.models import Batch, Group, Job
from core.names import LOCAL_LEASE_PREFIX, LOCAL_QUEUE_OWNER
from core.statuses import BatchStatus, GroupStatus, JobStatus
from worker.store.batches import BatchOptions, load_batches_in, model_list
from worker.store.groups import GroupJob
from worker.store.sql import now, run_sql


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now holds, with its batch's options."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    object_key: str | None
    source_uri: str | None
    run_count: int
    batch: BatchOptions
    size_bytes: int | None = None  # size of the uploaded object (None for an imported `source_uri`)
    owner: str = ""  # the lease owner this claim wrote (compare-and-set of `release_soon`)


def claim_jobs(job_ids: list[uuid.UUID], *, owner: str, lease_seconds: float) -> list[ClaimedJob]:
    """Claim the still-queued ones of these jobs (`queued → processing`, lease, run_count + 1)."""
    if not job_ids:
        return []
    ts = now()
    with session_scope() as session:
        rows = session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value, Job.deleted_at.is_(None))
            .values(
                status=JobStatus.PROCESSING.value,
                lease_owner=owner,
                lease_expires_at=ts + timedelta(seconds=lease_seconds),
                run_count=Job.run_count + 1,
                started_at=func.coalesce(Job.started_at, ts),
                group_id=None,
                deduplicated_from_id=None,
                fingerprint=None,  # set again by `dedupe`, which is what makes it a leader
                error_code=None,
                error_message=None,
            )
            .returning(
                Job.id, Job.tenant_id, Job.batch_id, Job.object_key, Job.source_uri, Job.run_count, Job.bytes
            )
        ).all()
        batch_ids = {r.batch_id for r in rows}
        if batch_ids:
            # "open" means nothing submitted yet; a claimed job means the batch is under way.
            session.execute(
                update(Batch)
                .where(Batch.id.in_(batch_ids), Batch.status == BatchStatus.OPEN.value)
                .values(
                    status=BatchStatus.PROCESSING.value, submitted_at=func.coalesce(Batch.submitted_at, ts)
                )
            )
        batches = load_batches_in(session, batch_ids) if batch_ids else {}
    order = {jid: i for i, jid in enumerate(job_ids)}
    claimed = [
        ClaimedJob(
            id=r.id,
            tenant_id=r.tenant_id,
            batch_id=r.batch_id,
            object_key=r.object_key,
            source_uri=r.source_uri,
            run_count=r.run_count,
            batch=batches[r.batch_id],
            size_bytes=r.bytes,
            owner=owner,
        )
        for r in rows
    ]
    claimed.sort(key=lambda c: order.get(c.id, 0))
    return claimed


def _held(owner: str, group_id: uuid.UUID | None) -> list[ColumnElement[bool]]:
    """The compare-and-set condition of a lease holder: still processing, under this owner and run token
    (the group id; None: a prepare run, before its job has a group)."""
    run = Job.group_id.is_(None) if group_id is None else Job.group_id == group_id
    return [Job.status == JobStatus.PROCESSING.value, Job.lease_owner == owner, run]


def extend_leases(
    job_ids: list[uuid.UUID], *, owner: str, group_id: uuid.UUID | None, lease_seconds: float
) -> int:
    """Renew the lease of jobs this run holds; returns how many it still holds.

    Compare-and-set on the lease owner and the run token: a stale run (its job requeued by the sweeper,
    claimed by another run, or handed to the local engine) neither keeps another run's lease alive nor
    takes it over.
    """
    if not job_ids:
        return 0
    held = _held(owner, group_id)
    # Rows locked in id order (the completion writer's order too): two transactions locking the same jobs
    # in different orders deadlock, and Postgres then aborts one of them.
    locked = select(Job.id).where(Job.id.in_(job_ids), *held).order_by(Job.id).with_for_update()
    with session_scope() as session:
        result = session.execute(
            update(Job)
            .where(Job.id.in_(locked.scalar_subquery()), *held)
            .values(lease_expires_at=now() + timedelta(seconds=lease_seconds))
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def release_soon(job_id: uuid.UUID, *, owner: str, group_id: uuid.UUID | None, after_seconds: float) -> bool:
    """Let a job's lease run out soon after an unexpected error, so the sweeper gives it another run;
    False when this run no longer holds the job (compare-and-set on owner and run token)."""
    with session_scope() as session:
        row = session.execute(
            update(Job)
            .where(Job.id == job_id, *_held(owner, group_id))
            .values(lease_expires_at=now() + timedelta(seconds=after_seconds))
            .returning(Job.id)
        ).first()
    return row is not None


def release_after_outage(
    job_id: uuid.UUID, *, owner: str, group_id: uuid.UUID | None, base_seconds: float, cap_seconds: float
) -> float | None:
    """After an infrastructure outage stopped this run: the run is not counted (`run_count - 1`: an
    outage delays a job, it never fails it with `too_many_attempts`) and the lease ends after a wait that
    grows with how long the job has been under way (half to all of the time since its first claim, so
    about doubling from one outage retry to the next), between `base_seconds` and `cap_seconds`. The
    wait, or None when this run no longer holds the job (compare-and-set on owner and run token)."""
    held = _held(owner, group_id)
    with session_scope() as session:
        row = session.execute(select(Job.started_at).where(Job.id == job_id, *held).with_for_update()).first()
        if row is None:
            return None
        ts = now()
        waited = (ts - row.started_at).total_seconds() if row.started_at is not None else 0.0
        ceiling = min(max(base_seconds, waited), cap_seconds)
        wait = ceiling * random.uniform(0.5, 1.0)  # spread a fleet's jobs out, never hammer a recovering S3
        session.execute(
            update(Job)
            .where(Job.id == job_id, *held)
            .values(
                lease_expires_at=ts + timedelta(seconds=wait),
                run_count=func.greatest(Job.run_count - 1, 0),
            )
        )
    return wait


def hand_off_local(job_id: uuid.UUID, *, owner: str, group_id: uuid.UUID, lease_seconds: float) -> bool:
    """Hand a job this run holds to the local queue: its lease passes to `LOCAL_QUEUE_OWNER` for
    `lease_seconds` (a queue wait is not a dead worker; the sweeper sends it to the local queue again
    if that runs out, never to the hosted chain). False when this run no longer holds the job."""
    with session_scope() as session:
        row = session.execute(
            update(Job)
            .where(Job.id == job_id, *_held(owner, group_id))
            .values(lease_owner=LOCAL_QUEUE_OWNER, lease_expires_at=now() + timedelta(seconds=lease_seconds))
            .returning(Job.id)
        ).first()
    return row is not None


def _processing_job(job_id: uuid.UUID, group_id: uuid.UUID | None) -> list[ColumnElement[bool]]:
    """The compare-and-set condition for finishing a job: still processing (and, given one, in this group)."""
    conditions: list[ColumnElement[bool]] = [Job.id == job_id, Job.status == JobStatus.PROCESSING.value]
    if group_id is not None:
        conditions.append(Job.group_id == group_id)
    return conditions


@durable
def end_job(
    job_id: uuid.UUID,
    *,
    status: JobStatus,
    code: str | None,
    message: str | None,
    group_id: uuid.UUID | None = None,
) -> bool:
    """Move a processing job to a terminal status (failed/skipped) by CAS; True when this call did it."""
    conditions = _processing_job(job_id, group_id)
    with session_scope() as session:
        row = session.execute(
            update(Job)
            .where(*conditions)
            .values(
                status=status.value,
                error_code=code,
                error_message=(message or "")[:2000] or None,
                finished_at=now(),
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(Job.batch_id, Job.duration_seconds)
        ).first()
        if row is not None:
            add_batch_totals(session, row.batch_id, audio_seconds=row.duration_seconds or 0.0)
    if row is not None:
        metrics.JOBS_FINISHED.labels(status=status.value).inc()
    return row is not None


# One round trip for a group's claim (`claim_group_run`): the lease on its still-processing jobs by
# compare-and-set (`status = 'processing'`; a group run never takes a job handed to the local stage, a
# local run only one waiting for it or whose lease ran out), the group marked running, and each claimed
# job's chunk plan, kept answers and batch options. The SELECT reads job_chunks/job_answers/batches,
# which the two UPDATEs do not touch, so the statement's one snapshot sees them as the separate SELECTs
# did.
_CLAIM_GROUP = """
WITH claimed AS (
    UPDATE jobs SET lease_owner = %(owner)s, lease_expires_at = %(expires)s, updated_at = now()
    WHERE group_id = %(group)s AND status = 'processing'
      AND (CAST(%(only)s AS uuid[]) IS NULL OR id = ANY(CAST(%(only)s AS uuid[])))
      AND CASE WHEN CAST(%(waiting)s AS text) IS NULL
               THEN COALESCE(lease_owner, '') NOT LIKE %(local_stage)s
               ELSE lease_owner = %(waiting)s OR lease_expires_at < now() END
    RETURNING id, tenant_id, batch_id, duration_seconds, speech_seconds, time_map, route_model
), running AS (
    UPDATE groups SET status = 'running' WHERE id = %(group)s AND status = 'pending' RETURNING id
)
SELECT c.id, c.tenant_id, c.batch_id, c.duration_seconds, c.speech_seconds, c.time_map, c.route_model,
    (SELECT json_agg(json_build_object('index', k.index, 'object_key', k.object_key) ORDER BY k.index)
       FROM job_chunks AS k WHERE k.job_id = c.id) AS chunks,
    (SELECT json_agg(json_build_object(
            'piece', a.piece, 'start_seconds', a.start_seconds, 'end_seconds', a.end_seconds, 'text', a.text,
            'segments', a.segments, 'language', a.language, 'model', a.model, 'attempt_id', a.attempt_id))
       FROM job_answers AS a WHERE a.job_id = c.id) AS answers,
    b.id AS b_id, b.tenant_id AS b_tenant_id, b.profile AS b_profile, b.language AS b_language,
    b.prompt AS b_prompt, b.models AS b_models, b.priority AS b_priority, b.budget_usd AS b_budget_usd,
    b.prefer AS b_prefer, b.timestamps AS b_timestamps, b.routing AS b_routing, b.diarize AS b_diarize
FROM claimed AS c LEFT JOIN batches AS b ON b.id = c.batch_id
ORDER BY c.id
"""


def claim_group(
    group_id: uuid.UUID,
    *,
    owner: str,
    lease_seconds: float,
    only: list[uuid.UUID] | None = None,
    waiting: str | None = None,
) -> list[GroupJob]:
    """Take the lease on a group's still-processing jobs (or `only` these) and load what they need.

    With `waiting`, only jobs whose lease that owner holds (waiting for this stage) or whose lease ran out
    are claimed: a duplicate message never takes a job from a live run.
    """
    jobs, _ = claim_group_run(group_id, owner=owner, lease_seconds=lease_seconds, only=only, waiting=waiting)
    return jobs


def claim_group_run(
    group_id: uuid.UUID,
    *,
    owner: str,
    lease_seconds: float,
    only: list[uuid.UUID] | None = None,
    waiting: str | None = None,
) -> tuple[list[GroupJob], dict[uuid.UUID, BatchOptions]]:
    """`claim_group`, with the claimed jobs' batch options, in one statement (one round trip).

    Jobs in id order; a job no longer processing (ended, requeued) is not claimed.
    """
    params = {
        "owner": owner,
        "expires": now() + timedelta(seconds=lease_seconds),
        "group": group_id,
        "only": list(only) if only is not None else None,
        "waiting": waiting,
        "local_stage": LOCAL_LEASE_PREFIX + "%",  # a job handed to the local stage is not the group's
    }
    with session_scope() as session:
        rows = run_sql(session, _CLAIM_GROUP, params).all()
    jobs: list[GroupJob] = []
    batches: dict[uuid.UUID, BatchOptions] = {}
    for r in rows:
        jobs.append(_group_job(r))
        if r.b_id is not None and r.b_id not in batches:
            batches[r.b_id] = BatchOptions(
                id=r.b_id,
                tenant_id=r.b_tenant_id,
                profile=r.b_profile,
                language=r.b_language,
                prompt=r.b_prompt,
                models=model_list(r.b_models),
                priority=r.b_priority,
                budget_usd=r.b_budget_usd,
                prefer=r.b_prefer,
                timestamps=r.b_timestamps,
                routing=r.b_routing,
                diarize=r.b_diarize,
            )
    return jobs, batches


def _group_job(r: Any) -> GroupJob:
    """A claimed job from its row of `_CLAIM_GROUP`."""
    answers: dict[str, dict[str, Any]] = {}
    for a in r.answers or []:
        answers[a["piece"]] = {
            "start_seconds": a["start_seconds"],
            "end_seconds": a["end_seconds"],
            "text": a["text"],
            "segments": a["segments"],
            "language": a["language"],
            "model": a["model"],
            "attempt_id": uuid.UUID(a["attempt_id"]) if a["attempt_id"] else None,
        }
    return GroupJob(
        id=r.id,
        tenant_id=r.tenant_id,
        batch_id=r.batch_id,
        duration_seconds=r.duration_seconds or 0.0,
        speech_seconds=r.speech_seconds or 0.0,
        time_map=r.time_map or {},
        chunks=[{"index": c["index"], "object_key": c["object_key"]} for c in r.chunks or []],
        answers=answers,
        route_model=r.route_model,
    )


def finish_group(group_id: uuid.UUID) -> None:
    """Mark a group done once none of its jobs is still processing."""
    with session_scope() as session:
        session.execute(
            update(Group)
            .where(
                Group.id == group_id,
                Group.status != GroupStatus.DONE.value,
                ~select(Job.id)
                .where(Job.group_id == group_id, Job.status == JobStatus.PROCESSING.value)
                .exists(),
            )
            .values(status=GroupStatus.DONE.value, finished_at=now())
        )
