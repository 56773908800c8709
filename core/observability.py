"""Serving metrics: the API's /metrics, each worker host's listener, multiprocess mode, Flower's auth.

Celery's prefork children each keep their own counters, so workers run prometheus-client in
multiprocess mode: every process writes its values to files under one directory
(`PROMETHEUS_MULTIPROC_DIR`) and the worker's main process serves their sum on
`VOXQ_WORKER_METRICS_PORT`. Fleet-wide gauges (queue depth, jobs by status, workers alive, open
circuits) are read from Redis and Postgres at scrape time by `FleetCollector`, served by the API only so
the fleet is counted once however many workers run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from core import metrics
from core.errors import ConfigError
from core.settings import PLACEHOLDER_SECRETS, Settings, get_settings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from fastapi import APIRouter

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DB_FILE = re.compile(r"^.+_(\d+)\.db$")


# --- multiprocess mode (workers) -------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_multiproc_dir(settings: Settings | None = None) -> Path:
    """The directory this worker's processes write metric files to (made fresh for this worker).

    An operator-set `PROMETHEUS_MULTIPROC_DIR` wins (k8s: an emptyDir per pod); otherwise each worker
    instance gets `<data dir>/prometheus/worker-<pid>`, so two workers on one host never add up each
    other's counters, and directories of workers that are gone are removed.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for file in path.glob("*.db"):
            match = _DB_FILE.match(file.name)
            if match and int(match.group(1)) != os.getpid():
                file.unlink(missing_ok=True)  # left by an earlier run: counters restart with the worker
        return path
    settings = settings or get_settings()
    base = Path(settings.data_dir).resolve() / "prometheus"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("worker-*"):
        pid = old.name.removeprefix("worker-")
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"worker-{os.getpid()}"
    path.mkdir()
    return path


def enable_multiprocess(path: Path) -> None:
    """Switch this process (and children it forks) to multiprocess metrics written under `path`.

    prometheus-client picks its value class when first imported; if that happened before the
    environment variable existed, swap the class and rebuild the values metrics already hold, so
    import order of worker modules does not matter.
    """
    os.environ[MULTIPROC_ENV] = str(path)
    from prometheus_client import values
    from prometheus_client.metrics import MetricWrapperBase

    if getattr(values.ValueClass, "_multiprocess", False):
        return
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    for collector in list(REGISTRY._collector_to_names):
        if not isinstance(collector, MetricWrapperBase):
            continue
        if collector._labelnames:
            with collector._lock:  # children are created lazily, with the new class
                collector._metrics = {}
        else:
            collector._metric_init()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a finished child's live gauges (its counters stay counted)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).is_dir():
        multiprocess.mark_process_dead(pid or os.getpid(), path)  # type: ignore[no-untyped-call]


def multiprocess_registry(path: Path | str | None = None) -> CollectorRegistry:
    """A registry summing every process's metric files under `path` (default: the env var)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path) if path else None)  # type: ignore[no-untyped-call]
    return registry


class MetricsListener:
    """A small HTTP server in a daemon thread serving one registry on /metrics."""

    def __init__(self, registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; raises OSError when the port is taken."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self._server, self._thread = server, thread
        self.port = server.server_address[1]

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


# --- fleet gauges (API) ----------------------------------------------------------------------------


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


# --- Flower ----------------------------------------------------------------------------------------


def flower_basic_auth(settings: Settings | None = None) -> str:
    """`user:password` for Flower's `--basic-auth`; raises ConfigError for a weak password outside dev."""
    settings = settings or get_settings()
    password = settings.flower_password.get_secret_value()
    weak = password.lower() in PLACEHOLDER_SECRETS or len(password) < 8
    if settings.environment != "dev" and weak:
        raise ConfigError(
            "VOXQ_FLOWER_PASSWORD must be a real password (8+ characters, not a placeholder) outside dev",
            code="flower_password_weak",
        )
    if not password:
        raise ConfigError(
            "VOXQ_FLOWER_PASSWORD is empty: Flower never runs without a password",
            code="flower_password_empty",
        )
    if ":" in settings.flower_user or "," in settings.flower_user or "," in password:
        raise ConfigError(
            "VOXQ_FLOWER_USER/PASSWORD may not contain ',' (or ':' in the user)", code="flower_auth_invalid"
        )
    return f"{settings.flower_user}:{password}"
