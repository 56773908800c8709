"""What the fleet is doing right now, read from Redis and Postgres (for /metrics and `voxq top`).

Every reading is one short query or one Redis round trip: these run on each Prometheus scrape and each
`voxq top` frame, so none of them may hold a connection or scan a table row by row in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any

import redis
from sqlalchemy import Engine, text

from core import names
from core.statuses import CircuitState, JobStatus

# kombu's Redis transport keeps messages of priority p > 0 in `queue + SEP + p` (steps 3, 6, 9).
_KOMBU_PRIORITY_SEP = "\x06\x16"
_KOMBU_PRIORITY_STEPS = (3, 6, 9)

# A worker whose heartbeat is older than this is counted as gone (beat sends one every 15 s).
WORKER_ALIVE_SECONDS = 60.0


@lru_cache(maxsize=8)
def redis_client(url: str) -> redis.Redis:
    """A shared client per URL with short timeouts (a scrape must not hang on a dead Redis)."""
    return redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3, decode_responses=True)


def queue_depths(client: redis.Redis, queues: tuple[str, ...] = names.ALL_QUEUES) -> dict[str, int]:
    """Messages waiting in each Celery queue (all of kombu's priority sub-lists included)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
        for step in _KOMBU_PRIORITY_STEPS:
            pipe.llen(f"{queue}{_KOMBU_PRIORITY_SEP}{step}")
    results: list[Any] = pipe.execute()
    per = 1 + len(_KOMBU_PRIORITY_STEPS)
    return {queue: sum(int(n) for n in results[i * per : (i + 1) * per]) for i, queue in enumerate(queues)}


def circuit_states(client: redis.Redis) -> dict[str, str]:
    """Model -> circuit state (open, half_open, retired) for every model whose circuit is not closed.

    Reads what `worker.circuit` writes: a hash `KEY_CIRCUIT + model` whose `open_until` (ms, Redis clock)
    says until when it is open, and `KEY_MODEL_RETIRED + model` for models gone for good.
    """
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    states: dict[str, str] = {}
    for key in client.scan_iter(match=names.KEY_CIRCUIT + "*", count=200):
        model = str(key)[len(names.KEY_CIRCUIT) :]
        if model.endswith(":probe") or client.type(key) != "hash":
            continue
        open_until = int(float(client.hget(key, "open_until") or 0))
        if open_until:
            states[model] = CircuitState.OPEN if now_ms < open_until else CircuitState.HALF_OPEN
    for key in client.scan_iter(match=names.KEY_MODEL_RETIRED + "*", count=200):
        states[str(key)[len(names.KEY_MODEL_RETIRED) :]] = CircuitState.RETIRED
    return states


def jobs_by_status(engine: Engine) -> dict[str, int]:
    """Count of (not deleted) jobs in each status; every known status is present."""
    counts = {status.value: 0 for status in JobStatus}
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL statement_timeout = 5000"))
        rows = conn.execute(
            text("SELECT status, count(*) FROM jobs WHERE deleted_at IS NULL GROUP BY status")
        ).all()
    for status, count in rows:
        counts[str(status)] = int(count)
    return counts


def workers_alive(engine: Engine, within_seconds: float = WORKER_ALIVE_SECONDS) -> list[str]:
    """Names of workers whose heartbeat is recent."""
    since = datetime.now(UTC) - timedelta(seconds=within_seconds)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT worker FROM worker_heartbeats WHERE last_seen_at >= :since ORDER BY worker"),
            {"since": since},
        ).all()
    return [str(r[0]) for r in rows]


def finished_per_minute(engine: Engine, minutes: int = 5) -> list[int]:
    """Jobs reaching a terminal status in each of the last `minutes` whole minutes, oldest first."""
    now = datetime.now(UTC)
    since = now - timedelta(minutes=minutes)
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT floor(extract(epoch FROM (:now - finished_at)) / 60)::int AS ago, count(*)"
                " FROM jobs WHERE finished_at >= :since AND finished_at <= :now GROUP BY ago"
            ),
            {"now": now, "since": since},
        ).all()
    buckets = [0] * minutes
    for ago, count in rows:
        if 0 <= int(ago) < minutes:
            buckets[minutes - 1 - int(ago)] = int(count)
    return buckets


def cost_last_hour(engine: Engine) -> Decimal:
    """USD of cost records written in the last hour (the fleet's current cost per hour)."""
    since = datetime.now(UTC) - timedelta(hours=1)
    with engine.connect() as conn:
        value = conn.execute(
            text("SELECT coalesce(sum(usd), 0) FROM cost_records WHERE created_at >= :since"),
            {"since": since},
        ).scalar_one()
    return Decimal(value)


@dataclass
class FleetSnapshot:
    """One reading of the whole fleet (what `voxq top` draws)."""

    taken_at: datetime
    queues: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)
    finished_per_minute: list[int] = field(default_factory=list)
    cost_per_hour_usd: Decimal = Decimal(0)
    circuits: dict[str, str] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        """Jobs being processed now."""
        return self.jobs.get(JobStatus.PROCESSING.value, 0)


def take_snapshot(engine: Engine, client: redis.Redis, minutes: int = 5) -> FleetSnapshot:
    """Read everything once; a source that cannot be read is reported in `errors`, not raised."""
    snap = FleetSnapshot(taken_at=datetime.now(UTC))
    try:
        snap.queues = queue_depths(client)
        snap.circuits = circuit_states(client)
    except redis.RedisError as exc:
        snap.errors["redis"] = type(exc).__name__
    try:
        snap.jobs = jobs_by_status(engine)
        snap.finished_per_minute = finished_per_minute(engine, minutes)
        snap.cost_per_hour_usd = cost_last_hour(engine)
        snap.workers = workers_alive(engine)
    except Exception as exc:  # any DB failure: show it in the frame, keep drawing
        snap.errors["postgres"] = type(exc).__name__
    return snap
