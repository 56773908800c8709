"""Transcription of a group: many jobs at once over one event loop, each through the model chain.

A group task claims its jobs (lease renewed in the background while it runs), then transcribes every job
concurrently; provider calls share the process's httpx client and are bounded by a per-process semaphore
of `VOXQ_MAX_IN_FLIGHT`, so a 2-core host keeps hundreds of requests open. Database and S3 calls run in
threads so they never stall the loop.

Long files: the chunks of one job run one after another, each prompted with the tail of the previous
chunk's text (continuity of names and spelling across the cut matters more than the latency of one file);
parallelism comes from running many jobs — and many chunked jobs — of a group at once. A chunk already
transcribed by an earlier run (kept in `job_chunks`) is not sent again.

For each piece of audio the chain (`batch.models` or `VOXQ_PRIMARY_MODEL` + `VOXQ_FALLBACK_MODELS`) is:
circuit allows? → rate limiter → budget reservation → attempt row (pending, own transaction) → call →
close attempt (+ cost record for a billed answer, same transaction). Then by the error's kind:

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
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from redis.exceptions import RedisError

from core import metrics
from core.errors import ModelUnavailable
from core.logging import bind_log_context, log_context
from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest
from core.statuses import AttemptOutcome, ChunkStatus, JobStatus
from worker import audio, budget, completion, dispatch, records
from worker.grouping import model_chain
from worker.runtime import Runtime

log = logging.getLogger(__name__)

LOCAL = "local"
PROMPT_TAIL_CHARS = 300
MAX_SPLIT_DEPTH = 3
MAX_BLOCKED_ROUNDS = 3
RETRY_AFTER_ERROR_SECONDS = 60.0


def derived_key(tenant_id: uuid.UUID, job_id: uuid.UUID, index: int | None = None) -> str:
    """Where prepare stores a job's normalised FLAC (or one chunk of it)."""
    if index is None:
        return f"{tenant_id}/derived/{job_id}.flac"
    return f"{tenant_id}/derived/{job_id}/{index:05d}.flac"


def compose_prompt(batch_prompt: str | None, previous_text: str | None) -> str | None:
    """The batch's prompt followed by the tail of the previous chunk's text."""
    tail = None
    if previous_text and previous_text.strip():
        tail = previous_text.strip()[-PROMPT_TAIL_CHARS:]
        if " " in tail and len(previous_text.strip()) > PROMPT_TAIL_CHARS:
            tail = tail.split(" ", 1)[1]
    parts = [p for p in (batch_prompt, tail) if p]
    return "\n".join(parts) if parts else None


class Handoff(Exception):
    """Raised when the chain reaches `local`: the job goes to the local engine's queue."""


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


@dataclass(frozen=True)
class Piece:
    """One unit sent to a provider: a whole (trimmed) job or one chunk of it."""

    job: records.GroupJob
    batch: records.BatchOptions
    index: int | None
    object_key: str
    offset: float  # start in trimmed time
    seconds: float


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


