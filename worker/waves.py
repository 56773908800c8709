"""A job's run: its pieces sent in waves through the model chain, then stitched into its transcript.

Long files (`VOXQ_CHUNK_CONTEXT`): a chunk can be prompted with the tail of its predecessor's text
(continuity of names and spelling across the cut) only once that text exists, so "all chunks in parallel"
and "every chunk prompted with the previous tail" cannot both hold. `plan_waves` decides the order:

- `alternate` (default): wave 1 sends chunks 0, 2, 4, … at once (batch prompt only); wave 2 sends 1, 3,
  5, … at once, each prompted with the batch prompt + the tail of its predecessor's wave-1 text. Two
  provider round trips per file (up to 18 chunks, see below), the same cost as sequential, and every
  other seam carries context.
- `sequential`: one chunk after another, every seam prompted; latency = one round trip per chunk.
- `none`: every chunk at once, batch prompt only; one round trip, no context across seams.

Every paid answer (whole file or chunk) is kept in `job_answers` by the transaction that closes its
attempt, even when this run has meanwhile lost its job (the sweeper requeued it): a piece with a kept
answer is never sent again by any later run of the job (`job_chunks` holds only the chunk plan);
its text prompts its successor (a run of pending chunks after it starts in wave 1 with that tail).
At most `CHUNKS_AT_ONCE` (9) chunks of one job are read and sent at a time, because a chunk's FLAC
(~11 MB per 600 s of speech) is held in memory while it is sent: a file of up to 18 chunks (3 h at the
default chunk length) takes two round trips; a 6-hour file (36 chunks) takes four rather than holding
18 chunks in memory at once. The process's in-flight semaphore bounds every call as before. When one
chunk ends the job (failure, skip, hand-off to `local`, or an unexpected error), its siblings start no
new call, the calls already in flight are awaited and closed like any other (answers kept), and the job
ends once.
Stitching: texts joined in chunk order, segments mapped to original time, provenance in chunk order.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from core.logs import log_context
from core.settings import ChunkContext
from core.statuses import JobStatus
from worker import audio, completion, derived, dispatch
from worker.chain import ChainRunner
from worker.derived import derived_key
from worker.grouping import job_route
from worker.outcomes import Halted, Handoff, JobEnded
from worker.pieces import Piece, compose_prompt, kept_answer, pieces_of
from worker.profiles import profile_plan
from worker.runtime import Runtime
from worker.store.answers import keep_answer, stored_answer
from worker.store.attempts import AttemptClose, close_attempt
from worker.store.batches import BatchOptions
from worker.store.claims import end_job, hand_off_local
from worker.store.groups import GroupJob, record_route, stored_route_model

log = logging.getLogger(__name__)

CHUNKS_AT_ONCE = 9


class Drained(Exception):
    """Raised when a job's run stopped because its process is draining (`Runtime.drain`)."""


@dataclass(frozen=True)
class Send:
    """One chunk to send: its position in the job and the position whose text's tail prompts it."""

    position: int
    context: int | None = None  # None: the batch prompt only


def plan_waves(count: int, done: Collection[int], mode: ChunkContext) -> list[list[Send]]:
    """The waves in which a job's `count` chunks are sent; chunks in `done` are already transcribed.

    Every chunk of a wave is sent at once; a wave starts when the previous one has answered, so a chunk's
    context is always a chunk already done or of an earlier wave. With `alternate`, each run of pending
    chunks sends its 1st, 3rd, … chunk in wave 1 (the run's first chunk prompted by its stored
    predecessor, if any) and its 2nd, 4th, … in wave 2, prompted by their wave-1 predecessors.
    """
    pending = [i for i in range(count) if i not in done]
    if not pending:
        return []
    if mode == "none":
        return [[Send(i) for i in pending]]
    if mode == "sequential":
        return [[Send(i, i - 1 if i > 0 else None)] for i in pending]
    first: list[Send] = []
    second: list[Send] = []
    run_start = 0
    for i in pending:
        if i == 0 or i - 1 in done:
            run_start = i
        if (i - run_start) % 2 == 0:
            first.append(Send(i, i - 1 if i > 0 and i == run_start else None))
        else:
            second.append(Send(i, i - 1))
    return [wave for wave in (first, second) if wave]


