"""Names shared by API and workers: queues, task names, Redis key prefixes. One place for each."""

from __future__ import annotations

# Celery queues. Workers consume high before normal before low (see worker.app), for ingest (prepare)
# as for transcription, so a high batch is never stuck behind a big normal one at either stage.
QUEUE_INGEST_HIGH = "ingest.high"
QUEUE_INGEST = "ingest"
QUEUE_TRANSCRIBE_HIGH = "transcribe.high"
QUEUE_TRANSCRIBE = "transcribe"
QUEUE_TRANSCRIBE_LOW = "transcribe.low"
QUEUE_LOCAL = "local"
# Word timestamps for text-only transcripts (worker.align_stage): CPU work on the local model, so it is
# consumed by the local worker, never by the workers that hold the provider lanes.
QUEUE_ALIGN = "align"
QUEUE_MAINTENANCE = "maintenance"
QUEUE_WEBHOOKS = "webhooks"

# In the order a worker consuming them all takes them: a high batch's whole path first.
ALL_QUEUES = (
    QUEUE_INGEST_HIGH,
    QUEUE_TRANSCRIBE_HIGH,
    QUEUE_INGEST,
    QUEUE_TRANSCRIBE,
    QUEUE_TRANSCRIBE_LOW,
    QUEUE_LOCAL,
    QUEUE_ALIGN,
    QUEUE_MAINTENANCE,
    QUEUE_WEBHOOKS,
)

# The model name that means the offline local engine (worker.local), last in the default chain and the
# only model without an API key. Its attempts record `local:<weights>` as their model and LOCAL_MODEL as
# their provider.
LOCAL_MODEL = "local"
LOCAL_MODEL_PREFIX = LOCAL_MODEL + ":"
# Lease owners of a job in the local stage: waiting in the `local` queue (LOCAL_QUEUE_OWNER), or run by a
# local worker (LOCAL_LEASE_PREFIX + its name). The sweeper hands such a job back to the local queue when
# its lease runs out, never to the hosted chain again (worker.sweeper).
LOCAL_LEASE_PREFIX = "local:"
LOCAL_QUEUE_OWNER = LOCAL_LEASE_PREFIX + "queue"

# Celery task names (stable across refactors; Flower shows these).
TASK_HEARTBEAT = "voxq.maintenance.heartbeat"
TASK_PREPARE_JOB = "voxq.ingest.prepare_job"
TASK_TRANSCRIBE_GROUP = "voxq.transcribe.group"
TASK_TRANSCRIBE_LOCAL = "voxq.local.transcribe"
TASK_SWEEP = "voxq.maintenance.sweep"
TASK_SWEEP_STORAGE = "voxq.maintenance.sweep_storage"
TASK_DELIVER_WEBHOOK = "voxq.webhooks.deliver"
TASK_ALIGN_JOB = "voxq.align.job"

# Redis key prefixes.
REDIS_PREFIX = "voxq:"
KEY_CIRCUIT = REDIS_PREFIX + "circuit:"  # + provider:model, or provider:<name> for a provider's account
KEY_RATE = REDIS_PREFIX + "rate:"  # + model + ":" + dimension (provider/<name>: a provider's buckets)
KEY_INFLIGHT = REDIS_PREFIX + "inflight:"  # + provider: holders of its fleet-wide in-flight slots
KEY_IDEMPOTENCY_LOCK = REDIS_PREFIX + "idem:"  # + tenant + ":" + key
KEY_GROUP_BUFFER = REDIS_PREFIX + "group:"  # + group key
KEY_METRICS = REDIS_PREFIX + "metrics:"
KEY_MODEL_RETIRED = REDIS_PREFIX + "retired:"  # + model
# Pub/sub: a model whose circuit opened, tripped or was retired (worker.circuit ends local readings).
CHANNEL_CIRCUIT_EVENTS = REDIS_PREFIX + "circuit-events"
KEY_PROVIDER_AUTH = (
    REDIS_PREFIX + "provider_auth:"
)  # + provider: its API key was refused (core.provider_health)
KEY_OBJECT_LOCK = REDIS_PREFIX + "objlock:"  # + sha256 of an audio object key (upload vs delete)
KEY_DERIVED = REDIS_PREFIX + "derived:"  # + the S3 key a job's FLAC kept in Redis would have (worker.derived)


def ingest_queue_for(priority: str) -> str:
    """The ingest (prepare) queue a batch of this priority uses."""
    return QUEUE_INGEST_HIGH if priority == "high" else QUEUE_INGEST


def transcribe_queue_for(priority: str) -> str:
    """The transcription queue a batch of this priority uses."""
    return {"high": QUEUE_TRANSCRIBE_HIGH, "low": QUEUE_TRANSCRIBE_LOW}.get(priority, QUEUE_TRANSCRIBE)


# prometheus-client's multiprocess mode: every process writes its metric values to files under the
# directory this environment variable names (workers: worker/metrics_export.py; API: api/metrics.py).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
