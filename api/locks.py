"""Short Redis locks on audio object keys, so an upload and a delete of the same content never interleave
(and the API's one other Redis write on audio: dropping a deleted job's FLAC kept there for its worker).

Content-addressed audio is shared by every job of a tenant with the same bytes. Without a lock, a delete
could count "no other job uses this object" just before an upload of identical audio commits its job,
then remove the object under it. Both sides take the key's lock around "make sure the object is there
and record who uses it" / "check who uses it and remove it". No database session is held while waiting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import lru_cache

import redis
from redis.exceptions import LockError, RedisError

from api.problems import RETRY, Problem
from core import names
from core.settings import get_settings

# Long enough for a server-side copy of the largest upload; a crashed holder frees the key after it.
LOCK_TTL_SECONDS = 900
LOCK_WAIT_SECONDS = 120


@lru_cache(maxsize=1)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def drop_inline_audio(object_key: str) -> None:
    """Delete the copy of a derived FLAC a worker keeps in Redis under this S3 key's name, if any (503
    `service_unavailable` when Redis cannot be reached: the caller has changed nothing yet)."""
    try:
        _client(get_settings().redis_url).delete(names.KEY_DERIVED + object_key)
    except RedisError as exc:
        raise Problem(
            503, "service_unavailable", "Redis is unreachable; try again shortly", headers=RETRY
        ) from exc


@contextmanager
def object_lock(object_key: str) -> Iterator[None]:
    """Hold the lock of one audio object key (503 `service_unavailable` when Redis cannot give it)."""
    digest = hashlib.sha256(object_key.encode()).hexdigest()
    lock = _client(get_settings().redis_url).lock(
        names.KEY_OBJECT_LOCK + digest, timeout=LOCK_TTL_SECONDS, blocking_timeout=LOCK_WAIT_SECONDS
    )
    try:
        acquired = lock.acquire()
    except RedisError as exc:
        raise Problem(
            503, "service_unavailable", "Redis is unreachable; try again shortly", headers=RETRY
        ) from exc
    if not acquired:
        raise Problem(
            503, "service_unavailable", "the audio object is busy; try again shortly", headers=RETRY
        )
    try:
        yield
    finally:
        with suppress(LockError, RedisError):  # expired or Redis went away: the TTL frees it
            lock.release()


@contextmanager
def object_locks(object_keys: Iterable[str]) -> Iterator[None]:
    """Hold the locks of several keys, taken in sorted order so two requests cannot deadlock."""
    with ExitStack() as stack:
        for key in sorted(set(object_keys)):
            stack.enter_context(object_lock(key))
        yield
