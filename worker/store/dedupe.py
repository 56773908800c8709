"""Dedupe: identical audio (same tenant, PCM fingerprint, language and prompt) is transcribed once.

A job whose twin already has a transcript gets a copy (zero cost); one whose twin is in flight follows it
(`deduplicated_from_id`, no lease of its own) and worker.completion finishes it with its leader's outcome.
Decisions are serialised per (tenant, fingerprint) by transaction-scoped advisory locks (core.dedupe):
the completion of a leader reads its followers under the same lock, and so does the API ending a leader.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert

from core import metrics
from core.billing import add_batch_totals
from core.db import session_scope
from core.dedupe import dedupe_lock_key, lock_dedupe_keys
from core.ids import uuid7
from core.models import Job, Transcript
from core.statuses import JobStatus
from worker.store.probes import ProbedJob
from worker.store.sql import now


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
        lock_dedupe_keys(session, (dedupe_lock_key(r.tenant_id, r.fingerprint) for r in requests))
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


def release_followers(
    leader_id: uuid.UUID, *, only: list[uuid.UUID] | None = None
) -> dict[str, list[uuid.UUID]]:
    """Send a leader's followers (or `only` these of them) back to `queued`, on their own (its run ended
    without a transcript to share); their ids by priority, for `dispatch.send_prepare`."""
    query = (
        update(Job)
        .where(Job.deduplicated_from_id == leader_id, Job.status == JobStatus.PROCESSING.value)
        .values(status=JobStatus.QUEUED.value, deduplicated_from_id=None, queued_at=now())
        .returning(Job.id, Job.priority)
    )
    if only is not None:
        query = query.where(Job.id.in_(only))
    by_priority: dict[str, list[uuid.UUID]] = {}
    with session_scope() as session:
        for job_id, priority in session.execute(query).all():
            by_priority.setdefault(priority, []).append(job_id)
    return by_priority
