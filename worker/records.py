"""Database writes of the pipeline: claims, attempts, cost records, transcripts, batch totals.

Every function here is one short transaction and never does network I/O other than Postgres. State
changes are compare-and-set, so a redelivered task cannot write a second transcript or move a job twice:

- A job is claimed `queued → processing` in bulk (one `UPDATE … RETURNING`), with a lease
  (`lease_owner`, `lease_expires_at`) and `run_count + 1` (the attempt counter lives in Postgres).
- `jobs.group_id` is the token of the current run: prepare gives a job a fresh group each run, and a
  transcribe task touches only jobs whose `group_id` is its own, so a stale task left over from an earlier
  run (requeued by the sweeper) does nothing.
- The transcript is inserted with `ON CONFLICT (job_id) DO NOTHING` and the job moves
  `processing → succeeded` by CAS in the same transaction.
- Totals are `SET x = x + :delta`, never read-modify-write.
- After a job becomes terminal, `finish_batch_if_done` counts the batch's non-terminal jobs in a *new*
  transaction (after the job's commit), so of two jobs finishing at once at least the later one sees the
  batch done; the batch's own CAS makes exactly one of them the finisher.
- A paid answer is kept (`job_answers`: text, original-time segments, language, model, attempt) in the
  transaction that closes its attempt, for the whole file as for each chunk, whatever became of the run
  (it may have lost its group to a requeue): any later run of the job reuses it instead of calling again.
- Jobs answered at about the same moment are completed together (`succeed_jobs`, the transcribe
  worker's group commit): one transaction, one statement per kind of row over all of them (`unnest`
  arrays, fixed SQL text), one UPDATE of each batch row; any failure writes them one by one instead.
- The writes that follow a paid provider answer (closing the attempt with its cost and answer, ending
  the job) retry through a short database outage (`durable`, up to a minute): losing them would
  mean calling the provider again and paying twice, or leaving a billed call to an estimate.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import ColumnElement, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert

from core import metrics
from core.billing import add_batch_totals
from core.db import durable, session_scope
from core.ids import uuid7
from core.models import Attempt, Batch, Group, Job, JobChunk, Transcript
from core.statuses import (
    JOB_TERMINAL,
    AttemptOutcome,
    BatchStatus,
    GroupStatus,
    JobStatus,
    Settlement,
)

TERMINAL_VALUES = tuple(s.value for s in JOB_TERMINAL)
LIVE_VALUES = tuple(s.value for s in JobStatus if s not in JOB_TERMINAL)
log = logging.getLogger(__name__)


def now() -> datetime:
    """The current UTC time."""
    return datetime.now(UTC)


class PricedLike(Protocol):
    """What `core.pricing.price_attempt` returns (only the fields recorded here)."""

    usd: Decimal
    billed_audio_seconds: float
    input_tokens: int | None
    input_audio_tokens: int | None
    input_text_tokens: int | None
    output_tokens: int | None
    unit_prices: dict[str, Any]
    price_table_version: str
    estimated: bool


@dataclass(frozen=True)
class BatchOptions:
    """The batch settings the pipeline needs for a job."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    profile: str
    language: str | None
    prompt: str | None
    models: list[str] | None
    priority: str
    budget_usd: Decimal | None


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


def _batch_options(row: Any) -> BatchOptions:
    models = row.models if isinstance(row.models, list) and row.models else None
    return BatchOptions(
        id=row.id,
        tenant_id=row.tenant_id,
        profile=row.profile,
        language=row.language,
        prompt=row.prompt,
        models=[str(m) for m in models] if models else None,
        priority=row.priority,
        budget_usd=row.budget_usd,
    )


def load_batches(batch_ids: set[uuid.UUID]) -> dict[uuid.UUID, BatchOptions]:
    """Options of these batches, by id."""
    if not batch_ids:
        return {}
    with session_scope() as session:
        return _load_batches(session, batch_ids)


def _load_batches(session: Any, batch_ids: set[uuid.UUID]) -> dict[uuid.UUID, BatchOptions]:
    rows = session.execute(
        select(
            Batch.id,
            Batch.tenant_id,
            Batch.profile,
            Batch.language,
            Batch.prompt,
            Batch.models,
            Batch.priority,
            Batch.budget_usd,
        ).where(Batch.id.in_(batch_ids))
    ).all()
    return {row.id: _batch_options(row) for row in rows}


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
        batches = _load_batches(session, batch_ids) if batch_ids else {}
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
        )
        for r in rows
    ]
    claimed.sort(key=lambda c: order.get(c.id, 0))
    return claimed


def extend_leases(job_ids: list[uuid.UUID], *, owner: str, lease_seconds: float) -> int:
    """Renew the lease of jobs this worker is working on; returns how many are still processing."""
    if not job_ids:
        return 0
    # Rows locked in id order (the completion writer's order too): two transactions locking the same jobs
    # in different orders deadlock, and Postgres then aborts one of them.
    locked = (
        select(Job.id)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.PROCESSING.value)
        .order_by(Job.id)
        .with_for_update()
    )
    with session_scope() as session:
        result = session.execute(
            update(Job)
            .where(Job.id.in_(locked.scalar_subquery()), Job.status == JobStatus.PROCESSING.value)
            .values(lease_owner=owner, lease_expires_at=now() + timedelta(seconds=lease_seconds))
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def release_soon(job_id: uuid.UUID, *, after_seconds: float) -> None:
    """Let a job's lease run out soon after an unexpected error, so the sweeper gives it another run."""
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.PROCESSING.value)
            .values(lease_expires_at=now() + timedelta(seconds=after_seconds))
        )


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


@dataclass(frozen=True)
class ProbedJob:
    """What prepare learned about one job, written in bulk."""

    id: uuid.UUID
    duration_seconds: float
    codec: str | None
    sample_rate: int | None
    channels: int | None
    speech_seconds: float
    time_map: dict[str, Any]


def save_probes(probes: list[ProbedJob]) -> None:
    """Store decode/VAD results of processing jobs (not the fingerprint: `dedupe` writes that)."""
    if not probes:
        return
    with session_scope() as session:
        for p in probes:
            session.execute(
                update(Job)
                .where(Job.id == p.id, Job.status == JobStatus.PROCESSING.value)
                .values(**_probe_values(p))
            )
    metrics.AUDIO_SUBMITTED_SECONDS.inc(sum(p.duration_seconds for p in probes))


def _probe_values(p: ProbedJob) -> dict[str, Any]:
    return {
        "duration_seconds": p.duration_seconds,
        "codec": p.codec,
        "sample_rate": p.sample_rate,
        "channels": p.channels,
        "speech_seconds": p.speech_seconds,
        "time_map": p.time_map,
    }


