"""Dedupe: identical audio (same tenant, PCM fingerprint, language and prompt) is transcribed once.

A job whose twin already has a transcript gets a copy (zero cost); one whose twin is in flight follows it
(`deduplicated_from_id`, no lease of its own) and worker.completion finishes it with its leader's outcome.
Only twins at least as good as the job's batch asks for count (its model chain; the rules are in
core.dedupe).
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
from core.dedupe import (
    dedupe_lock_key,
    lock_dedupe_keys,
    may_follow,
    may_reuse,
    takes_leader_outcome,
    transcript_models,
)
from core.ids import uuid7
from core.models import Job, Transcript
from core.settings import get_settings
from core.statuses import AlignmentStatus, JobStatus
from worker.grouping import chain_entries, job_route, model_chain
from worker.store.batches import load_batches_in
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
    chain: tuple[str, ...]  # its batch's model chain: which twins' transcripts it may take
    probe: ProbedJob | None = None


_STILL_PROCESSING = text(
    "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'processing'"
    " ORDER BY id FOR UPDATE"
)
# The twins of these audios (same tenant, fingerprint, language and prompt): finished ones with a
# transcript and decided leaders still in flight (a processing job with a fingerprint and no leader). One
# row per kind of twin whose reuse the chain rules (core.dedupe) tell apart: per transcript's models for a
# finished twin (the earliest finished), per route for one in flight (the earliest started): its batch's
# models, routing options and its trimmed seconds (worker.grouping.job_route).
_TWINS = text(
    """
    SELECT DISTINCT ON (j.tenant_id, j.fingerprint, b.language, b.prompt, j.status, t.model, t.models,
                        CASE WHEN j.status = 'processing' THEN b.models END,
                        CASE WHEN j.status = 'processing' THEN concat_ws('|', b.routing, b.diarize,
                            b.timestamps, b.profile, j.speech_seconds) END)
           j.id, j.tenant_id, j.fingerprint, b.language, b.prompt, j.status, j.finished_at, j.started_at,
           t.model AS transcript_model, t.models AS transcript_models, b.id AS batch_id, j.speech_seconds
    FROM jobs j
    JOIN batches b ON b.id = j.batch_id
    LEFT JOIN LATERAL (
        SELECT tr.model, tr.provenance -> 'models' AS models FROM transcripts tr WHERE tr.job_id = j.id
    ) t ON true
    WHERE (j.tenant_id, j.fingerprint) IN (
            SELECT * FROM unnest(CAST(:tenants AS uuid[]), CAST(:fingerprints AS text[])))
      AND j.deleted_at IS NULL
      AND j.id <> ALL(CAST(:ids AS uuid[]))
      AND (
        (j.status = 'succeeded' AND t.model IS NOT NULL)
        OR (j.status = 'processing' AND j.deduplicated_from_id IS NULL)
      )
    ORDER BY j.tenant_id, j.fingerprint, b.language, b.prompt, j.status, t.model, t.models,
             CASE WHEN j.status = 'processing' THEN b.models END,
             CASE WHEN j.status = 'processing' THEN concat_ws('|', b.routing, b.diarize,
                 b.timestamps, b.profile, j.speech_seconds) END,
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

    A twin counts only when the request's model chain accepts it (core.dedupe): a finished twin whose
    transcript its first choice wrote (`may_reuse`, the earliest finished), a leader in flight with the
    same first choice (`may_follow`, the earliest started).

    One transaction for all the requests, decided in order as if one after the other: a later request
    with the same audio as an earlier leader of the list waits for it (when its chain may). A request's
    `probe` is written by the same UPDATE (what `save_probes` would do in a transaction of its own).
    """
    if not requests:
        return []
    ids = [r.job_id for r in requests]
    decisions: list[DedupeDecision] = []
    with session_scope() as session:
        lock_dedupe_keys(session, (dedupe_lock_key(r.tenant_id, r.fingerprint) for r in requests))
        processing = set(session.execute(_STILL_PROCESSING, {"ids": ids}).scalars())
        twins = _Twins(session, requests, ids)
        for r in requests:
            key = (r.tenant_id, r.fingerprint, r.language, r.prompt)
            finished = twins.finished(key, r.chain)
            inflight = twins.inflight(key, r.chain)
            if finished is not None:
                decisions.append(DedupeDecision("copy", finished))
            elif inflight is not None:
                decisions.append(DedupeDecision("wait", inflight))
            else:
                decisions.append(DedupeDecision("leader"))
                if r.job_id in processing:
                    # A leader committed under the lock: the next twin (in this list or after it) finds it.
                    twins.add_leader(key, r.job_id, r.chain)
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


def _earliest(candidate: tuple[Any, ...]) -> float:
    return float(candidate[0].timestamp()) if candidate[0] is not None else float("inf")


class _Twins:
    """The twins `_TWINS` found for a list of requests, by (tenant, fingerprint, language, prompt), in the
    order they are preferred; leaders decided in this transaction are added as they are decided."""

    def __init__(self, session: Any, requests: list[DedupeRequest], ids: list[uuid.UUID]) -> None:
        settings = get_settings()
        self._finished: dict[tuple[Any, ...], list[tuple[Any, uuid.UUID, list[str]]]] = {}
        self._inflight: dict[tuple[Any, ...], list[tuple[Any, uuid.UUID, tuple[str, ...]]]] = {}
        pairs = sorted({(r.tenant_id, r.fingerprint) for r in requests})
        params = {"tenants": [t for t, _ in pairs], "fingerprints": [f for _, f in pairs], "ids": ids}
        rows = session.execute(_TWINS, params).all()
        # A leader in flight runs its routed chain, as prepare routed it (worker.grouping.job_route).
        batches = load_batches_in(
            session, {row.batch_id for row in rows if row.status != JobStatus.SUCCEEDED.value}
        )
        for row in rows:
            key = (row.tenant_id, row.fingerprint, row.language, row.prompt)
            if row.status == JobStatus.SUCCEEDED.value:
                models = transcript_models(row.transcript_model, {"models": row.transcript_models})
                models = chain_entries(models, settings)  # compared with chain entries
                self._finished.setdefault(key, []).append((row.finished_at, row.id, models))
            else:
                chain = job_route(batches[row.batch_id], row.speech_seconds or 0.0, settings).chain
                self._inflight.setdefault(key, []).append((row.started_at, row.id, chain))
        for found in self._finished.values():
            found.sort(key=_earliest)
        for leaders in self._inflight.values():
            leaders.sort(key=_earliest)

    def finished(self, key: tuple[Any, ...], chain: tuple[str, ...]) -> uuid.UUID | None:
        """The earliest finished twin whose transcript this chain may reuse."""
        return next((i for _, i, models in self._finished.get(key, []) if may_reuse(models, chain)), None)

    def inflight(self, key: tuple[Any, ...], chain: tuple[str, ...]) -> uuid.UUID | None:
        """The earliest-started leader in flight this chain may follow."""
        return next((i for _, i, lead in self._inflight.get(key, []) if may_follow(lead, chain)), None)

    def add_leader(self, key: tuple[Any, ...], job_id: uuid.UUID, chain: tuple[str, ...]) -> None:
        """A leader decided now: after every one already in flight."""
        self._inflight.setdefault(key, []).append((None, job_id, chain))


def final_alignment(doc: Any) -> dict[str, Any] | None:
    """A twin's timings worth copying (aligned, partial or failed: same audio, same times), else None."""
    if isinstance(doc, dict) and doc.get("status") not in (None, AlignmentStatus.PENDING.value):
        return {k: v for k, v in doc.items() if k != "token"}
    return None


