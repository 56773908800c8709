"""The retry and fallback policy of the model chain: what follows one provider call, as a pure function.

`decide` takes plain values — what the call came back with (`Call`: an answer, empty or not, or an
error's kind, status, code and Retry-After), where it stands (`Position`: retries of this model so far,
whether a next model exists, whether invalid audio was already seen, time left, the backoff a retry would
wait, the piece's split depth and length) and the settings' `Limits` — and returns an `Action`: the next
`Step`, the outcome its attempt is closed with, and the fleet bookkeeping (`Note`) to do. The chain runner
(worker.chain) executes it and nothing else decides. By the error's kind:

- RETRY (429, 408, 409, 5xx, timeouts): the same model again after `Position.delay` (full jitter,
  honouring Retry-After); after `max_retries` retries — or when the wait plus a call would run past the
  task's deadline — the next model. A 429 slows the fleet's rate limiter (when it says how long); other
  retryable errors count toward the circuit.
- NEXT_MODEL (quota, auth, retired): the next model at once; the model's circuit opens (for good when
  `model_gone`), unless the error concerns this request only.
- INVALID_AUDIO: exactly one try on the next model; if that fails too (whatever its error), the job fails
  with the first provider's message.
- TOO_LARGE (413): the piece is split in two (up to `MAX_SPLIT_DEPTH` levels, never below 2 s).
- An empty transcript: billed (it was answered), then the next model; the last model's is accepted
  (kept as the piece's answer) if no model answers better.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from core.providers.base import ErrorKind, ProviderError
from core.statuses import AttemptOutcome

MAX_SPLIT_DEPTH = 3
MIN_SPLIT_SECONDS = 2.0
EMPTY_TRANSCRIPT = "empty_transcript"


class Step(StrEnum):
    """What the chain does after a call."""

    ANSWER = "answer"  # the piece is transcribed: return the answer
    RETRY = "retry"  # call the same model again after `Action.delay`
    NEXT = "next"  # go on with the next model of the chain (or, at its end, give up)
    SPLIT = "split"  # split the piece in two and send each half through the chain
    FAIL = "fail"  # the job fails with `Action.fail_code` and `Action.fail_message`


class Note(StrEnum):
    """Fleet bookkeeping after a call (circuit breaker, rate limiter)."""

    SUCCESS = "success"  # the model answered: its circuit counts a success
    FAILURE = "failure"  # a retryable failure: counts toward opening its circuit
    PENALIZE = "penalize"  # a 429 with Retry-After: the fleet's limiter for the model waits that long
    TRIP = "trip"  # the model cannot serve (quota, auth): its circuit opens
    RETIRE = "retire"  # the model is gone: its circuit opens for good


@dataclass(frozen=True)
class Call:
    """What one provider call came back with, as plain values."""

    answered: bool  # an answer (possibly empty) rather than an error
    empty: bool = False  # the answer has no text
    kind: ErrorKind | None = None
    http_status: int | None = None
    code: str | None = None
    message: str = ""
    retry_after: float | None = None
    model_gone: bool = False
    opens_circuit: bool = False

    @classmethod
    def answer(cls, text: str) -> Call:
        """A call the provider answered with `text`."""
        return cls(answered=True, empty=not text.strip())

    @classmethod
    def error(cls, err: ProviderError) -> Call:
        """A call that failed with `err`."""
        return cls(
            answered=False,
            kind=err.kind,
            http_status=err.http_status,
            code=err.code,
            message=err.message,
            retry_after=err.retry_after,
            model_gone=err.model_gone,
            opens_circuit=err.opens_circuit,
        )


@dataclass(frozen=True)
class Position:
    """Where a call stands in its piece's run through the chain."""

    retries: int  # retries of this model before this call (0 for its first call)
    has_next: bool  # a model follows this one in the chain
    invalid_message: str | None = None  # set: an earlier model said invalid audio; this is the one extra try
    time_left: float = float("inf")  # seconds until the task's deadline
    delay: float = 0.0  # the backoff a retry would wait now (core.backoff), drawn by the caller
    depth: int = 0  # how many times the piece was split already
    seconds: float = 0.0  # the piece's audio length


@dataclass(frozen=True)
class Limits:
    """The settings the policy reads."""

    max_retries: int
    provider_timeout: float


@dataclass(frozen=True)
class Action:
    """What to do after a call: the step, how its attempt is closed, and the bookkeeping."""

    step: Step
    outcome: AttemptOutcome  # the attempt's outcome
    error_code: str | None = None  # recorded on the attempt
    note: Note | None = None
    keep: bool = False  # keep the answer with the attempt's close (`job_answers`)
    delay: float = 0.0  # with RETRY: seconds to wait first
    fail_code: str | None = None  # with FAIL: the job's error code and message
    fail_message: str | None = None
    invalid: bool = False  # with NEXT: invalid audio; only the next model gets a try
    empty: bool = False  # with NEXT: an empty transcript, accepted if no later model answers


def decide(call: Call, at: Position, limits: Limits) -> Action:
    """What follows a call (see the module docstring)."""
    failed = AttemptOutcome.FALLBACK if at.has_next else AttemptOutcome.FAILED
    if call.answered:
        if not call.empty:
            return Action(Step.ANSWER, AttemptOutcome.SUCCESS, note=Note.SUCCESS, keep=True)
        # Billed either way; the last model's empty answer is the piece's answer unless a later one speaks.
        if at.has_next:
            return Action(Step.NEXT, failed, EMPTY_TRANSCRIPT, Note.SUCCESS, empty=True)
        return Action(Step.NEXT, AttemptOutcome.SUCCESS, note=Note.SUCCESS, keep=True, empty=True)
    if at.invalid_message is not None:
        # The one extra try after invalid audio failed as well: the audio is the problem.
        return _fail(AttemptOutcome.FAILED, call, "invalid_audio", at.invalid_message)
    if call.kind == ErrorKind.RETRY:
        return _retry(call, at, limits, failed)
    if call.kind == ErrorKind.TOO_LARGE:
        if at.depth >= MAX_SPLIT_DEPTH or at.seconds < MIN_SPLIT_SECONDS:
            return _fail(AttemptOutcome.RETRIED, call, "too_large", call.message)
        return Action(Step.SPLIT, AttemptOutcome.RETRIED, call.code)
    if call.kind == ErrorKind.INVALID_AUDIO:
        if not at.has_next:
            return _fail(failed, call, "invalid_audio", call.message)
        return Action(Step.NEXT, failed, call.code, invalid=True)
    note = Note.RETIRE if call.model_gone else Note.TRIP if call.opens_circuit else None
    return Action(Step.NEXT, failed, call.code, note)


def _retry(call: Call, at: Position, limits: Limits, failed: AttemptOutcome) -> Action:
    """A retryable error: the same model after the backoff, unless retries or time ran out."""
    # A 429 is the fleet's pace, not the model's health: it slows the limiter, the circuit is untouched.
    note = Note.FAILURE if call.http_status != 429 else Note.PENALIZE if call.retry_after else None
    too_late = at.delay + limits.provider_timeout > at.time_left
    if at.retries + 1 > limits.max_retries or too_late:
        return Action(Step.NEXT, failed, call.code, note)
    return Action(Step.RETRY, AttemptOutcome.RETRIED, call.code, note, delay=at.delay)


def _fail(outcome: AttemptOutcome, call: Call, code: str, message: str) -> Action:
    return Action(Step.FAIL, outcome, call.code, fail_code=code, fail_message=message)