def save_time_map(job_id: uuid.UUID, time_map: dict[str, Any]) -> None:
    """Replace a job's time map (after its chunk plan changed)."""
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(time_map=time_map))


@dataclass(frozen=True)
class DedupeDecision:
    """What to do with a job whose audio may have been seen before."""

    kind: str  # "leader" (transcribe it), "copy" (a finished twin exists), "wait" (a twin is in flight)
    twin_id: uuid.UUID | None = None


@dataclass(frozen=True)
class DedupeRequest:
    """One prepared job asking whether its audio has a twin."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    fingerprint: str
    language: str | None
    prompt: str | None
    probe: ProbedJob | None = None


def dedupe(
    *,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    fingerprint: str,
    language: str | None,
    prompt: str | None,
    probe: ProbedJob | None = None,
) -> DedupeDecision:
    """Find a twin for one job (see `dedupe_many`)."""
    return dedupe_many([DedupeRequest(job_id, tenant_id, fingerprint, language, prompt, probe)])[0]


def dedupe_lock_key(tenant_id: uuid.UUID, fingerprint: str) -> str:
    """The text whose hash is the advisory lock serialising dedupe of this audio in this tenant."""
    return f"{tenant_id}:{fingerprint}"


# Locks every key in one statement, in the order of the lock ids: two transactions taking overlapping
# sets then queue behind each other instead of deadlocking. (A subquery with ORDER BY is not flattened,
# so the outer call runs in its order.)
_LOCK_KEYS = text(
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
    " FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"
)
_STILL_PROCESSING = text(
    "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'processing'"
    " ORDER BY id FOR UPDATE"
)
# For each (tenant, fingerprint, language, prompt): the earliest finished twin with a transcript and the
# earliest-started decided leader still in flight (a processing job with a fingerprint and no leader).
_TWINS = text(
    """
    SELECT DISTINCT ON (j.tenant_id, j.fingerprint, b.language, b.prompt, j.status)
           j.id, j.tenant_id, j.fingerprint, b.language, b.prompt, j.status
    FROM jobs j
    JOIN batches b ON b.id = j.batch_id
    WHERE (j.tenant_id, j.fingerprint) IN (
            SELECT * FROM unnest(CAST(:tenants AS uuid[]), CAST(:fingerprints AS text[])))
      AND j.deleted_at IS NULL
      AND j.id <> ALL(CAST(:ids AS uuid[]))
      AND (
        (j.status = 'succeeded' AND EXISTS (SELECT 1 FROM transcripts t WHERE t.job_id = j.id))
        OR (j.status = 'processing' AND j.deduplicated_from_id IS NULL)
      )
    ORDER BY j.tenant_id, j.fingerprint, b.language, b.prompt, j.status,
             CASE WHEN j.status = 'succeeded' THEN j.finished_at END, j.started_at
    """
)
# One UPDATE for every decided job: the fingerprint (what makes a leader), a follower's leader (and no
# lease: its leader's outcome finishes or releases it) and, given one, the probe.
_MARK = text(
    """
    UPDATE jobs AS j SET
        fingerprint = v.fingerprint,
        deduplicated_from_id = v.follows,
        lease_owner = CASE WHEN v.follows IS NULL THEN j.lease_owner END,
        lease_expires_at = CASE WHEN v.follows IS NULL THEN j.lease_expires_at END,
        duration_seconds = CASE WHEN v.probed THEN v.duration_seconds ELSE j.duration_seconds END,
        codec = CASE WHEN v.probed THEN v.codec ELSE j.codec END,
        sample_rate = CASE WHEN v.probed THEN v.sample_rate ELSE j.sample_rate END,
        channels = CASE WHEN v.probed THEN v.channels ELSE j.channels END,
        speech_seconds = CASE WHEN v.probed THEN v.speech_seconds ELSE j.speech_seconds END,
        time_map = CASE WHEN v.probed THEN CAST(v.time_map AS jsonb) ELSE j.time_map END,
        updated_at = now()
    FROM unnest(
        CAST(:ids AS uuid[]), CAST(:fingerprints AS text[]), CAST(:follows AS uuid[]),
        CAST(:probed AS boolean[]), CAST(:durations AS float8[]), CAST(:codecs AS text[]),
        CAST(:rates AS integer[]), CAST(:channels AS integer[]), CAST(:speech AS float8[]),
        CAST(:time_maps AS text[])
    ) AS v(id, fingerprint, follows, probed, duration_seconds, codec, sample_rate, channels,
           speech_seconds, time_map)
    WHERE j.id = v.id AND j.status = 'processing'
    """
)


def dedupe_many(requests: list[DedupeRequest]) -> list[DedupeDecision]:
    """Find twins (same tenant, same PCM fingerprint, same language and prompt options) for these jobs.

    Serialised per (tenant, fingerprint) with transaction-scoped advisory locks, so two workers preparing
    identical audio at once cannot both become leaders. Each job's fingerprint is written here, under the
    lock, together with its decision: a processing job with a fingerprint and no `deduplicated_from_id`
    is therefore always a decided leader, never a twin that has not decided yet (which could still end up
    following someone, making chains of followers).

    One transaction for all the requests, decided in order as if one after the other: a later request
    with the same audio as an earlier leader of the list waits for it. A request's `probe` is written by
    the same UPDATE (what `save_probes` would do in a transaction of its own).
    """
    if not requests:
        return []
    ids = [r.job_id for r in requests]
    decisions: list[DedupeDecision] = []
    with session_scope() as session:
        session.execute(
            _LOCK_KEYS, {"keys": sorted({dedupe_lock_key(r.tenant_id, r.fingerprint) for r in requests})}
        )
        processing = set(session.execute(_STILL_PROCESSING, {"ids": ids}).scalars())
        finished: dict[tuple[Any, ...], uuid.UUID] = {}
        inflight: dict[tuple[Any, ...], uuid.UUID] = {}
        pairs = sorted({(r.tenant_id, r.fingerprint) for r in requests})
        for row in session.execute(
            _TWINS,
            {"tenants": [t for t, _ in pairs], "fingerprints": [f for _, f in pairs], "ids": ids},
        ):
            target = finished if row.status == JobStatus.SUCCEEDED.value else inflight
            target[(row.tenant_id, row.fingerprint, row.language, row.prompt)] = row.id
        for r in requests:
            key = (r.tenant_id, r.fingerprint, r.language, r.prompt)
            if key in finished:
                decisions.append(DedupeDecision("copy", finished[key]))
            elif key in inflight:
                decisions.append(DedupeDecision("wait", inflight[key]))
            else:
                decisions.append(DedupeDecision("leader"))
                if r.job_id in processing:
                    # A leader committed under the lock: the next twin (in this list or after it) finds it.
                    inflight[key] = r.job_id
        probes = [r.probe for r in requests]
        session.execute(
            _MARK,
            {
                "ids": ids,
                "fingerprints": [r.fingerprint for r in requests],
                "follows": [d.twin_id if d.kind == "wait" else None for d in decisions],
                "probed": [p is not None for p in probes],
                "durations": [p.duration_seconds if p else None for p in probes],
                "codecs": [p.codec if p else None for p in probes],
                "rates": [p.sample_rate if p else None for p in probes],
                "channels": [p.channels if p else None for p in probes],
                "speech": [p.speech_seconds if p else None for p in probes],
                "time_maps": [json.dumps(p.time_map) if p else None for p in probes],
            },
        )
    metrics.AUDIO_SUBMITTED_SECONDS.inc(sum(p.duration_seconds for p in probes if p is not None))
    return decisions


def copy_transcript(job_id: uuid.UUID, twin_id: uuid.UUID) -> bool:
    """Finish a job with its twin's transcript: zero cost, `deduplicated_from_id` set. True if done."""
    with session_scope() as session:
        twin = session.execute(select(Transcript).where(Transcript.job_id == twin_id)).scalar_one_or_none()
        if twin is None:
            return False
        job = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.PROCESSING.value)
            .values(
                status=JobStatus.SUCCEEDED.value,
                deduplicated_from_id=twin_id,
                model=twin.model,
                billed_seconds=0.0,
                finished_at=now(),
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(Job.tenant_id, Job.batch_id, Job.duration_seconds)
        ).first()
        if job is None:
            return False
        session.execute(
            insert(Transcript)
            .values(
                id=uuid7(),
                tenant_id=job.tenant_id,
                job_id=job_id,
                attempt_id=None,
                text=twin.text,
                language=twin.language,
                segments=twin.segments,
                model=twin.model,
                provenance={"deduplicated_from": str(twin_id), "source_attempt_id": str(twin.attempt_id)},
            )
            .on_conflict_do_nothing(index_elements=[Transcript.job_id])
        )
        add_batch_totals(session, job.batch_id, audio_seconds=job.duration_seconds or 0.0)
    metrics.DEDUPE_HITS.inc()
    metrics.JOBS_FINISHED.labels(status=JobStatus.SUCCEEDED.value).inc()
    return True