def copy_transcript(job_id: uuid.UUID, twin_id: uuid.UUID, *, as_follower: bool = False) -> bool:
    """Finish a job with its twin's transcript: zero cost, `deduplicated_from_id` set. True if done.

    `as_follower`: the job waited for this twin as its leader, and takes its transcript only when every
    model that wrote it is one its own chain accepts (`core.dedupe.takes_leader_outcome`).
    """
    with session_scope() as session:
        twin = session.execute(select(Transcript).where(Transcript.job_id == twin_id)).scalar_one_or_none()
        if twin is None:
            return False
        models = transcript_models(twin.model, twin.provenance)
        if as_follower and not takes_leader_outcome(
            chain_entries(models, get_settings()), _chain_of(session, job_id)
        ):
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
                alignment=final_alignment(twin.alignment),
                provenance={
                    "deduplicated_from": str(twin_id),
                    "source_attempt_id": str(twin.attempt_id),
                    "models": models,
                },
            )
            .on_conflict_do_nothing(index_elements=[Transcript.job_id])
        )
        add_batch_totals(session, job.batch_id, audio_seconds=job.duration_seconds or 0.0)
    metrics.DEDUPE_HITS.inc()
    metrics.JOBS_FINISHED.labels(status=JobStatus.SUCCEEDED.value).inc()
    return True


def _chain_of(session: Any, job_id: uuid.UUID) -> list[str]:
    """The job's routed chain (its batch's models in its route's order: worker.grouping.job_route)."""
    row = session.execute(select(Job.batch_id, Job.speech_seconds).where(Job.id == job_id)).first()
    batch = load_batches_in(session, {row.batch_id}).get(row.batch_id) if row is not None else None
    if batch is None:
        return model_chain(None, get_settings())
    return list(job_route(batch, row.speech_seconds or 0.0, get_settings()).chain)


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
