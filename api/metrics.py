"""The API's /metrics: its own metrics (every API process when multiprocess) plus the fleet gauges.

Fleet-wide gauges (queue depth, jobs by status, workers alive, open circuits) are read from Redis and
Postgres at scrape time by `FleetCollector`, served by the API only so the fleet is counted once however
many workers run (each worker host serves its own counters: worker/metrics_export.py).

`GET /metrics` needs `Authorization: Bearer <VOXQ_METRICS_TOKEN>` (Prometheus: `authorization:
credentials_file`); without a configured token it is open in the dev environment only and answers 401
elsewhere. Jobs by status is a `COUNT(*) … GROUP BY status` over the jobs table, so it is counted at most
once per `VOXQ_FLEET_JOBS_SECONDS` for the whole fleet (`jobs_by_status_cached`: the reading is shared
through Redis and kept by each process), not on every scrape of every API process.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api.problems import Problem
from core import metrics
from core.model_access import circuit_label
from core.names import KEY_METRICS, MULTIPROC_ENV
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    import redis
    from sqlalchemy import Engine

log = logging.getLogger(__name__)

# The fleet's last jobs-by-status reading (JSON) and the lock of the process counting the next one.
JOBS_READING_KEY = KEY_METRICS + "jobs_by_status"
JOBS_COUNTING_KEY = KEY_METRICS + "jobs_by_status:counting"

_memo_lock = threading.Lock()
_memo: tuple[float, dict[str, int]] | None = None  # (monotonic time read, counts) of this process


def jobs_by_status_cached(engine: Engine, client: redis.Redis | None, max_age: float) -> dict[str, int]:
    """Jobs per status, counted at most once per `max_age` seconds fleet-wide (0: on every call).

    This process's own reading younger than `max_age` first; then the fleet's, in Redis (written with a
    `max_age` expiry by whichever process counted last); otherwise this process counts, under a Redis
    lock so that concurrent scrapes of several API processes count once (the others answer the previous
    reading meanwhile). Without Redis, each process counts at most once per `max_age`.
    """
    global _memo
    from core import fleet

    now = time.monotonic()
    with _memo_lock:
        if max_age > 0 and _memo is not None and now - _memo[0] < max_age:
            return dict(_memo[1])
    counts: dict[str, int] | None = None
    if client is not None and max_age > 0:
        counts = _shared_reading(engine, client, max_age)
    if counts is None:
        counts = fleet.jobs_by_status(engine)
    with _memo_lock:
        _memo = (time.monotonic(), counts)
    return dict(counts)


def _shared_reading(engine: Engine, client: redis.Redis, max_age: float) -> dict[str, int] | None:
    """The fleet's fresh reading, or a new one counted here (None: Redis failed; the caller counts)."""
    from core import fleet

    ttl_ms = max(1, int(max_age * 1000))
    try:
        raw = client.get(JOBS_READING_KEY)
        if raw:
            return {str(k): int(v) for k, v in json.loads(str(raw)).items()}
        if not client.set(JOBS_COUNTING_KEY, "1", nx=True, px=ttl_ms):
            stale = client.get(JOBS_READING_KEY + ":last")
            if stale:  # another process is counting right now: the previous reading will do
                return {str(k): int(v) for k, v in json.loads(str(stale)).items()}
        counts = fleet.jobs_by_status(engine)
        payload = json.dumps(counts)
        pipe = client.pipeline(transaction=False)
        pipe.set(JOBS_READING_KEY, payload, px=ttl_ms)
        pipe.set(JOBS_READING_KEY + ":last", payload)
        pipe.delete(JOBS_COUNTING_KEY)
        pipe.execute()
        return counts
    except Exception as exc:  # redis down or a bad value: this process counts for itself
        log.warning("metrics: shared jobs reading unavailable: %s", type(exc).__name__)
        return None


def reset_jobs_memo() -> None:
    """Forget this process's jobs reading (tests)."""
    global _memo
    with _memo_lock:
        _memo = None


