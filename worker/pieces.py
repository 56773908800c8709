"""Pieces: the units of a job's audio sent to a model (the whole trimmed file, or each chunk), and the
prompt each is sent with.

The transcribe stage (worker.transcribe) and the local engine's stage (worker.local) both walk a job's
pieces in order and prompt each with the batch's prompt and the tail of its predecessor's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker import audio
from worker.derived import derived_key
from worker.store.answers import KeptAnswer
from worker.store.batches import BatchOptions
from worker.store.groups import GroupJob

PROMPT_TAIL_CHARS = 300


@dataclass(frozen=True)
class Piece:
    """One unit sent to a provider: a whole (trimmed) job or one chunk of it."""

    job: GroupJob
    batch: BatchOptions
    index: int | None
    object_key: str
    offset: float  # start in trimmed time
    seconds: float
    # Set when a sibling chunk ended the job: no new call starts for this piece.
    halt: asyncio.Event | None = field(default=None, compare=False)

    @property
    def halted(self) -> bool:
        """A sibling chunk ended the job."""
        return self.halt is not None and self.halt.is_set()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when a sibling ends the job meanwhile."""
        if self.halt is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.halt.wait(), timeout=seconds)


def pieces_of(job: GroupJob, batch: BatchOptions) -> list[Piece]:
    """A job's pieces in order: the whole (trimmed) file, or its chunks."""
    tmap = audio.TimeMap.from_json(job.time_map)
    if not job.chunks:
        return [Piece(job, batch, None, derived_key(job.tenant_id, job.id), 0.0, tmap.trimmed_seconds)]
    out: list[Piece] = []
    for chunk in job.chunks:
        t0, t1 = tmap.chunks[chunk["index"]]
        out.append(Piece(job, batch, chunk["index"], chunk["object_key"], t0, t1 - t0))
    return out


def compose_prompt(batch_prompt: str | None, previous_text: str | None) -> str | None:
    """The batch's prompt followed by the tail of the previous chunk's text."""
    tail = None
    if previous_text and previous_text.strip():
        tail = previous_text.strip()[-PROMPT_TAIL_CHARS:]
        if " " in tail and len(previous_text.strip()) > PROMPT_TAIL_CHARS:
            tail = tail.split(" ", 1)[1]
    parts = [p for p in (batch_prompt, tail) if p]
    return "\n".join(parts) if parts else None


def shift_segments(segments: list[dict[str, Any]], by: float) -> list[dict[str, Any]]:
    """`segments` (and their words) moved `by` seconds later."""
    out = []
    for seg in segments:
        moved = {**seg, "start": float(seg["start"]) + by, "end": float(seg["end"]) + by}
        if seg.get("words"):
            moved["words"] = [
                {**w, "start": float(w["start"]) + by, "end": float(w["end"]) + by} for w in seg["words"]
            ]
        out.append(moved)
    return out


class PieceAnswer(Protocol):
    """What a piece's answer carries (worker.chain.Answer)."""

    text: str
    segments: list[dict[str, Any]] | None
    language: str | None
    model: str


def kept_answer(piece: Piece, answer: PieceAnswer, attempt_id: uuid.UUID) -> KeptAnswer:
    """A piece's answer as `job_answers` keeps it: the piece's bounds, segments in original time."""
    tmap = audio.TimeMap.from_json(piece.job.time_map)
    return KeptAnswer(
        job_id=piece.job.id,
        index=piece.index,
        start_seconds=piece.offset,
        end_seconds=piece.offset + piece.seconds,
        text=answer.text,
        segments=audio.map_segments(
            answer.segments, text=answer.text, offset=piece.offset, duration=piece.seconds, tmap=tmap
        ),
        language=answer.language,
        model=answer.model,
        attempt_id=attempt_id,
    )
