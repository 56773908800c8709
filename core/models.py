"""Database models (SQLAlchemy 2, typed). Status columns hold the names from `core.statuses`."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.ids import uuid7
from core.statuses import (
    AttemptOutcome,
    BatchStatus,
    GroupStatus,
    JobStatus,
    Priority,
    Profile,
    WebhookStatus,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

USD = Numeric(18, 8)


class Base(DeclarativeBase):
    """Declarative base with a stable constraint naming convention (so migrations can name them)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB, uuid.UUID: UUID(as_uuid=True)}


def _pk() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid7)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Tenant(Base):
    """A customer account; every other row belongs to exactly one tenant."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = _pk()
    name: Mapped[str] = mapped_column(String(200), unique=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = _created()


class ApiKey(Base):
    """An API key, stored only as a SHA-256 hash; `prefix` lets people tell keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created()
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookSecret(Base):
    """A tenant's webhook signing secret, encrypted with `VOXQ_SECRETS_KEY` (core/webhook_secrets.py).

    It must be recoverable to sign (unlike an API key), so it is encrypted, not hashed. The current
    secret has no `expires_at`; a rotation gives the previous one an end (the overlap window), and until
    then deliveries carry a signature by each.
    """

    __tablename__ = "webhook_secrets"
    __table_args__ = (Index("ix_webhook_secrets_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(32))  # the secret's first characters, to tell them apart
    ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImportGrant(Base):
    """A tenant may import objects of `bucket` whose key starts with `prefix` (core/import_grants.py)."""

    __tablename__ = "import_grants"
    __table_args__ = (UniqueConstraint("tenant_id", "bucket", "prefix"),)

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    bucket: Mapped[str] = mapped_column(String(255))
    prefix: Mapped[str] = mapped_column(Text, default="", server_default=text("''"))
    created_at: Mapped[datetime] = _created()


class Batch(Base):
    """A set of files submitted together with shared options."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(500))
    profile: Mapped[str] = mapped_column(String(20), default=Profile.AUTO.value)
    language: Mapped[str | None] = mapped_column(String(16))
    prompt: Mapped[str | None] = mapped_column(Text)
    models: Mapped[list[Any] | None] = mapped_column(JSONB)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    budget_usd: Mapped[Decimal | None] = mapped_column(USD)
    priority: Mapped[str] = mapped_column(String(10), default=Priority.NORMAL.value)
    # cost: rate limits are waited out on the same model; speed: they may move a job to the next model.
    prefer: Mapped[str] = mapped_column(String(10), default="cost", server_default=text("'cost'"))
    # none | segment | word (core.statuses.Timestamps); NULL: the profile's default (`effective_timestamps`)
    timestamps: Mapped[str | None] = mapped_column(String(10))
    # chain | cheapest (core.providers.routing): the order a job's models are tried in; diarize: a need.
    routing: Mapped[str] = mapped_column(String(10), default="chain", server_default=text("'chain'"))
    diarize: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    auto_submit: Mapped[bool] = mapped_column(Boolean, default=False)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSONB, default=dict)
    status: Mapped[str] = mapped_column(String(20), default=BatchStatus.OPEN.value)
    audio_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    billed_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0), server_default=text("0"))
    committed_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0), server_default=text("0"))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Group(Base):
    """Jobs transcribed together by one task: packed short files, or the chunks of one long file."""

    __tablename__ = "groups"

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), index=True
    )
    key: Mapped[str] = mapped_column(String(200))
    duration_class: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=GroupStatus.PENDING.value)
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    total_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = _created()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """One file: where its audio is, what probing found, and where it is in its lifecycle."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        Index("ix_jobs_tenant_id_id", "tenant_id", "id"),
        Index("ix_jobs_tenant_id_fingerprint", "tenant_id", "fingerprint"),
        Index(
            "ix_jobs_lease_expires_at",
            "lease_expires_at",
            postgresql_where=text("status = 'processing'"),
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    group_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("groups.id", ondelete="SET NULL"), index=True
    )
    deduplicated_from_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True
    )
    object_key: Mapped[str | None] = mapped_column(Text)
    source_uri: Mapped[str | None] = mapped_column(Text)  # s3://bucket/key for imports
    filename: Mapped[str | None] = mapped_column(Text)
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(200))
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    codec: Mapped[str | None] = mapped_column(String(64))
    sample_rate: Mapped[int | None] = mapped_column(Integer)
    channels: Mapped[int | None] = mapped_column(Integer)
    fingerprint: Mapped[str | None] = mapped_column(String(64))  # sha256 of normalised PCM
    speech_seconds: Mapped[float | None] = mapped_column(Float)  # after trimming silence
    # trimmed→original time map and chunk bounds (see worker.audio.TimeMap); null until prepared
    time_map: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    billed_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0), server_default=text("0"))
    model: Mapped[str | None] = mapped_column(String(100))  # the model that produced the transcript
    # The model its route tries first and why (core.providers.routing), written when it is grouped.
    route_model: Mapped[str | None] = mapped_column(String(100))
    route_reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.UPLOADED.value)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[str] = mapped_column(String(10), default=Priority.NORMAL.value)
    run_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )
    uploaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobChunk(Base):
    """One slice of a long file in its job's chunk plan, transcribed on its own and stitched back in `index`
    order. The plan only: a chunk's paid answer is kept in `job_answers` (piece `chunk:<index>`)."""

    __tablename__ = "job_chunks"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[uuid.UUID] = _pk()
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    start_seconds: Mapped[float] = mapped_column(Float)  # in the original file's time
    end_seconds: Mapped[float] = mapped_column(Float)
    object_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()


