"""Derived audio: where prepare keeps a job's normalised FLAC until the transcribe stage has sent it.

A whole small job's FLAC (a voicemail is ~40 KB) is kept in Redis (`voxq:derived:{object key}`) instead of
S3: one S3 PUT in prepare and one GET in transcribe fewer per file. Everything else — chunked files, files
over `VOXQ_DERIVED_INLINE_MAX_BYTES`, jobs whose chain starts with `local`, or when Redis already holds
more than `VOXQ_DERIVED_INLINE_REDIS_MAX_BYTES` (checked once per prepare task) — goes to S3 as before.

Never losing a file:
- the Redis copy lives as long as the job's lease while it waits for its group task (the broker's
  visibility timeout plus the job lease), so a redelivered group task still finds it; it is deleted once
  the job is terminal;
- a read finds it in Redis, else in S3; if it is in neither (Redis restarted without persistence), the
  read fails like a missing object: the job's lease is shortened and the sweeper sends it to `prepare`
  again, which rebuilds the FLAC from the original upload (a run, not a file, is lost);
- a job handed to the local engine has its audio copied to S3 first (the local worker reads S3).

Derived audio is an intermediate product: the storage sweep (worker.upload_sweep) removes the S3 objects of
jobs that ended, and DELETE /v1/jobs/{id} removes a job's S3 objects and its Redis copy at once (the key
layout is `core.storage.derived_key`, the Redis prefix `core.names.KEY_DERIVED`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from core import names
from core.settings import Settings
from core.storage import derived_key as derived_key  # the layout is core's: the API deletes by it too

if TYPE_CHECKING:
    import redis

    from worker.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = names.KEY_DERIVED

_client: redis.Redis | None = None
_client_pid: int | None = None


def inline_key(object_key: str) -> str:
    """The Redis key holding the FLAC that would be stored at `object_key`."""
    return f"{PREFIX}{object_key}"


def _sync_client(settings: Settings) -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        import redis

        _client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        _client_pid = os.getpid()
    return _client


def inline_allowed(settings: Settings) -> bool:
    """Whether this prepare task may keep small FLACs in Redis (setting on, Redis below its share)."""
    if settings.derived_inline_max_bytes <= 0:
        return False
    try:
        used = int(_sync_client(settings).info("memory").get("used_memory", 0))
    except (RedisError, OSError) as exc:
        log.warning("derived audio goes to S3: Redis unavailable (%s)", type(exc).__name__)
        return False
    return used < settings.derived_inline_redis_max_bytes


def put_inline_many(settings: Settings, items: list[tuple[str, bytes]]) -> list[bool]:
    """Keep small FLACs in Redis for their jobs' lease, in one round trip; per item, whether it is kept
    there (False: it does not fit or the write failed, store it in S3)."""
    fits = [len(flac) <= settings.derived_inline_max_bytes for _, flac in items]
    if not any(fits):
        return fits
    ttl = settings.celery_visibility_timeout + settings.job_lease_seconds
    try:
        pipe = _sync_client(settings).pipeline(transaction=False)
        for (key, flac), fit in zip(items, fits, strict=True):
            if fit:
                pipe.set(inline_key(key), flac, ex=ttl)
        pipe.execute()
    except (RedisError, OSError) as exc:
        log.warning("derived audio goes to S3: Redis write failed (%s)", type(exc).__name__)
        return [False] * len(items)
    return fits


async def read(rt: Runtime, object_key: str) -> bytes:
    """A piece's FLAC: from Redis when prepare kept it there, else from S3 (raises when in neither)."""
    import asyncio

    try:
        data = await rt.redis.get(inline_key(object_key))
    except (RedisError, OSError) as exc:
        log.warning("derived audio read from S3: Redis unavailable (%s)", type(exc).__name__)
        data = None
    if isinstance(data, bytes):
        return data
    return await asyncio.to_thread(_read_s3, rt, object_key)


async def read_many(rt: Runtime, object_keys: list[str]) -> dict[str, bytes]:
    """The Redis-kept FLACs among these keys, in one round trip (a group's files; the rest are read one
    by one with `read`, from Redis or S3). Empty when Redis is unavailable."""
    if not object_keys:
        return {}
    try:
        values = await rt.redis.mget([inline_key(k) for k in object_keys])
    except (RedisError, OSError) as exc:
        log.warning("derived audio read one by one: Redis unavailable (%s)", type(exc).__name__)
        return {}
    return {k: v for k, v in zip(object_keys, values, strict=True) if isinstance(v, bytes)}


def _read_s3(rt: Runtime, object_key: str) -> bytes:
    return rt.storage.get_bytes(object_key)


async def spill(rt: Runtime, object_key: str) -> None:
    """Copy a Redis-kept FLAC to S3 (before the job leaves for a stage that reads S3 only)."""
    import asyncio

    try:
        data = await rt.redis.get(inline_key(object_key))
    except (RedisError, OSError):
        data = None  # the FLAC is in S3 already, or the local worker's read fails and the job re-runs
    if isinstance(data, bytes):
        await asyncio.to_thread(rt.storage.upload_bytes, data, object_key, "audio/flac")


async def forget(rt: Runtime, object_keys: list[str]) -> None:
    """Drop the Redis copies of finished jobs' FLACs (best effort: they expire anyway)."""
    if not object_keys:
        return
    try:
        await rt.redis.delete(*(inline_key(k) for k in object_keys))
    except (RedisError, OSError) as exc:
        log.warning("derived audio left to expire in Redis (%s)", type(exc).__name__)