def followers_of(leader_id: uuid.UUID) -> list[uuid.UUID]:
    """Jobs waiting for this leader's transcript."""
    with session_scope() as session:
        return list(
            session.execute(
                select(Job.id).where(
                    Job.deduplicated_from_id == leader_id, Job.status == JobStatus.PROCESSING.value
                )
            ).scalars()
        )


def release_followers(leader_id: uuid.UUID) -> list[uuid.UUID]:
    """Send a leader's followers back to `queued` (its run ended without a transcript to share)."""
    with session_scope() as session:
        return list(
            session.execute(
                update(Job)
                .where(Job.deduplicated_from_id == leader_id, Job.status == JobStatus.PROCESSING.value)
                .values(status=JobStatus.QUEUED.value, deduplicated_from_id=None, queued_at=now())
                .returning(Job.id)
            ).scalars()
        )


@dataclass(frozen=True)
class GroupPlan:
    """A group to create: its key, class and (job id, seconds) members."""

    tenant_id: uuid.UUID
    batch_id: uuid.UUID | None
    key: str
    duration_class: str
    members: list[tuple[uuid.UUID, float]]
    chain: list[str]
    priority: str


_POINT_AT_GROUPS = text(
    "UPDATE jobs AS j SET group_id = v.group_id, updated_at = now(),"
    " lease_owner = COALESCE(CAST(:owner AS text), j.lease_owner),"
    " lease_expires_at = COALESCE(CAST(:expires AS timestamptz), j.lease_expires_at)"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:groups AS uuid[])) AS v(id, group_id)"
    " WHERE j.id = v.id AND j.status = 'processing'"
)


def assign_groups(
    plans: list[GroupPlan], *, owner: str | None = None, lease_seconds: float | None = None
) -> list[uuid.UUID]:
    """Create the groups and point their (still processing) jobs at them; returns the group ids.

    With `owner` and `lease_seconds`, the jobs' leases are renewed by the same UPDATE.
    """
    ids: list[uuid.UUID] = []
    if not plans:
        return ids
    rows = []
    job_ids: list[uuid.UUID] = []
    job_groups: list[uuid.UUID] = []
    for plan in plans:
        gid = uuid7()
        ids.append(gid)
        rows.append(
            {
                "id": gid,
                "tenant_id": plan.tenant_id,
                "batch_id": plan.batch_id,
                "key": plan.key[:200],
                "duration_class": plan.duration_class,
                "status": GroupStatus.PENDING.value,
                "job_count": len(plan.members),
                "total_seconds": sum(s for _, s in plan.members),
            }
        )
        for job_id, _ in plan.members:
            job_ids.append(job_id)
            job_groups.append(gid)
    expires = now() + timedelta(seconds=lease_seconds) if owner and lease_seconds is not None else None
    with session_scope() as session:
        session.execute(insert(Group).values(rows))
        session.execute(
            _POINT_AT_GROUPS,
            {"ids": job_ids, "groups": job_groups, "owner": owner if expires else None, "expires": expires},
        )
    return ids


def save_chunks(job_id: uuid.UUID, chunks: list[dict[str, Any]]) -> None:
    """Create (or re-plan, on a re-run) the chunk rows of a long job (its plan; answers: `job_answers`)."""
    if not chunks:
        return
    with session_scope() as session:
        for c in chunks:
            stmt = insert(JobChunk).values(
                id=uuid7(),
                job_id=job_id,
                index=c["index"],
                start_seconds=c["start_seconds"],
                end_seconds=c["end_seconds"],
                object_key=c["object_key"],
            )
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[JobChunk.job_id, JobChunk.index],
                    set_={
                        "start_seconds": stmt.excluded.start_seconds,
                        "end_seconds": stmt.excluded.end_seconds,
                        "object_key": stmt.excluded.object_key,
                    },
                )
            )
        # A re-run may plan fewer chunks than a previous one did.
        session.execute(
            JobChunk.__table__.delete().where(  # type: ignore[attr-defined]
                JobChunk.job_id == job_id, JobChunk.index >= len(chunks)
            )
        )


