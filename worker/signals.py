"""Process signals: build DB engines and HTTP clients after fork, never share them across processes.

- Every child process: a fresh DB engine and the runtime (event loop, shared httpx client) — see
  worker.runtime.
- A child of a worker that consumes the `local` queue starts loading the local model at once, in a
  background thread (Celery waits only a few seconds for a new child to report in, and loading takes
  longer); `wait_for_local_model` lets the first local task wait for it.
- The main process, once ready, reads the provider's `GET /models` (when an API key is set) and logs a
  loud warning for each configured model whose `shutdown_date` is within 90 days.
- The worker's main process imports the task modules and freezes what startup left alive out of the
  garbage collector's scans before a prefork pool forks (`freeze_startup_objects`); each child freezes
  what its own init added, and the main process once more when ready (a threads pool runs tasks in it).
  It also sets the collector's thresholds (`COLLECTOR_THRESHOLDS`, inherited by the children).
- A process's shutdown (a prefork child's exit, or the main process after a warm shutdown stopped a
  threads or solo pool) waits for the group runs still in flight on its loop, then closes the runtime.
- A pool child sent SIGTERM (Celery cancels the running task when the broker connection is lost) starts
  no new provider call, waits for the calls in flight and commits their answers (`Runtime.drain`), then
  dies of the signal: an answer the provider billed is kept, not paid for again by the next run.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime
from typing import Any

from billiard.process import current_process
from celery.signals import (
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from core.db import dispose_engine, get_engine
from core.names import LOCAL_MODEL, QUEUE_LOCAL
from core.settings import get_settings
from worker.grouping import model_chain

log = logging.getLogger(__name__)
# How much longer than one provider call a terminated pool child may take to commit its answers.
DRAIN_EXTRA_SECONDS = 5.0
POOL_CHILD_PREFIX = "ForkPoolWorker"  # billiard's name for a prefork pool's child processes

_local_loaded = threading.Event()
_local_error: list[BaseException] = []


def consumed_queues(argv: list[str] | None = None) -> list[str]:
    """The queues this worker was started with (`-Q a,b` / `--queues=a,b`), empty when not given."""
    args = sys.argv if argv is None else argv
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            return [q for q in args[i + 1].split(",") if q]
        if arg.startswith("--queues="):
            return [q for q in arg.split("=", 1)[1].split(",") if q]
        if arg.startswith("-Q") and len(arg) > 2:
            return [q for q in arg[2:].split(",") if q]
    return []


def _load_local_model() -> None:
    try:
        from worker.local_engine import get_local_provider

        get_local_provider().load()
    except BaseException as exc:  # reported to the first local task, which fails its job clearly
        _local_error.append(exc)
        log.error("local model failed to load: %s", exc)
    finally:
        _local_loaded.set()


def wait_for_local_model(timeout: float = 600.0) -> None:
    """Block until the background load started at process init is done (no-op when none started)."""
    if _local_thread is not None:
        _local_loaded.wait(timeout)


_local_thread: threading.Thread | None = None

# The garbage collector's thresholds in worker processes (Python's default: 700, 10, 10). A transcribe
# worker at 256 in flight keeps ~650 calls' coroutines, futures, requests and buffers alive for 2 s each:
# with the default, the youngest generation was collected ~550 times and the whole heap (full scans of
# ~110 ms each, the world stopped) 4 times in P2's 17 s, 0.8 s of collector time in all, much of it in
# the bursts when a wave of answers lands. Young collections every 20,000 net allocations instead of 700,
# the middle one every 20 of those and a full one every 50 middle ones: what dies young is still freed
# by reference counting at once, and garbage cycles are still collected, only in fewer, larger steps.
COLLECTOR_THRESHOLDS = (20_000, 20, 50)


def tune_collector() -> tuple[int, int, int]:
    """Set the worker process's garbage-collector thresholds (`COLLECTOR_THRESHOLDS`); returns them."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    threshold: tuple[int, int, int] = gc.get_threshold()
    return threshold


def freeze_startup_objects(*, import_tasks: bool = False) -> int:
    """Put every object alive now out of the garbage collector's scans (first importing the task modules).

    P1: a worker process holds ~130K long-lived objects (Celery, SQLAlchemy, botocore, numpy, httpx); each
    full (generation 2) collection walked all of them. Freezing them took P1's CPU per file from 4.1 to
    3.4-3.7 ms in the ingest worker and from 2.5 to 1.9-2.0 ms in the transcribe worker. Frozen
    objects are still freed by reference counting; only garbage cycles among them would stay (modules,
    classes, caches: none worth a scan). A later call freezes only what was created since (and costs a
    collection of just that). Returns the frozen count.
    """
    if import_tasks:
        # What the tasks import lazily: imported (and frozen) once in the worker's main process, so that
        # prefork children inherit it frozen and their start stays short.
        import worker.prepare
        import worker.transcribe  # noqa: F401

    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def check_providers_at_start() -> list[str]:
    """Validate the providers configuration and log each retirement warning (core/providers/retirement.py);
    returns the warnings. An invalid configuration stops the worker: Celery logs and swallows an exception
    raised by a signal handler, so it exits with SystemExit(1) instead."""
    from core.errors import ConfigError
    from core.providers.retirement import check_providers, utc_today

    try:
        warnings = check_providers(get_settings(), utc_today())
    except ConfigError as exc:
        log.critical("invalid providers configuration: %s", exc)
        raise SystemExit(1) from None
    for line in warnings:
        log.warning("model retirement: %s", line)
    return warnings


