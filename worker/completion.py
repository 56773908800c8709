"""Completion: a job's transcript, and what follows a job becoming terminal.

A job's one transcript is inserted with `ON CONFLICT (job_id) DO NOTHING` and the job moves
`processing → succeeded` by CAS in the same transaction (`succeed_job`), with the close of its answering
attempt. Jobs answered at about the same moment are completed together (`succeed_jobs`, the transcribe
worker's group commit): one transaction, one statement per kind of row over all of them (`unnest`
arrays, fixed SQL text), one UPDATE of each batch row; any failure writes them one by one instead.

Then:

1. Its dedupe followers (jobs with identical audio that waited for it) are resolved: a succeeded leader's
   transcript is copied to them (zero cost) when their own model chain accepts the models that wrote it
   (core.dedupe); a failed leader's failure is theirs too (the audio is the same); a skipped or
   cancelled leader (budget or user action, not about the audio), one whose transcript is gone or was
   written by a model a follower's chain does not accept, sends them back to `queued` to be prepared
   again on their own. The followers are read under the same advisory lock that `worker.store.dedupe`
   takes (core.dedupe), so a follower attached at the last moment is never missed. A worker that dies
   between a leader's end and this step leaves followers with no lease: the sweeper finds them
   (`resolve_stranded_followers`). A leader the API ends (cancel, delete) hands its followers back
   itself (api.service).
2. The batch is finished (completed/failed by CAS) if that was its last non-terminal job, and its webhook
   is queued. A group task checks its batches once, after all its jobs ended (`finish_batches`), instead
   of once per job: a batch is never done while a job of it in the same group is still running.
   `finish_batch_if_done` counts the batch's non-terminal jobs in a *new* transaction (after the job's
   commit), so of two jobs finishing at once at least the later one sees the batch done; the batch's own
   CAS makes exactly one of them the finisher.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import aliased

from core import metrics
from core.billing import add_batch_totals
from core.db import durable, session_scope
from core.dedupe import dedupe_lock_key, lock_dedupe_keys
from core.ids import uuid7
from core.models import Batch, Job, Transcript
from core.statuses import BatchStatus, JobStatus, Timestamps, effective_timestamps
from worker import dispatch
from worker.store.attempts import AttemptClose, close_attempts_in, count_close
from worker.store.batches import batches_of
from worker.store.claims import end_job
from worker.store.dedupe import copy_transcript, release_followers
from worker.store.sql import LIVE_VALUES, TERMINAL_VALUES, now, run_sql, to_json
from worker.store.transcripts import new_token, pending_alignment, stale_alignments

log = logging.getLogger(__name__)


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


_SUCCEED_JOBS = f"""
UPDATE jobs AS j
SET status = '{JobStatus.SUCCEEDED.value}', model = v.model, finished_at = %(finished_at)s,
    lease_owner = NULL, lease_expires_at = NULL, error_code = NULL, error_message = NULL, updated_at = now()
FROM unnest(%(id)s::uuid[], %(group_id)s::uuid[], %(model)s::text[]) AS v(id, group_id, model)
WHERE j.id = v.id AND j.status = '{JobStatus.PROCESSING.value}'
  AND (v.group_id IS NULL OR j.group_id = v.group_id)
  AND NOT EXISTS (SELECT 1 FROM transcripts AS t WHERE t.job_id = j.id)
RETURNING j.id, j.tenant_id, j.batch_id, j.duration_seconds, j.fingerprint,
    (SELECT b.profile FROM batches AS b WHERE b.id = j.batch_id) AS profile,
    (SELECT b.timestamps FROM batches AS b WHERE b.id = j.batch_id) AS timestamps
"""
_FOLLOWERS = f"""
SELECT deduplicated_from_id, id FROM jobs
WHERE deduplicated_from_id = ANY(%(ids)s::uuid[]) AND status = '{JobStatus.PROCESSING.value}'
"""


def _succeed(rows: list[JobSuccess]) -> list[Succeeded | None]:
    closes = [r.close for r in rows if r.close is not None]
    with session_scope() as session:
        close_totals = dict(
            zip([c.attempt_id for c in closes], close_attempts_in(session, closes), strict=True)
        )
        ids = sorted({r.job_id for r in rows})
        by_id = {r.job_id: r for r in rows}
        won = {
            j.id: j
            for j in run_sql(
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
        aligns = alignments_to_request([(by_id[i].text, j.profile, j.timestamps) for i, j in won.items()])
        tokens = {i: a for i, a in zip(won, aligns, strict=True) if a is not None}
        if won:
            stored = _insert_transcripts(session, [by_id[i] for i in won], won, tokens)
            if stored != set(won):
                # Stored by another run between our CAS and insert: keep that one, undo ours.
                raise _TranscriptExists()
            # The same locks, in the same order, as every other dedupe writer (core.dedupe).
            lock_dedupe_keys(
                session, (dedupe_lock_key(j.tenant_id, j.fingerprint) for j in won.values() if j.fingerprint)
            )
            followers = {i: [] for i in won}
            for leader, follower in run_sql(session, _FOLLOWERS, {"ids": list(won)}):
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
        count_close(c, close_totals[c.attempt_id])
    send_aligns(tokens)  # after the commit: the task reads the pending transcript
    metrics.JOBS_FINISHED.labels(status=JobStatus.SUCCEEDED.value).inc(len(won))
    return [Succeeded(followers=followers[r.job_id]) if r.job_id in won else None for r in rows]


_INSERT_TRANSCRIPTS = """
INSERT INTO transcripts (id, tenant_id, job_id, attempt_id, text, language, segments, model, provenance,
    alignment)
