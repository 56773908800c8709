"""The Celery application: Redis broker, reliability settings, queues and routes.

Reliability choices (see FACTS.md): tasks are idempotent and acked late; a task whose worker dies is
rejected and redelivered, and our own attempt counter in Postgres stops it looping; one task is
prefetched at a time; Redis' visibility timeout is above the longest task.
"""

from __future__ import annotations

import click
from celery import Celery
from kombu import Queue

from core import names
from core.settings import Settings, get_settings
from worker.metrics_export import prepare_worker_metrics


def started_as_worker() -> bool:
    """Whether this process is `celery -A worker.app worker ...`: the Celery CLI imports this module while
    its command line is being run, with the subcommand already known."""
    context = click.get_current_context(silent=True)
    return context is not None and context.invoked_subcommand == "worker"


if started_as_worker():
    # Before Celery imports the task modules (and with them core.metrics) and before the pool forks:
    # every metric of every process of this worker is created in multiprocess mode.
    prepare_worker_metrics()


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app from settings."""
    settings = settings or get_settings()
    app = Celery(
        "voxq",
        broker=settings.redis_url,
        include=["worker.task_logging", "worker.metrics_export", "worker.tasks", "worker.signals"],
    )
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.celery_visibility_timeout,
            # Queues are polled in the order the worker's -Q lists them (names.ALL_QUEUES without -Q):
            # ingest.high, transcribe.high, ingest, transcribe, transcribe.low, ...
            "queue_order_strategy": "priority",
        },
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(settings.task_time_limit - 60, 30),
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        task_default_queue=names.QUEUE_TRANSCRIBE,
        task_queues=[Queue(q) for q in names.ALL_QUEUES],
        task_routes={
            names.TASK_HEARTBEAT: {"queue": names.QUEUE_MAINTENANCE},
            names.TASK_SWEEP: {"queue": names.QUEUE_MAINTENANCE},
            names.TASK_SWEEP_STORAGE: {"queue": names.QUEUE_MAINTENANCE},
            names.TASK_PREPARE_JOB: {"queue": names.QUEUE_INGEST},
            names.TASK_TRANSCRIBE_LOCAL: {"queue": names.QUEUE_LOCAL},
            names.TASK_ALIGN_JOB: {"queue": names.QUEUE_ALIGN},
            names.TASK_DELIVER_WEBHOOK: {"queue": names.QUEUE_WEBHOOKS},
        },
        beat_schedule={
            "sweep-stuck-jobs": {"task": names.TASK_SWEEP, "schedule": 30.0},
            "sweep-storage": {"task": names.TASK_SWEEP_STORAGE, "schedule": 3600.0},
            "heartbeat": {"task": names.TASK_HEARTBEAT, "schedule": 15.0},
        },
        timezone="UTC",
    )
    return app


app = make_celery()
