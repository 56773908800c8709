"""Hand queued jobs to the workers. The API calls this; it never imports the worker package."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from functools import lru_cache

from celery import Celery

from core import names
from core.settings import get_settings

# Jobs per `prepare` task: one task per job would cap throughput at the broker's task rate.
JOBS_PER_TASK = 50


@lru_cache(maxsize=1)
def producer() -> Celery:
    """This process's Celery producer for the configured broker (built once; tests `cache_clear()` it)."""
    settings = get_settings()
    app = Celery("voxq-producer", broker=settings.redis_url)
    app.conf.update(
        broker_transport_options={"visibility_timeout": settings.celery_visibility_timeout},
        task_serializer="json",
        broker_connection_retry_on_startup=True,
    )
    return app


def enqueue_jobs(job_ids: Sequence[uuid.UUID | str], *, priority: str = "normal") -> int:
    """Send `prepare` tasks for jobs already marked `queued` in Postgres; returns the task count.

    Call after the transaction that marked them queued has committed. Sending twice is harmless: the
    worker claims each job by compare-and-set.
    """
    ids = [str(j) for j in job_ids]
    app = producer()
    sent = 0
    for start in range(0, len(ids), JOBS_PER_TASK):
        app.send_task(
            names.TASK_PREPARE_JOB,
            kwargs={"job_ids": ids[start : start + JOBS_PER_TASK], "priority": priority},
            queue=names.ingest_queue_for(priority),
        )
        sent += 1
    return sent


def enqueue_alignment(job_id: uuid.UUID, token: str) -> None:
    """Send the align task for a transcript whose alignment was just marked pending with `token`."""
    producer().send_task(
        names.TASK_ALIGN_JOB, kwargs={"job_id": str(job_id), "alignment_id": token}, queue=names.QUEUE_ALIGN
    )
