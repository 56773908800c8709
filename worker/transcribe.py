"""Transcription of a group: many jobs at once over one event loop, each through the model chain.

A group task claims its jobs (lease renewed in the background while it runs), then transcribes every job
concurrently; provider calls share the process's httpx client and are bounded by a per-process semaphore
of `VOXQ_MAX_IN_FLIGHT`, so a 2-core host keeps hundreds of requests open. Database and S3 calls run in
threads so they never stall the loop.

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

For each piece of audio the chain (`batch.models` or `VOXQ_PRIMARY_MODEL` + `VOXQ_FALLBACK_MODELS`) is:
circuit allows? → rate limiter → budget reservation → attempt row (pending, committed before the call;
calls starting at the same moment share one INSERT, `Runtime.attempts`) → call → close attempt (+ cost
record for a billed answer, same transaction; for a whole job's answer, the same transaction as its
transcript). Then by the error's kind:

- RETRY (429, 408, 409, 5xx, timeouts): back off with full jitter, honouring Retry-After; after
  `VOXQ_MAX_RETRIES` retries — or when the wait would run past the task's time limit — next model.
  A 429 slows the fleet's rate limiter; other retryable errors count toward the circuit.
- NEXT_MODEL (quota, auth, retired): that model's circuit opens (for good when `model_gone`), next model
  at once.
- INVALID_AUDIO: exactly one try on the next model; if that fails too, the job fails with the first
  provider's message.
- TOO_LARGE (413): the piece is split at its quietest point near the middle and both halves go through the
  chain (up to 3 levels).
- An empty transcript for audio the VAD says is speech: billed (it was answered), then the next model.
  If every model answers empty, the empty transcript is accepted.
- `local`: the job is handed to the `local` queue (worker.local) and this task lets it go.
- The budget refusing a reservation: the job is `skipped` with `budget_exceeded`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from redis.exceptions import RedisError

from core import metrics
from core.backoff import backoff_delay
from core.errors import ModelUnavailable
from core.ids import uuid7
from core.logs import bind_log_context, log_context
from core.names import LOCAL_MODEL
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest
from core.settings import ChunkContext
from core.statuses import JobStatus
from worker import audio, budget, completion, derived, dispatch
from worker.derived import derived_key
from worker.grouping import model_chain
from worker.pieces import Piece, compose_prompt, pieces_of
from worker.policy import Action, Call, Limits, Note, Position, Step, decide
from worker.runtime import Runtime
from worker.store.answers import KeptAnswer, keep_answer, stored_answer
from worker.store.attempts import AttemptClose, PendingAttempt, PricedLike, close_attempt
from worker.store.batches import BatchOptions
from worker.store.claims import claim_group_run, end_job, extend_leases, finish_group, release_soon
from worker.store.groups import GroupJob

log = logging.getLogger(__name__)

MAX_BLOCKED_ROUNDS = 3
RETRY_AFTER_ERROR_SECONDS = 60.0
CHUNKS_AT_ONCE = 9
# Called (in a job's own task) when a call of the job has taken a provider slot: see `start_group`.
_ON_SLOT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("_ON_SLOT", default=None)


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


class Handoff(Exception):
    """Raised when the chain reaches `local`: the job goes to the local engine's queue."""


class _Halted(Exception):
    """Raised instead of starting a call once a sibling chunk has ended the job."""


class _ChainBlocked(Exception):
    """Raised when every usable model was skipped because its circuit is open (not retired)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobEnded(Exception):
    """Raised when a job cannot be transcribed: it ends with this status, code and message."""

    def __init__(self, status: JobStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Answer:
    """A transcription of one piece; segment times are relative to the piece's start."""

    text: str
    segments: list[dict[str, Any]] | None
    language: str | None
    model: str
    attempt_ids: list[uuid.UUID] = field(default_factory=list)
    # With `run(..., defer_close=True)`: the answering attempt, not yet closed; the caller closes it in
    # the transaction that stores the transcript (`completion.JobSuccess.close`) or on its way out.
    pending_close: AttemptClose | None = None
    kept: bool = False  # stored in `job_answers` with the close of its attempt (see `_kept`)


