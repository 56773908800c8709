"""A Celery app with one no-op task and voxq's reliability settings: the broker's ceiling for P1.

Same broker, same options as worker.app (acks late, prefetch 1, no results, task events); the task only
counts itself in Redis so the benchmark knows when every task ran.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

QUEUE = "bench.noop"
COUNTER = "bench:noop:done"

app = Celery("voxq-bench-noop", broker=os.environ["VOXQ_REDIS_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    result_backend=None,
    task_serializer="json",
    accept_content=["json"],
    worker_send_task_events=True,
    task_send_sent_event=True,
    task_track_started=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)
_client: redis.Redis | None = None


@app.task(name="bench.noop")
def noop(*, job_id: str) -> None:
    """Count one done task."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["VOXQ_REDIS_URL"])
    _client.incr(COUNTER)