@dataclass(frozen=True)
class GroupJob:
    """A job of a group as the transcribe stage sees it."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    duration_seconds: float
    speech_seconds: float
    time_map: dict[str, Any]
    chunks: list[dict[str, Any]]  # the chunk plan: [{index, object_key}]
    # Paid answers kept by earlier runs, by piece key: {start_seconds, end_seconds, text, segments,
    # language, model, attempt_id}
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)


# One round trip for a group's claim (`claim_group_run`): the lease on its still-processing jobs by
# compare-and-set (`status = 'processing'`), the group marked running, and each claimed job's chunk plan,
# kept answers and batch options. The SELECT reads job_chunks/job_answers/batches, which the two UPDATEs
# do not touch, so the statement's one snapshot sees them as the separate SELECTs did.
_CLAIM_GROUP = """
WITH claimed AS (
    UPDATE jobs SET lease_owner = %(owner)s, lease_expires_at = %(expires)s, updated_at = now()
    WHERE group_id = %(group)s AND status = 'processing'
      AND (CAST(%(only)s AS uuid[]) IS NULL OR id = ANY(CAST(%(only)s AS uuid[])))
    RETURNING id, tenant_id, batch_id, duration_seconds, speech_seconds, time_map
), running AS (
    UPDATE groups SET status = 'running' WHERE id = %(group)s AND status = 'pending' RETURNING id
)
SELECT c.id, c.tenant_id, c.batch_id, c.duration_seconds, c.speech_seconds, c.time_map,
    (SELECT json_agg(json_build_object('index', k.index, 'object_key', k.object_key) ORDER BY k.index)
       FROM job_chunks AS k WHERE k.job_id = c.id) AS chunks,
    (SELECT json_agg(json_build_object(
            'piece', a.piece, 'start_seconds', a.start_seconds, 'end_seconds', a.end_seconds, 'text', a.text,
            'segments', a.segments, 'language', a.language, 'model', a.model, 'attempt_id', a.attempt_id))
       FROM job_answers AS a WHERE a.job_id = c.id) AS answers,
    b.id AS b_id, b.tenant_id AS b_tenant_id, b.profile AS b_profile, b.language AS b_language,
    b.prompt AS b_prompt, b.models AS b_models, b.priority AS b_priority, b.budget_usd AS b_budget_usd
FROM claimed AS c LEFT JOIN batches AS b ON b.id = c.batch_id
ORDER BY c.id
"""


def claim_group(
    group_id: uuid.UUID, *, owner: str, lease_seconds: float, only: list[uuid.UUID] | None = None
) -> list[GroupJob]:
    """Take the lease on a group's still-processing jobs (or `only` these) and load what they need."""
    jobs, _ = claim_group_run(group_id, owner=owner, lease_seconds=lease_seconds, only=only)
    return jobs


def claim_group_run(
    group_id: uuid.UUID, *, owner: str, lease_seconds: float, only: list[uuid.UUID] | None = None
) -> tuple[list[GroupJob], dict[uuid.UUID, BatchOptions]]:
    """`claim_group`, with the claimed jobs' batch options, in one statement (one round trip).

    Jobs in id order; a job no longer processing (ended, requeued) is not claimed.
    """
    params = {
        "owner": owner,
        "expires": now() + timedelta(seconds=lease_seconds),
        "group": group_id,
        "only": list(only) if only is not None else None,
    }
    with session_scope() as session:
        rows = _sql(session, _CLAIM_GROUP, params).all()
    jobs: list[GroupJob] = []
    batches: dict[uuid.UUID, BatchOptions] = {}
    for r in rows:
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
        jobs.append(
            GroupJob(
                id=r.id,
                tenant_id=r.tenant_id,
                batch_id=r.batch_id,
                duration_seconds=r.duration_seconds or 0.0,
                speech_seconds=r.speech_seconds or 0.0,
                time_map=r.time_map or {},
                chunks=[{"index": c["index"], "object_key": c["object_key"]} for c in r.chunks or []],
                answers=answers,
            )
        )
        if r.b_id is not None and r.b_id not in batches:
            batches[r.b_id] = BatchOptions(
                id=r.b_id,
                tenant_id=r.b_tenant_id,
                profile=r.b_profile,
                language=r.b_language,
                prompt=r.b_prompt,
                models=[str(m) for m in r.b_models] if isinstance(r.b_models, list) and r.b_models else None,
                priority=r.b_priority,
                budget_usd=r.b_budget_usd,
            )
    return jobs, batches


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


def piece_key(index: int | None) -> str:
    """The `job_answers.piece` of a job's piece: the whole file, or one chunk."""
    return "whole" if index is None else f"chunk:{index}"


# Bounds are stored rounded in the time map; a stored answer is for the same piece within a millisecond.
_SAME_BOUNDS_SECONDS = 1e-3


@dataclass(frozen=True)
class KeptAnswer:
    """A paid answer for one piece of a job, as kept in `job_answers`."""

    job_id: uuid.UUID
    index: int | None  # chunk index; None for the whole file
    start_seconds: float  # the piece's bounds in trimmed time
    end_seconds: float
    text: str
    segments: list[dict[str, Any]]  # original time
    language: str | None
    model: str
    attempt_id: uuid.UUID


def stored_answer(job: GroupJob, index: int | None, start: float, end: float) -> dict[str, Any] | None:
    """The answer an earlier run kept for this piece (same bounds), if any."""
    kept = job.answers.get(piece_key(index))
    if kept is None:
        return None
    same = (
        abs(float(kept["start_seconds"]) - start) <= _SAME_BOUNDS_SECONDS
        and abs(float(kept["end_seconds"]) - end) <= _SAME_BOUNDS_SECONDS
    )
    return kept if same else None


def _keep_answers(session: Any, answers: list[KeptAnswer]) -> None:
    """Store paid answers, one statement (the first one for a piece wins; one for a re-planned piece —
    other bounds — replaces it)."""
    if not answers:
        return
    unique = list({(a.job_id, piece_key(a.index)): a for a in answers}.values())  # one row per piece
    _sql(
        session,
        _KEEP_ANSWERS,
        {
            "id": [uuid7() for _ in unique],
            "job_id": [a.job_id for a in unique],
            "piece": [piece_key(a.index) for a in unique],
            "start_seconds": [a.start_seconds for a in unique],
            "end_seconds": [a.end_seconds for a in unique],
            "text": [a.text for a in unique],
            "segments": [_json(a.segments) for a in unique],
            "language": [a.language for a in unique],
            "model": [a.model for a in unique],
            "attempt_id": [a.attempt_id for a in unique],
        },
    )


@durable
def keep_answer(answer: KeptAnswer) -> None:
    """Keep an answer assembled from several calls (a piece split after a 413): each call is already
    closed with its cost; this makes the whole piece reusable by a later run."""
    with session_scope() as session:
        if session.execute(select(Job.deleted_at).where(Job.id == answer.job_id)).scalar() is None:
            _keep_answers(session, [answer])