SELECT v.id, v.tenant_id, v.job_id, v.attempt_id, v.text, v.language, v.segments::jsonb, v.model,
    v.provenance::jsonb, v.alignment::jsonb
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(job_id)s::uuid[], %(attempt_id)s::uuid[],
            %(text)s::text[], %(language)s::text[], %(segments)s::text[], %(model)s::text[],
            %(provenance)s::text[], %(alignment)s::text[])
     AS v(id, tenant_id, job_id, attempt_id, text, language, segments, model, provenance, alignment)
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""


def _insert_transcripts(
    session: Any,
    rows: list[JobSuccess],
    jobs: dict[uuid.UUID, Any],
    aligns: dict[uuid.UUID, tuple[str, Timestamps]],
) -> set[uuid.UUID]:
    """The transcripts of jobs that won their compare-and-set (with a pending alignment where their batch
    asks for timestamps); the jobs whose transcript was stored."""
    inserted = run_sql(
        session,
        _INSERT_TRANSCRIPTS,
        {
            "id": [uuid7() for _ in rows],
            "tenant_id": [jobs[r.job_id].tenant_id for r in rows],
            "job_id": [r.job_id for r in rows],
            "attempt_id": [r.attempt_id for r in rows],
            "text": [r.text for r in rows],
            "language": [r.language for r in rows],
            "segments": [to_json(r.segments) for r in rows],
            "model": [r.model for r in rows],
            "provenance": [to_json(r.provenance) for r in rows],
            "alignment": [
                to_json(pending_alignment(*aligns[r.job_id])) if r.job_id in aligns else None for r in rows
            ],
        },
    )
    return {r[0] for r in inserted}


def alignments_to_request(
    jobs: list[tuple[str, str | None, str | None]],
) -> list[tuple[str, Timestamps] | None]:
    """Per (text, batch profile, batch timestamps): a new alignment token and granularity when the batch
    asks for timestamps and there is text to time (the align stage, queue `align`), else None."""
    out: list[tuple[str, Timestamps] | None] = []
    for text, profile, chosen in jobs:
        timestamps = effective_timestamps(profile or "", chosen)
        wanted = timestamps != Timestamps.NONE and bool(text.strip())
        out.append((new_token(), timestamps) if wanted else None)
    return out


def _lock_and_state(job_id: uuid.UUID) -> tuple[str, str | None, str | None, list[uuid.UUID]] | None:
    with session_scope() as session:
        job = session.execute(
            select(Job.status, Job.error_code, Job.error_message, Job.tenant_id, Job.fingerprint).where(
                Job.id == job_id
            )
        ).first()
        if job is None:
            return None
        if job.fingerprint:
            lock_dedupe_keys(session, [dedupe_lock_key(job.tenant_id, job.fingerprint)])
        followers = list(
            session.execute(
                select(Job.id).where(
                    Job.deduplicated_from_id == job_id, Job.status == JobStatus.PROCESSING.value
                )
            ).scalars()
        )
        return job.status, job.error_code, job.error_message, followers


def job_finished(
    job_id: uuid.UUID,
    batch_id: uuid.UUID,
    *,
    check_batch: bool = True,
    succeeded: Succeeded | None = None,
) -> None:
    """Resolve followers and finish batches after `job_id` became terminal.

    With `succeeded` (what `succeed_job` returned: the job succeeded and its followers were read
    under the dedupe lock in that same transaction) the state is not read again.
    """
    state: tuple[str, str | None, str | None, list[uuid.UUID]] | None
    if succeeded is not None:
        state = (JobStatus.SUCCEEDED.value, None, None, succeeded.followers)
    else:
        state = _lock_and_state(job_id)
    batches = {batch_id} if check_batch else set()
    if state is not None:
        status, code, message, followers = state
        ended: list[uuid.UUID] = []
        others: list[uuid.UUID] = []
        for follower in followers:
            if status == JobStatus.SUCCEEDED.value:
                shared = copy_transcript(follower, job_id, as_follower=True)
            elif status == JobStatus.FAILED.value:
                shared = end_job(follower, status=JobStatus.FAILED, code=code, message=message)
            else:
                shared = False
            # Nothing shared (skipped, cancelled, or its transcript is gone): on their own again.
            (ended if shared else others).append(follower)
        # A follower may have followers of its own (a re-run leader that found another leader).
        for follower in ended:
            job_finished(follower, batch_id, check_batch=False)
        if status == JobStatus.SUCCEEDED.value and ended:
            request_alignments(ended)
        if others:
            for priority, requeued in release_followers(job_id, only=others).items():
                dispatch.send_prepare(requeued, priority=priority)
        if followers:
            batches |= batches_of(followers)
    finish_batches(batches)


