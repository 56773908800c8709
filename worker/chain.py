"""The model chain: one piece of audio through its models, every call recorded as an attempt.

For each piece (worker.pieces) the chain (worker.grouping.model_chain: `batch.models` or
`VOXQ_PRIMARY_MODEL` + `VOXQ_FALLBACK_MODELS`, as `provider:model` entries; each call goes to its entry's
provider, worker.entries) is: circuit allows? → rate limiter → budget reservation →
attempt row (pending, committed before the call; calls starting at the same moment share one INSERT,
`Runtime.attempts`) → call → close attempt (+ cost record for a billed answer, same transaction; for a
whole job's answer, the same transaction as its transcript). What follows each call — retry after a
backoff, the next model, a split of the piece, the job's failure — is decided by worker.policy (a pure
function); `ChainRunner` executes it: one close of the attempt, the circuit's or limiter's bookkeeping,
the wait, the fallback or the split. Besides:

- `local`: the job is handed to the `local` queue (worker.local): `Handoff`.
- The budget refusing a reservation (worker.budget: the most the call can cost): the call waits while
  other calls of the batch hold reservations, else the job is `skipped` with `budget_exceeded`.
- When every usable model was skipped because its circuit is open, the chain waits for a half-open
  circuit and goes again (`MAX_BLOCKED_ROUNDS`, never past the deadline).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
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
from core.statuses import CircuitState, JobStatus
from worker import audio, budget, inflight, provider_alerts
from worker.circuit import PROVIDER_KEY_PREFIX, Ticket, call_keys
from worker.entries import Target, response_format, target
from worker.outcomes import Halted, Handoff, JobEnded
from worker.pieces import Piece, compose_prompt, kept_answer, shift_segments
from worker.policy import MIN_SPLIT_SECONDS, Action, Call, Limits, Note, Position, Step, decide
from worker.runtime import Runtime
from worker.store.answers import KeptAnswer
from worker.store.attempts import AttemptClose, PendingAttempt, PricedLike, close_attempt

log = logging.getLogger(__name__)

MAX_BLOCKED_ROUNDS = 3
# How long a call whose budget reservation does not fit waits before trying again while other calls of
# the batch hold theirs.
BUDGET_WAIT_SECONDS = 0.5
# Called (in a job's own task) when a call of the job has taken a provider slot: see
# worker.transcribe.start_group.
ON_SLOT: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("ON_SLOT", default=None)


class _ChainBlocked(Exception):
    """Raised when every usable model was skipped because its circuit is open (not retired)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _CircuitRefused(Exception):
    """Raised instead of a call when its provider's circuit or the model's does not let it through (open,
    retired, or half-open with its probe already out); `key` is whose circuit it was."""

    def __init__(self, state: str, key: str) -> None:
        super().__init__(state)
        self.state, self.key = state, key