def _relative_segments(answer: Answer, seconds: float) -> list[dict[str, Any]]:
    if answer.segments:
        return answer.segments
    return [{"start": 0.0, "end": seconds, "text": answer.text}] if answer.text.strip() else []


def _shift(segments: list[dict[str, Any]], by: float) -> list[dict[str, Any]]:
    out = []
    for seg in segments:
        moved = {**seg, "start": float(seg["start"]) + by, "end": float(seg["end"]) + by}
        if seg.get("words"):
            moved["words"] = [
                {**w, "start": float(w["start"]) + by, "end": float(w["end"]) + by} for w in seg["words"]
            ]
        out.append(moved)
    return out


@dataclass
class _Walk:
    """A piece's way through the chain so far (one pass of `ChainRunner._run_once`)."""

    blocked: bool = False  # a model was skipped because its circuit is open (not retired)
    invalid: str | None = None  # an invalid-audio message, from the model at `invalid_at`
    invalid_at: int = -1
    empty: Answer | None = None  # an empty transcript, accepted if no later model answers
    last_error: str | None = None


class ChainRunner:
    """Runs one piece of audio through the model chain, recording every call."""

    def __init__(self, rt: Runtime, *, deadline: float) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.deadline = deadline
        self.provider = rt.provider()
        self.circuit = rt.circuit()
        self.limiter = rt.limiter()
        self.limits = Limits(
            max_retries=rt.settings.max_retries, provider_timeout=rt.settings.provider_timeout_seconds
        )
        self.rate_limited = bool(rt.settings.model_rpm_limit or rt.settings.model_audio_seconds_per_minute)
        # Whole files' FLACs read for the group in one round trip (`derived.read_many`), each taken once.
        self.audio: dict[str, bytes] = {}

    async def run(
        self,
        piece: Piece,
        data: bytes,
        seconds: float,
        prompt: str | None,
        chain: list[str],
        *,
        start: int = 0,
        depth: int = 0,
        defer_close: bool = False,
    ) -> Answer:
        """Transcribe `data` (FLAC, `seconds` long) with the first model of `chain[start:]` that can.

        With `defer_close`, a successful answer's attempt is returned unclosed (`Answer.pending_close`).

        When the chain ran out only because circuits were open (a provider outage the fleet already
        noticed), wait for them to half-open and go again, up to `MAX_BLOCKED_ROUNDS` times and never past
        the task's deadline, rather than failing files during a short outage.
        """
        rounds = 0
        while True:
            try:
                return await self._run_once(
                    piece, data, seconds, prompt, chain, start=start, depth=depth, defer_close=defer_close
                )
            except _ChainBlocked as blocked:
                rounds += 1
                wait = self.settings.circuit_open_seconds * random.uniform(1.0, 1.2)
                timeout = self.settings.provider_timeout_seconds
                if rounds > MAX_BLOCKED_ROUNDS or time.monotonic() + wait + timeout > self.deadline:
                    raise JobEnded(JobStatus.FAILED, ModelUnavailable.code, blocked.message) from None
                await piece.pause(wait)

    async def _run_once(
        self,
        piece: Piece,
        data: bytes,
        seconds: float,
        prompt: str | None,
        chain: list[str],
        *,
        start: int,
        depth: int,
        defer_close: bool = False,
    ) -> Answer:
        walk = _Walk()
        for i in range(start, len(chain)):
            model = chain[i]
            if model == LOCAL_MODEL:
                raise Handoff()
            if walk.invalid is not None and i > walk.invalid_at + 1:
                break  # only the model right after the one that said invalid audio gets a try
            if not await self.circuit.allow(model):
                state = await self.circuit.state(model)
                walk.blocked = walk.blocked or state != "retired"
                walk.last_error = f"{model}: circuit {state}"
                self._fallback(model, chain, i)
                continue
            answer = await self._through_model(
                piece, data, seconds, prompt, chain, i, depth, defer_close, walk
            )
            if answer is not None:
                return answer
        if walk.invalid is not None:
            raise JobEnded(JobStatus.FAILED, "invalid_audio", walk.invalid)
        if walk.empty is not None:
            return walk.empty
        message = (
            f"no model in the chain could transcribe this audio (last: {walk.last_error or 'none tried'})"
        )
        if walk.blocked:
            raise _ChainBlocked(message)
        raise JobEnded(JobStatus.FAILED, ModelUnavailable.code, message)

    async def _through_model(
        self,
        piece: Piece,
        data: bytes,
        seconds: float,
        prompt: str | None,
        chain: list[str],
        i: int,
        depth: int,
        defer_close: bool,
        walk: _Walk,
    ) -> Answer | None:
        """Call `chain[i]`, again after each retryable failure, and do what the policy decides after each
        call (worker.policy); the piece's answer, or None to go on with the next model."""
        model = chain[i]
        retry = 0
        while True:
            raw, err, attempt_id, reserved, latency_ms = await self._call(
                piece, data, seconds, prompt, model, retry
            )
            if raw is not None:
                call, delay = Call.answer(raw.text), 0.0
            else:
                assert err is not None
                call = Call.error(err)
                # Drawn here (full jitter) so that `decide` stays a pure function.
                delay = backoff_delay(
                    retry + 1,
                    base=self.settings.retry_base_seconds,
                    cap=self.settings.retry_max_seconds,
                    retry_after=err.retry_after,
                )
            position = Position(
                retries=retry,
                has_next=i + 1 < len(chain),
                invalid_message=walk.invalid,
                time_left=self.deadline - time.monotonic(),
                delay=delay,
                depth=depth,
                seconds=seconds,
            )
            action = decide(call, position, self.limits)
            close = self._close_of(
                action, piece, model, attempt_id, reserved, latency_ms, raw, call, seconds, depth
            )
            if raw is None:
                await self._bookkeep(model, action.note, call)  # an error: noted before the close
            if action.step != Step.ANSWER or not defer_close:
                await asyncio.to_thread(close_attempt, **vars(close))
            if raw is not None:
                await self._bookkeep(model, action.note, call)  # an answer: its close (what was paid) first
            if action.step == Step.ANSWER:
                assert raw is not None
                pending = close if defer_close else None
                kept = close.answer is not None
                return Answer(raw.text, raw.segments, raw.language, model, [attempt_id], pending, kept)
            if action.step == Step.RETRY:
                await piece.pause(action.delay)
                retry += 1
                continue
            if action.step == Step.SPLIT:
                return await self._split(piece, data, seconds, prompt, chain, i, depth)
            if action.step == Step.FAIL:
                assert action.fail_code is not None and action.fail_message is not None
                raise JobEnded(JobStatus.FAILED, action.fail_code, action.fail_message)
            if action.empty:
                assert raw is not None
                walk.empty = Answer(
                    "", None, raw.language, model, [attempt_id], kept=close.answer is not None
                )
                walk.last_error = f"{model}: empty transcript"
            else:
                walk.last_error = f"{model}: {call.message}"
            if action.invalid:
                walk.invalid, walk.invalid_at = call.message, i
            self._fallback(model, chain, i)
            return None

    def _close_of(
        self,
        action: Action,
        piece: Piece,
        model: str,
        attempt_id: uuid.UUID,
        reserved: Decimal,
        latency_ms: float | None,
        raw: _RawAnswer | None,
        call: Call,
        seconds: float,
        depth: int,
    ) -> AttemptClose:
        """How a call's attempt is closed: the policy's outcome; an answer's price, usage and kept answer."""
        return AttemptClose(
            attempt_id=attempt_id,
            outcome=action.outcome,
            latency_ms=latency_ms,
            tenant_id=piece.job.tenant_id,
            batch_id=piece.job.batch_id,
            job_id=piece.job.id,
            model=model,
            reserved_usd=reserved,
            http_status=200 if raw is not None else call.http_status,
            error_code=action.error_code,
            error_message=None if raw is not None else call.message,
            priced=self._price(model, raw, seconds) if raw is not None else None,
            usage=raw.extra_usage if raw is not None else None,
            answer=_kept(piece, raw, attempt_id, depth) if raw is not None and action.keep else None,
        )

    async def _bookkeep(self, model: str, note: Note | None, call: Call) -> None:
        """The circuit's or rate limiter's part of a call's outcome."""
        if note == Note.SUCCESS:
            await self._note(self.circuit.record_success(model))
        elif note == Note.FAILURE:
            await self._note(self.circuit.record_failure(model))
        elif note == Note.PENALIZE and call.retry_after:
            await self._note(self.limiter.penalize(model, call.retry_after))
        elif note == Note.TRIP:
            await self._note(self.circuit.trip(model))
        elif note == Note.RETIRE:
            await self._note(self.circuit.retire(model))

    async def _note(self, bookkeeping: Awaitable[Any]) -> None:
        """Circuit and rate-limiter bookkeeping after a call: a Redis blip (a restart) here is logged, and
        must not throw away an answer already paid for (the job would run and pay again)."""
        try:
            await bookkeeping
        except (RedisError, OSError) as exc:
            log.warning("circuit/limiter bookkeeping skipped: %s", type(exc).__name__)

    def _fallback(self, model: str, chain: list[str], i: int) -> None:
        metrics.FALLBACKS.labels(
            from_model=model, to_model=chain[i + 1] if i + 1 < len(chain) else "none"
        ).inc()

    def _price(self, model: str, answer: _RawAnswer, seconds: float) -> PricedLike:
        from core.pricing import price_attempt

        priced: PricedLike = price_attempt(model, answer.extra_usage, seconds)
        return priced

    async def _call(
        self, piece: Piece, data: bytes, seconds: float, prompt: str | None, model: str, retry: int
    ) -> tuple[_RawAnswer | None, ProviderError | None, uuid.UUID, Decimal, float | None]:
        # Lines logged during the call carry the model and retry number (never the audio or text).
        with log_context(model=model, retry=retry, chunk=piece.index):
            return await self._call_in_context(piece, data, seconds, prompt, model, retry)

    async def _call_in_context(
        self, piece: Piece, data: bytes, seconds: float, prompt: str | None, model: str, retry: int
    ) -> tuple[_RawAnswer | None, ProviderError | None, uuid.UUID, Decimal, float | None]:
        if piece.halted:
            raise _Halted()
        if self.rate_limited:
            await self.limiter.acquire(model, seconds)  # counts its own waits in metrics
            if piece.halted:
                raise _Halted()
        # Without a budget there is nothing to reserve against: skip the round trip.
        estimate = budget.estimate_usd(model, seconds) if piece.batch.budget_usd is not None else Decimal(0)
        if estimate and not await asyncio.to_thread(budget.reserve, piece.job.batch_id, estimate):
            raise JobEnded(
                JobStatus.SKIPPED,
                "budget_exceeded",
                f"the batch's budget of ${piece.batch.budget_usd} would be passed by this file",
            )
        # The attempt row is written once a slot is free, so `started_at` is when the call really starts
        # and a pending attempt older than the provider timeout belongs to a dead worker (see sweeper).
        async with self.rt.semaphore:
            if piece.halted:
                await asyncio.to_thread(budget.release, piece.job.batch_id, estimate)
                raise _Halted()
            on_slot = _ON_SLOT.get()
            if on_slot is not None:
                on_slot()
            attempt_id = uuid7()
            try:
                # Shares its INSERT with the other calls starting now (Runtime.attempts).
                await self.rt.attempts.open(
                    PendingAttempt(
                        id=attempt_id,
                        tenant_id=piece.job.tenant_id,
                        job_id=piece.job.id,
                        chunk_index=piece.index,
                        model=model,
                        provider=getattr(self.provider, "name", "openai"),
                        retry_number=retry,
                        audio_seconds=seconds,
                        request_bytes=len(data),
                        worker=self.rt.worker_name,
                    )
                )
            except BaseException:
                await asyncio.to_thread(budget.release, piece.job.batch_id, estimate)
                raise
            bind_log_context(attempt=str(attempt_id))  # undone when _call's log_context exits
            request = TranscriptionRequest(
                audio=data,
                filename=audio.FLAC_FILENAME,
                content_type=audio.FLAC_CONTENT_TYPE,
                model=model,
                audio_seconds=seconds,
                language=piece.batch.language,
                prompt=prompt,
                request_id=str(attempt_id),
                want_timestamps=True,
            )
            started = time.monotonic()
            try:
                result = await self.provider.transcribe(request)
            except ProviderError as exc:
                return None, exc, attempt_id, estimate, (time.monotonic() - started) * 1000
            except Exception as exc:  # a bug or an untranslated failure: retry like a transport error
                log.exception("provider call raised %s", type(exc).__name__)
                error = ProviderError(
                    f"unexpected {type(exc).__name__}", kind=ErrorKind.RETRY, code="internal"
                )
                return None, error, attempt_id, estimate, (time.monotonic() - started) * 1000
        raw = _RawAnswer(result.text, result.segments, result.language, model, [attempt_id])
        raw.extra_usage = result.usage
        return raw, None, attempt_id, estimate, (time.monotonic() - started) * 1000

    async def _split(
        self,
        piece: Piece,
        data: bytes,
        seconds: float,
        prompt: str | None,
        chain: list[str],
        i: int,
        depth: int,
    ) -> Answer:
        """Split the piece's audio at its quietest point near the middle; each half through the chain."""

        def halves() -> tuple[bytes, bytes, float]:
            pcm = audio.decode_flac(data)
            left, right, cut = audio.split_quietest(pcm)
            return audio.encode_flac(left), audio.encode_flac(right), cut

        left, right, cut = await asyncio.to_thread(halves)
        first = await self.run(piece, left, cut, prompt, chain, start=i, depth=depth + 1)
        second = await self.run(
            piece,
            right,
            seconds - cut,
            compose_prompt(piece.batch.prompt, first.text),
            chain,
            start=i,
            depth=depth + 1,
        )
        segments = _relative_segments(first, cut) + _shift(_relative_segments(second, seconds - cut), cut)
        return Answer(
            " ".join(t for t in (first.text.strip(), second.text.strip()) if t),
            segments,
            first.language or second.language,
            second.model,
            first.attempt_ids + second.attempt_ids,
        )