def open_attempt(
    *,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    chunk_index: int | None,
    model: str,
    provider: str,
    retry_number: int,
    audio_seconds: float,
    request_bytes: int,
    worker: str,
) -> uuid.UUID:
    """Insert a pending attempt before the call; its id doubles as the provider request id."""
    attempt_id = uuid7()
    open_attempts(
        [
            PendingAttempt(
                id=attempt_id,
                tenant_id=tenant_id,
                job_id=job_id,
                chunk_index=chunk_index,
                model=model,
                provider=provider,
                retry_number=retry_number,
                audio_seconds=audio_seconds,
                request_bytes=request_bytes,
                worker=worker,
            )
        ]
    )
    return attempt_id


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt row to write before its call (see `open_attempts`)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID
    chunk_index: int | None
    model: str
    provider: str
    retry_number: int
    audio_seconds: float
    request_bytes: int
    worker: str


def open_attempts(rows: list[PendingAttempt]) -> None:
    """Insert pending attempts (one statement, one transaction) before their calls start."""
    if not rows:
        return
    with session_scope() as session:
        _sql(
            session,
            _OPEN_ATTEMPTS,
            {"started_at": now()} | {name: [getattr(r, name) for r in rows] for name in _PENDING_COLUMNS},
        )


_PENDING_COLUMNS = (
    "id",
    "tenant_id",
    "job_id",
    "chunk_index",
    "model",
    "provider",
    "retry_number",
    "audio_seconds",
    "request_bytes",
    "worker",
)
# Like the completion statements below: one fixed text for any number of rows (a multi-row VALUES was
# compiled anew for each row count).
_OPEN_ATTEMPTS = f"""
INSERT INTO attempts (id, tenant_id, job_id, chunk_index, model, provider, retry_number, audio_seconds,
    request_bytes, worker, outcome, started_at)
SELECT v.id, v.tenant_id, v.job_id, v.chunk_index, v.model, v.provider, v.retry_number, v.audio_seconds,
    v.request_bytes, v.worker, '{AttemptOutcome.PENDING.value}', %(started_at)s
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(job_id)s::uuid[], %(chunk_index)s::int[],
            %(model)s::text[], %(provider)s::text[], %(retry_number)s::int[], %(audio_seconds)s::float8[],
            %(request_bytes)s::int8[], %(worker)s::text[])
     AS v(id, tenant_id, job_id, chunk_index, model, provider, retry_number, audio_seconds, request_bytes,
          worker)
"""


@durable
def close_attempt(
    attempt_id: uuid.UUID,
    *,
    outcome: AttemptOutcome,
    latency_ms: float | None,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    job_id: uuid.UUID,
    model: str,
    reserved_usd: Decimal = Decimal(0),
    http_status: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    priced: PricedLike | None = None,
    usage: dict[str, Any] | None = None,
    compute_seconds: float | None = None,
    answer: KeptAnswer | None = None,
) -> None:
    """Close an attempt; for a billed answer write its cost record and add it to job and batch totals.

    All in one transaction, together with settling the budget reservation (committed += actual - reserved)
    and keeping `answer` (the paid transcript of the piece) for any later run of the job, whatever became
    of this run (a deleted job's answer is not kept).
    """
    close = AttemptClose(
        attempt_id=attempt_id,
        outcome=outcome,
        latency_ms=latency_ms,
        tenant_id=tenant_id,
        batch_id=batch_id,
        job_id=job_id,
        model=model,
        reserved_usd=reserved_usd,
        http_status=http_status,
        error_code=error_code,
        error_message=error_message,
        priced=priced,
        usage=usage,
        compute_seconds=compute_seconds,
        answer=answer,
    )
    with session_scope() as session:
        (totals,) = _close_attempts(session, [close])
        if totals.touches_batch:
            add_batch_totals(
                session, batch_id, billed_seconds=totals.billed, cost=totals.usd, committed=totals.committed
            )
    _count_close(close, totals)


@dataclass(frozen=True)
class AttemptClose:
    """Everything `close_attempt` writes for one attempt (also passed to `succeed_job` to do it there)."""

    attempt_id: uuid.UUID
    outcome: AttemptOutcome
    latency_ms: float | None
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    job_id: uuid.UUID
    model: str
    reserved_usd: Decimal = Decimal(0)
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    priced: PricedLike | None = None
    usage: dict[str, Any] | None = None
    compute_seconds: float | None = None
    answer: KeptAnswer | None = None  # the paid answer, kept in the same transaction

    @property
    def billed(self) -> bool:
        """A priced answer or a local engine's run: it gets a cost record."""
        return self.priced is not None or self.compute_seconds is not None


@dataclass(frozen=True)
class _CloseTotals:
    """What closing an attempt adds to its batch's totals."""

    usd: Decimal
    billed: float
    committed: Decimal
    touches_batch: bool
    late: bool = False  # a late answer: the totals moved by a difference, the metrics count the answer


