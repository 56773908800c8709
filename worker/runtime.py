"""Per-process runtime of a worker: one event loop, one shared httpx client, one async Redis client.

Built after fork (in `worker_process_init`, or lazily on first use) and never shared across processes.
The loop runs forever in a background thread of the process; a task hands it a coroutine with `run()`
and waits for the result. So the httpx connection pool and the `VOXQ_MAX_IN_FLIGHT` semaphore are shared
by every task of the process, whatever the Celery pool: a prefork child runs one group at a time, and a
`-P threads -c N` transcribe worker runs N groups at once on the same client and the same in-flight
bound — the way to keep hundreds of requests open from one 2-core host without N copies of everything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from core.settings import Settings, get_settings
from core.storage import Storage

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from core.circuit import CircuitBreaker
    from core.providers.base import Provider
    from core.ratelimit import RateLimiter

T = TypeVar("T")
HTTP_SHARD_CONNECTIONS = 32
# How long an attempt row waits for others to share its INSERT (AttemptOpener).
OPEN_ATTEMPTS_WINDOW_SECONDS = 0.003
OPEN_ATTEMPTS_MAX_ROWS = 256


class AttemptOpener:
    """Writes the pending attempt rows of calls about to start in this process together.

    Each call awaits its row before it starts (the row is the record that the call happened; the sweeper
    reads `started_at`), but calls that start within a few milliseconds of each other — hundreds in
    flight — share one INSERT and one commit instead of one transaction each. Rows that arrive while a
    write is under way go in the next one.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Any, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def open(self, row: Any) -> None:
        """Write `row` (a `records.PendingAttempt`) and return once it is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        await future

    async def _write(self) -> None:
        await asyncio.sleep(OPEN_ATTEMPTS_WINDOW_SECONDS)
        try:
            while self._waiting:
                batch = self._waiting[:OPEN_ATTEMPTS_MAX_ROWS]
                del self._waiting[:OPEN_ATTEMPTS_MAX_ROWS]
                await self._write_batch(batch)
        finally:
            # Only left over when this writer was cancelled (the loop is closing): nobody will write them.
            for _, future in self._waiting:
                future.cancel()
            self._waiting.clear()

    async def _write_batch(self, batch: list[tuple[Any, asyncio.Future[None]]]) -> None:
        from worker import records

        try:
            await asyncio.to_thread(records.open_attempts, [row for row, _ in batch])
        except Exception as exc:
            if len(batch) > 1:
                # One bad row must not fail its neighbours' calls: write them one by one.
                for one in batch:
                    await self._write_batch([one])
            elif not batch[0][1].done():
                batch[0][1].set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for _, future in batch:
            if not future.done():
                future.set_result(None)


@dataclass
class Runtime:
    """What a worker process shares between its tasks."""

    pid: int
    settings: Settings
    loop: asyncio.AbstractEventLoop
    http: httpx.AsyncClient
    storage: Storage
    worker_name: str
    thread: threading.Thread | None = None
    # More clients for hosted calls beside `http`, handed out round robin by `provider()`: httpcore's pool
    # scans every connection on each request (O(n) per request), which at 256 connections in one pool
    # took a third of the event loop's time; shards of ~32 keep the scan short.
    http_shards: list[httpx.AsyncClient] = field(default_factory=list)
    _next_shard: int = 0
    _redis: aioredis.Redis | None = None
    _semaphore: asyncio.Semaphore | None = None
    attempts: AttemptOpener = field(default_factory=AttemptOpener)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the process's loop and wait for its result (from any thread but the loop's).

        If the wait is interrupted (a Celery soft time limit raised in this thread), the coroutine is
        cancelled, so nothing it started keeps running behind the next task's back.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                with contextlib.suppress(BaseException):
                    concurrent.futures.wait([future], timeout=10)
            raise

    @property
    def semaphore(self) -> asyncio.Semaphore:
        """Bounds provider calls in flight in this process."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.settings.max_in_flight)
        return self._semaphore

    @property
    def redis(self) -> aioredis.Redis:
        """The process's async Redis client (circuit breakers, rate limiters)."""
        if self._redis is None:
            import redis.asyncio as aioredis

            # One connection per request in flight at most, and a wait rather than an error when they
            # are all busy: redis-py's default pool raises MaxConnectionsError past 100 connections,
            # which failed whole groups at 256 in flight.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.settings.redis_url,
                max_connections=max(self.settings.max_in_flight, 10) + 16,
                timeout=60,
            )
            self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        return self._redis

    def provider(self) -> Provider:
        """The hosted provider (OpenAI-compatible) on the shared client."""
        from core.providers.openai import OpenAIProvider

        key = self.settings.openai_api_key
        clients = [self.http, *self.http_shards]
        self._next_shard = (self._next_shard + 1) % len(clients)
        return OpenAIProvider(
            clients[self._next_shard],
            base_url=self.settings.openai_base_url,
            api_key=key.get_secret_value() if key is not None else None,
            timeout=self.settings.provider_timeout_seconds,
        )

    def circuit(self) -> CircuitBreaker:
        """The fleet-wide circuit breakers (state in Redis)."""
        from core.circuit import CircuitBreaker

        return CircuitBreaker(
            self.redis,
            failure_threshold=self.settings.circuit_failure_threshold,
            open_seconds=self.settings.circuit_open_seconds,
        )

    def limiter(self) -> RateLimiter:
        """The fleet-wide rate limiter (token buckets in Redis)."""
        from core.ratelimit import RateLimiter

        return RateLimiter(
            self.redis,
            rpm=self.settings.model_rpm_limit,
            audio_seconds_per_minute=self.settings.model_audio_seconds_per_minute,
        )

    def close(self) -> None:
        """Close clients, stop the loop's thread and close the loop (process shutdown)."""
        try:
            for client in (self.http, *self.http_shards):
                self.run(client.aclose())
            if self._redis is not None:
                self.run(self._redis.aclose())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self.thread is not None:
                self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()


_runtime: Runtime | None = None
_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime, built on first use after fork."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = _build()
        return _runtime


def _build() -> Runtime:
    settings = get_settings()
    loop = asyncio.new_event_loop()
    # Database and S3 calls of a group run in threads (`asyncio.to_thread`): give them as many threads
    # as the DB pool has connections, not the default of cores + 4.
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=max(settings.database_pool_size, 4), thread_name_prefix="voxq-io")
    )
    limits = httpx.Limits(
        max_connections=max(settings.max_in_flight, 10),
        max_keepalive_connections=max(settings.max_in_flight, 10),
    )
    # Each client may hold every request in flight (a single group can use them all); the semaphore is
    # the bound. See Runtime.http_shards.
    shards = max(1, -(-settings.max_in_flight // HTTP_SHARD_CONNECTIONS))
    http, *http_shards = [
        httpx.AsyncClient(limits=limits, timeout=settings.provider_timeout_seconds) for _ in range(shards)
    ]
    thread = threading.Thread(target=loop.run_forever, name="voxq-loop", daemon=True)
    thread.start()
    return Runtime(
        pid=os.getpid(),
        settings=settings,
        loop=loop,
        http=http,
        http_shards=http_shards,
        storage=Storage(settings),
        worker_name=f"{socket.gethostname()}:{os.getpid()}",
        thread=thread,
    )


def close_runtime() -> None:
    """Close this process's runtime if it has one."""
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.close()
        _runtime = None