class JobAnswer(Base):
    """A paid provider answer for one piece of a job (the whole file, or one chunk), kept in the same
    transaction that closes its attempt: any later run of the job (redelivery, sweeper requeue, new group)
    reuses it instead of paying for the same audio again. `start_seconds`/`end_seconds` are the piece's
    bounds in trimmed time: an answer is reused only for the same piece of the same plan."""

    __tablename__ = "job_answers"
    __table_args__ = (UniqueConstraint("job_id", "piece"),)

    id: Mapped[uuid.UUID] = _pk()
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    piece: Mapped[str] = mapped_column(String(32))  # "whole" or "chunk:<index>"
    start_seconds: Mapped[float] = mapped_column(Float)
    end_seconds: Mapped[float] = mapped_column(Float)
    text: Mapped[str] = mapped_column(Text)
    segments: Mapped[list[Any] | None] = mapped_column(JSONB)  # original time
    language: Mapped[str | None] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(100))
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("attempts.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = _created()


class Attempt(Base):
    """One provider call (hosted or local), written before the call and closed after it."""

    __tablename__ = "attempts"
    __table_args__ = (
        Index("ix_attempts_model_outcome", "model", "outcome"),
        Index("ix_attempts_settlement", "settlement"),
    )

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    chunk_index: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(100))
    provider: Mapped[str] = mapped_column(String(50))
    retry_number: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(20), default=AttemptOutcome.PENDING.value)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    audio_seconds: Mapped[float | None] = mapped_column(Float)
    request_bytes: Mapped[int | None] = mapped_column(BigInteger)
    worker: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    # For an abandoned hosted call charged an estimate (core/billing.py): unsettled | billed | not_billed
    settlement: Mapped[str | None] = mapped_column(String(20))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Transcript(Base):
    """The one transcript of a job (unique per job: written once, by compare-and-set)."""

    __tablename__ = "transcripts"
    __table_args__ = (
        # The few transcripts whose timings are still to come (the sweeper re-sends lost align tasks).
        Index(
            "ix_transcripts_alignment_pending",
            "created_at",
            postgresql_where=text("(alignment ->> 'status') = 'pending'"),
        ),
    )

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    attempt_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("attempts.id", ondelete="SET NULL"))
    text: Mapped[str] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(16))
    segments: Mapped[list[Any] | None] = mapped_column(JSONB)  # [{start, end, text, words?}] original time
    model: Mapped[str] = mapped_column(String(100))
    provenance: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    # Timings for subtitles (worker/align_stage.py): {status, token, timestamps, source, method, words,
    # segments, chunks, reason, detail, ...}; NULL when the batch asked for none.
    alignment: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created()


class CostRecord(Base):
    """What one billed attempt cost, priced from the provider's `usage` with a versioned price table."""

    __tablename__ = "cost_records"
    __table_args__ = (Index("ix_cost_records_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("batches.id", ondelete="SET NULL"), index=True
    )
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    attempt_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("attempts.id", ondelete="RESTRICT"), unique=True)
    model: Mapped[str] = mapped_column(String(100))
    usage_type: Mapped[str | None] = mapped_column(String(20))  # tokens | duration | none
    billed_audio_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    input_audio_tokens: Mapped[int | None] = mapped_column(Integer)
    input_text_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    compute_seconds: Mapped[float | None] = mapped_column(Float)
    unit_prices: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    price_table_version: Mapped[str] = mapped_column(String(40))
    usd: Mapped[Decimal] = mapped_column(USD)
    estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = _created()


class BudgetReservation(Base):
    """What one hosted call holds of its batch's budget (`batches.committed_usd`) until its attempt is
    closed: released exactly once, by whoever deletes this row (worker.budget, core.billing)."""

    __tablename__ = "budget_reservations"

    attempt_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    usd: Mapped[Decimal] = mapped_column(USD)
    created_at: Mapped[datetime] = _created()


class WebhookDelivery(Base):
    """One attempt to deliver a batch's completion webhook."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[uuid.UUID] = _pk()
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(50))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    attempt_number: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(20), default=WebhookStatus.PENDING.value)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyRecord(Base):
    """The first answer to a POST carrying an `Idempotency-Key`, replayed for 24 h."""

    __tablename__ = "idempotency_keys"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(Text)
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class WorkerHeartbeat(Base):
    """Last sign of life of each worker process (for health checks and `voxq top`)."""

    __tablename__ = "worker_heartbeats"

    worker: Mapped[str] = mapped_column(String(200), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