async def transcribe_job(
    rt: Runtime, runner: ChainRunner, job: GroupJob, batch: BatchOptions, group_id: uuid.UUID
) -> str:
    """Transcribe one job of a group to the end (succeeded, failed, skipped or handed off)."""
    with log_context(job_id=str(job.id), batch_id=str(job.batch_id), group_id=str(group_id)):
        return await _transcribe_job(rt, runner, job, batch, group_id)


@dataclass
class _Done:
    """One piece's result as stitched into the job: segments in original time."""

    text: str
    segments: list[dict[str, Any]]
    model: str
    attempt_ids: list[uuid.UUID]
    language: str | None = None
    pending_close: AttemptClose | None = None  # see Answer.pending_close


def _kept_result(job: GroupJob, piece: Piece) -> _Done | None:
    """A piece an earlier run of this job paid for (kept in `job_answers`), or None."""
    kept = stored_answer(job, piece.index, piece.offset, piece.offset + piece.seconds)
    if kept is None:
        return None
    return _Done(
        kept["text"],
        kept["segments"] or [],
        kept["model"],
        [kept["attempt_id"]] if kept["attempt_id"] else [],
        kept["language"],
    )


async def _send_piece(
    rt: Runtime,
    runner: ChainRunner,
    piece: Piece,
    previous_text: str | None,
    chain: list[str],
    tmap: audio.TimeMap,
) -> _Done:
    """Transcribe one piece through the chain (its answer is kept at once: a later run reuses it)."""
    data = runner.audio.pop(piece.object_key, None)
    if data is None:
        data = await derived.read(rt, piece.object_key)
    prompt = compose_prompt(piece.batch.prompt, previous_text)
    # A whole job's answer is closed with its transcript (`completion.JobSuccess.close`).
    answer = await runner.run(piece, data, piece.seconds, prompt, chain, defer_close=piece.index is None)
    del data
    mapped = audio.map_segments(
        answer.segments, text=answer.text, offset=piece.offset, duration=piece.seconds, tmap=tmap
    )
    if not answer.kept:  # assembled from a split piece's halves: keep the whole piece now
        await asyncio.to_thread(keep_answer, kept_answer(piece, answer, answer.attempt_ids[-1]))
    return _Done(answer.text, mapped, answer.model, answer.attempt_ids, answer.language, answer.pending_close)


async def _run_wave(
    rt: Runtime,
    runner: ChainRunner,
    pieces: list[Piece],
    wave: list[Send],
    results: dict[int, _Done],
    chain: list[str],
    tmap: audio.TimeMap,
    halt: asyncio.Event,
) -> None:
    """Send a wave's chunks at once; the first to end the job halts its siblings, which are awaited.

    A halted sibling starts no new call; a call already in flight finishes and is closed and saved as
    usual, so no attempt is left pending and nothing paid for is thrown away. The first error is raised.
    """
    errors: list[BaseException] = []
    at_once = asyncio.Semaphore(CHUNKS_AT_ONCE)

    async def one(send: Send) -> None:
        context = results[send.context].text if send.context is not None else None
        try:
            async with at_once:
                if halt.is_set():
                    return
                results[send.position] = await _send_piece(
                    rt, runner, pieces[send.position], context, chain, tmap
                )
        except Halted:
            pass
        except BaseException as exc:
            errors.append(exc)
            halt.set()
            raise

    await asyncio.gather(*(one(send) for send in wave), return_exceptions=True)
    if errors:
        raise errors[0]


