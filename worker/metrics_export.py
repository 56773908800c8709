"""Worker metrics: multiprocess mode across prefork children, served by the main process on a port.

Celery's prefork children each keep their own counters, so workers run prometheus-client in
multiprocess mode: every process writes its values to files under one directory
(`PROMETHEUS_MULTIPROC_DIR`) and the worker's main process serves their sum on
`VOXQ_WORKER_METRICS_PORT`. `prepare_worker_metrics` runs in the worker's main process as the Celery CLI
loads the app (worker/app.py), before the task modules (and with them core.metrics) are imported and
before the pool forks, so every metric is created in multiprocess mode and children inherit the
directory; each child's live gauges are dropped when it exits; the listener starts once the worker is
ready and stops with it. `VOXQ_WORKER_METRICS_PORT=0` turns the listener off (the counters are still
written, so a later scrape of a restarted listener is not needed to keep them). The fleet-wide gauges are
the API's (api/metrics.py), so the fleet is counted once.

This module must not import core.metrics: it is imported before multiprocess mode is on.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import worker_process_shutdown, worker_ready, worker_shutdown
from prometheus_client import CollectorRegistry, multiprocess, values

from core.names import MULTIPROC_ENV
from core.settings import Settings, get_settings

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

_DB_FILE = re.compile(r"^.+_(\d+)\.db$")


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


def use_multiprocess(path: Path) -> None:
    """Make this process (and the children it forks) write its metrics to files under `path`.

    prometheus-client chooses how a metric keeps its value (in memory, or in a per-process file) when the
    metric is created, from the value class it picked with `values.get_value_class()` when it was first
    imported — by the Celery CLI already, through Flower's command plugin, before this code runs. So the
    environment variable is set and the class chosen again by the same public function, before any
    voxq metric exists; raises RuntimeError when core.metrics (where they are created) is already
    imported.
    """
    if "core.metrics" in sys.modules:
        raise RuntimeError("multiprocess metrics must be chosen before core.metrics is imported")
    os.environ[MULTIPROC_ENV] = str(path)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


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


_state: dict[str, Any] = {}


def prepare_worker_metrics() -> None:
    """Turn multiprocess metrics on for this worker (its own directory); the listener serves that."""
    owned = MULTIPROC_ENV not in os.environ  # we made the directory, so we remove it at shutdown
    path = worker_multiproc_dir()
    use_multiprocess(path)
    _state.update(path=path, owned=owned, main_pid=os.getpid())


@worker_ready.connect
def _start_listener(**_: Any) -> None:
    settings = get_settings()
    path = _state.get("path")
    if not settings.worker_metrics_port or path is None:
        return
    listener = MetricsListener(
        multiprocess_registry(path), settings.worker_metrics_port, settings.worker_metrics_host
    )
    try:
        listener.start()
    except OSError as exc:  # another worker on this host serves it; ours still writes its files
        log.warning("metrics listener not started on port %s: %s", settings.worker_metrics_port, exc)
        return
    _state["listener"] = listener
    log.info("metrics on http://%s:%s/metrics", listener.host, listener.port)


@worker_process_shutdown.connect
def _child_exit(**_: Any) -> None:
    mark_process_dead(os.getpid())


@worker_shutdown.connect
def _stop_listener(**_: Any) -> None:
    listener: MetricsListener | None = _state.pop("listener", None)
    if listener is not None:
        listener.stop()
    path: Path | None = _state.get("path")
    if path is not None and _state.get("owned") and _state.get("main_pid") == os.getpid():
        shutil.rmtree(path, ignore_errors=True)
