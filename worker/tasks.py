"""Celery tasks: thin, keyword-only, named by constants; each calls a plain function."""

from __future__ import annotations

import os
import socket
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