async def _transcribe_job(
    rt: Runtime, runner: ChainRunner, job: GroupJob, batch: BatchOptions, group_id: uuid.UUID
) -> str:
    # The route prepare recorded (worker.grouping.job_route), computed again from the same trimmed seconds;
    # a configuration changed since then routes it anew, and the job's record says so.
    route = job_route(batch, job.speech_seconds, rt.settings)
    chain = list(route.chain)
    if stored_route_model(route.model) != job.route_model:
        log.info("job %s rerouted since prepare: %s -> %s", job.id, job.route_model, route.model)
        await asyncio.to_thread(record_route, job.id, route.model, route.reason)
    tmap = audio.TimeMap.from_json(job.time_map)
    halt = asyncio.Event()
    rt.halts.add(halt)  # a draining process halts it (Runtime.drain)
    if rt.draining:
        halt.set()
    pieces: list[Piece] = []
    results: dict[int, _Done] = {}
    for position, piece in enumerate(pieces_of(job, batch)):
        pieces.append(replace(piece, halt=halt))
        kept = _kept_result(job, piece)
        if kept is not None:
            results[position] = kept
    try:
        context = profile_plan(batch.profile, rt.settings).chunk_context  # worker/profiles.py
        for wave in plan_waves(len(pieces), set(results), context):
            await _run_wave(rt, runner, pieces, wave, results, chain, tmap, halt)
        if len(results) < len(pieces):  # halted by a drain: the answers in are kept, the job runs again
            raise Drained(f"job {job.id}: the process stopped before every piece was sent")
    except Handoff:
        if not job.chunks:
            await derived.spill(rt, derived_key(job.tenant_id, job.id))  # the local worker reads S3
        # The job stays leased while it waits for (and runs on) the local engine: the sweeper never
        # sends it back into the hosted chain (issue #16, item 4). A run that lost it sends nothing.
        if await asyncio.to_thread(
            hand_off_local,
            job.id,
            owner=rt.worker_name,
            group_id=group_id,
            lease_seconds=dispatch.local_wait_seconds(rt.settings),
        ):
            await asyncio.to_thread(dispatch.send_local, job.id, group_id)
        return "handoff"
    except JobEnded as ended:
        if await asyncio.to_thread(
            end_job,
            job.id,
            status=ended.status,
            code=ended.code,
            message=ended.message,
            group_id=group_id,
        ):
            # The group checks its batches once at its end (transcribe_group).
            await asyncio.to_thread(completion.job_finished, job.id, job.batch_id, check_batch=False)
        return ended.status.value
    except BaseException:
        await _close_deferred(results)
        raise
    ordered = [results[position] for position in range(len(pieces))]
    try:
        # Written together with the other jobs answered at about the same moment (`Runtime.completions`),
        # retried through a database outage (`completion.succeed_one`).
        done = await rt.completions.succeed(_stitched(job, batch, group_id, ordered, tmap))
    except BaseException:
        # Not written after all: the paid answer is still closed and kept, so the next run reuses it
        # instead of paying again (issue #16, item 5). A close already committed is not repeated.
        await _close_deferred(results)
        raise
    if done is not None and done.followers:
        await asyncio.to_thread(
            completion.job_finished, job.id, job.batch_id, check_batch=False, succeeded=done
        )
    return JobStatus.SUCCEEDED.value


async def _close_deferred(results: dict[int, _Done]) -> None:
    """Close the answered attempts not yet closed with their transcript (on any way out of a run)."""
    for kept in results.values():
        if kept.pending_close is not None:
            await asyncio.shield(asyncio.to_thread(close_attempt, **vars(kept.pending_close)))


def _stitched(
    job: GroupJob, batch: BatchOptions, group_id: uuid.UUID, ordered: list[_Done], tmap: audio.TimeMap
) -> completion.JobSuccess:
    """The job's transcript from its pieces' results in order, with the close of a deferred attempt."""
    models = [done.model for done in ordered]
    attempt_ids = [a for done in ordered for a in done.attempt_ids]
    language = next((done.language for done in ordered if done.language), None)
    segments = [seg for done in ordered for seg in done.segments]
    model = Counter(models).most_common(1)[0][0] if models else "none"
    text = " ".join(d.text.strip() for d in ordered if d.text and d.text.strip())
    provenance = {
        "attempt_ids": [str(a) for a in attempt_ids],
        "models": models,
        "chunks": len(job.chunks) or 1,
        "trimmed_seconds": round(tmap.trimmed_seconds, 3),
        "original_seconds": job.duration_seconds,
    }
    return completion.JobSuccess(
        job.id,
        group_id=group_id,
        text=text,
        segments=segments,
        language=language or batch.language,
        model=model,
        attempt_id=attempt_ids[-1] if attempt_ids else None,
        provenance=provenance,
        close=next((d.pending_close for d in ordered if d.pending_close is not None), None),
    )
