"""Request dependencies as `Annotated` aliases: a DB session, the caller's tenant, the storage client.

No request may hold a database connection while it waits for a threadpool thread: sync routes run on
anyio's limited pool, and FastAPI validates a sync route's response on that pool too. A session still
holding its connection after the route returned, waiting for a thread, while every thread waits for a
connection, is a deadlock that only the pool timeout (30 s) breaks (the P4b closed-loop stall). So
routers use `SessionRoute`: a sync endpoint's request session is closed in the endpoint's own thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import or_, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.problems import Problem
from core import auth
from core.db import get_sessionmaker, session_scope
from core.models import ApiKey
from core.settings import get_settings
from core.storage import Storage

log = logging.getLogger(__name__)

# Writing last_used_at on every request would make each GET a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_bearer = HTTPBearer(auto_error=False, description="An API key from `voxq keys create`")
# Where api.guard leaves the tenant it authenticated, in the request's ASGI scope.
TENANT_SCOPE_KEY = "voxq.tenant"


@dataclass(frozen=True)
class TenantContext:
    """Who is calling: the tenant and the key they used."""

    tenant_id: uuid.UUID
    key_id: uuid.UUID


async def get_session() -> AsyncIterator[Session]:
    """A session for one request; routes commit what they change.

    Async on purpose: a sync generator's teardown would need a threadpool thread. Creating a Session
    does not connect. `SessionRoute` closes it when a sync endpoint returns (in that endpoint's thread);
    the close here only covers async endpoints and is a no-op after that.
    """
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def _closing_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # FastAPI reads the signature (and its annotations) through __wrapped__
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()  # the connection goes back before the response is validated

    return run


class SessionRoute(APIRoute):
    """A route whose sync endpoint closes its request session before it returns (see module docstring)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="voxq"'})


def resolve_tenant(plaintext: str) -> TenantContext | None:
    """The tenant a plaintext key belongs to, or None for an unknown/revoked key (short transaction)."""
    with session_scope() as session:
        key = auth.authenticate(session, plaintext)
        if key is None:
            return None
        now = datetime.now(UTC)
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
            )
            .values(last_used_at=now)
        )
        return TenantContext(tenant_id=key.tenant_id, key_id=key.id)


class KeyCache:
    """Valid keys (by hash) -> tenant, each for `VOXQ_AUTH_CACHE_SECONDS` after it was looked up.

    A cached key skips the database; a revoked key or a disabled tenant is refused once its entry is
    older than the TTL. Unknown keys are never cached. Bounded: emptied when it reaches MAX_ENTRIES.
    An entry older than REFRESH_AFTER of the TTL is `due`: the key is looked up again in the background
    while the entry still answers (see `tenant_for_key`).
    """

    MAX_ENTRIES = 10_000
    REFRESH_AFTER = 0.8

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, tuple[float, TenantContext]] = {}

    def get(self, key_hash: str, ttl: float) -> TenantContext | None:
        """The tenant cached for this key hash less than `ttl` seconds ago, or None."""
        entry = self._entries.get(key_hash)
        if entry is None or self._clock() - entry[0] >= ttl:
            return None
        return entry[1]

    def due(self, key_hash: str, ttl: float) -> bool:
        """Whether this key's entry is old enough to be refreshed (REFRESH_AFTER of `ttl` or older)."""
        entry = self._entries.get(key_hash)
        return entry is not None and self._clock() - entry[0] >= self.REFRESH_AFTER * ttl

    def put(self, key_hash: str, tenant: TenantContext) -> None:
        """Remember a key that was just found valid."""
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (self._clock(), tenant)

    def drop(self, key_hash: str) -> None:
        """Forget a key that was just found unknown, revoked or disabled."""
        self._entries.pop(key_hash, None)


_key_cache = KeyCache()
# Lookups in progress by key hash: concurrent misses for one key share one lookup (a client fleet
# using one key would otherwise all queue on the same api_keys row's last_used_at update).
_lookups: dict[str, asyncio.Future[TenantContext | None]] = {}
# Background refreshes in flight (a reference keeps each task alive until it is done).
_refreshes: set[asyncio.Task[None]] = set()


