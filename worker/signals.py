"""Process signals: build DB engines and HTTP clients after fork, never share them across processes."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init, worker_process_shutdown

from core.db import dispose_engine, get_engine


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    dispose_engine()  # anything inherited from the parent is not ours
    get_engine()


@worker_process_shutdown.connect
def _shutdown_process(**_: Any) -> None:
    dispose_engine()