# No alignment document: SQL NULL, or the JSON null an ORM insert of None writes.
_NO_ALIGNMENT = func.coalesce(func.jsonb_typeof(Transcript.alignment), "null") == "null"


def request_alignments(job_ids: list[uuid.UUID]) -> None:
    """Queue the align stage for succeeded jobs whose transcript was copied from a twin (dedupe) without
    final timings, when their batch asks for timestamps (`succeed_job` does it for the others)."""
    with session_scope() as session:
        rows = session.execute(
            select(Transcript.job_id, Transcript.text, Batch.profile, Batch.timestamps)
            .join(Job, Job.id == Transcript.job_id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Transcript.job_id.in_(job_ids), _NO_ALIGNMENT)
        ).all()
        wanted = alignments_to_request([(r.text, r.profile, r.timestamps) for r in rows])
        tokens = {r.job_id: a for r, a in zip(rows, wanted, strict=True) if a is not None}
        for job_id, (token, timestamps) in tokens.items():
            session.execute(
                update(Transcript)
                .where(Transcript.job_id == job_id, _NO_ALIGNMENT)
                .values(alignment=pending_alignment(token, timestamps))
            )
    send_aligns(tokens)


def send_aligns(tokens: dict[uuid.UUID, tuple[str, Timestamps]]) -> None:
    """Send the align tasks of committed pending alignments; a broker error is logged, not raised (the job
    has succeeded: the sweeper sends the task again later, `resend_stale_alignments`)."""
    for job_id, (token, _) in tokens.items():
        try:
            dispatch.send_align(job_id, token)
        except Exception as exc:  # kombu/redis errors of many kinds
            log.warning(
                "align task of job %s not sent (%s); the sweeper resends it", job_id, type(exc).__name__
            )


def resend_stale_alignments() -> int:
    """Send again the align tasks of alignments pending for too long (the sweeper's safety net); how many."""
    stale = stale_alignments()
    for job_id, token in stale:
        dispatch.send_align(job_id, token)
    return len(stale)


# A leader's completion resolves its followers right after its commit; one ended longer ago than this
# with followers still waiting lost that step (its worker died in between).
STRANDED_AFTER_SECONDS = 60.0


def resolve_stranded_followers(*, limit: int = 100) -> int:
    """Resolve the followers of leaders that ended over `STRANDED_AFTER_SECONDS` ago without it (the
    sweeper's safety net: a follower has no lease, so nothing else would ever move it); how many leaders."""
    leader = aliased(Job)
    with session_scope() as session:
        stranded = session.execute(
            select(leader.id, leader.batch_id)
            .where(
                leader.status.in_(TERMINAL_VALUES),
                leader.finished_at < now() - timedelta(seconds=STRANDED_AFTER_SECONDS),
                # Followers have no lease: this reads the partial index on processing jobs' leases.
                select(Job.id)
                .where(
                    Job.deduplicated_from_id == leader.id,
                    Job.status == JobStatus.PROCESSING.value,
                    Job.lease_expires_at.is_(None),
                )
                .exists(),
            )
            .limit(limit)
        ).all()
    for leader_id, batch_id in stranded:
        job_finished(leader_id, batch_id)
    return len(stranded)


def finish_batches(batch_ids: set[uuid.UUID]) -> None:
    """Finish each of these batches that has no live job left (by CAS, once) and queue its webhook."""
    for bid in batch_ids:
        finish_batch(bid)


def finish_batch(batch_id: uuid.UUID) -> bool:
    """Finish this batch if no live job is left (by CAS, once) and queue its webhook; True if it did."""
    finished = finish_batch_if_done(batch_id)
    if finished is None:
        return False
    log.info("batch finished", extra={"batch_id": str(batch_id), "status": finished.status})
    if finished.webhook_url:
        dispatch.send_webhook(batch_id)
    return True


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
        counts = _status_counts(session, batch_id)
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
        counts = _status_counts(session, batch_id)
    return {
        "batch_id": str(batch.id),
        "status": batch.status,
        "counts": {"total": sum(counts.values()), **{k: int(v) for k, v in sorted(counts.items())}},
        "cost_usd": str(batch.cost_usd),
    }


def _status_counts(session: Any, batch_id: uuid.UUID) -> dict[str, int]:
    """How many of the batch's jobs are in each status."""
    return {
        status: int(n)
        for status, n in session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
    }