class ChainRunner:
    """Runs one piece of audio through the model chain, recording every call."""

    def __init__(self, rt: Runtime, *, deadline: float) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.deadline = deadline
        self.provider = rt.provider()
        self.circuit = rt.circuit()
        self.limiter = rt.limiter()
        self.rate_limited = bool(rt.settings.model_rpm_limit or rt.settings.model_audio_seconds_per_minute)

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
    ) -> Answer:
        """Transcribe `data` (FLAC, `seconds` long) with the first model of `chain[start:]` that can.

        When the chain ran out only because circuits were open (a provider outage the fleet already
        noticed), wait for them to half-open and go again, up to `MAX_BLOCKED_ROUNDS` times and never past
        the task's deadline, rather than failing files during a short outage.
        """
        rounds = 0
        while True:
            try:
                return await self._run_once(piece, data, seconds, prompt, chain, start=start, depth=depth)
            except _ChainBlocked as blocked:
                rounds += 1
                wait = self.settings.circuit_open_seconds * random.uniform(1.0, 1.2)
                timeout = self.settings.provider_timeout_seconds
                if rounds > MAX_BLOCKED_ROUNDS or time.monotonic() + wait + timeout > self.deadline:
                    raise JobEnded(JobStatus.FAILED, ModelUnavailable.code, blocked.message) from None
                await asyncio.sleep(wait)

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
    ) -> Answer:
        blocked = False
        invalid: ProviderError | None = None
        invalid_index = -1
        empty: Answer | None = None
        last_error: str | None = None
        i = start
        while i < len(chain):
            model = chain[i]
            if model == LOCAL:
                raise Handoff()
            if invalid is not None and i > invalid_index + 1:
                break
            if not await self.circuit.allow(model):
                state = await self.circuit.state(model)
                blocked = blocked or state != "retired"
                last_error = f"{model}: circuit {state}"
                self._fallback(model, chain, i)
                i += 1
                continue
            retry = 0
            while True:
                answer, err, attempt_id, reserved, latency_ms = await self._call(
                    piece, data, seconds, prompt, model, retry
                )
                has_next = i + 1 < len(chain)
                close: dict[str, Any] = {
                    "latency_ms": latency_ms,
                    "tenant_id": piece.job.tenant_id,
                    "batch_id": piece.job.batch_id,
                    "job_id": piece.job.id,
                    "model": model,
                    "reserved_usd": reserved,
                }
                if answer is not None:
                    priced = self._price(model, answer, seconds)
                    usage = answer.extra_usage
                    if not answer.text.strip():
                        outcome = AttemptOutcome.FALLBACK if has_next else AttemptOutcome.SUCCESS
                        await asyncio.to_thread(
                            records.close_attempt,
                            attempt_id,
                            outcome=outcome,
                            priced=priced,
                            usage=usage,
                            http_status=200,
                            error_code="empty_transcript" if has_next else None,
                            **close,
                        )
                        await self._note(self.circuit.record_success(model))
                        empty = Answer("", None, answer.language, model, [attempt_id])
                        last_error = f"{model}: empty transcript"
                        self._fallback(model, chain, i)
                        i += 1
                        break
                    await asyncio.to_thread(
                        records.close_attempt,
                        attempt_id,
                        outcome=AttemptOutcome.SUCCESS,
                        priced=priced,
                        usage=usage,
                        http_status=200,
                        **close,
                    )
                    await self._note(self.circuit.record_success(model))
                    return Answer(answer.text, answer.segments, answer.language, model, [attempt_id])
                assert err is not None
                last_error = f"{model}: {err.message}"
                common: dict[str, Any] = {
                    "http_status": err.http_status,
                    "error_code": err.code,
                    "error_message": err.message,
                }
                if invalid is not None:
                    # The one extra try after invalid audio failed as well: the audio is the problem.
                    await asyncio.to_thread(
                        records.close_attempt, attempt_id, outcome=AttemptOutcome.FAILED, **common, **close
                    )
                    raise JobEnded(JobStatus.FAILED, "invalid_audio", invalid.message)
                if err.kind == ErrorKind.RETRY:
                    if err.http_status == 429:
                        if err.retry_after:
                            await self._note(self.limiter.penalize(model, err.retry_after))
                    else:
                        await self._note(self.circuit.record_failure(model))
                    retry += 1
                    from core.retry import backoff_delay

                    delay = backoff_delay(
                        retry,
                        base=self.settings.retry_base_seconds,
                        cap=self.settings.retry_max_seconds,
                        retry_after=err.retry_after,
                    )
                    too_late = (
                        time.monotonic() + delay + self.settings.provider_timeout_seconds > self.deadline
                    )
                    if retry > self.settings.max_retries or too_late:
                        outcome = AttemptOutcome.FALLBACK if has_next else AttemptOutcome.FAILED
                        await asyncio.to_thread(
                            records.close_attempt, attempt_id, outcome=outcome, **common, **close
                        )
                        self._fallback(model, chain, i)
                        i += 1
                        break
                    await asyncio.to_thread(
                        records.close_attempt, attempt_id, outcome=AttemptOutcome.RETRIED, **common, **close
                    )
                    await asyncio.sleep(delay)
                    continue
                if err.kind == ErrorKind.TOO_LARGE:
                    await asyncio.to_thread(
                        records.close_attempt, attempt_id, outcome=AttemptOutcome.RETRIED, **common, **close
                    )
                    return await self._split(piece, data, seconds, prompt, chain, i, depth, err)
                outcome = AttemptOutcome.FALLBACK if has_next else AttemptOutcome.FAILED
                await asyncio.to_thread(records.close_attempt, attempt_id, outcome=outcome, **common, **close)
                if err.kind == ErrorKind.INVALID_AUDIO:
                    if not has_next:
                        raise JobEnded(JobStatus.FAILED, "invalid_audio", err.message)
                    invalid, invalid_index = err, i
                elif err.model_gone:
                    await self._note(self.circuit.retire(model))
                elif err.opens_circuit:
                    await self._note(self.circuit.trip(model))
                self._fallback(model, chain, i)
                i += 1
                break
        if invalid is not None:
            raise JobEnded(JobStatus.FAILED, "invalid_audio", invalid.message)
        if empty is not None:
            return empty
        message = f"no model in the chain could transcribe this audio (last: {last_error or 'none tried'})"
        if blocked:
            raise _ChainBlocked(message)
        raise JobEnded(JobStatus.FAILED, ModelUnavailable.code, message)

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

    def _price(self, model: str, answer: _RawAnswer, seconds: float) -> records.PricedLike:
        from core.pricing import price_attempt

        priced: records.PricedLike = price_attempt(model, answer.extra_usage, seconds)
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
        if self.rate_limited:
            await self.limiter.acquire(model, seconds)  # counts its own waits in metrics
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
            try:
                attempt_id = await asyncio.to_thread(
                    records.open_attempt,
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
        err: ProviderError,
    ) -> Answer:
        if depth >= MAX_SPLIT_DEPTH or seconds < 2:
            raise JobEnded(JobStatus.FAILED, "too_large", err.message)

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


