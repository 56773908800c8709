"""A transcript's timings (`transcripts.alignment`): what the align stage reads, and its write by token.

The alignment document's `token` is set whenever an alignment is asked for (at completion, or by
`POST /v1/jobs/{id}/align`); the align task carries it and writes its result only while the transcript
still holds that token (compare-and-set), so a redelivered or superseded task never overwrites a newer
request's result, and a result is never written to a transcript that was deleted meanwhile.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core.db import durable, session_scope
from core.models import Batch, Job, Transcript
from core.statuses import AlignmentStatus, JobStatus, Timestamps, effective_timestamps
from worker.store.sql import now, run_sql


@dataclass(frozen=True)
class AlignInput:
    """What the align stage needs of a job and its transcript (read in one short transaction)."""

    job_id: uuid.UUID
    tenant_id: uuid.UUID
    object_key: str | None
    source_uri: str | None
    duration_seconds: float | None
    time_map: dict[str, Any] | None
    profile: str
    text: str
    language: str | None
    segments: list[dict[str, Any]]
    timestamps: Timestamps


def pending_alignment(token: str, timestamps: Timestamps) -> dict[str, Any]:
    """The alignment document of a transcript whose align task is queued (`requested_at`: when it was
    sent, for `stale_alignments`)."""
    return {
        "status": AlignmentStatus.PENDING.value,
        "token": token,
        "timestamps": timestamps.value,
        "requested_at": now().isoformat(timespec="microseconds"),
    }


def new_token() -> str:
    """A fresh alignment token."""
    return str(uuid.uuid4())


@durable
def read_for_alignment(job_id: uuid.UUID, token: str) -> AlignInput | None:
    """The job and transcript to align, or None when the token is no longer the transcript's (superseded,
    already written, deleted) or the job is no longer a live succeeded one."""
    with session_scope() as session:
        row = session.execute(
            select(Job, Transcript, Batch.profile, Batch.timestamps)
            .join(Transcript, Transcript.job_id == Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id == job_id)
        ).first()
        if row is None:
            return None
        job, transcript, profile, batch_timestamps = row
        doc = transcript.alignment if isinstance(transcript.alignment, dict) else {}
        if (
            doc.get("token") != token
            or doc.get("status") != AlignmentStatus.PENDING.value
            or job.status != JobStatus.SUCCEEDED.value
            or job.deleted_at is not None
        ):
            return None
        chosen = doc.get("timestamps") or effective_timestamps(profile, batch_timestamps).value
        return AlignInput(
            job_id=job.id,
            tenant_id=job.tenant_id,
            object_key=job.object_key,
            source_uri=job.source_uri,
            duration_seconds=job.duration_seconds,
            time_map=job.time_map,
            profile=profile,
            text=transcript.text,
            language=transcript.language,
            segments=list(transcript.segments or []),
            timestamps=Timestamps(chosen),
        )


@durable
def save_alignment(job_id: uuid.UUID, token: str, doc: dict[str, Any]) -> bool:
    """Store an alignment result (with `token`) if the transcript still waits for that token; True if so."""
    with session_scope() as session:
        done = session.execute(
            update(Transcript)
            .where(
                Transcript.job_id == job_id,
                Transcript.alignment["token"].astext == token,
                Transcript.alignment["status"].astext == AlignmentStatus.PENDING.value,
            )
            .values(alignment={**doc, "token": token})
            .returning(Transcript.id)
        ).first()
    return done is not None


# A pending alignment whose task was sent longer ago than this lost it (the broker lost the message, or
# the task failed without writing): the sweeper sends it again, with the same token (a duplicate run
# writes nothing: the first write ends the token's pending state).
STALE_ALIGNMENT_SECONDS = 1800.0

_STALE = f"""
UPDATE transcripts AS t
SET alignment = jsonb_set(t.alignment, '{{requested_at}}', to_jsonb(%(now)s::text))
FROM (
    SELECT id FROM transcripts
    WHERE (alignment ->> 'status') = '{AlignmentStatus.PENDING.value}'
      AND COALESCE(alignment ->> 'requested_at', '') < %(cutoff)s
    ORDER BY created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS stale
WHERE t.id = stale.id
RETURNING t.job_id, t.alignment ->> 'token'
"""


def stale_alignments(
    *, older_than: float = STALE_ALIGNMENT_SECONDS, limit: int = 100
) -> list[tuple[uuid.UUID, str]]:
    """Pending alignments sent over `older_than` seconds ago, marked sent now: (job id, token) to re-send."""
    ts = now()
    cutoff = (ts - timedelta(seconds=older_than)).isoformat(timespec="microseconds")
    with session_scope() as session:
        rows = run_sql(
            session, _STALE, {"now": ts.isoformat(timespec="microseconds"), "cutoff": cutoff, "limit": limit}
        ).all()
    return [(job_id, token) for job_id, token in rows if token]