# The completion path's statements (closing attempts, their cost records and kept answers, a job's
# transcript and compare-and-set) take whole columns as arrays (`unnest`): one statement for any number
# of rows, a fixed text that Postgres prepares once per connection and SQLAlchemy neither compiles nor
# builds a cache key for (the ORM-enabled form of each took ~1 ms of the worker's CPU per call at P2's
# rate). Each mirrors core/models.py; `updated_at` is set as the models' `onupdate` would.
_CLOSE_ATTEMPTS = f"""
UPDATE attempts AS a
SET outcome = v.outcome, http_status = v.http_status, error_code = v.error_code,
    error_message = v.error_message, ended_at = %(ended_at)s, latency_ms = v.latency_ms
FROM unnest(%(id)s::uuid[], %(outcome)s::text[], %(http_status)s::int[], %(error_code)s::text[],
            %(error_message)s::text[], %(latency_ms)s::float8[])
     AS v(id, outcome, http_status, error_code, error_message, latency_ms)
WHERE a.id = v.id AND a.outcome <> '{AttemptOutcome.ABANDONED.value}'
RETURNING a.id
"""
_INSERT_COST_RECORDS = """
INSERT INTO cost_records (id, tenant_id, batch_id, job_id, attempt_id, model, usage_type,
    billed_audio_seconds, input_tokens, input_audio_tokens, input_text_tokens, output_tokens,
    compute_seconds, unit_prices, price_table_version, usd, estimated)
SELECT v.id, v.tenant_id, v.batch_id, v.job_id, v.attempt_id, v.model, v.usage_type, v.billed,
    v.input_tokens, v.input_audio_tokens, v.input_text_tokens, v.output_tokens, v.compute_seconds,
    v.unit_prices::jsonb, v.price_table_version, v.usd, v.estimated
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(batch_id)s::uuid[], %(job_id)s::uuid[],
            %(attempt_id)s::uuid[], %(model)s::text[], %(usage_type)s::text[], %(billed)s::float8[],
            %(input_tokens)s::int[], %(input_audio_tokens)s::int[], %(input_text_tokens)s::int[],
            %(output_tokens)s::int[], %(compute_seconds)s::float8[], %(unit_prices)s::text[],
            %(price_table_version)s::text[], %(usd)s::numeric[], %(estimated)s::bool[])
     AS v(id, tenant_id, batch_id, job_id, attempt_id, model, usage_type, billed, input_tokens,
          input_audio_tokens, input_text_tokens, output_tokens, compute_seconds, unit_prices,
          price_table_version, usd, estimated)
ON CONFLICT (attempt_id) DO NOTHING
RETURNING attempt_id
"""
_ADD_JOB_COSTS = """
UPDATE jobs AS j
SET cost_usd = j.cost_usd + v.usd, billed_seconds = j.billed_seconds + v.billed, updated_at = now()
FROM unnest(%(id)s::uuid[], %(usd)s::numeric[], %(billed)s::float8[]) AS v(id, usd, billed)
WHERE j.id = v.id
RETURNING j.id, j.deleted_at
"""
_KEEP_ANSWERS = f"""
INSERT INTO job_answers AS ja (id, job_id, piece, start_seconds, end_seconds, text, segments, language,
    model, attempt_id)
SELECT v.id, v.job_id, v.piece, v.start_seconds, v.end_seconds, v.text, v.segments::jsonb, v.language,
    v.model, v.attempt_id
FROM unnest(%(id)s::uuid[], %(job_id)s::uuid[], %(piece)s::text[], %(start_seconds)s::float8[],
            %(end_seconds)s::float8[], %(text)s::text[], %(segments)s::text[], %(language)s::text[],
            %(model)s::text[], %(attempt_id)s::uuid[])
     AS v(id, job_id, piece, start_seconds, end_seconds, text, segments, language, model, attempt_id)
ON CONFLICT (job_id, piece) DO UPDATE
SET start_seconds = excluded.start_seconds, end_seconds = excluded.end_seconds, text = excluded.text,
    segments = excluded.segments, language = excluded.language, model = excluded.model,
    attempt_id = excluded.attempt_id
WHERE abs(ja.start_seconds - excluded.start_seconds) > {_SAME_BOUNDS_SECONDS}
   OR abs(ja.end_seconds - excluded.end_seconds) > {_SAME_BOUNDS_SECONDS}
"""
_SUCCEED_JOBS = f"""
UPDATE jobs AS j
SET status = '{JobStatus.SUCCEEDED.value}', model = v.model, finished_at = %(finished_at)s,
    lease_owner = NULL, lease_expires_at = NULL, error_code = NULL, error_message = NULL, updated_at = now()
FROM unnest(%(id)s::uuid[], %(group_id)s::uuid[], %(model)s::text[]) AS v(id, group_id, model)
WHERE j.id = v.id AND j.status = '{JobStatus.PROCESSING.value}'
  AND (v.group_id IS NULL OR j.group_id = v.group_id)
  AND NOT EXISTS (SELECT 1 FROM transcripts AS t WHERE t.job_id = j.id)
RETURNING j.id, j.tenant_id, j.batch_id, j.duration_seconds, j.fingerprint
"""
_INSERT_TRANSCRIPTS = """
INSERT INTO transcripts (id, tenant_id, job_id, attempt_id, text, language, segments, model, provenance)
SELECT v.id, v.tenant_id, v.job_id, v.attempt_id, v.text, v.language, v.segments::jsonb, v.model,
    v.provenance::jsonb
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(job_id)s::uuid[], %(attempt_id)s::uuid[],
            %(text)s::text[], %(language)s::text[], %(segments)s::text[], %(model)s::text[],
            %(provenance)s::text[])
     AS v(id, tenant_id, job_id, attempt_id, text, language, segments, model, provenance)
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""
# Advisory locks of several fingerprints are taken in a fixed (sorted) order: no deadlock between writers.
_DEDUPE_LOCKS = "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest(%(keys)s::text[]) AS k"
_FOLLOWERS = f"""
SELECT deduplicated_from_id, id FROM jobs
WHERE deduplicated_from_id = ANY(%(ids)s::uuid[]) AND status = '{JobStatus.PROCESSING.value}'
"""


def _sql(session: Any, statement: str, params: dict[str, Any]) -> Any:
    """Run one of the statements above on the session's connection (its transaction)."""
    return session.connection().exec_driver_sql(statement, params)


def _json(value: Any) -> str | None:
    """A JSONB value as the ORM would send it (SQL NULL for None)."""
    return None if value is None else json.dumps(value)


def _close_values(c: AttemptClose, ended_at: datetime) -> dict[str, Any]:
    return {
        "outcome": c.outcome.value,
        "http_status": c.http_status,
        "error_code": c.error_code,
        "error_message": (c.error_message or "")[:2000] or None,
        "ended_at": ended_at,
        "latency_ms": c.latency_ms,
    }


def _close_attempts(session: Any, closes: list[AttemptClose]) -> list[_CloseTotals]:
    """Close attempts (one per call, distinct): their UPDATE, cost records, the jobs' totals and kept
    answers, a statement each for all of them; the batches' totals are the caller's to add.

    Returns what each adds to its batch, in order.
    """
    if not closes:
        return []
    ended_at = now()
    rows = [_close_values(c, ended_at) for c in closes]
    # Compare-and-set against the sweeper: an attempt it already abandoned (and charged an estimate) is
    # closed by `_close_late`, which puts the truth in place of the estimate.
    closed = {
        r[0]
        for r in _sql(
            session,
            _CLOSE_ATTEMPTS,
            {"ended_at": ended_at, "id": [c.attempt_id for c in closes]}
            | {k: [r[k] for r in rows] for k in _CLOSE_COLUMNS},
        )
    }
    results: dict[int, _CloseTotals] = {}
    for i, c in enumerate(closes):
        if c.attempt_id not in closed:
            late = _close_late(session, c, rows[i])
            if late is not None:
                results[i] = late
    billed = [i for i, c in enumerate(closes) if i not in results and c.billed]
    charged = _insert_cost_records(session, [closes[i] for i in billed]) if billed else set()
    usd: dict[int, Decimal] = {}
    seconds: dict[int, float] = {}
    for i in billed:
        c = closes[i]
        if c.attempt_id in charged:
            usd[i] = c.priced.usd if c.priced is not None else Decimal(0)
            seconds[i] = c.priced.billed_audio_seconds if c.priced is not None else 0.0
        # else: already charged (an abandoned call's estimate): counted once, nothing added now.
    if billed:
        per_job: dict[uuid.UUID, tuple[Decimal, float]] = {}
        for i in billed:
            job_usd, job_seconds = per_job.get(closes[i].job_id, (Decimal(0), 0.0))
            per_job[closes[i].job_id] = (job_usd + usd.get(i, Decimal(0)), job_seconds + seconds.get(i, 0.0))
        jobs = sorted(per_job)  # rows locked in id order
        live = {
            r.id
            for r in _sql(
                session,
                _ADD_JOB_COSTS,
                {
                    "id": jobs,
                    "usd": [per_job[j][0] for j in jobs],
                    "billed": [per_job[j][1] for j in jobs],
                },
            )
            if r.deleted_at is None
        }
        _keep_answers(
            session,
            [a for i in billed if (a := closes[i].answer) is not None and closes[i].job_id in live],
        )
    for i, c in enumerate(closes):
        if i not in results:
            spent = usd.get(i, Decimal(0))
            results[i] = _CloseTotals(
                usd=spent,
                billed=seconds.get(i, 0.0),
                committed=spent - c.reserved_usd,
                touches_batch=c.priced is not None or bool(c.reserved_usd),
            )
    return [results[i] for i in range(len(closes))]


