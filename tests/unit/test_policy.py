"""worker.policy.decide: what follows each provider call, as a table of cases."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from core.providers.base import ErrorKind, ProviderError
from core.statuses import AttemptOutcome
from worker.policy import EMPTY_TRANSCRIPT, Action, Call, Limits, Note, Position, Step, decide

pytestmark = pytest.mark.unit

LIMITS = Limits(max_retries=4, provider_timeout=120.0)
RETRIED, FALLBACK, FAILED, SUCCESS = (
    AttemptOutcome.RETRIED,
    AttemptOutcome.FALLBACK,
    AttemptOutcome.FAILED,
    AttemptOutcome.SUCCESS,
)


def error(
    kind: ErrorKind,
    status: int | None,
    code: str,
    *,
    retry_after: float | None = None,
    model_gone: bool = False,
    opens_circuit: bool | None = None,
    auth_failed: bool = False,
) -> Call:
    """A call that failed as the OpenAI error translation would say."""
    err = ProviderError(
        f"{code} said the provider",
        kind=kind,
        code=code,
        http_status=status,
        retry_after=retry_after,
        model_gone=model_gone,
        opens_circuit=opens_circuit,
        auth_failed=auth_failed,
    )
    return Call.error(err)


SERVER_ERROR = error(ErrorKind.RETRY, 500, "server_error")
RATE_LIMITED = error(ErrorKind.RETRY, 429, "rate_limit_exceeded", retry_after=2.0)
RATE_LIMITED_BARE = error(ErrorKind.RETRY, 429, "rate_limit_exceeded")
TIMEOUT = error(ErrorKind.RETRY, None, "timeout")
QUOTA = error(ErrorKind.NEXT_MODEL, 429, "insufficient_quota")
AUTH = error(ErrorKind.NEXT_MODEL, 401, "invalid_api_key", auth_failed=True)
GONE = error(ErrorKind.NEXT_MODEL, 404, "model_not_found", model_gone=True)
FORBIDDEN = error(ErrorKind.NEXT_MODEL, 403, "http_403", auth_failed=True)
QUOTA_BY_TYPE = error(ErrorKind.NEXT_MODEL, 429, "http_429")
BILLING_LIMIT = error(ErrorKind.NEXT_MODEL, 400, "billing_hard_limit_reached", opens_circuit=False)
BILLING_INACTIVE = error(ErrorKind.RETRY, 429, "billing_not_active")
MODEL_TRIP = error(ErrorKind.NEXT_MODEL, 400, "model_overloaded_for_good", opens_circuit=True)
REFUSED_PARAMETER = error(ErrorKind.NEXT_MODEL, 400, "unsupported_parameter", opens_circuit=False)
INVALID = error(ErrorKind.INVALID_AUDIO, 400, "invalid_value")
TOO_LARGE = error(ErrorKind.TOO_LARGE, 413, "request_too_large")
FIRST_INVALID = "the first provider could not decode it"


BASE = Position(retries=0, has_next=True, time_left=3000.0, delay=1.5, seconds=30.0)


def at(**changes: Any) -> Position:
    """The base position with some values changed."""
    return replace(BASE, **changes)


CASES = [
    # An answer.
    ("answer", Call.answer("hello"), at(), Action(Step.ANSWER, SUCCESS, note=Note.SUCCESS, keep=True)),
    (
        "answer on the extra try after invalid audio",
        Call.answer("hello"),
        at(invalid_message=FIRST_INVALID),
        Action(Step.ANSWER, SUCCESS, note=Note.SUCCESS, keep=True),
    ),
    (
        "empty transcript, a next model exists: billed, then the next model",
        Call.answer("  "),
        at(),
        Action(Step.NEXT, FALLBACK, EMPTY_TRANSCRIPT, Note.SUCCESS, empty=True),
    ),
    (
        "empty transcript from the last model: accepted and kept",
        Call.answer(""),
        at(has_next=False),
        Action(Step.NEXT, SUCCESS, note=Note.SUCCESS, keep=True, empty=True),
    ),
    # Retryable errors.
    (
        "5xx: retry after the backoff, counted by the circuit",
        SERVER_ERROR,
        at(retries=1),
        Action(Step.RETRY, RETRIED, "server_error", Note.FAILURE, delay=1.5),
    ),
    (
        "429 with Retry-After: retry, the fleet's limiter waits",
        RATE_LIMITED,
        at(delay=2.0),
        Action(Step.RETRY, RETRIED, "rate_limit_exceeded", Note.PENALIZE, delay=2.0, pause=2.0),
    ),
    (
        "429 without Retry-After: retry, the fleet pauses the model for the backoff",
        RATE_LIMITED_BARE,
        at(),
        Action(Step.RETRY, RETRIED, "rate_limit_exceeded", Note.PENALIZE, delay=1.5, pause=1.5),
    ),
    (
        "429s use up no retries: the same model again, not the pricier fallback",
        RATE_LIMITED_BARE,
        at(retries=9, throttled=9),
        Action(Step.RETRY, RETRIED, "rate_limit_exceeded", Note.PENALIZE, delay=1.5, pause=1.5),
    ),
    (
        "429s before a 5xx do not count toward its retries",
        SERVER_ERROR,
        at(retries=6, throttled=3),
        Action(Step.RETRY, RETRIED, "server_error", Note.FAILURE, delay=1.5),
    ),
    (
        "429s and the deadline: the next model",
        RATE_LIMITED,
        at(retries=9, throttled=9, time_left=121.0, delay=2.0),
        Action(Step.NEXT, FALLBACK, "rate_limit_exceeded", Note.PENALIZE, pause=2.0),
    ),
    (
        "a batch preferring speed: 429s use up retries, then the next model",
        RATE_LIMITED,
        at(retries=4, throttled=4, speed=True),
        Action(Step.NEXT, FALLBACK, "rate_limit_exceeded", Note.PENALIZE, pause=2.0),
    ),
    (
        "a batch preferring speed: a 429 with retries left is retried",
        RATE_LIMITED,
        at(retries=1, throttled=1, speed=True, delay=2.0),
        Action(Step.RETRY, RETRIED, "rate_limit_exceeded", Note.PENALIZE, delay=2.0, pause=2.0),
    ),
    (
        "timeout: retry",
        TIMEOUT,
        at(),
        Action(Step.RETRY, RETRIED, "timeout", Note.FAILURE, delay=1.5),
    ),
    (
        "retries used up: the next model",
        SERVER_ERROR,
        at(retries=4),
        Action(Step.NEXT, FALLBACK, "server_error", Note.FAILURE),
    ),
    (
        "retries used up on the last model: failed",
        SERVER_ERROR,
        at(retries=4, has_next=False),
        Action(Step.NEXT, FAILED, "server_error", Note.FAILURE),
    ),
    (
        "the wait plus a call would pass the deadline: the next model",
        SERVER_ERROR,
        at(time_left=121.0, delay=1.5),
        Action(Step.NEXT, FALLBACK, "server_error", Note.FAILURE),
    ),
    (
        "the wait plus a call ends right at the deadline: retry",
        SERVER_ERROR,
        at(time_left=121.5, delay=1.5),
        Action(Step.RETRY, RETRIED, "server_error", Note.FAILURE, delay=1.5),
    ),
    # The model cannot serve.
    (
        "quota: the next model at once, the provider's circuit opens",
        QUOTA,
        at(),
        Action(Step.NEXT, FALLBACK, "insufficient_quota", Note.ACCOUNT),
    ),
    (
        "quota on the last model: failed",
        QUOTA,
        at(has_next=False),
        Action(Step.NEXT, FAILED, "insufficient_quota", Note.ACCOUNT),
    ),
    (
        "a refused API key: the next model at once, the provider's circuit opens, operators are told",
        AUTH,
        at(),
        Action(Step.NEXT, FALLBACK, "invalid_api_key", Note.AUTH),
    ),
    (
        "a 403 (a revoked key, a region refused): the provider's circuit, loudly",
        FORBIDDEN,
        at(),
        Action(Step.NEXT, FALLBACK, "http_403", Note.AUTH),
    ),
    (
        "quota without its code (a 429 that moves on): the provider's circuit",
        QUOTA_BY_TYPE,
        at(),
        Action(Step.NEXT, FALLBACK, "http_429", Note.ACCOUNT),
    ),
    (
        "billing hard limit (a 400 the translation calls a request error): the provider's circuit",
        BILLING_LIMIT,
        at(),
        Action(Step.NEXT, FALLBACK, "billing_hard_limit_reached", Note.ACCOUNT),
    ),
    (
        "billing not active (a 429 the translation would retry): the provider's circuit, no retry",
        BILLING_INACTIVE,
        at(),
        Action(Step.NEXT, FALLBACK, "billing_not_active", Note.ACCOUNT),
    ),
    (
        "another error that opens the circuit, not about the account: just the model's",
        MODEL_TRIP,
        at(),
        Action(Step.NEXT, FALLBACK, "model_overloaded_for_good", Note.TRIP),
    ),
    (
        "model gone: the next model, its circuit retired",
        GONE,
        at(),
        Action(Step.NEXT, FALLBACK, "model_not_found", Note.RETIRE),
    ),
    (
        "an error about this request only: the next model, circuit untouched",
        REFUSED_PARAMETER,
        at(),
        Action(Step.NEXT, FALLBACK, "unsupported_parameter", None),
    ),
    # The audio is the problem.
    (
        "invalid audio: one try on the next model",
        INVALID,
        at(),
        Action(Step.NEXT, FALLBACK, "invalid_value", invalid=True),
    ),
    (
        "invalid audio on the last model: the job fails",
        INVALID,
        at(has_next=False),
        Action(
            Step.FAIL,
            FAILED,
            "invalid_value",
            fail_code="invalid_audio",
            fail_message="invalid_value said the provider",
        ),
    ),
    (
        "a 5xx on the extra try after invalid audio: retried as usual, not a job failure",
        SERVER_ERROR,
        at(invalid_message=FIRST_INVALID),
        Action(Step.RETRY, RETRIED, "server_error", Note.FAILURE, delay=1.5),
    ),
    (
        "a 429 on the extra try: retried, the fleet pauses",
        RATE_LIMITED,
        at(invalid_message=FIRST_INVALID, delay=2.0),
        Action(Step.RETRY, RETRIED, "rate_limit_exceeded", Note.PENALIZE, delay=2.0, pause=2.0),
    ),
    (
        "a timeout on the extra try: retried",
        TIMEOUT,
        at(invalid_message=FIRST_INVALID),
        Action(Step.RETRY, RETRIED, "timeout", Note.FAILURE, delay=1.5),
    ),
    (
        "retries used up on the extra try: the second opinion passes to the next model",
        SERVER_ERROR,
        at(invalid_message=FIRST_INVALID, retries=4),
        Action(Step.NEXT, FALLBACK, "server_error", Note.FAILURE, invalid=True),
    ),
    (
        "quota on the extra try: the second opinion passes to the next model",
        QUOTA,
        at(invalid_message=FIRST_INVALID),
        Action(Step.NEXT, FALLBACK, "insufficient_quota", Note.ACCOUNT, invalid=True),
    ),
    (
        "invalid audio again on the extra try: the first message",
        INVALID,
        at(invalid_message=FIRST_INVALID),
        Action(Step.FAIL, FAILED, "invalid_value", fail_code="invalid_audio", fail_message=FIRST_INVALID),
    ),
    # Too large.
    (
        "413: split the piece",
        TOO_LARGE,
        at(seconds=1200.0),
        Action(Step.SPLIT, RETRIED, "request_too_large"),
    ),
    (
        "413 at the deepest split: the job fails",
        TOO_LARGE,
        at(depth=3),
        Action(
            Step.FAIL,
            RETRIED,
            "request_too_large",
            fail_code="too_large",
            fail_message="request_too_large said the provider",
        ),
    ),
    (
        "413 on under 2 s of audio: the job fails",
        TOO_LARGE,
        at(seconds=1.9, depth=1),
        Action(
            Step.FAIL,
            RETRIED,
            "request_too_large",
            fail_code="too_large",
            fail_message="request_too_large said the provider",
        ),
    ),
]


@pytest.mark.parametrize(("call", "position", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decide(call: Call, position: Position, expected: Action) -> None:
    assert decide(call, position, LIMITS) == expected


def test_call_keeps_what_the_error_says() -> None:
    call = Call.error(
        ProviderError(
            "slow down", kind=ErrorKind.RETRY, code="rate_limit_exceeded", http_status=429, retry_after=3.5
        )
    )
    assert call == Call(
        answered=False,
        kind=ErrorKind.RETRY,
        http_status=429,
        code="rate_limit_exceeded",
        message="slow down",
        retry_after=3.5,
    )
    assert QUOTA.opens_circuit and not SERVER_ERROR.opens_circuit  # next_model errors open it by default


SCOPES = [
    # note -> the circuit it acts on: the provider's (every model of the account) or the model's.
    (Note.ACCOUNT, "provider"),
    (Note.AUTH, "provider"),
    (Note.RETIRE, "model"),
    (Note.TRIP, "model"),
    (Note.FAILURE, "model"),
    (Note.SUCCESS, "model"),
    (Note.PENALIZE, "model"),  # a 429 rate limit is per model per organisation at OpenAI
]


@pytest.mark.parametrize(("note", "scope"), SCOPES, ids=[n.value for n, _ in SCOPES])
def test_which_circuit_a_note_acts_on(note: Note, scope: str) -> None:
    assert note.scope == scope
