"""Worker metrics: multiprocess mode across prefork children, served by the main process on a port.

`worker_init` runs in the worker's main process before the pool forks, so children inherit the
multiprocess directory; each child's live gauges are dropped when it exits; the listener starts once the
worker is ready and stops with it. `VOXQ_WORKER_METRICS_PORT=0` turns the listener off (the counters are
still written, so a later scrape of a restarted listener is not needed to keep them).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from celery.signals import worker_init, worker_process_shutdown, worker_ready, worker_shutdown

from core.observability import (
    MULTIPROC_ENV,
    MetricsListener,
    enable_multiprocess,
    mark_process_dead,
    multiprocess_registry,
    worker_multiproc_dir,
)
from core.settings import get_settings

log = logging.getLogger(__name__)

_state: dict[str, Any] = {}


@worker_init.connect
def _prepare_multiprocess(**_: Any) -> None:
    owned = MULTIPROC_ENV not in os.environ  # we made the directory, so we remove it at shutdown
    path = worker_multiproc_dir()
    enable_multiprocess(path)
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
