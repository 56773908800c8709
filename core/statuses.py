"""Status names: the one place each state a row can be in is spelled."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Lifecycle of one file."""

    PENDING_UPLOAD = "pending_upload"  # presigned upload issued, object not verified yet
    UPLOADED = "uploaded"
    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


JOB_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.SKIPPED})
JOB_ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.PROCESSING})


class BatchStatus(StrEnum):
    """Lifecycle of a batch of files."""

    OPEN = "open"  # accepting files, nothing submitted yet
    PROCESSING = "processing"
    COMPLETED = "completed"  # every job terminal and at least one succeeded (or none failed)
    FAILED = "failed"  # every job terminal, none succeeded
    CANCELLED = "cancelled"


BATCH_TERMINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED})


class GroupStatus(StrEnum):
    """Lifecycle of a packed group of short files or a chunked long file."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"


class AttemptOutcome(StrEnum):
    """What became of one provider call."""

    PENDING = "pending"  # the call is in flight (or its worker died during it)
    SUCCESS = "success"
    RETRIED = "retried"  # failed in a retryable way; the same model is tried again
    FALLBACK = "fallback"  # failed; the next model in the chain takes over
    FAILED = "failed"  # failed and nothing else will be tried
    ABANDONED = "abandoned"  # its worker died; the sweeper closed it


class CircuitState(StrEnum):
    """Where a model's circuit breaker stands (worker/circuit.py writes it, the fleet gauges read it)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # one probe call is let through
    RETIRED = "retired"  # the model is gone (model_not_found)


class Settlement(StrEnum):
    """Where the bill of a hosted call nobody saw answered stands (abandoned, or its answer lost on the way
    back; see core/billing.py); NULL for a call whose answer or error voxq received."""

    UNSETTLED = "unsettled"  # an estimate is charged; the provider's export will tell
    BILLED = "billed"  # the provider billed it: its cost record holds the exact usage
    NOT_BILLED = "not_billed"  # absent from an export covering the call: no cost record


class WebhookStatus(StrEnum):
    """Outcome of one webhook delivery attempt."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # this attempt failed; another may follow
    GAVE_UP = "gave_up"
    REFUSED = "refused"  # URL resolved to a forbidden address


class Profile(StrEnum):
    """What kind of audio a batch holds, which steers grouping and chunking."""

    VOICEMAIL = "voicemail"
    PODCAST = "podcast"
    AUTO = "auto"


class Priority(StrEnum):
    """Batch priority; high batches go to their own queue."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class Timestamps(StrEnum):
    """What timings a batch asks for (its `timestamps` option): none, subtitle cues, or cues and words."""

    NONE = "none"
    SEGMENT = "segment"
    WORD = "word"


class AlignmentStatus(StrEnum):
    """Where a transcript's timings stand (`transcripts.alignment->>'status'`, worker/align_stage.py)."""

    PENDING = "pending"  # the align task is queued
    ALIGNED = "aligned"  # every chunk has word times (aligned, or the model's own)
    PARTIAL = "partial"  # some chunks failed: their cues are whole chunks
    FAILED = "failed"  # no chunk could be timed: subtitles fall back to whole-chunk cues


def default_timestamps(profile: str) -> Timestamps:
    """The `timestamps` a batch of this profile gets when it does not say (podcast: segment; else none)."""
    return Timestamps.SEGMENT if profile == Profile.PODCAST else Timestamps.NONE


def effective_timestamps(profile: str, chosen: str | None) -> Timestamps:
    """The batch's `timestamps` option: what it chose, else its profile's default."""
    return Timestamps(chosen) if chosen else default_timestamps(profile)
