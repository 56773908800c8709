"""Settings: the one place every configurable fact of voxq is read from the environment."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.names import LOCAL_MODEL

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "changethis", "secret", "password", "admin"})

Environment = Literal["dev", "test", "production"]
# The legacy shared webhook secret outside production when none is set (see `webhook_secret`).
DEV_WEBHOOK_SECRET = "voxq-dev-webhook-secret"  # noqa: S105 (a dev default, refused in production)
# How the chunks of one long file share context (see worker/waves.py's docstring).
ChunkContext = Literal["alternate", "sequential", "none"]


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of voxq's configuration, from `VOXQ_*` variables (and OpenAI's own conventions)."""

    model_config = SettingsConfigDict(env_prefix="VOXQ_", extra="ignore", env_file=None)

    environment: Environment = "dev"

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/voxq"
    database_pool_size: int = 10
    redis_url: str = "redis://127.0.0.1:6379/0"

    s3_endpoint_url: str | None = None
    s3_bucket: str = "voxq-audio"
    s3_access_key_id: str = "voxq"
    s3_secret_access_key: SecretStr = SecretStr("voxq-dev-secret")
    s3_region: str = "us-east-1"
    s3_presign_expiry_seconds: int = 3600
    s3_multipart_threshold_bytes: int = 16 * 1024 * 1024
    s3_multipart_chunk_bytes: int = 8 * 1024 * 1024
    # Dev only: every tenant may import whole buckets listed here. Outside dev imports need per-tenant
    # grants (`voxq imports grant`, core/import_grants.py) and the API refuses to start with this set.
    import_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # OpenAI conventions keep their own names.
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "VOXQ_OPENAI_API_KEY")
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=AliasChoices("OPENAI_BASE_URL", "VOXQ_OPENAI_BASE_URL"),
    )
    # Unset: the built-in catalogue's dated default (openai:gpt-4o-mini-transcribe before 2027-02-26,
    # openai:gpt-transcribe from then; core/providers/retirement.py). Chain entries are `provider:model`
    # or a bare model name (the runtime's provider's).
    primary_model: str | None = None
    fallback_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["gpt-4o-transcribe", LOCAL_MODEL]
    )
    # Models a batch may name besides the primary and the fallbacks (core/model_access.py); a batch naming
    # any other model is refused (422 `model_not_allowed`).
    allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    price_table_version: str = "2026-11"
    price_table_dir: str | None = None  # extra price tables (<version>.json) overriding core/prices/
    # The operator's providers (TOML, core/providers/config.py), merged over the built-in catalogue
    # (core/prices/catalogue.toml). Unset: OPENAI_API_KEY / OPENAI_BASE_URL define the provider `openai`.
    providers_file: str | None = None

    # Pipeline limits.
    max_upload_bytes: int = 2 * 1024**3
    max_audio_seconds: float = 6 * 3600.0
    max_chunk_seconds: float = 600.0
    # alternate: even chunks at once, then odd chunks at once, each prompted with its predecessor's tail
    # (2 round trips per file); sequential: one chunk after another, every seam prompted (N round trips);
    # none: every chunk at once, batch prompt only.
    chunk_context: ChunkContext = "alternate"
    max_in_flight: int = 64
    max_retries: int = 4
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 30.0
    provider_timeout_seconds: float = 120.0
    group_max_files: int = 50
    group_max_seconds: float = 1800.0
    short_file_seconds: float = 120.0
    job_lease_seconds: int = 900
    job_max_attempts: int = 5
    # A run stopped by an infrastructure outage (S3, Postgres, Redis unreachable) is not counted against
    # `job_max_attempts`: the job waits and runs again, the wait growing with how long it has waited
    # (worker.prepare), between these bounds.
    outage_retry_base_seconds: float = 30.0
    outage_retry_max_seconds: float = 300.0
    circuit_failure_threshold: int = 5
    circuit_open_seconds: float = 30.0
    # How long a worker process trusts a circuit it saw closed with no failures (worker/circuit.py); 0: ask
    # Redis on every call.
    circuit_local_seconds: float = 1.0
    # A provider's refused API key (401/403) keeps /readyz degraded this long after the last refusal (a
    # probe that gets through clears it sooner).
    provider_auth_alert_seconds: float = Field(default=900.0, gt=0)
    # A model the provider answered `model_not_found` for is skipped by every worker for this long.
    model_retired_seconds: float = Field(default=7 * 86400.0, gt=0)
    model_rpm_limit: int = 0
    model_audio_seconds_per_minute: float = 0.0
    trim_silence: bool = True
    # A whole job's derived FLAC up to this size waits for its group task in Redis instead of S3 (0: off);
    # not while Redis already uses more than the second setting (worker.derived).
    derived_inline_max_bytes: int = 256 * 1024
    derived_inline_redis_max_bytes: int = 256 * 1024 * 1024

    # Local engine.
    local_model_dir: str | None = None
    local_model_cache_dir: str = ".voxq/models"
    local_cpu_threads: int = 0
    local_concurrency: int = 1
    local_compute_type: str = "int8"

    # Webhooks. Each tenant signs with its own secrets (core/webhook_secrets.py), stored encrypted with
    # `secrets_key` (comma-separated: the first encrypts, every one decrypts, for rotating the key).
    # `webhook_secret` is the legacy shared secret: it signs only for tenants that have no secret of their
    # own yet (created before per-tenant secrets); unset, their deliveries are refused. Outside production
    # it defaults to a fixed dev value.
    secrets_key: SecretStr = SecretStr("voxq-dev-secrets-key")
    webhook_secret: SecretStr | None = None
    webhook_allow_private: bool = False
    webhook_max_attempts: int = 10

    # Celery.
    celery_visibility_timeout: int = 7200
    task_time_limit: int = 3600
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"  # 0.0.0.0 in a container, so Prometheus can reach it

    # Flower.
    flower_user: str = "voxq"
    flower_password: SecretStr = SecretStr("")

    # Media parsing of what tenants send (the API's probe, the worker's decode) runs in capped child
    # processes (core/sandbox.py): address space above what such a child uses at start, CPU seconds per
    # file (probing reads ~2 s of audio; a 6-hour 48 kHz stereo MP3 decodes in ~45 s of CPU here),
    # children per API or worker process.
    media_memory_mb: int = Field(default=1024, ge=64)
    probe_cpu_seconds: float = Field(default=20.0, gt=0)
    decode_cpu_seconds: float = Field(default=300.0, gt=0)
    media_processes: int = Field(default=2, ge=1)

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    idempotency_ttl_seconds: int = 24 * 3600
    # Each API process remembers a valid key (by its hash) for this long, so a polling client's requests
    # skip the key lookup; a revoked key or a disabled tenant is refused within it. 0 = look up every time.
    auth_cache_seconds: float = Field(default=5.0, ge=0)
    # Threads of each API process that run the polled status read (GET /v1/jobs/{id}); see api/deps.py
    # run_polled. Each serves one read at a time (a Postgres round trip plus ~1 ms of Python).
    api_poll_threads: int = Field(default=1, ge=1)
    # A request body that is not multipart (JSON) may be at most this long; multipart uploads are bounded
    # by max_upload_bytes per request, also while streaming (api/guard.py).
    max_json_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # GET /metrics needs `Authorization: Bearer <token>`; unset, /metrics is open in dev only.
    metrics_token: SecretStr | None = None
    # The fleet's jobs-by-status gauge is counted at most once per this many seconds, fleet-wide.
    fleet_jobs_seconds: float = Field(default=30.0, ge=0)
    log_format: Literal["json", "human"] = "json"
    log_level: str = "INFO"

    data_dir: str = ".voxq"

    @field_validator("fallback_models", "import_buckets", "allowed_models", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("webhook_secret", "metrics_token", "primary_model", "providers_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _reject_placeholder_secrets(self) -> Settings:
        if self.environment != "production" and self.webhook_secret is None:
            self.webhook_secret = SecretStr(DEV_WEBHOOK_SECRET)
        if self.environment == "production":
            for name in (
                "s3_secret_access_key",
                "secrets_key",
                "webhook_secret",
                "flower_password",
                "metrics_token",
            ):
                secret: SecretStr | None = getattr(self, name)
                if secret is None:
                    continue  # optional (the legacy webhook secret, the metrics token)
                value = secret.get_secret_value()
                if value.lower() in PLACEHOLDER_SECRETS or "dev" in value.lower():
                    raise ValueError(f"VOXQ_{name.upper()} must be set to a real secret in production")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def reset_settings_cache() -> None:
    """Forget cached settings (tests and CLI subcommands that change the environment)."""
    get_settings.cache_clear()
