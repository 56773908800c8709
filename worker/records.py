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
- The writes that follow a paid provider answer (closing the attempt with its cost and answer, ending
  the job) retry through a short database outage (`durable`, up to a minute): losing them would
  mean calling the provider again and paying twice, or leaving a billed call to an estimate.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import ColumnElement, and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert

from core import metrics
from core.billing import add_batch_totals
from core.db import durable, session_scope
from core.ids import uuid7
from core.models import Attempt, Batch, CostRecord, Group, Job, JobAnswer, JobChunk, Transcript
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
    batches = load_batches(batch_ids)
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
    with session_scope() as session:
        result = session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.PROCESSING.value)
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


def dedupe(
    *,
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    fingerprint: str,
    language: str | None,
    prompt: str | None,
    probe: ProbedJob | None = None,
) -> DedupeDecision:
    """Find a twin (same tenant, same PCM fingerprint, same language and prompt options).

    Serialised per (tenant, fingerprint) with a transaction-scoped advisory lock, so two workers preparing
    identical audio at once cannot both become leaders. The job's fingerprint is written here, under the
    lock, together with the decision: a processing job with a fingerprint and no `deduplicated_from_id`
    is therefore always a decided leader, never a twin that has not decided yet (which could still end up
    following someone, making chains of followers).

    With `probe`, the job's probe results are written by the same UPDATE (what `save_probes` would do in a
    transaction of its own: one round trip and one commit per prepared job fewer).
    """
    decision = _dedupe(job_id, tenant_id, fingerprint, language, prompt, probe)
    if probe is not None:
        metrics.AUDIO_SUBMITTED_SECONDS.inc(probe.duration_seconds)
    return decision