_CLOSE_COLUMNS = ("outcome", "http_status", "error_code", "error_message", "latency_ms")


def _insert_cost_records(session: Any, closes: list[AttemptClose]) -> set[uuid.UUID]:
    """Cost records of billed closes (none twice: `ON CONFLICT (attempt_id)`); the attempts charged now."""

    def usage_type(c: AttemptClose) -> str:
        return getattr(c.priced, "usage_type", None) or (
            str(c.usage.get("type")) if c.usage and c.usage.get("type") else "none"
        )

    def of_price(name: str) -> list[Any]:
        return [getattr(c.priced, name, None) for c in closes]

    inserted = _sql(
        session,
        _INSERT_COST_RECORDS,
        {
            "id": [uuid7() for _ in closes],
            "tenant_id": [c.tenant_id for c in closes],
            "batch_id": [c.batch_id for c in closes],
            "job_id": [c.job_id for c in closes],
            "attempt_id": [c.attempt_id for c in closes],
            "model": [c.model for c in closes],
            "usage_type": [usage_type(c) for c in closes],
            "billed": [c.priced.billed_audio_seconds if c.priced is not None else 0.0 for c in closes],
            "input_tokens": of_price("input_tokens"),
            "input_audio_tokens": of_price("input_audio_tokens"),
            "input_text_tokens": of_price("input_text_tokens"),
            "output_tokens": of_price("output_tokens"),
            "compute_seconds": [c.compute_seconds for c in closes],
            "unit_prices": [
                _json(dict(c.priced.unit_prices) if c.priced is not None else {}) for c in closes
            ],
            "price_table_version": [
                c.priced.price_table_version if c.priced is not None else "local" for c in closes
            ],
            "usd": [c.priced.usd if c.priced is not None else Decimal(0) for c in closes],
            "estimated": [bool(c.priced.estimated) if c.priced is not None else False for c in closes],
        },
    )
    return {r[0] for r in inserted}


def _close_late(session: Any, c: AttemptClose, values: dict[str, Any]) -> _CloseTotals | None:
    """Close an attempt the sweeper abandoned (its worker looked dead) with the answer that came after all.

    A priced answer replaces the estimate with the exact cost, an HTTP error answer (never billed) removes
    it, and only the difference moves the job's and batch's totals; the dead worker's budget reservation
    was already turned into the estimate by the sweeper (`core.billing.charge_estimate`), so committed
    moves by the same difference. A transport error tells nothing about the bill: the estimate stays,
    unsettled, for `voxq billing settle`. None: not such a case (no row, or a local attempt).
    """
    from core import billing

    row = session.execute(
        update(Attempt).where(Attempt.id == c.attempt_id).values(**values).returning(Attempt.id)
    ).first()
    if row is None or c.compute_seconds is not None:
        return None
    if c.priced is None and c.http_status is None:
        return _CloseTotals(usd=Decimal(0), billed=0.0, committed=Decimal(0), touches_batch=False)
    delta = billing.rebill(
        session,
        attempt_id=c.attempt_id,
        tenant_id=c.tenant_id,
        batch_id=c.batch_id,
        job_id=c.job_id,
        model=c.model,
        priced=c.priced,
        settlement=Settlement.BILLED if c.priced is not None else Settlement.NOT_BILLED,
    )
    if (
        c.answer is not None
        and session.execute(select(Job.id).where(Job.id == c.job_id, Job.deleted_at.is_(None))).first()
    ):
        _keep_answers(session, [c.answer])
    return _CloseTotals(
        usd=delta.usd, billed=delta.billed_seconds, committed=delta.usd, touches_batch=True, late=True
    )


def _count_close(c: AttemptClose, totals: _CloseTotals) -> None:
    """Metrics of a closed attempt (after its commit)."""
    metrics.ATTEMPTS.labels(model=c.model, outcome=c.outcome.value).inc()
    if c.latency_ms is not None:
        metrics.PROVIDER_LATENCY.labels(model=c.model).observe(c.latency_ms / 1000.0)
    if c.priced is not None:
        # Counters only go up: a late answer counts what it billed (the sweeper's estimate never was).
        billed = c.priced.billed_audio_seconds if totals.late else totals.billed
        usd = c.priced.usd if totals.late else totals.usd
        metrics.AUDIO_BILLED_SECONDS.labels(model=c.model).inc(max(billed, 0.0))
        metrics.COST_USD.labels(model=c.model).inc(max(float(usd), 0.0))


@dataclass(frozen=True)
class Succeeded:
    """A job this call moved to `succeeded`, with its dedupe followers (read under the dedupe lock)."""

    followers: list[uuid.UUID]


@dataclass(frozen=True)
class JobSuccess:
    """A job's one transcript, to store as it moves `processing → succeeded` (see `succeed_job`)."""

    job_id: uuid.UUID
    group_id: uuid.UUID | None  # the run's token; None: any run
    text: str
    segments: list[dict[str, Any]]
    language: str | None
    model: str
    attempt_id: uuid.UUID | None
    provenance: dict[str, Any]
    close: AttemptClose | None = None  # the answering attempt, closed in the same transaction


class _TranscriptExists(Exception):
    """An earlier run's transcript is already stored: roll this transaction back and look again."""


def succeed_job(
    job_id: uuid.UUID,
    *,
    group_id: uuid.UUID | None,
    text_: str,
    segments: list[dict[str, Any]],
    language: str | None,
    model: str,
    attempt_id: uuid.UUID | None,
    provenance: dict[str, Any],
    close: AttemptClose | None = None,
) -> Succeeded | None:
    """Write the job's one transcript and move it `processing → succeeded`; None unless this call did it.

    One transaction does what used to take three: with `close`, the answering attempt is closed (cost
    record, totals) first — committed even when the job's compare-and-set fails, a paid answer is always
    recorded; then the job's CAS and its transcript; then its dedupe followers are read under the same
    advisory lock `dedupe` takes (so a follower attached at the last moment is never missed), for
    `completion.job_finished`. The batch's totals get one UPDATE for both (the batch row is the hot one).
    """
    return succeed_one(
        JobSuccess(job_id, group_id, text_, segments, language, model, attempt_id, provenance, close)
    )


