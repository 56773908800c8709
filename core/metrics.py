"""Prometheus metric families: defined once here, incremented where things happen.

Workers run prefork children, so when PROMETHEUS_MULTIPROC_DIR is set prometheus-client writes
per-process files and the exporter aggregates them (worker/metrics_export.py, api/metrics.py).
Labels carry model names and outcomes only: never ids, filenames or text. A model label only ever
carries a model the operator configured (`core.model_access.metric_model_label`; any other name is
`other`): the families below with a model label map it themselves, so no caller can forget.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from core.model_access import metric_model_label

# Label names that hold a model name.
_MODEL_LABEL_NAMES = frozenset({"model", "from_model", "to_model"})


class ModelLabels:
    """Mixin for a metric family: values of its model labels pass through `metric_model_label`."""

    _labelnames: tuple[str, ...]

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        """The child for these label values, model names bounded to the configured ones."""
        if labelvalues:
            labelvalues = tuple(
                metric_model_label(str(value)) if name in _MODEL_LABEL_NAMES else value
                for name, value in zip(self._labelnames, labelvalues, strict=False)
            )
        for name in _MODEL_LABEL_NAMES & labelkwargs.keys():
            labelkwargs[name] = metric_model_label(str(labelkwargs[name]))
        return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]


class ModelCounter(ModelLabels, Counter):
    """A Counter whose model labels carry configured model names only."""


class ModelHistogram(ModelLabels, Histogram):
    """A Histogram whose model labels carry configured model names only."""


class ModelGauge(ModelLabels, Gauge):
    """A Gauge whose model labels carry configured model names only."""


ATTEMPTS = ModelCounter(
    "voxq_attempts_total",
    "Provider calls by model and outcome (success, retried, fallback, failed).",
    ["model", "outcome"],
)
PROVIDER_LATENCY = ModelHistogram(
    "voxq_provider_latency_seconds",
    "Provider call latency by model.",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300),
)
AUDIO_SUBMITTED_SECONDS = Counter(
    "voxq_audio_submitted_seconds_total", "Seconds of audio submitted (probed)."
)
AUDIO_BILLED_SECONDS = ModelCounter(
    "voxq_audio_billed_seconds_total", "Seconds of audio billed by providers, by model.", ["model"]
)
COST_USD = ModelCounter("voxq_cost_usd_total", "Cost in USD by model.", ["model"])
JOBS_FINISHED = Counter("voxq_jobs_finished_total", "Jobs reaching a terminal status.", ["status"])
DEDUPE_HITS = Counter("voxq_dedupe_hits_total", "Jobs that reused the transcript of identical audio.")
FALLBACKS = ModelCounter(
    "voxq_fallbacks_total", "Moves from one model to the next.", ["from_model", "to_model"]
)
CIRCUIT_STATE = ModelGauge(
    "voxq_circuit_open",
    "1 when the model's circuit breaker is not closed, else 0 (the state a worker process saw last).",
    ["model"],
    # The latest value any process set, not the max: a circuit that closed again must read 0.
    multiprocess_mode="mostrecent",
)
PROVIDER_CIRCUIT_STATE = Gauge(
    "voxq_provider_circuit_open",
    "1 when the provider's account circuit (quota, billing, auth) is not closed: none of its models is "
    "called; else 0 (the state a worker process saw last).",
    ["provider"],
    multiprocess_mode="mostrecent",
)
PROVIDER_IN_FLIGHT = Gauge(
    "voxq_provider_in_flight",
    "Fleet-wide calls in flight to the provider (its max_in_flight slots taken), as a process saw last.",
    ["provider"],
    multiprocess_mode="mostrecent",
)
RATE_LIMIT_WAIT_SECONDS = ModelCounter(
    "voxq_rate_limiter_wait_seconds_total", "Seconds spent waiting on the shared rate limiter.", ["model"]
)
RATE_LIMIT_WAITS = ModelCounter(
    "voxq_rate_limiter_waits_total", "Times a call waited on the rate limiter.", ["model"]
)
PROVIDER_AUTH_FAILURES = Counter(
    "voxq_provider_auth_failures_total",
    "Provider calls refused for the API key (401/403): a wrong or revoked key; jobs move to the next model.",
    ["provider"],
)
WEBHOOK_DELIVERIES = Counter(
    "voxq_webhook_deliveries_total", "Webhook delivery attempts by outcome.", ["outcome"]
)
UPLOADED_BYTES = Counter("voxq_uploaded_bytes_total", "Bytes of audio accepted by the API.")

# Fleet gauges: not kept in any process, but computed at scrape time from Redis and Postgres by
# `api.metrics.FleetCollector` (served by the API's /metrics, so the fleet is counted once).
QUEUE_DEPTH = "voxq_queue_depth"  # {queue}: messages waiting in each Celery queue (Redis LLEN)
JOBS_BY_STATUS = "voxq_jobs"  # {status}: jobs in each status (Postgres)
WORKERS_ALIVE = "voxq_workers_alive"  # workers whose heartbeat is recent
# Days until each configured model's retirement date (provider:model label; negative: retired).
MODEL_RETIREMENT_DAYS_LEFT = "voxq_model_retirement_days_left"
CIRCUITS_OPEN = "voxq_circuits_open"  # {model}: circuit keys present in Redis (shared by all workers)
FLEET_SCRAPE_ERRORS = "voxq_fleet_scrape_error"  # {source}: 1 when Redis or Postgres could not be read
FLEET_FAMILIES = (QUEUE_DEPTH, JOBS_BY_STATUS, WORKERS_ALIVE, CIRCUITS_OPEN, FLEET_SCRAPE_ERRORS)