class FleetCollector(Collector):
    """Computes queue depth, jobs by status, workers alive and open circuits on each scrape."""

    def collect(self) -> Iterable[Metric]:
        """Read Redis and Postgres now; a source that fails yields an error gauge, not an exception."""
        from core import fleet
        from core.db import get_engine

        settings = get_settings()
        errors = GaugeMetricFamily(
            metrics.FLEET_SCRAPE_ERRORS,
            "1 when the source could not be read at scrape time.",
            labels=["source"],
        )
        out: list[Metric] = []
        client: redis.Redis | None = None
        try:
            client = fleet.redis_client(settings.redis_url)
            depths = fleet.queue_depths(client)
            circuits = fleet.circuit_states(client)
        except Exception as exc:
            client = None
            log.warning("metrics: redis unreadable: %s", type(exc).__name__)
            errors.add_metric(["redis"], 1)
        else:
            errors.add_metric(["redis"], 0)
            depth = GaugeMetricFamily(
                metrics.QUEUE_DEPTH, "Messages waiting in each queue.", labels=["queue"]
            )
            for queue, count in depths.items():
                depth.add_metric([queue], count)
            open_ = GaugeMetricFamily(
                metrics.CIRCUITS_OPEN,
                "1 for each model or provider account (provider:<name>) whose circuit is not closed; "
                "`other` counts the circuits of names not configured.",
                labels=["model"],
            )
            # Redis keys from before the allowlist may name anything: several may share `other`
            for label, count in Counter(circuit_label(key) for key in circuits).items():
                open_.add_metric([label], count)
            out += [depth, open_]
        try:
            engine = get_engine()
            jobs = jobs_by_status_cached(engine, client, settings.fleet_jobs_seconds)
            alive = fleet.workers_alive(engine)
        except Exception as exc:
            log.warning("metrics: postgres unreadable: %s", type(exc).__name__)
            errors.add_metric(["postgres"], 1)
        else:
            errors.add_metric(["postgres"], 0)
            by_status = GaugeMetricFamily(metrics.JOBS_BY_STATUS, "Jobs in each status.", labels=["status"])
            for status, count in jobs.items():
                by_status.add_metric([status], count)
            workers = GaugeMetricFamily(metrics.WORKERS_ALIVE, "Workers with a recent heartbeat.")
            workers.add_metric([], len(alive))
            out += [by_status, workers]
        out.append(errors)
        return out

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: registering must not touch Redis or Postgres."""
        return []


class RetirementCollector(Collector):
    """Days left before each configured model's retirement date, from the configuration (no I/O)."""

    def collect(self) -> Iterable[Metric]:
        """One gauge sample per configured model with a date (label: `provider:model`)."""
        from core.providers.retirement import retirement_details, utc_today

        gauge = GaugeMetricFamily(
            metrics.MODEL_RETIREMENT_DAYS_LEFT,
            "Days until the model's retirement date (0 or less: retired, sent no requests).",
            labels=["model"],
        )
        for item in retirement_details(get_settings(), utc_today()):
            gauge.add_metric([str(item["model"])], float(str(item["days_left"])))
        return [gauge]

    def describe(self) -> Iterable[Metric]:
        """Nothing up front."""
        return []


class _Forward(Collector):
    """Exposes another registry's metrics through this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        """The source's metrics."""
        return self.source.collect()

    def describe(self) -> Iterable[Metric]:
        """Nothing up front."""
        return []


def api_registry(*, fleet: bool = True) -> CollectorRegistry:
    """The API's registry: its own metrics (all processes when multiprocess) plus the fleet gauges."""
    registry = CollectorRegistry()
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Forward(REGISTRY))
    registry.register(RetirementCollector())
    if fleet:
        registry.register(FleetCollector())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


def scrape_allowed(authorization: str | None, settings: Settings) -> bool:
    """Whether a request with this `Authorization` header may read /metrics (see the module docstring)."""
    if settings.metrics_token is None:
        return settings.environment == "dev"
    scheme, _, token = (authorization or "").partition(" ")
    expected = settings.metrics_token.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected)


def metrics_router(registry: CollectorRegistry | None = None) -> APIRouter:
    """A FastAPI router with `GET /metrics` (a sync endpoint: the fleet reading blocks, off the loop)."""
    reg = registry or api_registry()
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics_endpoint(request: Request) -> Response:
        settings = get_settings()
        if not scrape_allowed(request.headers.get("authorization"), settings):
            detail = (
                "send `Authorization: Bearer <VOXQ_METRICS_TOKEN>`"
                if settings.metrics_token is not None
                else "set VOXQ_METRICS_TOKEN: /metrics is open without one in the dev environment only"
            )
            raise Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
        return Response(render(reg), media_type=CONTENT_TYPE_LATEST)

    return router
