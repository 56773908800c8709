"""Kept answers: every paid transcription of a piece (whole file or chunk), reused by any later run.

A paid answer is kept (`job_answers`: text, original-time segments, language, model, attempt) in the
transaction that closes its attempt (worker.store.attempts), for the whole file as for each chunk,
whatever became of the run (it may have lost its group to a requeue): any later run of the job reuses it
instead of calling again. A deleted job's answer is not kept.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from core.db import durable, session_scope
from core.ids import uuid7
from core.models import Job
from worker.store.groups import GroupJob
from worker.store.sql import run_sql, to_json

# Bounds are stored rounded in the time map; a stored answer is for the same piece within a millisecond.
SAME_BOUNDS_SECONDS = 1e-3


def piece_key(index: int | None) -> str:
    """The `job_answers.piece` of a job's piece: the whole file, or one chunk."""
    return "whole" if index is None else f"chunk:{index}"


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
        abs(float(kept["start_seconds"]) - start) <= SAME_BOUNDS_SECONDS
        and abs(float(kept["end_seconds"]) - end) <= SAME_BOUNDS_SECONDS
    )
    return kept if same else None


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
WHERE abs(ja.start_seconds - excluded.start_seconds) > {SAME_BOUNDS_SECONDS}
   OR abs(ja.end_seconds - excluded.end_seconds) > {SAME_BOUNDS_SECONDS}
"""


def keep_answers_in(session: Any, answers: list[KeptAnswer]) -> None:
    """Store paid answers in the caller's transaction, one statement (the first one for a piece wins; one
    for a re-planned piece — other bounds — replaces it)."""
    if not answers:
        return
    unique = list({(a.job_id, piece_key(a.index)): a for a in answers}.values())  # one row per piece
    run_sql(
        session,
        _KEEP_ANSWERS,
        {
            "id": [uuid7() for _ in unique],
            "job_id": [a.job_id for a in unique],
            "piece": [piece_key(a.index) for a in unique],
            "start_seconds": [a.start_seconds for a in unique],
            "end_seconds": [a.end_seconds for a in unique],
            "text": [a.text for a in unique],
            "segments": [to_json(a.segments) for a in unique],
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
            keep_answers_in(session, [answer])
