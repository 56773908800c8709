"""Request and response bodies. Requests forbid unknown fields, so a typo is a 422, not a silent no-op."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Self

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from core.model_access import allowed_models, unconfigured_models
from core.providers.routing import ROUTING_POLICIES
from core.settings import get_settings

ProfileName = Literal["voicemail", "podcast", "auto"]
PriorityName = Literal["high", "normal", "low"]
PreferName = Literal["cost", "speed"]
# A batch's `timestamps` (core.statuses.Timestamps); a value outside these is 422 `invalid_timestamps`.
TIMESTAMPS_VALUES = ("none", "segment", "word")
INVALID_TIMESTAMPS = "invalid_timestamps"
# A batch's `routing` (core.providers.routing) and `diarize`: 422 `invalid_routing` / `invalid_diarize`.
INVALID_ROUTING = "invalid_routing"
INVALID_DIARIZE = "invalid_diarize"
TranscriptFormat = Literal["txt", "json", "srt", "vtt"]
GroupBy = Literal["day", "model", "batch"]
ModelName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]
MAX_METADATA_BYTES = 16 * 1024
# The validation error type (and problem code) of a model the operator did not configure.
MODEL_NOT_ALLOWED = "model_not_allowed"


def _storable(value: Any) -> None:
    """Raise unless every string in `value` can be stored in Postgres (no NUL, valid UTF-8)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key)
            _storable(item)
    elif isinstance(value, list):
        for item in value:
            _storable(item)


class Strict(BaseModel):
    """A request body: unknown fields are refused, and text must be storable."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _storable_text(self) -> Self:
        for name in type(self).model_fields:
            _storable(getattr(self, name))
        return self


class BatchOptions(Strict):
    """Options shared by every file of a batch."""

    name: str | None = Field(default=None, max_length=500)
    profile: ProfileName = "auto"
    language: str | None = Field(default=None, pattern=r"^[a-z]{2}$", description="ISO-639-1 code")
    prompt: str | None = Field(default=None, max_length=4000)
    models: list[ModelName] | None = Field(
        default=None, min_length=1, max_length=8, description="Model chain; default: the server's"
    )
    webhook_url: AnyHttpUrl | None = None
    budget_usd: Decimal | None = Field(default=None, ge=0, le=Decimal(10**9), max_digits=18, decimal_places=8)
    priority: PriorityName = "normal"
    prefer: PreferName = Field(
        default="cost",
        description="cost: a rate-limited model is waited for (backoff, same model); speed: after "
        "VOXQ_MAX_RETRIES rate-limit retries the job moves on to the next (possibly pricier) model",
    )
    timestamps: str | None = Field(
        default=None,
        description="none | segment | word: subtitle cues (and word times) for every transcript, aligned "
        "locally when the model gives none; default: segment for the podcast profile, else none",
        json_schema_extra={"enum": list(TIMESTAMPS_VALUES)},
    )
    routing: str = Field(
        default="chain",
        description="chain: the models in the chain's order; cheapest: the cheapest configured model of the "
        "chain that natively meets the batch's needs (timestamps, diarize) for each file, minimum billed "
        "seconds included, then the others by price, local last. Each job says which and why "
        "(route_model, route_reason)",
        json_schema_extra={"enum": list(ROUTING_POLICIES)},
    )
    diarize: bool = Field(
        default=False,
        description="route to models that label speakers (with routing=cheapest); speaker labels are not "
        "returned in transcripts yet",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timestamps")
    @classmethod
    def _known_timestamps(cls, value: str | None) -> str | None:
        return _timestamps(value)

    @field_validator("routing", mode="before")
    @classmethod
    def _known_routing(cls, value: Any) -> Any:
        if value not in ROUTING_POLICIES:
            raise PydanticCustomError(
                INVALID_ROUTING, "routing must be one of {allowed}", {"allowed": ", ".join(ROUTING_POLICIES)}
            )
        return value

    @field_validator("diarize", mode="before")
    @classmethod
    def _a_bool(cls, value: Any) -> Any:
        if not isinstance(value, bool):
            raise PydanticCustomError(INVALID_DIARIZE, "diarize must be true or false", {})
        return value

    @field_validator("models")
    @classmethod
    def _configured_models(cls, value: list[str] | None) -> list[str] | None:
        if value:
            unknown = unconfigured_models(value)
            if unknown:
                raise PydanticCustomError(
                    MODEL_NOT_ALLOWED,
                    "not a model this server offers: {names} (offered: {offered})",
                    {
                        "names": ", ".join(unknown),
                        "offered": ", ".join(sorted(allowed_models(get_settings()))),
                    },
                )
        return value

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must serialise to at most {MAX_METADATA_BYTES} bytes")
        return value


def _timestamps(value: str | None) -> str | None:
    """`value` when it is a `timestamps` choice; raise the `invalid_timestamps` validation error otherwise."""
    if value is not None and value not in TIMESTAMPS_VALUES:
        raise PydanticCustomError(
            INVALID_TIMESTAMPS,
            "timestamps must be one of {allowed}",
            {"allowed": ", ".join(TIMESTAMPS_VALUES)},
        )
    return value


class AlignRequest(Strict):
    """POST /v1/jobs/{id}/align (optional body)."""

    timestamps: str | None = Field(
        default=None,
        description="segment | word; default: the batch's choice, or segment when the batch asked for none",
        json_schema_extra={"enum": ["segment", "word"]},
    )

    @field_validator("timestamps")
    @classmethod
    def _timed(cls, value: str | None) -> str | None:
        if value == "none":
            raise PydanticCustomError(INVALID_TIMESTAMPS, "re-aligning needs timestamps segment or word", {})
        return _timestamps(value)


class AlignOut(BaseModel):
    """A re-alignment accepted: the job and its alignment's new state."""

    job_id: uuid.UUID
    status: str
    timestamps: str