def _read(rt: Runtime, key: str) -> bytes:
    return b"".join(rt.storage.iter_chunks(key))


def pieces_of(
    job: records.GroupJob, batch: records.BatchOptions
) -> list[tuple[Piece, dict[str, Any] | None]]:
    """A job's pieces in order, each with its stored chunk row (when it has one)."""
    tmap = audio.TimeMap.from_json(job.time_map)
    if not job.chunks:
        piece = Piece(job, batch, None, derived_key(job.tenant_id, job.id), 0.0, tmap.trimmed_seconds)
        return [(piece, None)]
    out: list[tuple[Piece, dict[str, Any] | None]] = []
    for chunk in job.chunks:
        t0, t1 = tmap.chunks[chunk["index"]]
        out.append((Piece(job, batch, chunk["index"], chunk["object_key"], t0, t1 - t0), chunk))
    return out


async def transcribe_job(
    rt: Runtime, runner: ChainRunner, job: records.GroupJob, batch: records.BatchOptions, group_id: uuid.UUID
) -> str:
    """Transcribe one job of a group to the end (succeeded, failed, skipped or handed off)."""
    with log_context(job_id=str(job.id), batch_id=str(job.batch_id), group_id=str(group_id)):
        return await _transcribe_job(rt, runner, job, batch, group_id)