async def tenant_for_key(plaintext: str) -> TenantContext | None:
    """`resolve_tenant` behind the process's key cache (a hit needs no thread and no database).

    P4b: when a busy key's entry expired, every request of that key waited for the one lookup (a
    transaction on a worker thread, slowed down by the requests piling up meanwhile): 25-80 ms stalls
    every TTL. So the first request that finds its entry `due` (REFRESH_AFTER of the TTL old) starts the
    lookup in the background and is answered from the entry: a key in steady use never waits for its
    lookup, and an entry still never answers past its TTL (a revoked key is refused as before; a refresh
    that finds it revoked drops the entry at once).
    """
    ttl = get_settings().auth_cache_seconds
    key_hash = auth.hash_key(plaintext)
    if ttl <= 0:
        return await run_in_threadpool(resolve_tenant, plaintext)
    cached = _key_cache.get(key_hash, ttl)
    if cached is not None:
        if key_hash not in _lookups and _key_cache.due(key_hash, ttl):
            task = asyncio.create_task(_refresh(key_hash, plaintext))
            _refreshes.add(task)
            task.add_done_callback(_refreshes.discard)
        return cached
    pending = _lookups.get(key_hash)
    if pending is not None:
        await asyncio.wait([pending])  # our own cancellation propagates; the shared lookup goes on
        if not pending.cancelled():
            return pending.result()
        return await run_in_threadpool(resolve_tenant, plaintext)  # the shared lookup failed: our own
    return await _lookup(key_hash, plaintext)


async def _lookup(key_hash: str, plaintext: str) -> TenantContext | None:
    """Look the key up once for every request that arrives meanwhile (they wait on `_lookups`)."""
    future: asyncio.Future[TenantContext | None] = asyncio.get_running_loop().create_future()
    _lookups[key_hash] = future
    try:
        tenant = await run_in_threadpool(resolve_tenant, plaintext)
    except BaseException:
        future.cancel()  # waiters look the key up themselves (and meet the same error, if any)
        raise
    finally:
        del _lookups[key_hash]
    if tenant is None:
        _key_cache.drop(key_hash)
    else:
        _key_cache.put(key_hash, tenant)
    future.set_result(tenant)
    return tenant


async def _refresh(key_hash: str, plaintext: str) -> None:
    """A background `_lookup`: a failure leaves the entry to expire at its TTL (the next request after
    that looks the key up itself and meets the error, if it persists)."""
    try:
        await _lookup(key_hash, plaintext)
    except Exception as exc:
        log.warning("API key refresh failed: %s", type(exc).__name__)


async def get_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantContext:
    """The caller's tenant from `Authorization: Bearer <key>`; 401 when missing, unknown or revoked."""
    checked = request.scope.get(TENANT_SCOPE_KEY)
    if isinstance(checked, TenantContext):
        return checked  # api.guard already looked this request's key up, before reading its body
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
    tenant = await tenant_for_key(credentials.credentials)
    if tenant is None:
        raise _unauthorized("invalid or revoked API key")
    return tenant


_poll_executor: ThreadPoolExecutor | None = None
_T = TypeVar("_T")


async def run_polled(func: Callable[..., _T], *args: Any) -> _T:
    """Run a polled endpoint's blocking read on the process's poll thread(s) (`VOXQ_API_POLL_THREADS`,
    1 by default) instead of anyio's shared pool.

    P4b: 100 clients polling every 0.5 s arrive in bursts (8-9 requests within 20 ms); on the shared pool
    each burst ran on as many threads at once, all taking turns at the GIL with the event loop (a waiter
    gets it after up to 5 ms), so the burst's answers left together 25-125 ms later. One poll thread
    serves the burst in order while the loop keeps parsing and answering: the slowest poll of each
    second (after the first) 32-125 ms -> 7-29 ms (2 poll threads: 8-38 ms); P4b polling p99 47-80 ->
    11-20 ms. The read stays off the event loop (a slow database or a busy connection pool never
    blocks it).
    """
    global _poll_executor
    if _poll_executor is None:
        _poll_executor = ThreadPoolExecutor(get_settings().api_poll_threads, thread_name_prefix="voxq-poll")
    context = contextvars.copy_context()  # the request's log context, as run_in_threadpool passes it on
    return await asyncio.get_running_loop().run_in_executor(
        _poll_executor, functools.partial(context.run, func, *args)
    )


def get_storage(request: Request) -> Storage:
    """The process's storage client (built once, on first use)."""
    storage: Storage | None = getattr(request.app.state, "storage", None)
    if storage is None:
        storage = Storage()
        request.app.state.storage = storage
    return storage


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[TenantContext, Depends(get_tenant)]
StorageDep = Annotated[Storage, Depends(get_storage)]