def _dedupe(
    job_id: uuid.UUID,
    tenant_id: uuid.UUID,
    fingerprint: str,
    language: str | None,
    prompt: str | None,
    probe: ProbedJob | None,
) -> DedupeDecision:
    with session_scope() as session:
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"{tenant_id}:{fingerprint}"},
        )
        twin_filter = and_(
            Job.tenant_id == tenant_id,
            Job.fingerprint == fingerprint,
            Job.id != job_id,
            Job.deleted_at.is_(None),
            Batch.language.is_not_distinct_from(language),
            Batch.prompt.is_not_distinct_from(prompt),
        )
        finished = session.execute(
            select(Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .join(Transcript, Transcript.job_id == Job.id)
            .where(twin_filter, Job.status == JobStatus.SUCCEEDED.value)
            .order_by(Job.finished_at)
            .limit(1)
        ).scalar()
        mark = (
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.PROCESSING.value)
            .values(**(_probe_values(probe) if probe is not None else {}))
        )
        if finished is not None:
            session.execute(mark.values(fingerprint=fingerprint))
            return DedupeDecision("copy", finished)
        inflight = session.execute(
            select(Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(
                twin_filter,
                Job.status == JobStatus.PROCESSING.value,
                Job.deduplicated_from_id.is_(None),
            )
            .order_by(Job.started_at)
            .limit(1)
        ).scalar()
        if inflight is not None:
            # A follower holds no lease: it is finished (or released) by its leader's outcome.
            session.execute(
                mark.values(
                    fingerprint=fingerprint,
                    deduplicated_from_id=inflight,
                    lease_expires_at=None,
                    lease_owner=None,
                )
            )
            return DedupeDecision("wait", inflight)
        # Leader: committed with the lock held, so the next twin to take the lock finds it.
        session.execute(mark.values(fingerprint=fingerprint))
        return DedupeDecision("leader")


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


def assign_groups(plans: list[GroupPlan]) -> list[uuid.UUID]:
    """Create the groups and point their (still processing) jobs at them; returns the group ids."""
    ids: list[uuid.UUID] = []
    if not plans:
        return ids
    with session_scope() as session:
        for plan in plans:
            gid = uuid7()
            ids.append(gid)
            session.execute(
                insert(Group).values(
                    id=gid,
                    tenant_id=plan.tenant_id,
                    batch_id=plan.batch_id,
                    key=plan.key[:200],
                    duration_class=plan.duration_class,
                    status=GroupStatus.PENDING.value,
                    job_count=len(plan.members),
                    total_seconds=sum(s for _, s in plan.members),
                )
            )
            session.execute(
                update(Job)
                .where(Job.id.in_([j for j, _ in plan.members]), Job.status == JobStatus.PROCESSING.value)
                .values(group_id=gid)
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


def claim_group(
    group_id: uuid.UUID, *, owner: str, lease_seconds: float, only: list[uuid.UUID] | None = None
) -> list[GroupJob]:
    """Take the lease on a group's still-processing jobs (or `only` these) and load what they need."""
    ts = now()
    conditions = [Job.group_id == group_id, Job.status == JobStatus.PROCESSING.value]
    if only is not None:
        conditions.append(Job.id.in_(only))
    with session_scope() as session:
        rows = session.execute(
            update(Job)
            .where(*conditions)
            .values(lease_owner=owner, lease_expires_at=ts + timedelta(seconds=lease_seconds))
            .returning(
                Job.id, Job.tenant_id, Job.batch_id, Job.duration_seconds, Job.speech_seconds, Job.time_map
            )
        ).all()
        session.execute(
            update(Group)
            .where(Group.id == group_id, Group.status == GroupStatus.PENDING.value)
            .values(status=GroupStatus.RUNNING.value)
        )
        ids = [r.id for r in rows]
        chunk_rows = (
            session.execute(
                select(JobChunk.job_id, JobChunk.index, JobChunk.object_key)
                .where(JobChunk.job_id.in_(ids))
                .order_by(JobChunk.job_id, JobChunk.index)
            ).all()
            if ids
            else []
        )
        answer_rows = (
            session.execute(select(JobAnswer).where(JobAnswer.job_id.in_(ids))).scalars().all() if ids else []
        )
    answers: dict[uuid.UUID, dict[str, dict[str, Any]]] = {}
    for a in answer_rows:
        answers.setdefault(a.job_id, {})[a.piece] = {
            "start_seconds": a.start_seconds,
            "end_seconds": a.end_seconds,
            "text": a.text,
            "segments": a.segments,
            "language": a.language,
            "model": a.model,
            "attempt_id": a.attempt_id,
        }
    by_job: dict[uuid.UUID, list[dict[str, Any]]] = {}
    for c in chunk_rows:
        by_job.setdefault(c.job_id, []).append({"index": c.index, "object_key": c.object_key})
    jobs = [
        GroupJob(
            id=r.id,
            tenant_id=r.tenant_id,
            batch_id=r.batch_id,
            duration_seconds=r.duration_seconds or 0.0,
            speech_seconds=r.speech_seconds or 0.0,
            time_map=r.time_map or {},
            chunks=by_job.get(r.id, []),
            answers=answers.get(r.id, {}),
        )
        for r in rows
    ]
    jobs.sort(key=lambda j: j.id)
    return jobs


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
_ANSWER_COLUMNS = ("start_seconds", "end_seconds", "text", "segments", "language", "model", "attempt_id")


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


def _keep_answer(session: Any, answer: KeptAnswer) -> None:
    """Store a paid answer (the first one for a piece wins; one for a re-planned piece replaces it)."""
    stmt = insert(JobAnswer).values(
        id=uuid7(),
        job_id=answer.job_id,
        piece=piece_key(answer.index),
        start_seconds=answer.start_seconds,
        end_seconds=answer.end_seconds,
        text=answer.text,
        segments=answer.segments,
        language=answer.language,
        model=answer.model,
        attempt_id=answer.attempt_id,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=[JobAnswer.job_id, JobAnswer.piece],
            set_={c: getattr(stmt.excluded, c) for c in _ANSWER_COLUMNS},
            where=or_(
                func.abs(JobAnswer.start_seconds - stmt.excluded.start_seconds) > _SAME_BOUNDS_SECONDS,
                func.abs(JobAnswer.end_seconds - stmt.excluded.end_seconds) > _SAME_BOUNDS_SECONDS,
            ),
        )
    )


@durable
def keep_answer(answer: KeptAnswer) -> None:
    """Keep an answer assembled from several calls (a piece split after a 413): each call is already
    closed with its cost; this makes the whole piece reusable by a later run."""
    with session_scope() as session:
        if session.execute(select(Job.deleted_at).where(Job.id == answer.job_id)).scalar() is None:
            _keep_answer(session, answer)


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
    ts = now()
    with session_scope() as session:
        session.execute(
            insert(Attempt).values(
                [{**vars(r), "outcome": AttemptOutcome.PENDING.value, "started_at": ts} for r in rows]
            )
        )


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
        totals = _close_attempt_in(session, close)
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


@dataclass(frozen=True)
class _CloseTotals:
    """What closing an attempt adds to its batch's totals."""

    usd: Decimal
    billed: float
    committed: Decimal
    touches_batch: bool
    late: bool = False  # a late answer: the totals moved by a difference, the metrics count the answer


def _close_attempt_in(session: Any, c: AttemptClose) -> _CloseTotals:
    """The attempt's UPDATE, its cost record and the job's totals; the batch's are the caller's to add."""
    usd = c.priced.usd if c.priced is not None else Decimal(0)
    billed = c.priced.billed_audio_seconds if c.priced is not None else 0.0
    values = {
        "outcome": c.outcome.value,
        "http_status": c.http_status,
        "error_code": c.error_code,
        "error_message": (c.error_message or "")[:2000] or None,
        "ended_at": now(),
        "latency_ms": c.latency_ms,
    }
    # Compare-and-set against the sweeper: an attempt it already abandoned (and charged an estimate) is
    # closed by `_close_late`, which puts the truth in place of the estimate.
    closed = session.execute(
        update(Attempt)
        .where(Attempt.id == c.attempt_id, Attempt.outcome != AttemptOutcome.ABANDONED.value)
        .values(**values)
        .returning(Attempt.id)
    ).first()
    if closed is None:
        late = _close_late(session, c, values)
        if late is not None:
            return late
    priced, usage = c.priced, c.usage
    if priced is not None or c.compute_seconds is not None:
        usage_type = getattr(priced, "usage_type", None) or (
            str(usage.get("type")) if usage and usage.get("type") else "none"
        )
        inserted = session.execute(
            insert(CostRecord)
            .values(
                id=uuid7(),
                tenant_id=c.tenant_id,
                batch_id=c.batch_id,
                job_id=c.job_id,
                attempt_id=c.attempt_id,
                model=c.model,
                usage_type=usage_type,
                billed_audio_seconds=billed,
                input_tokens=getattr(priced, "input_tokens", None),
                input_audio_tokens=getattr(priced, "input_audio_tokens", None),
                input_text_tokens=getattr(priced, "input_text_tokens", None),
                output_tokens=getattr(priced, "output_tokens", None),
                compute_seconds=c.compute_seconds,
                unit_prices=dict(priced.unit_prices) if priced is not None else {},
                price_table_version=priced.price_table_version if priced is not None else "local",
                usd=usd,
                estimated=bool(priced.estimated) if priced is not None else False,
            )
            .on_conflict_do_nothing(index_elements=[CostRecord.attempt_id])
            .returning(CostRecord.id)
        ).first()
        if inserted is None:
            # Already charged (an abandoned call's estimate): count it once.
            usd, billed = Decimal(0), 0.0
        job = session.execute(
            update(Job)
            .where(Job.id == c.job_id)
            .values(cost_usd=Job.cost_usd + usd, billed_seconds=Job.billed_seconds + billed)
            .returning(Job.deleted_at)
        ).first()
        if c.answer is not None and job is not None and job.deleted_at is None:
            _keep_answer(session, c.answer)
    return _CloseTotals(
        usd=usd,
        billed=billed,
        committed=usd - c.reserved_usd,
        touches_batch=priced is not None or bool(c.reserved_usd),
    )


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
        _keep_answer(session, c.answer)
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


class _TranscriptExists(Exception):
    """An earlier run's transcript is already stored: roll this transaction back and look again."""


@durable
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
    for _ in range(2):
        try:
            return _succeed(job_id, group_id, text_, segments, language, model, attempt_id, provenance, close)
        except _TranscriptExists:
            continue  # the second pass sees the transcript and only closes the attempt
    return None


def _succeed(
    job_id: uuid.UUID,
    group_id: uuid.UUID | None,
    text_: str,
    segments: list[dict[str, Any]],
    language: str | None,
    model: str,
    attempt_id: uuid.UUID | None,
    provenance: dict[str, Any],
    close: AttemptClose | None,
) -> Succeeded | None:
    has_transcript = select(Transcript.id).where(Transcript.job_id == job_id).exists()
    succeeded: Succeeded | None = None
    with session_scope() as session:
        totals = _close_attempt_in(session, close) if close is not None else None
        job = session.execute(
            update(Job)
            .where(*_processing_job(job_id, group_id), ~has_transcript)
            .values(
                status=JobStatus.SUCCEEDED.value,
                model=model,
                finished_at=now(),
                lease_owner=None,
                lease_expires_at=None,
                error_code=None,
                error_message=None,
            )
            .returning(Job.tenant_id, Job.batch_id, Job.duration_seconds, Job.fingerprint)
        ).first()
        if job is not None:
            inserted = session.execute(
                insert(Transcript)
                .values(
                    id=uuid7(),
                    tenant_id=job.tenant_id,
                    job_id=job_id,
                    attempt_id=attempt_id,
                    text=text_,
                    language=language,
                    segments=segments,
                    model=model,
                    provenance=provenance,
                )
                .on_conflict_do_nothing(index_elements=[Transcript.job_id])
                .returning(Transcript.id)
            ).first()
            if inserted is None:
                # Stored by another run between our CAS and insert: keep that one, undo ours.
                raise _TranscriptExists()
            if job.fingerprint:
                session.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                    {"k": f"{job.tenant_id}:{job.fingerprint}"},
                )
            succeeded = Succeeded(
                followers=list(
                    session.execute(
                        select(Job.id).where(
                            Job.deduplicated_from_id == job_id, Job.status == JobStatus.PROCESSING.value
                        )
                    ).scalars()
                )
            )
        batch_id = job.batch_id if job is not None else close.batch_id if close is not None else None
        audio_seconds = (job.duration_seconds or 0.0) if job is not None else 0.0
        if batch_id is not None and (job is not None or (totals is not None and totals.touches_batch)):
            add_batch_totals(
                session,
                batch_id,
                audio_seconds=audio_seconds,
                billed_seconds=totals.billed if totals is not None else 0.0,
                cost=totals.usd if totals is not None else Decimal(0),
                committed=totals.committed if totals is not None else Decimal(0),
            )
    if close is not None and totals is not None:
        _count_close(close, totals)
    if succeeded is not None:
        metrics.JOBS_FINISHED.labels(status=JobStatus.SUCCEEDED.value).inc()
    return succeeded


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