@worker_init.connect
def _init_worker(**_: Any) -> None:
    # The main process, before a prefork pool forks its children (or the process a threads pool runs in).
    check_providers_at_start()
    tune_collector()
    freeze_startup_objects(import_tasks=True)


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    global _local_thread
    dispose_engine()  # anything inherited from the parent is not ours
    get_engine()
    from worker.runtime import get_runtime

    # A prefork child's group task waits for its whole run: a killed child's task is then redelivered at
    # once (`task_reject_on_worker_lost`), which a task that returned early would lose.
    get_runtime().detach_groups = False
    queues = consumed_queues()
    if QUEUE_LOCAL in queues and LOCAL_MODEL in model_chain(None, get_settings()):
        _local_thread = threading.Thread(target=_load_local_model, name="voxq-local-load", daemon=True)
        _local_thread.start()
    freeze_startup_objects()


def _drain_then_terminate(signum: int, _frame: Any) -> None:
    """SIGTERM in a pool child (Celery cancels the running task when the broker connection is lost):
    finish the provider calls in flight and commit their answers before dying, since the provider bills
    an answer it sent whether or not we keep it; then terminate as the signal asked."""
    from worker.runtime import current_runtime

    rt = current_runtime()
    if rt is not None:
        log.warning("terminated: draining the provider calls in flight first")
        try:
            rt.drain(timeout=rt.settings.provider_timeout_seconds + DRAIN_EXTRA_SECONDS)
        except BaseException as exc:  # dying anyway: the sweeper recovers what is left
            log.warning("drain failed: %s", type(exc).__name__)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@task_prerun.connect
def _drain_on_terminate(**_: Any) -> None:
    # A prefork pool child only (in a solo or threads pool's process SIGTERM is Celery's warm shutdown).
    # Installed when a task starts: billiard sets its own SIGTERM handler after `worker_process_init`.
    pool_child = current_process().name.startswith(POOL_CHILD_PREFIX)
    if pool_child and signal.getsignal(signal.SIGTERM) is not _drain_then_terminate:
        signal.signal(signal.SIGTERM, _drain_then_terminate)


@worker_process_shutdown.connect
@worker_shutdown.connect
def _shutdown_process(**_: Any) -> None:
    # A prefork child's exit, or the main process after a warm shutdown stopped the pool: a threads (or
    # solo) pool ran its tasks there, and group runs whose tasks returned may still be in flight:
    # `close_runtime` waits for them. (No-op in a prefork main process, which has no runtime of its own.)
    from worker.runtime import close_runtime

    try:
        close_runtime()
    finally:
        dispose_engine()


def warn_retiring_models() -> list[tuple[str, str]]:
    """Log a loud warning for each configured model retiring within 90 days; returns them."""
    settings = get_settings()
    key = settings.openai_api_key
    if key is None or not key.get_secret_value():
        return []
    import asyncio

    import httpx

    from core.providers.base import ProviderError
    from core.providers.config import OPENAI, ModelRef
    from core.providers.openai import list_models, retiring_models

    def openai_ref(entry: str) -> ModelRef | None:
        ref = ModelRef.of_entry(entry)
        return ref if ref is not None and ref.provider == OPENAI else None

    async def fetch() -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return await list_models(client, settings.openai_base_url, key.get_secret_value())

    try:
        models = asyncio.run(fetch())
    except (ProviderError, httpx.HTTPError, OSError) as exc:
        log.info("could not read the provider's model list: %s", exc)
        return []
    # The list is OpenAI's (OPENAI_BASE_URL): compared with the chain's OpenAI models, by their own names.
    openai_models = [ref.model for e in model_chain(None, settings) if (ref := openai_ref(e)) is not None]
    found = retiring_models(models, openai_models, datetime.now(UTC).date())
    for model, shutdown in found:
        log.warning(
            "MODEL RETIRING: configured model %s shuts down on %s (within 90 days); "
            "change VOXQ_PRIMARY_MODEL / VOXQ_FALLBACK_MODELS",
            model,
            shutdown.isoformat(),
        )
    return [(m, d.isoformat()) for m, d in found]


@worker_ready.connect
def _on_ready(**_: Any) -> None:
    freeze_startup_objects()  # a threads pool runs its tasks in this process
    # In the background: an unreachable provider must not hold up the worker's start.
    threading.Thread(target=warn_retiring_models, name="voxq-model-check", daemon=True).start()