@dataclass
class _RawAnswer(Answer):
    extra_usage: dict[str, Any] | None = None


def _kept(piece: Piece, answer: Answer, attempt_id: uuid.UUID, depth: int) -> KeptAnswer | None:
    """The piece's answer as kept with the close of its attempt (not a half of a split piece: the
    assembled answer of those is kept once both halves are in)."""
    if depth:
        return None
    return _kept_answer(piece, answer, attempt_id)


def _kept_answer(piece: Piece, answer: Answer, attempt_id: uuid.UUID) -> KeptAnswer:
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
        await asyncio.to_thread(keep_answer, _kept_answer(piece, answer, answer.attempt_ids[-1]))
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
        except _Halted:
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
    chain = model_chain(batch.models, rt.settings)
    tmap = audio.TimeMap.from_json(job.time_map)
    halt = asyncio.Event()
    pieces: list[Piece] = []
    results: dict[int, _Done] = {}
    for position, piece in enumerate(pieces_of(job, batch)):
        pieces.append(replace(piece, halt=halt))
        kept = _kept_result(job, piece)
        if kept is not None:
            results[position] = kept
    try:
        for wave in plan_waves(len(pieces), set(results), rt.settings.chunk_context):
            await _run_wave(rt, runner, pieces, wave, results, chain, tmap, halt)
    except Handoff:
        if not job.chunks:
            await derived.spill(rt, derived_key(job.tenant_id, job.id))  # the local worker reads S3
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
        # An answered attempt not yet closed with its transcript is closed on any way out.
        for kept in results.values():
            if kept.pending_close is not None:
                await asyncio.to_thread(close_attempt, **vars(kept.pending_close))
        raise
    ordered = [results[position] for position in range(len(pieces))]
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
    # Written together with the other jobs answered at about the same moment (`Runtime.completions`).
    done = await rt.completions.succeed(
        completion.JobSuccess(
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
    )
    if done is not None and done.followers:
        await asyncio.to_thread(
            completion.job_finished, job.id, job.batch_id, check_batch=False, succeeded=done
        )
    return JobStatus.SUCCEEDED.value


async def keep_leases(
    ids: list[uuid.UUID], *, owner: str, lease_seconds: float, every: float | None = None
) -> None:
    """Renew these jobs' leases every third of a lease until cancelled.

    A renewal that fails (a deadlock Postgres broke, a database outage) is tried again after a tenth of
    the interval rather than ending the loop: a lease left to run out makes the sweeper hand live jobs to
    another worker.
    """
    interval = every if every is not None else max(lease_seconds / 3, 1)
    wait = interval
    while True:
        await asyncio.sleep(wait)
        try:
            await asyncio.to_thread(extend_leases, ids, owner=owner, lease_seconds=lease_seconds)
            wait = interval
        except Exception as exc:
            log.warning("lease renewal of %d job(s) failed (%s); retrying", len(ids), type(exc).__name__)
            wait = interval / 10


class _GroupRun:
    """One run of a group's claimed jobs: every job concurrently, lease renewal, then the group's tail."""

    def __init__(
        self,
        rt: Runtime,
        group_id: uuid.UUID,
        jobs: list[GroupJob],
        batches: dict[uuid.UUID, BatchOptions],
        runner: ChainRunner,
    ) -> None:
        self.rt = rt
        self.group_id = group_id
        self.jobs = jobs
        self.batches = batches
        self.runner = runner
        self.live = len(jobs)  # jobs not ended yet
        self.unslotted = {job.id for job in jobs}  # jobs with no call holding a slot yet, not ended
        self.slotted = asyncio.Event()  # set once `unslotted` is empty
        self.detached = False  # the group's task has returned (`start_group`)
        if not self.unslotted:
            self.slotted.set()

    @classmethod
    async def claim(cls, rt: Runtime, group_id: uuid.UUID) -> _GroupRun | None:
        """Claim the group's processing jobs; None (the group marked done) when there is none."""
        settings = rt.settings
        deadline = time.monotonic() + max(settings.task_time_limit - 90, 60)
        # Jobs and their batches' options in one round trip: the refill path of a freed slot.
        jobs, batches = await asyncio.to_thread(
            claim_group_run, group_id, owner=rt.worker_name, lease_seconds=settings.job_lease_seconds
        )
        if not jobs:
            await asyncio.to_thread(finish_group, group_id)
            return None
        runner = ChainRunner(rt, deadline=deadline)
        runner.audio = await derived.read_many(
            rt, [derived_key(j.tenant_id, j.id) for j in jobs if not j.chunks and not j.answers]
        )
        return cls(rt, group_id, jobs, batches, runner)

    def _slot_taken(self, job_id: uuid.UUID) -> None:
        self.unslotted.discard(job_id)
        if not self.unslotted:
            self.slotted.set()

    def _job_done(self, job_id: uuid.UUID) -> None:
        self._slot_taken(job_id)
        self.live -= 1
        if self.detached:
            self.rt.groups.job_done()

    async def _job(self, job: GroupJob) -> str:
        _ON_SLOT.set(lambda: self._slot_taken(job.id))  # this job's task only (its own context)
        try:
            return await transcribe_job(self.rt, self.runner, job, self.batches[job.batch_id], self.group_id)
        finally:
            self._job_done(job.id)

    async def finish(self) -> dict[str, int]:
        """Transcribe every job to its end, then the group's tail; how many ended in each way."""
        rt, jobs, group_id = self.rt, self.jobs, self.group_id
        renewer = asyncio.ensure_future(
            keep_leases(
                [j.id for j in jobs], owner=rt.worker_name, lease_seconds=rt.settings.job_lease_seconds
            )
        )
        try:
            results = await asyncio.gather(*(self._job(job) for job in jobs), return_exceptions=True)
        finally:
            renewer.cancel()
        counts: Counter[str] = Counter()
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                # Left `processing` with a lease ending soon: the sweeper gives it another run.
                log.error("job %s: %s: %s", job.id, type(result).__name__, result)
                counts["error"] += 1
                try:
                    await asyncio.to_thread(release_soon, job.id, after_seconds=RETRY_AFTER_ERROR_SECONDS)
                except Exception:
                    log.exception("could not shorten the lease of job %s", job.id)
            else:
                counts[result] += 1
        # The group's tail: one I/O-thread hop for the batch checks and the group's end, while Redis
        # forgets the FLACs.
        # One batch check per batch of the group, after every job of it here ended (each job skipped its
        # own: its siblings were still live, so the batch could not be done). Handed-off or failed-to-run
        # jobs are still live; the local worker or the sweeper checks when they end.
        # Ended (or handed off, with a copy in S3): their Redis-kept FLACs are no longer needed.
        await asyncio.gather(
            asyncio.to_thread(_finish_group_and_batches, group_id, {j.batch_id for j in jobs}),
            derived.forget(
                rt,
                [
                    derived_key(job.tenant_id, job.id)
                    for job, result in zip(jobs, results, strict=True)
                    if not job.chunks and not isinstance(result, BaseException)
                ],
            ),
        )
        return dict(counts)


async def transcribe_group(rt: Runtime, group_id: uuid.UUID) -> dict[str, int]:
    """Transcribe every still-processing job of a group; returns how many ended in each way."""
    run = await _GroupRun.claim(rt, group_id)
    if run is None:
        return {}
    return await run.finish()


async def start_group(rt: Runtime, group_id: uuid.UUID) -> dict[str, int]:
    """The group task's body: claim the group, start its jobs, and return once none of them waits for a
    provider slot (each holds one, or has ended); the rest of the run (answers, completions, lease
    renewal, the group's tail) goes on on the process's loop while the task's thread claims its next
    group. Returns the counts of a run that ended first, else `{"detached": jobs still running}`.

    The work a process takes on stays bounded: a thread stays with its group until every job of it got a
    slot (so the in-flight semaphore bounds it), and while the detached jobs not ended yet would exceed
    `Runtime.groups.limit` (2 x `VOXQ_MAX_IN_FLIGHT`: jobs backing off between retries hold no slot).
    The jobs keep their leases (renewed until they end), so a process killed after the task returned
    loses nothing: the sweeper re-runs its jobs once their leases run out. The whole run is bounded by the
    task's soft time limit as before (the chain's deadline stops retries earlier); a warm shutdown waits
    for it (`Runtime.close`). With `Runtime.detach_groups` off (a prefork child), the task waits for the
    whole run, as `transcribe_group`.
    """
    soft_limit = max(rt.settings.task_time_limit - 60, 30)
    run = await _GroupRun.claim(rt, group_id)
    if run is None:
        return {}
    task = asyncio.ensure_future(_bounded(run.finish(), soft_limit, group_id))
    rt.groups.track(task)
    try:
        if rt.detach_groups:
            slotted = asyncio.ensure_future(run.slotted.wait())
            try:
                await asyncio.wait({slotted, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                slotted.cancel()
            if not task.done():
                room = asyncio.ensure_future(rt.groups.wait_room(lambda: run.live))
                try:
                    await asyncio.wait({room, task}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    room.cancel()
            if not task.done():
                run.detached = True
                rt.groups.detach(run.live)
                task.add_done_callback(_log_failure)
                return {"detached": run.live}
        return await asyncio.shield(task)
    except BaseException:
        # Interrupted (a soft time limit raised in the task's thread): the run stops, as it always did.
        task.cancel()
        raise


async def _bounded(run: Awaitable[dict[str, int]], seconds: float, group_id: uuid.UUID) -> dict[str, int]:
    try:
        async with asyncio.timeout(seconds):
            return await run
    except TimeoutError:
        log.error(
            "group %s: still running after %.0f s: stopped (the sweeper re-runs its jobs)", group_id, seconds
        )
        raise


def _log_failure(task: asyncio.Task[dict[str, int]]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("detached group run failed: %s: %s", type(exc).__name__, exc)


def _finish_group_and_batches(group_id: uuid.UUID, batch_ids: set[uuid.UUID]) -> None:
    completion.finish_batches(batch_ids)
    finish_group(group_id)
