"""The contract every transcription provider meets, and the provider error tree.

ProviderError                 Raised when a provider call fails; `kind` says what to do next.
kinds: retry        same model again after backoff (429 rate limit, 408, 409, 5xx, timeouts)
       next_model   go to the next model now; the model's circuit opens (quota, 401/403, retired);
                    `auth_failed` for 401/403: the key is wrong or revoked, which is reported loudly
       invalid_audio  the audio is the problem: one try on the next model, then fail the job
       too_large    413: re-chunk smaller and try again
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from core.errors import VoxqError


class ErrorKind(StrEnum):
    """What the pipeline should do after a failed provider call."""

    RETRY = "retry"
    NEXT_MODEL = "next_model"
    INVALID_AUDIO = "invalid_audio"
    TOO_LARGE = "too_large"


class ProviderError(VoxqError):
    """Raised when a provider call fails; carries what the pipeline needs to decide what happens next."""

    code = "provider_error"

    def __init__(
        self,
        message: str,
        *,
        kind: ErrorKind,
        code: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        model_gone: bool = False,
        opens_circuit: bool | None = None,
        billing_unknown: bool = False,
        auth_failed: bool = False,
    ) -> None:
        super().__init__(message, code=code)
        self.kind = kind
        self.http_status = http_status
        self.retry_after = retry_after
        self.model_gone = model_gone  # model_not_found: its circuit opens for good
        self.auth_failed = auth_failed  # 401/403: the provider refused the API key (operators must know)
        # next_model errors about the model (quota, auth, retired) open its circuit; one about this
        # request only (e.g. a parameter this model refuses) does not.
        self.opens_circuit = (kind == ErrorKind.NEXT_MODEL) if opens_circuit is None else opens_circuit
        # The request reached the provider and its answer was lost (a read timeout, a dropped connection,
        # a 200 that did not parse): the provider may have billed it. The attempt is charged an estimate,
        # unsettled, until the provider's usage export says (core.billing).
        self.billing_unknown = billing_unknown


@dataclass(frozen=True)
class TranscriptionRequest:
    """One audio file (or chunk) to transcribe with one model."""

    audio: bytes
    filename: str  # with an extension the provider accepts, e.g. "chunk.flac"
    content_type: str
    model: str
    audio_seconds: float
    language: str | None = None
    prompt: str | None = None
    request_id: str | None = None  # sent as X-Client-Request-Id; the attempt's id
    want_timestamps: bool = False
    # The response format the model's configured capabilities allow (worker.entries.response_format:
    # verbose_json when the model offers it and timestamps are wanted, else json); None for a model the
    # providers configuration does not describe: verbose_json when timestamps are wanted, else json.
    response_format: str | None = None


@dataclass
class TranscriptionResult:
    """What a provider answered."""

    text: str
    model: str
    language: str | None = None
    segments: list[dict[str, Any]] | None = None  # [{start, end, text, words?: [{start, end, word}]}]
    usage: dict[str, Any] | None = None  # the provider's `usage` object, verbatim
    http_status: int | None = None
    compute_seconds: float | None = None  # local engine: CPU wall time spent
    extra: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    """Anything that turns audio into text."""

    name: str

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        """Transcribe one request or raise ProviderError."""
        ...
