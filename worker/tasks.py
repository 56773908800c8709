"""Celery tasks: thin, keyword-only, named by constants; each calls a plain function."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import UTC, datetime

from sqlalchemy.dialects.postgresql import insert

from core import names
from core.db import session_scope
from core.models import WorkerHeartbeat
from worker.app import app


def record_heartbeat(*, worker: str, pid: int, queues: list[str]) -> None:
    """Upsert this worker's last-seen time in Postgres."""
    now = datetime.now(UTC)
    stmt = insert(WorkerHeartbeat).values(
        worker=worker, pid=pid, queues=queues, started_at=now, last_seen_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[WorkerHeartbeat.worker], set_={"last_seen_at": now, "pid": pid, "queues": queues}
    )
    with session_scope() as session:
        session.execute(stmt)


@app.task(name=names.TASK_HEARTBEAT, acks_late=True)
def heartbeat(*, worker: str | None = None) -> None:
    """Record that a worker is alive (scheduled by beat; also the foundation's end-to-end probe)."""
    record_heartbeat(worker=worker or socket.gethostname(), pid=os.getpid(), queues=[])


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=names.TASK_PREPARE_JOB, acks_late=True)
def prepare_job(*, job_ids: list[str], priority: str = "normal") -> dict[str, int]:
    """Prepare queued jobs: normalise, dedupe, store FLAC, group and hand on (worker.prepare)."""
    from worker.prepare import prepare_jobs

    del priority  # each job's batch says its priority; the kwarg only routes the message
    report = prepare_jobs([uuid.UUID(j) for j in job_ids], owner=_owner())
    return {
        "claimed": report.claimed,
        "failed": report.failed,
        "deduplicated": report.deduplicated,
        "grouped": report.grouped,
        "groups": len(report.groups),
    }


@app.task(name=names.TASK_TRANSCRIBE_GROUP, acks_late=True)
def transcribe_group(*, group_id: str) -> dict[str, int]:
    """Transcribe a group's jobs concurrently through their model chain (worker.transcribe); returns once
    none of them waits for a provider slot, the rest going on on the process's loop (`start_group`)."""
    from worker.runtime import get_runtime
    from worker.transcribe import start_group

    rt = get_runtime()
    return rt.run(start_group(rt, uuid.UUID(group_id)))


@app.task(name=names.TASK_TRANSCRIBE_LOCAL, acks_late=True)
def transcribe_local(*, job_id: str, group_id: str) -> str:
    """Transcribe one job with the offline local engine (worker.local)."""
    from worker.local import transcribe_local as run_local
    from worker.signals import wait_for_local_model

    wait_for_local_model()
    return run_local(uuid.UUID(job_id), uuid.UUID(group_id), worker=_owner())


@app.task(name=names.TASK_ALIGN_JOB, acks_late=True)
def align_job(*, job_id: str, alignment_id: str) -> str:
    """Word timestamps and subtitle cues for a succeeded job's transcript (worker.align_stage); the
    `alignment_id` is the token of the alignment request it answers (`transcripts.alignment.token`)."""
    from worker.align_stage import align_job as run_align

    # The model loads on the first align task of the process (or is the one the local engine loaded).
    return run_align(uuid.UUID(job_id), alignment_id)


@app.task(name=names.TASK_SWEEP, acks_late=True)
def sweep() -> dict[str, int]:
    """Recover jobs and attempts of dead workers (worker.sweeper)."""
    from worker.sweeper import sweep as run_sweep

    report = run_sweep()
    return {
        "requeued": len(report.requeued),
        "resent": len(report.resent),
        "failed": len(report.failed),
        "abandoned_attempts": report.abandoned_attempts,
    }


@app.task(name=names.TASK_SWEEP_STORAGE, acks_late=True)
def sweep_storage() -> dict[str, int]:
    """Remove abandoned uploads and ended jobs' derived audio from S3 (worker.upload_sweep)."""
    from core.storage import Storage
    from worker.upload_sweep import sweep_storage as run_sweep

    result = run_sweep(Storage())
    return {
        "aborted_multipart_uploads": result.aborted_multipart_uploads,
        "deleted_incoming": result.deleted_incoming,
        "deleted_derived": result.deleted_derived,
    }


@app.task(name=names.TASK_DELIVER_WEBHOOK, acks_late=True)
def deliver_webhook(*, batch_id: str, attempt: int = 1) -> str:
    """POST a finished batch's signed webhook; schedule the next try on failure (worker.webhook_delivery)."""
    from worker.dispatch import send_webhook
    from worker.webhook_delivery import deliver

    result = deliver(uuid.UUID(batch_id), attempt=attempt)
    if result.retry_in is not None:
        send_webhook(uuid.UUID(batch_id), attempt=attempt + 1, countdown=result.retry_in)
    return result.status.value