@durable
def succeed_one(row: JobSuccess) -> Succeeded | None:
    """`succeed_job` for a `JobSuccess`, retried through a short database outage."""
    for _ in range(2):
        try:
            return _succeed([row])[0]
        except _TranscriptExists:
            continue  # the second pass sees the transcript and only closes the attempt
    return None


def succeed_jobs(rows: list[JobSuccess]) -> list[Succeeded | None]:
    """`succeed_job` for jobs whose answers came in together, in one transaction (group commit).

    Statements take all rows at once and the batch row is updated once per batch, which is what made
    one transaction per job a convoy on the hot batch row. The jobs must be distinct. Any error rolls the
    whole transaction back and is raised: the caller then writes each row with `succeed_one` (durable,
    and a job's lost compare-and-set or a transcript already stored is handled there one by one).
    """
    return _succeed(rows)


def _succeed(rows: list[JobSuccess]) -> list[Succeeded | None]:
    closes = [r.close for r in rows if r.close is not None]
    with session_scope() as session:
        close_totals = dict(
            zip([c.attempt_id for c in closes], _close_attempts(session, closes), strict=True)
        )
        ids = sorted({r.job_id for r in rows})
        by_id = {r.job_id: r for r in rows}
        won = {
            j.id: j
            for j in _sql(
                session,
                _SUCCEED_JOBS,
                {
                    "finished_at": now(),
                    "id": ids,
                    "group_id": [by_id[i].group_id for i in ids],
                    "model": [by_id[i].model for i in ids],
                },
            )
        }
        followers: dict[uuid.UUID, list[uuid.UUID]] = {}
        if won:
            stored = _insert_transcripts(session, [by_id[i] for i in won], won)
            if stored != set(won):
                # Stored by another run between our CAS and insert: keep that one, undo ours.
                raise _TranscriptExists()
            keys = sorted({f"{j.tenant_id}:{j.fingerprint}" for j in won.values() if j.fingerprint})
            if keys:
                _sql(session, _DEDUPE_LOCKS, {"keys": keys})
            followers = {i: [] for i in won}
            for leader, follower in _sql(session, _FOLLOWERS, {"ids": list(won)}):
                followers[leader].append(follower)
        batches: dict[uuid.UUID, list[Any]] = {}
        for r in rows:
            job = won.get(r.job_id)
            totals = close_totals.get(r.close.attempt_id) if r.close is not None else None
            batch_id = job.batch_id if job is not None else r.close.batch_id if r.close is not None else None
            if batch_id is None or (job is None and (totals is None or not totals.touches_batch)):
                continue
            sums = batches.setdefault(batch_id, [0.0, 0.0, Decimal(0), Decimal(0)])
            sums[0] += (job.duration_seconds or 0.0) if job is not None else 0.0
            if totals is not None:
                sums[1] += totals.billed
                sums[2] += totals.usd
                sums[3] += totals.committed
        for batch_id in sorted(batches):  # rows locked in id order
            audio, billed, cost, committed = batches[batch_id]
            add_batch_totals(
                session, batch_id, audio_seconds=audio, billed_seconds=billed, cost=cost, committed=committed
            )
    for c in closes:
        _count_close(c, close_totals[c.attempt_id])
    metrics.JOBS_FINISHED.labels(status=JobStatus.SUCCEEDED.value).inc(len(won))
    return [Succeeded(followers=followers[r.job_id]) if r.job_id in won else None for r in rows]


def _insert_transcripts(session: Any, rows: list[JobSuccess], jobs: dict[uuid.UUID, Any]) -> set[uuid.UUID]:
    """The transcripts of jobs that won their compare-and-set; the jobs whose transcript was stored."""
    inserted = _sql(
        session,
        _INSERT_TRANSCRIPTS,
        {
            "id": [uuid7() for _ in rows],
            "tenant_id": [jobs[r.job_id].tenant_id for r in rows],
            "job_id": [r.job_id for r in rows],
            "attempt_id": [r.attempt_id for r in rows],
            "text": [r.text for r in rows],
            "language": [r.language for r in rows],
            "segments": [_json(r.segments) for r in rows],
            "model": [r.model for r in rows],
            "provenance": [_json(r.provenance) for r in rows],
        },
    )
    return {r[0] for r in inserted}


@dataclass(frozen=True)
class FinishedBatch:
    """A batch that just became terminal."""

    id: uuid.UUID
    status: str
    webhook_url: str | None


def finish_batch_if_done(batch_id: uuid.UUID) -> FinishedBatch | None:
    """If every job of the batch is terminal, move it to completed/failed by CAS (once)."""
    with session_scope() as session:
        # Cheap first: one index probe per live status, not a count over a batch of thousands of jobs.
        live = session.execute(
            select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(LIVE_VALUES)).limit(1)
        ).first()
        if live is not None:
            return None
        counts: dict[str, int] = {
            status: int(n)
            for status, n in session.execute(
                select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
            ).all()
        }
        if not counts or any(status not in TERMINAL_VALUES for status in counts):
            return None
        succeeded = counts.get(JobStatus.SUCCEEDED.value, 0)
        failed = counts.get(JobStatus.FAILED.value, 0)
        status = BatchStatus.COMPLETED if succeeded > 0 or failed == 0 else BatchStatus.FAILED
        row = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                or_(Batch.status == BatchStatus.PROCESSING.value, Batch.status == BatchStatus.OPEN.value),
            )
            .values(status=status.value, completed_at=now())
            .returning(Batch.webhook_url)
        ).first()
    if row is None:
        return None
    return FinishedBatch(id=batch_id, status=status.value, webhook_url=row.webhook_url)


def batch_summary(batch_id: uuid.UUID) -> dict[str, Any] | None:
    """`{batch_id, status, counts, cost_usd}` for the webhook payload."""
    with session_scope() as session:
        batch = session.execute(
            select(Batch.id, Batch.status, Batch.cost_usd, Batch.tenant_id, Batch.webhook_url).where(
                Batch.id == batch_id
            )
        ).first()
        if batch is None:
            return None
        counts: dict[str, int] = {
            status: int(n)
            for status, n in session.execute(
                select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
            ).all()
        }
    return {
        "batch_id": str(batch.id),
        "status": batch.status,
        "counts": {"total": sum(counts.values()), **{k: int(v) for k, v in sorted(counts.items())}},
        "cost_usd": str(batch.cost_usd),
    }


def batches_of(job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """The batches these jobs belong to."""
    if not job_ids:
        return set()
    with session_scope() as session:
        return set(session.execute(select(Job.batch_id).where(Job.id.in_(job_ids))).scalars())
