"""Sending the pipeline's next tasks from inside a worker (the API uses api.enqueue instead)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from core import names
from core.settings import Settings


def _send(task: str, kwargs: dict[str, object], queue: str) -> None:
    from worker.app import app

    app.send_task(task, kwargs=kwargs, queue=queue)


def send_prepare(job_ids: Sequence[uuid.UUID], *, priority: str) -> None:
    """Queue `prepare` for jobs already set back to `queued`."""
    ids = [str(j) for j in job_ids]
    for start in range(0, len(ids), 50):
        _send(
            names.TASK_PREPARE_JOB,
            {"job_ids": ids[start : start + 50], "priority": priority},
            names.ingest_queue_for(priority),
        )


def send_group(group_id: uuid.UUID, *, priority: str) -> None:
    """Queue the transcribe task of a group on its priority's queue."""
    _send(names.TASK_TRANSCRIBE_GROUP, {"group_id": str(group_id)}, names.transcribe_queue_for(priority))


def local_wait_seconds(settings: Settings) -> float:
    """The lease of a job waiting in the local queue (`core.names.LOCAL_QUEUE_OWNER`): like a group
    waiting in the broker, a queue backlog is not a dead worker."""
    return float(settings.celery_visibility_timeout + settings.job_lease_seconds)


def send_local(job_id: uuid.UUID, group_id: uuid.UUID) -> None:
    """Hand one job to the local engine's queue (its lease already with `LOCAL_QUEUE_OWNER`)."""
    _send(names.TASK_TRANSCRIBE_LOCAL, {"job_id": str(job_id), "group_id": str(group_id)}, names.QUEUE_LOCAL)


def send_align(job_id: uuid.UUID, token: str) -> None:
    """Queue the align task of a transcript whose alignment is pending with `token`."""
    _send(names.TASK_ALIGN_JOB, {"job_id": str(job_id), "alignment_id": token}, names.QUEUE_ALIGN)


def send_webhook(batch_id: uuid.UUID, *, attempt: int = 1, countdown: float = 0.0) -> None:
    """Queue a webhook delivery for a finished batch."""
    from worker.app import app

    app.send_task(
        names.TASK_DELIVER_WEBHOOK,
        kwargs={"batch_id": str(batch_id), "attempt": attempt},
        queue=names.QUEUE_WEBHOOKS,
        countdown=countdown or None,
    )
