"""The API's /metrics: its own metrics (every API process when multiprocess) plus the fleet gauges.

Fleet-wide gauges (queue depth, jobs by status, workers alive, open circuits) are read from Redis and
Postgres at scrape time by `FleetCollector`, served by the API only so the fleet is counted once however
many workers run (each worker host serves its own counters: worker/metrics_export.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from core import metrics
from core.names import MULTIPROC_ENV
from core.settings import get_settings

if TYPE_CHECKING:
    from fastapi import APIRouter

log = logging.getLogger(__name__)


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
        try:
            client = fleet.redis_client(settings.redis_url)
            depths = fleet.queue_depths(client)
            circuits = fleet.circuit_states(client)
        except Exception as exc:
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
                metrics.CIRCUITS_OPEN, "1 for each model whose circuit is not closed.", labels=["model"]
            )
            for model in circuits:
                open_.add_metric([model], 1)
            out += [depth, open_]
        try:
            engine = get_engine()
            jobs = fleet.jobs_by_status(engine)
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
    if fleet:
        registry.register(FleetCollector())
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


def metrics_router(registry: CollectorRegistry | None = None) -> APIRouter:
    """A FastAPI router with `GET /metrics` (a sync endpoint: the fleet reading blocks, off the loop)."""
    from fastapi import APIRouter, Response

    reg = registry or api_registry()
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        return Response(render(reg), media_type=CONTENT_TYPE_LATEST)

    return router