class BatchCreate(BatchOptions):
    """POST /v1/batches."""

    auto_submit: bool = False


class StatusCounts(BaseModel):
    """Jobs of a batch per status."""

    pending_upload: int = 0
    uploaded: int = 0
    queued: int = 0
    processing: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0


class BatchOut(BaseModel):
    """A batch with its progress and cost so far."""

    id: uuid.UUID
    name: str | None
    status: str
    profile: str
    language: str | None
    priority: str
    prefer: str
    timestamps: str
    routing: str
    diarize: bool
    auto_submit: bool
    models: list[str] | None
    webhook_url: str | None
    budget_usd: float | None
    metadata: dict[str, Any]
    counts: StatusCounts
    total_jobs: int
    progress: float = Field(description="Share of jobs in a terminal status, 0..1")
    audio_seconds: float
    billed_seconds: float
    cost_usd: float = Field(description="billed_usd + estimated_usd")
    billed_usd: float = Field(description="Cost priced from the provider's own usage")
    estimated_usd: float = Field(
        description="Cost estimated from list prices (an unknown model, a call whose bill is not settled)"
    )
    created_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    routes: dict[str, int] | None = Field(
        default=None,
        description="Jobs per route (`provider:model` each job was routed to first, as `route_model` of "
        "GET /v1/jobs/{id}), most first; only in GET /v1/batches/{id}, null in lists",
    )


class BatchPage(BaseModel):
    """One page of batches, newest first."""

    items: list[BatchOut]
    next_cursor: str | None


class JobError(BaseModel):
    """Why a job failed or was skipped."""

    code: str
    message: str | None


class JobBrief(BaseModel):
    """A job as an upload answers it."""

    id: uuid.UUID
    filename: str | None
    status: str
    bytes: int | None
    sha256: str | None


class UploadOut(BaseModel):
    """POST /v1/batches/{id}/files: one job per file."""

    batch_id: uuid.UUID
    jobs: list[JobBrief]


class JobOut(BaseModel):
    """A job: status, probe results, the model that produced its transcript, attempts and cost."""

    id: uuid.UUID
    batch_id: uuid.UUID
    filename: str | None
    status: str
    bytes: int | None
    sha256: str | None
    content_type: str | None
    source_uri: str | None
    duration_seconds: float | None
    codec: str | None
    sample_rate: int | None
    channels: int | None
    model: str | None
    attempts: int
    billed_seconds: float
    cost_usd: float = Field(description="billed_usd + estimated_usd")
    billed_usd: float = Field(description="Cost priced from the provider's own usage")
    estimated_usd: float = Field(
        description="Cost estimated from list prices (an unknown model, a call whose bill is not settled)"
    )
    error: JobError | None
    fallback_reason: str | None = Field(
        default=None,
        description="Why the job last moved on from a model of its chain (that model and the provider's "
        "message, e.g. a refused API key or an exhausted quota); null when it never did",
    )
    route_model: str | None = Field(
        default=None, description="The model the job's route tries first (null until the job is prepared)"
    )
    route_reason: str | None = Field(
        default=None,
        description="Why that model: 'chain order', or for routing=cheapest the needs it meets and its "
        "expected cost for this file against the runner-up",
    )
    deduplicated_from: uuid.UUID | None
    created_at: datetime
    uploaded_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    """One page of a batch's jobs, in upload order."""

    items: list[JobOut]
    next_cursor: str | None