async def _transcribe_job(
    rt: Runtime, runner: ChainRunner, job: records.GroupJob, batch: records.BatchOptions, group_id: uuid.UUID
) -> str:
    chain = model_chain(batch.models, rt.settings)
    tmap = audio.TimeMap.from_json(job.time_map)
    texts: list[str] = []
    segments: list[dict[str, Any]] = []
    attempt_ids: list[uuid.UUID] = []
    models: list[str] = []
    language: str | None = None
    previous: str | None = None
    try:
        for piece, stored in pieces_of(job, batch):
            if stored is not None and stored["status"] == ChunkStatus.SUCCEEDED.value:
                text = stored["text"] or ""
                texts.append(text)
                segments.extend(stored["segments"] or [])
                models.append(stored["model"] or "")
                if stored["attempt_id"]:
                    attempt_ids.append(stored["attempt_id"])
                previous = text
                continue
            data = await asyncio.to_thread(_read, rt, piece.object_key)
            answer = await runner.run(
                piece, data, piece.seconds, compose_prompt(batch.prompt, previous), chain
            )
            mapped = audio.map_segments(
                answer.segments, text=answer.text, offset=piece.offset, duration=piece.seconds, tmap=tmap
            )
            if piece.index is not None:
                await asyncio.to_thread(
                    records.save_chunk_result,
                    job.id,
                    piece.index,
                    text_=answer.text,
                    segments=mapped,
                    model=answer.model,
                    attempt_id=answer.attempt_ids[-1],
                )
            texts.append(answer.text)
            segments.extend(mapped)
            attempt_ids.extend(answer.attempt_ids)
            models.append(answer.model)
            language = language or answer.language
            previous = answer.text
    except Handoff:
        await asyncio.to_thread(dispatch.send_local, job.id, group_id)
        return "handoff"
    except JobEnded as ended:
        if await asyncio.to_thread(
            records.end_job,
            job.id,
            status=ended.status,
            code=ended.code,
            message=ended.message,
            group_id=group_id,
        ):
            await asyncio.to_thread(completion.job_finished, job.id, job.batch_id)
        return ended.status.value
    model = Counter(models).most_common(1)[0][0] if models else "none"
    text = " ".join(t.strip() for t in texts if t and t.strip())
    provenance = {
        "attempt_ids": [str(a) for a in attempt_ids],
        "models": models,
        "chunks": len(job.chunks) or 1,
        "trimmed_seconds": round(tmap.trimmed_seconds, 3),
        "original_seconds": job.duration_seconds,
    }
    done = await asyncio.to_thread(
        records.succeed_job,
        job.id,
        group_id=group_id,
        text_=text,
        segments=segments,
        language=language or batch.language,
        model=model,
        attempt_id=attempt_ids[-1] if attempt_ids else None,
        provenance=provenance,
    )
    if done:
        await asyncio.to_thread(completion.job_finished, job.id, job.batch_id)
    return JobStatus.SUCCEEDED.value


async def transcribe_group(rt: Runtime, group_id: uuid.UUID) -> dict[str, int]:
    """Transcribe every still-processing job of a group; returns how many ended in each way."""
    settings = rt.settings
    deadline = time.monotonic() + max(settings.task_time_limit - 90, 60)
    jobs = await asyncio.to_thread(
        records.claim_group, group_id, owner=rt.worker_name, lease_seconds=settings.job_lease_seconds
    )
    if not jobs:
        await asyncio.to_thread(records.finish_group, group_id)
        return {}
    batches = await asyncio.to_thread(records.load_batches, {j.batch_id for j in jobs})
    runner = ChainRunner(rt, deadline=deadline)
    ids = [j.id for j in jobs]

    async def renew() -> None:
        while True:
            await asyncio.sleep(max(settings.job_lease_seconds / 3, 1))
            await asyncio.to_thread(
                records.extend_leases, ids, owner=rt.worker_name, lease_seconds=settings.job_lease_seconds
            )

    renewer = asyncio.ensure_future(renew())
    try:
        results = await asyncio.gather(
            *(transcribe_job(rt, runner, job, batches[job.batch_id], group_id) for job in jobs),
            return_exceptions=True,
        )
    finally:
        renewer.cancel()
    counts: Counter[str] = Counter()
    for job, result in zip(jobs, results, strict=True):
        if isinstance(result, BaseException):
            # Left `processing` with a lease ending soon: the sweeper gives it another run.
            log.error("job %s: %s: %s", job.id, type(result).__name__, result)
            counts["error"] += 1
            try:
                await asyncio.to_thread(records.release_soon, job.id, after_seconds=RETRY_AFTER_ERROR_SECONDS)
            except Exception:
                log.exception("could not shorten the lease of job %s", job.id)
        else:
            counts[result] += 1
    await asyncio.to_thread(records.finish_group, group_id)
    return dict(counts)