class _Paused(Exception):
    """Raised instead of a call when the fleet paused the model (a 429) while the call waited for a slot."""


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
        # Each call goes to its chain entry's provider (`_target`, `Runtime.provider(name)`).
        self._targets: dict[str, Target] = {}
        self.circuit = rt.circuit()
        self.limiter = rt.limiter()
        self.limits = Limits(
            max_retries=rt.settings.max_retries, provider_timeout=rt.settings.provider_timeout_seconds
        )
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
            # A piece longer or larger than the model takes (its max_duration_seconds, its provider's
            # max_upload_bytes) is never sent to it: split first, each half through the chain from this
            # model (the operator's order stands: the model still gets the audio, in parts); too short to
            # split: the next model.
            if self._target(model).too_big(seconds, len(data)):
                if seconds >= MIN_SPLIT_SECONDS:  # as a 413 is split (worker.policy)
                    return await self._split(piece, data, seconds, prompt, chain, i, depth)
                walk.last_error = f"{model}: the piece is longer or larger than the model takes"
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
        retry = throttled = 0
        while True:
            try:
                raw, err, attempt_id, latency_ms, ticket = await self._call(
                    piece, data, seconds, prompt, model, retry
                )
            except _CircuitRefused as refused:  # checked before each call, retries included
                self._skipped(refused, chain, i, walk)
                return None
            if raw is not None:
                call = Call.answer(raw.text)
            else:
                assert err is not None
                call = Call.error(err)
            position = Position(
                retries=retry,
                has_next=i + 1 < len(chain),
                invalid_message=walk.invalid,
                time_left=self.deadline - time.monotonic(),
                delay=self._backoff(err, retry),
                depth=depth,
                seconds=seconds,
                throttled=throttled,
                speed=piece.batch.prefer == "speed",
            )
            action = decide(call, position, self.limits)
            close = self._close_of(
                action, piece, model, attempt_id, err, latency_ms, raw, call, seconds, depth
            )
            if raw is None:
                await self._bookkeep(model, action, ticket, call)  # an error: noted before the close
            if action.step != Step.ANSWER or not defer_close:
                await asyncio.to_thread(close_attempt, **vars(close))
            if raw is not None:
                await self._bookkeep(
                    model, action, ticket, call
                )  # an answer: its close (what was paid) first
            if action.step == Step.ANSWER:
                assert raw is not None
                pending = close if defer_close else None
                kept = close.answer is not None
                return Answer(raw.text, raw.segments, raw.language, raw.model, [attempt_id], pending, kept)
            if action.step == Step.RETRY:
                await piece.pause(action.delay)
                retry += 1
                throttled += call.http_status == 429
                continue
            if action.step == Step.SPLIT:
                return await self._split(piece, data, seconds, prompt, chain, i, depth)
            if action.step == Step.FAIL:
                assert action.fail_code is not None and action.fail_message is not None
                raise JobEnded(JobStatus.FAILED, action.fail_code, action.fail_message)
            if action.empty:
                assert raw is not None
                walk.empty = Answer(
                    "", None, raw.language, raw.model, [attempt_id], kept=close.answer is not None
                )
                walk.last_error = f"{model}: empty transcript"
            else:
                walk.last_error = f"{model}: {call.message}"
            if action.invalid:  # the first model's message stands; the next model is the second opinion
                walk.invalid, walk.invalid_at = walk.invalid or call.message, i
            self._fallback(model, chain, i)
            return None

    def _backoff(self, err: ProviderError | None, retry: int) -> float:
        """The wait before a retry after `err` (none after an answer); drawn here (full jitter) so that
        `decide` stays a pure function."""
        if err is None:
            return 0.0
        return backoff_delay(
            retry + 1,
            base=self.settings.retry_base_seconds,
            cap=self.settings.retry_max_seconds,
            retry_after=err.retry_after,
        )

    def _skipped(self, refused: _CircuitRefused, chain: list[str], i: int, walk: _Walk) -> None:
        """`chain[i]` was not called: its provider's or its own circuit is open, retired or half-open
        with the probe out."""
        walk.blocked = walk.blocked or refused.state != CircuitState.RETIRED
        account = refused.key.startswith(PROVIDER_KEY_PREFIX)  # the account's: quota, billing or key
        walk.last_error = f"{chain[i]}: {refused.key if account else 'model'} circuit {refused.state}"
        if walk.invalid is not None:
            walk.invalid_at = i  # the second opinion after invalid audio passes to the next model
        self._fallback(chain[i], chain, i)

    def _close_of(
        self,
        action: Action,
        piece: Piece,
        model: str,
        attempt_id: uuid.UUID,
        err: ProviderError | None,
        latency_ms: float | None,
        raw: _RawAnswer | None,
        call: Call,
        seconds: float,
        depth: int,
    ) -> AttemptClose:
        """How a call's attempt is closed: the policy's outcome; an answer's price, usage and kept answer.

        A failure the provider may have billed all the same (`ProviderError.billing_unknown`: it timed
        out after the request was sent, or its 200 did not parse) is charged the list-price estimate,
        unsettled, exactly like a call whose worker died (core.billing): `voxq billing settle` puts the
        provider's own figure in its place, or removes it."""
        to = self._target(model)  # recorded as the bare model; priced at its provider's price
        unsettled = raw is None and err is not None and err.billing_unknown
        priced: PricedLike | None = None
        if raw is not None:
            priced = self._price(model, raw, seconds)
        elif unsettled:
            from core.pricing import price_attempt

            priced = price_attempt(to.model, None, seconds, provider=to.provider)
        return AttemptClose(
            attempt_id=attempt_id,
            outcome=action.outcome,
            latency_ms=latency_ms,
            tenant_id=piece.job.tenant_id,
            batch_id=piece.job.batch_id,
            job_id=piece.job.id,
            model=to.model,
            http_status=200 if raw is not None else call.http_status,
            error_code=action.error_code,
            error_message=None if raw is not None else call.message,
            priced=priced,
            usage=raw.extra_usage if raw is not None else None,
            unsettled=unsettled,
            answer=_kept(piece, raw, attempt_id, depth) if raw is not None and action.keep else None,
        )

    async def _bookkeep(self, model: str, action: Action, ticket: Ticket, call: Call) -> None:
        """The circuits' or rate limiter's part of a call's outcome (worker.circuit.settle: the model's
        circuit, or the provider's for quota, billing and auth), and a refused API key's alert."""
        provider, account, key = call_keys(self._target(model))
        if await self._note(self.circuit.settle(account, key, action.note, ticket)):
            await self._note(provider_alerts.auth_restored(self.rt, provider))  # the account's probe passed
        if action.note == Note.AUTH:
            await self._note(
                provider_alerts.auth_refused(self.rt, provider, model, call.http_status, call.code)
            )
        elif action.note == Note.PENALIZE and action.pause > 0:
            # The model's pause, not the provider's: a 429 rate limit is per model (per organisation).
            await self._note(self.limiter.penalize(model, action.pause))

    async def _note(self, bookkeeping: Awaitable[Any]) -> Any:
        """Circuit and rate-limiter bookkeeping after a call: a Redis blip (a restart) here is logged, and
        must not throw away an answer already paid for (the job would run and pay again)."""
        try:
            return await bookkeeping
        except (RedisError, OSError) as exc:
            log.warning("circuit/limiter bookkeeping skipped: %s", type(exc).__name__)
            return None

    def _fallback(self, model: str, chain: list[str], i: int) -> None:
        metrics.FALLBACKS.labels(
            from_model=model, to_model=chain[i + 1] if i + 1 < len(chain) else "none"
        ).inc()

    def _pending(
        self, piece: Piece, attempt_id: uuid.UUID, model: str, retry: int, seconds: float, data: bytes
    ) -> PendingAttempt:
        """The attempt row opened for a call (its INSERT shared with calls starting now: Runtime.attempts):
        the entry's provider and its bare model name."""
        to = self._target(model)
        return PendingAttempt(
            id=attempt_id,
            tenant_id=piece.job.tenant_id,
            job_id=piece.job.id,
            chunk_index=piece.index,
            model=to.model,
            provider=to.provider,
            retry_number=retry,
            audio_seconds=seconds,
            request_bytes=len(data),
            worker=self.rt.worker_name,
        )

    def _price(self, model: str, answer: _RawAnswer, seconds: float) -> PricedLike:
        """An answer's cost at its entry's provider's price for the model."""
        from core.pricing import price_attempt

        to = self._target(model)
        priced: PricedLike = price_attempt(to.model, answer.extra_usage, seconds, provider=to.provider)
        return priced

    def _target(self, model: str) -> Target:
        """The provider, bare model name and limits of chain entry `model` (worker.entries)."""
        found = self._targets.get(model)
        if found is None:
            found = self._targets[model] = target(model, self.settings)
        return found

    async def _call(
        self, piece: Piece, data: bytes, seconds: float, prompt: str | None, model: str, retry: int
    ) -> tuple[_RawAnswer | None, ProviderError | None, uuid.UUID, float | None, Ticket]:
        # Lines logged during the call carry the model and retry number (never the audio or text).
        with log_context(model=model, retry=retry, chunk=piece.index):
            while True:
                try:
                    return await self._call_in_context(piece, data, seconds, prompt, model, retry)
                except _Paused:
                    # The fleet paused the model while this call waited for a slot: wait it out (acquire
                    # waits too; this sleep only matters when the pause never reached Redis).
                    await self.limiter.sleep_in_pause(model)

    async def _before_slot(self, piece: Piece, model: str, seconds: float) -> None:
        """The circuit's first look and the rate limiter's wait, before the budget and a slot."""
        if piece.halted:
            raise Halted()
        provider, account, key = call_keys(self._target(model))
        # The provider's circuit, then the model's: an open one costs no limiter wait or reservation.
        state, whose = await self.circuit.peek_call(account, key)
        if state in (CircuitState.OPEN, CircuitState.RETIRED):
            raise _CircuitRefused(state, whose)
        # Always: a 429's fleet-wide pause holds without an RPM or audio limit configured too.
        await self.limiter.acquire(model, seconds, provider)  # counts its own waits in metrics
        if piece.halted:
            raise Halted()

    async def _call_in_context(
        self, piece: Piece, data: bytes, seconds: float, prompt: str | None, model: str, retry: int
    ) -> tuple[_RawAnswer | None, ProviderError | None, uuid.UUID, float | None, Ticket]:
        await self._before_slot(piece, model, seconds)
        attempt_id = uuid7()  # the reservation's key before it is the attempt's
        # Without a budget there is nothing to reserve against: skip the round trip.
        reserved = (
            await self._reserve(piece, model, seconds, prompt, attempt_id)
            if piece.batch.budget_usd is not None
            else Decimal(0)
        )
        # The attempt row is written once a slot is free, so `started_at` is when the call really starts
        # and a pending attempt older than the provider timeout belongs to a dead worker (see sweeper).
        provider, account, key = call_keys(self._target(model))
        # The provider's fleet-wide in-flight slot (its cap), then this process's semaphore.
        async with inflight.call_slot(self.rt, piece, provider, self.deadline) as slot:
            if piece.halted or not slot.held:
                if reserved:
                    await asyncio.to_thread(budget.release, attempt_id)
                raise Halted() if piece.halted else slot.late()
            if self.limiter.paused_here(model):  # a sibling's 429 while this call waited for a slot
                if reserved:
                    await asyncio.to_thread(budget.release, attempt_id)
                raise _Paused()
            # Right before the send (a slot may have taken a while): a circuit opened meanwhile, e.g. the
            # provider's by a sibling's insufficient_quota, stops this call too.
            ticket = await self.circuit.admit_call(account, key)
            if ticket is None:
                if reserved:
                    await asyncio.to_thread(budget.release, attempt_id)
                raise _CircuitRefused(*await self.circuit.state_call(account, key))
            on_slot = ON_SLOT.get()
            if on_slot is not None:
                on_slot()
            try:
                await self.rt.attempts.open(self._pending(piece, attempt_id, model, retry, seconds, data))
            except BaseException:
                if reserved:
                    await asyncio.to_thread(budget.release, attempt_id)
                raise
            bind_log_context(attempt=str(attempt_id))  # undone when _call's log_context exits
            to = self._target(model)  # the entry's provider gets the call, with the bare model name
            request = TranscriptionRequest(
                audio=data,
                filename=audio.FLAC_FILENAME,
                content_type=audio.FLAC_CONTENT_TYPE,
                model=to.model,
                audio_seconds=seconds,
                language=piece.batch.language,
                prompt=prompt,
                request_id=str(attempt_id),
                want_timestamps=True,
                response_format=response_format(to.config, True),
            )
            started = time.monotonic()
            try:
                result = await self.rt.provider(to.provider).transcribe(request)
            except ProviderError as exc:
                return None, exc, attempt_id, (time.monotonic() - started) * 1000, ticket
            except Exception as exc:  # a bug or an untranslated failure: retry like a transport error
                log.exception("provider call raised %s", type(exc).__name__)
                # Nobody knows how far the call got: charged an estimate until settled, like a timeout.
                error = ProviderError(
                    f"unexpected {type(exc).__name__}",
                    kind=ErrorKind.RETRY,
                    code="internal",
                    billing_unknown=True,
                )
                return None, error, attempt_id, (time.monotonic() - started) * 1000, ticket
        raw = _RawAnswer(result.text, result.segments, result.language, to.model, [attempt_id])
        raw.extra_usage = result.usage
        return raw, None, attempt_id, (time.monotonic() - started) * 1000, ticket

    async def _reserve(
        self, piece: Piece, model: str, seconds: float, prompt: str | None, attempt_id: uuid.UUID
    ) -> Decimal:
        """Reserve the most this call can cost against the batch's budget (worker.budget); what was
        reserved. While it does not fit but other calls of the batch hold reservations, wait for them
        (their real costs free the difference); with none held, or no time left, the job is skipped."""
        bound = budget.bound_usd(model, seconds, prompt)
        if not bound:
            return bound
        batch_id = piece.job.batch_id
        while not await asyncio.to_thread(budget.reserve, batch_id, attempt_id, bound):
            late = time.monotonic() + BUDGET_WAIT_SECONDS + self.settings.provider_timeout_seconds
            if late > self.deadline or not await asyncio.to_thread(budget.others_hold, batch_id):
                raise JobEnded(
                    JobStatus.SKIPPED,
                    "budget_exceeded",
                    f"the batch's budget of ${piece.batch.budget_usd} would be passed by this file",
                )
            await piece.pause(BUDGET_WAIT_SECONDS * random.uniform(0.5, 1.5))
            if piece.halted:
                raise Halted()
        return bound

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
        segments = _relative_segments(first, cut) + shift_segments(
            _relative_segments(second, seconds - cut), cut
        )
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
    return kept_answer(piece, answer, attempt_id)
