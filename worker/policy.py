"""The retry and fallback policy of the model chain: what follows one provider call, as a pure function.

`decide` takes plain values — what the call came back with (`Call`: an answer, empty or not, or an
error's kind, status, code and Retry-After), where it stands (`Position`: retries of this model so far,
whether a next model exists, whether invalid audio was already seen, time left, the backoff a retry would
wait, the piece's split depth and length) and the settings' `Limits` — and returns an `Action`: the next
`Step`, the outcome its attempt is closed with, and the fleet bookkeeping (`Note`) to do. The chain runner
(worker.chain) executes it and nothing else decides. By the error's kind:

- RETRY (429, 408, 409, 5xx, timeouts): the same model again after `Position.delay` (full jitter,
  honouring Retry-After); after `max_retries` retries — or when the wait plus a call would run past the
  task's deadline — the next model. A 429 pauses the model for the whole fleet (`Action.pause`: its
  Retry-After, else the backoff) and leaves the circuit alone; other retryable errors count toward the
  circuit. Rate limiting slows the fleet down instead of moving it to a pricier model: 429s use up no
  retries (only the deadline ends them) unless the batch prefers speed (`Position.speed`).
- NEXT_MODEL (quota, billing, auth, retired): the next model at once. What it closes depends on whose
  trouble it is (issue #17). The account's — `insufficient_quota` (or any 429 that moves on), a billing
  refusal (`ACCOUNT_CODES`, whatever kind the translation gave it: `billing_not_active` comes as a 429,
  `billing_hard_limit_reached` as a 400) and a refused API key (401/403, `Note.AUTH`, reported loudly) —
  opens the *provider's* circuit: every model of that provider is skipped without a request
  (`Note.ACCOUNT`, `Note.AUTH`; `Note.scope` says which circuit a note acts on). The model's —
  `model_not_found` (`Note.RETIRE`), another error that opens the circuit (`Note.TRIP`), repeated
  retryable failures (`Note.FAILURE`) — closes just that model. An error about this request only
  changes no circuit.
- INVALID_AUDIO: exactly one try on the next model (the second opinion); if it says invalid audio too,
  the job fails with the first provider's message. Its other errors are handled as usual (a 429, 5xx or
  timeout is retried); if it cannot serve, the second opinion passes to the model after it (`invalid`).
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
    TRIP = "trip"  # the model cannot serve (not an account's trouble): its circuit opens
    RETIRE = "retire"  # the model is gone: its circuit opens (for `VOXQ_MODEL_RETIRED_SECONDS`)
    ACCOUNT = "account"  # the account cannot pay (quota, billing): the provider's circuit opens
    AUTH = "auth"  # the provider refused the API key: the provider's circuit opens, operators are told

    @property
    def scope(self) -> str:
        """The circuit the note acts on: "provider" (every model of the account) or "model"."""
        return "provider" if self in (Note.ACCOUNT, Note.AUTH) else "model"


# Error codes that are the account's, not the model's: another model of the same provider (same key,
# same organisation) would be refused the same way.
ACCOUNT_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "access_terminated"}
)


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
    auth_failed: bool = False

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
            auth_failed=err.auth_failed,
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
    throttled: int = 0  # of `retries`, those after a 429 rate limit
    speed: bool = False  # the batch prefers speed over cost (`prefer: speed`): 429s use up retries too


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
    pause: float = 0.0  # with PENALIZE: seconds the fleet's limiter pauses the model
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
    account = _account_note(call)
    if account is not None:
        # The account cannot serve any model of the provider; on the extra try after invalid audio the
        # second opinion passes on.
        return Action(Step.NEXT, failed, call.code, account, invalid=at.invalid_message is not None)
    if at.invalid_message is not None and call.kind == ErrorKind.INVALID_AUDIO:
        # The second opinion after invalid audio says so too: the audio is the problem.
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
    note = _unserved_note(call)
    # On the extra try after invalid audio, a model that cannot serve passes the second opinion on.
    return Action(Step.NEXT, failed, call.code, note, invalid=at.invalid_message is not None)


def _retry(call: Call, at: Position, limits: Limits, failed: AttemptOutcome) -> Action:
    """A retryable error: the same model after the backoff, unless retries or time ran out."""
    rate_limited = call.http_status == 429
    # A 429 is the fleet's pace, not the model's health: the fleet's limiter pauses the model (for the
    # provider's Retry-After, else this backoff), the circuit is untouched.
    note, pause = (Note.PENALIZE, call.retry_after or at.delay) if rate_limited else (Note.FAILURE, 0.0)
    too_late = at.delay + limits.provider_timeout > at.time_left
    # Rate limiting slows the fleet down rather than moving it to a pricier model: unless the batch
    # prefers speed, 429s use up no retries (the task's deadline still bounds them).
    used = at.retries if at.speed else -1 if rate_limited else at.retries - at.throttled
    if used + 1 > limits.max_retries or too_late:
        return Action(Step.NEXT, failed, call.code, note, pause=pause, invalid=at.invalid_message is not None)
    return Action(Step.RETRY, AttemptOutcome.RETRIED, call.code, note, delay=at.delay, pause=pause)


def _account_note(call: Call) -> Note | None:
    """`Note.AUTH` or `Note.ACCOUNT` when the error is the account's (see the module docstring)."""
    if call.auth_failed:
        return Note.AUTH
    if call.code in ACCOUNT_CODES:
        return Note.ACCOUNT
    if call.kind == ErrorKind.NEXT_MODEL and call.http_status == 429 and call.opens_circuit:
        return Note.ACCOUNT  # a 429 that is not a rate limit to wait out: quota (whatever its code)
    return None


def _unserved_note(call: Call) -> Note | None:
    """The bookkeeping of a model that cannot serve this request (the account's troubles are handled
    before: `_account_note`)."""
    if call.model_gone:
        return Note.RETIRE
    return Note.TRIP if call.opens_circuit else None


def _fail(outcome: AttemptOutcome, call: Call, code: str, message: str) -> Action:
    return Action(Step.FAIL, outcome, call.code, fail_code=code, fail_message=message)