class PresignedUploadCreate(Strict):
    """POST /v1/batches/{id}/uploads: ask for a presigned PUT for one big file."""

    filename: str = Field(min_length=1, max_length=1000)
    bytes: int = Field(gt=0)
    content_type: str | None = Field(default=None, max_length=200, pattern=r"^[\w.+-]+/[\w.+-]+$")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class PresignedUploadOut(BaseModel):
    """Where to PUT the file, and until when."""

    job_id: uuid.UUID
    upload_url: str
    method: Literal["PUT"] = "PUT"
    headers: dict[str, str]
    expires_at: datetime


class ImportCreate(Strict):
    """POST /v1/batches/{id}/imports: audio already in an allowed bucket."""

    s3_uris: list[Annotated[str, Field(pattern=r"^s3://[^/]+/.+$", max_length=2000)]] = Field(
        min_length=1, max_length=1000
    )


class ImportOut(BaseModel):
    """The jobs created by an import."""

    batch_id: uuid.UUID
    jobs: list[JobBrief]


class RejectedJob(BaseModel):
    """A presigned upload that failed verification at submit."""

    job_id: uuid.UUID
    code: str
    message: str


class SubmitOut(BaseModel):
    """What a submit (or retry) queued."""

    batch_id: uuid.UUID
    status: str
    queued: int
    job_ids: list[uuid.UUID]
    rejected: list[RejectedJob] = Field(default_factory=list)
    waiting_for_upload: list[uuid.UUID] = Field(default_factory=list)


class AttemptOut(BaseModel):
    """One provider call and what it cost."""

    id: uuid.UUID
    model: str
    provider: str
    chunk_index: int | None
    retry_number: int
    outcome: str
    http_status: int | None
    error_code: str | None
    error_message: str | None
    audio_seconds: float | None
    latency_ms: float | None
    started_at: datetime
    ended_at: datetime | None
    cost_usd: float | None
    estimated: bool | None


class AttemptList(BaseModel):
    """Every attempt of a job, oldest first."""

    items: list[AttemptOut]


class UsageRow(BaseModel):
    """Cost of one day, model or batch."""

    key: str
    cost_usd: float = Field(description="billed_usd + estimated_usd")
    billed_seconds: float
    records: int
    billed_usd: float = Field(description="Cost priced from the provider's own usage")
    estimated_usd: float = Field(
        description="Cost estimated from list prices (an unknown model, a call whose bill is not settled)"
    )


class UsageOut(BaseModel):
    """The tenant's cost report."""

    model_config = ConfigDict(populate_by_name=True)

    from_: datetime = Field(alias="from")
    to: datetime
    group_by: GroupBy
    total_usd: float = Field(description="total_billed_usd + total_estimated_usd")
    total_billed_usd: float
    total_estimated_usd: float
    total_billed_seconds: float
    rows: list[UsageRow]


class WebhookSecretCreate(Strict):
    """POST /v1/webhook-secrets: rotate the tenant's signing secret."""

    overlap_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        le=30 * 24 * 3600,
        description="How long the secrets current until now keep signing beside the new one",
    )


class WebhookSecretOut(BaseModel):
    """A new signing secret: the only answer that ever contains it."""

    id: uuid.UUID
    secret: str
    prefix: str
    created_at: datetime
    previous_expire_at: datetime | None = Field(
        description="When the secrets that were current stop signing (null: there were none)"
    )


class WebhookSecretRow(BaseModel):
    """A live signing secret, without the secret."""

    id: uuid.UUID
    prefix: str
    created_at: datetime
    expires_at: datetime | None


class WebhookSecretList(BaseModel):
    """The tenant's live signing secrets, newest first."""

    items: list[WebhookSecretRow]


class RetiringModelOut(BaseModel):
    """A configured model with a retirement date (from voxq's catalogue or the providers file)."""

    model: str  # provider:model
    retires: str  # ISO date; from that day the model is sent no requests
    days_left: int  # 0 or less: retired


class HealthOut(BaseModel):
    """Liveness plus the result of each dependency check (readiness: plus retiring models)."""

    status: str
    checks: dict[str, str]
    models: list[RetiringModelOut] | None = None
