"""Per-process runtime of a worker: one event loop, one shared httpx client, one async Redis client.

Built after fork (in `worker_process_init`, or lazily on first use) and never shared across processes.
The loop runs forever in a background thread of the process; a task hands it a coroutine with `run()`
and waits for the result. So the httpx connection pool and the `VOXQ_MAX_IN_FLIGHT` semaphore are shared
by every task of the process, whatever the Celery pool: a prefork child runs one group at a time, and a
`-P threads -c N` transcribe worker runs N groups at once on the same client and the same in-flight
bound — the way to keep hundreds of requests open from one 2-core host without N copies of everything.
Every configured provider gets one client of its own (`Runtime.provider(name)`: base URL, key, headers),
built on first use on that same httpx client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Coroutine, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import httpx

from core.settings import Settings, get_settings
from core.storage import Storage
from worker.provider_http import make_provider_client

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from core.providers.base import Provider
    from worker import completion
    from worker.circuit import CircuitBreaker
    from worker.inflight import InFlightCaps
    from worker.ratelimit import RateLimiter

T = TypeVar("T")
RowT = TypeVar("RowT")
ResultT = TypeVar("ResultT")
log = logging.getLogger(__name__)
# How long an attempt row waits for others to share its INSERT (AttemptOpener).
OPEN_ATTEMPTS_WINDOW_SECONDS = 0.003
OPEN_ATTEMPTS_MAX_ROWS = 256
# How long an answered job waits for others to share its completion transaction (CompletionWriter): none.
# The writer starts at once and the answers that land while a write is under way share the next one
# (group commit without a wait), so a wave of answers is still written in a few large transactions. The
# wait was 50 ms (P2 paired runs: 87.5% -> 89.9% of ideal against 10 ms), but every millisecond between
# a billed answer and its commit is a window in which a killed worker loses an answer the provider
# billed, and the job pays again (chaos run: "jobs paid twice", docs/benchmarks.md).
COMPLETIONS_WINDOW_SECONDS = 0.0
COMPLETIONS_MAX_ROWS = 128
# A half-open circuit's probe key outlives the provider timeout by this much (attempt row, connect).
PROBE_MARGIN_SECONDS = 30.0


class _GroupWriter(Generic[RowT, ResultT]):
    """Rows handed in by concurrent calls, written together by one writer; each call awaits its own result.

    The writer starts when the first row arrives, waits `window` seconds for others, writes up to
    `max_rows` at once, and goes on while rows keep arriving (rows that come in during a write go in the
    next one). When writing a group fails, each of its rows is written on its own (`_write_one`), so one
    bad row — or a failed group — fails only the calls it must.
    """

    window = 0.0
    max_rows = 256

    def __init__(self) -> None:
        self._waiting: list[tuple[RowT, asyncio.Future[ResultT]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def _submit(self, row: RowT) -> ResultT:
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
        return await future

    async def _write_rows(self, rows: list[RowT]) -> list[ResultT]:
        """Write these rows together (one transaction); their results in order."""
        raise NotImplementedError

    async def _write_one(self, row: RowT) -> ResultT:
        """Write one row on its own (after its group's write failed)."""
        (result,) = await self._write_rows([row])
        return result

    def _key(self, row: RowT) -> Hashable | None:
        """Rows with the same key never share a write (None: no such constraint)."""
        return None

    def _take(self) -> list[tuple[RowT, asyncio.Future[ResultT]]]:
        batch: list[tuple[RowT, asyncio.Future[ResultT]]] = []
        later: list[tuple[RowT, asyncio.Future[ResultT]]] = []
        keys: set[Hashable] = set()
        for item in self._waiting:
            key = self._key(item[0])
            if len(batch) >= self.max_rows or (key is not None and key in keys):
                later.append(item)
                continue
            if key is not None:
                keys.add(key)
            batch.append(item)
        self._waiting = later
        return batch

    async def _write(self) -> None:
        if self.window:
            await asyncio.sleep(self.window)
        try:
            while self._waiting:
                await self._write_batch(self._take())
        finally:
            # Only left over when this writer was cancelled (the loop is closing): nobody will write them.
            for _, future in self._waiting:
                future.cancel()
            self._waiting.clear()

    async def _write_batch(self, batch: list[tuple[RowT, asyncio.Future[ResultT]]]) -> None:
        try:
            results = await self._write_rows([row for row, _ in batch])
        except Exception as exc:
            # A group of one too: `_write_one` is where a write is retried (a lone job's completion
            # failed for good on a Postgres blip, leaving its paid answer unsaved: issue #16, item 5).
            log.warning(
                "group write of %d row(s) failed (%s): writing them one by one",
                len(batch),
                type(exc).__name__,
            )
            await asyncio.gather(*(self._write_alone(item) for item in batch))
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _write_alone(self, item: tuple[RowT, asyncio.Future[ResultT]]) -> None:
        row, future = item
        try:
            result = await self._write_one(row)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)


class AttemptOpener(_GroupWriter[Any, None]):
    """Writes the pending attempt rows of calls about to start in this process together.

    Each call awaits its row before it starts (the row is the record that the call happened; the sweeper
    reads `started_at`), but calls that start within a few milliseconds of each other — hundreds in
    flight — share one INSERT and one commit instead of one transaction each. Rows that arrive while a
    write is under way go in the next one.
    """

    window = OPEN_ATTEMPTS_WINDOW_SECONDS
    max_rows = OPEN_ATTEMPTS_MAX_ROWS

    async def open(self, row: Any) -> None:
        """Write `row` (a `worker.store.attempts.PendingAttempt`) and return once it is committed."""
        await self._submit(row)

    async def _write_rows(self, rows: list[Any]) -> list[None]:
        from worker.store import attempts

        await asyncio.to_thread(attempts.open_attempts, rows)
        return [None] * len(rows)


class CompletionWriter(_GroupWriter["completion.JobSuccess", "completion.Succeeded | None"]):
    """Group commit of answered jobs: the transcripts (and the closes of their answering attempts) of
    jobs whose answers came in at about the same moment are written by one transaction
    (`completion.succeed_jobs`), which moves the hot batch row once per batch instead of once per job. Its
    failure — a database outage, a lost race for a transcript — writes each job on its own with
    `completion.succeed_one` (durable, the per-job rules), so no close is lost and none is billed twice: the
    group's transaction either committed whole or not at all.

    A row handed in is written even if its caller is cancelled meanwhile (a task's time limit): an
    answered attempt is always closed.
    """

    window = COMPLETIONS_WINDOW_SECONDS
    max_rows = COMPLETIONS_MAX_ROWS

    async def succeed(self, row: completion.JobSuccess) -> completion.Succeeded | None:
        """Store `row` (with its attempt's close); what `completion.succeed_job` returns, once committed."""
        return await self._submit(row)

    def _key(self, row: completion.JobSuccess) -> Hashable:
        return row.job_id  # two runs of one job never share a transaction

    async def _write_rows(self, rows: list[completion.JobSuccess]) -> list[completion.Succeeded | None]:
        from worker import completion

        return await asyncio.to_thread(completion.succeed_jobs, rows)

    async def _write_one(self, row: completion.JobSuccess) -> completion.Succeeded | None:
        from worker import completion

        return await asyncio.to_thread(completion.succeed_one, row)


class GroupRuns:
    """The group runs of a process that are still going, and how many jobs of those whose Celery task has
    already returned ("detached": `worker.transcribe.start_group`) are not done yet.

    A group task returns once none of its jobs waits for a provider slot, and its thread claims the next
    group while the calls are in flight. What bounds the work a process takes on is the in-flight
    semaphore (a thread stays with its group until every job of it holds a slot) and `limit` here: a
    group is not let go while the detached jobs not done yet would exceed it (jobs backing off between
    retries hold no slot). A warm shutdown waits for every run (`drain`) before the loop stops.
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.runs: set[asyncio.Task[Any]] = set()
        self.detached_jobs = 0
        self._waiters: list[asyncio.Future[None]] = []

    def track(self, run: asyncio.Task[Any]) -> None:
        """Keep `run` (a whole group's run) until it ends; `drain` waits for it."""
        self.runs.add(run)
        run.add_done_callback(self.runs.discard)

    def has_room(self, jobs: int) -> bool:
        """Whether `jobs` more detached jobs fit (one group always fits when none is detached)."""
        return self.detached_jobs == 0 or self.detached_jobs + jobs <= self.limit

    async def wait_room(self, jobs: Callable[[], int]) -> None:
        """Return once `jobs()` more detached jobs fit."""
        while not self.has_room(jobs()):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def detach(self, jobs: int) -> None:
        """`jobs` live jobs of a group whose task returned."""
        self.detached_jobs += jobs

    def job_done(self) -> None:
        """A detached job ended: wake those waiting for room."""
        self.detached_jobs -= 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until every group run of the process has ended (warm shutdown)."""
        while self.runs:
            log.info("waiting for %d group run(s) still in flight", len(self.runs))
            await asyncio.wait(set(self.runs))


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
    _redis: aioredis.Redis | None = None
    _semaphore: asyncio.Semaphore | None = None
    _circuit: CircuitBreaker | None = None
    _limiter: RateLimiter | None = None
    _providers: dict[str, Provider] = field(default_factory=dict)  # by provider name (`provider`)
    _inflight: InFlightCaps | None = None
    attempts: AttemptOpener = field(default_factory=AttemptOpener)
    completions: CompletionWriter = field(default_factory=CompletionWriter)
    groups: GroupRuns = field(default_factory=GroupRuns)
    # Whether a group task returns before its calls end (`worker.transcribe.start_group`). Off where Celery
    # sends `worker_process_init` (worker.signals: a prefork child, and the solo pool): a killed prefork
    # child's task is redelivered at once (reject on worker lost), which a task that returned would lose.
    # A threads pool's process dies with its thread and its unacked messages (back only after the
    # visibility timeout): there the leases and the sweeper are what recover a killed run anyway.
    detach_groups: bool = True
    # The halt events of the jobs running here (worker.waves): `drain` sets them all.
    halts: weakref.WeakSet[asyncio.Event] = field(default_factory=weakref.WeakSet)
    draining: bool = False

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
            from redis.driver_info import DriverInfo

            # One connection per request in flight at most, and a wait rather than an error when they
            # are all busy: redis-py's default pool raises MaxConnectionsError past 100 connections,
            # which failed whole groups at 256 in flight.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.settings.redis_url,
                max_connections=max(self.settings.max_in_flight, 10) + 16,
                timeout=60,
                # Built once: by default each new connection looks redis-py's version up in the installed
                # packages' metadata (~1 ms), 5% of the loop while the pool grows to hundreds.
                driver_info=DriverInfo(),
            )
            self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        return self._redis

    def provider(self, name: str | None = None) -> Provider:
        """The client of provider `name` of the providers configuration (None: the provider of the
        default chain's first hosted model, `openai` in env-only setups), built on first use on the
        process's one shared HTTP client with the provider's base URL, key and headers. KeyError for a
        provider the configuration does not have."""
        from core.providers.config import OPENAI, load_catalogue
        from core.providers.retirement import runtime_provider, utc_today

        if name is None:
            default = runtime_provider(load_catalogue(self.settings), self.settings, utc_today())
            name = default.name if default is not None else OPENAI
        client = self._providers.get(name)
        if client is None:
            client = self._providers[name] = self._build_provider(name)
        return client

    def _build_provider(self, name: str) -> Provider:
        from core.providers.config import api_key, load_catalogue
        from core.providers.openai import OpenAIProvider

        config = load_catalogue(self.settings).providers[name]
        return OpenAIProvider(
            self.http,
            base_url=config.base_url,
            api_key=api_key(config, self.settings),
            timeout=self.settings.provider_timeout_seconds,
            headers=config.headers,
            name=config.name,
        )

    def circuit(self) -> CircuitBreaker:
        """The fleet-wide circuit breakers (state in Redis), one per process: its local reading of a clean
        circuit (`VOXQ_CIRCUIT_LOCAL_SECONDS`) is shared by every group of the process."""
        if self._circuit is None:
            from worker.circuit import CircuitBreaker

            self._circuit = CircuitBreaker(
                self.redis,
                failure_threshold=self.settings.circuit_failure_threshold,
                open_seconds=self.settings.circuit_open_seconds,
                local_seconds=self.settings.circuit_local_seconds,
                # Longer than the probe's call can take, so a slow probe is never joined by a second.
                probe_timeout_seconds=self.settings.provider_timeout_seconds + PROBE_MARGIN_SECONDS,
                retired_seconds=self.settings.model_retired_seconds,
            )
        return self._circuit

    def limiter(self) -> RateLimiter:
        """The fleet-wide rate limiter (token buckets in Redis), one per process: a pause this process
        set is known to every group of the process at once (`RateLimiter.paused_here`). Per model:
        `VOXQ_MODEL_RPM_LIMIT` / `VOXQ_MODEL_AUDIO_SECONDS_PER_MINUTE`; per provider: the providers
        file's `limits.rpm` / `limits.audio_seconds_per_hour`."""
        if self._limiter is None:
            from core.providers.config import load_catalogue
            from worker.ratelimit import RateLimiter

            providers = load_catalogue(self.settings).providers
            self._limiter = RateLimiter(
                self.redis,
                rpm=self.settings.model_rpm_limit,
                audio_seconds_per_minute=self.settings.model_audio_seconds_per_minute,
                provider_limits={
                    name: (p.limits.rpm, p.limits.audio_seconds_per_hour / 60.0)
                    for name, p in providers.items()
                    if p.limits.rpm or p.limits.audio_seconds_per_hour
                },
            )
        return self._limiter

    def inflight(self) -> InFlightCaps:
        """The providers' fleet-wide in-flight caps (the providers file's `limits.max_in_flight`), one
        per process. A lease outlives any call of a live worker (the provider timeout plus a margin)."""
        if self._inflight is None:
            from core.providers.config import load_catalogue
            from worker.inflight import InFlightCaps

            providers = load_catalogue(self.settings).providers
            self._inflight = InFlightCaps(
                self.redis,
                caps={name: p.limits.max_in_flight for name, p in providers.items()},
                lease_seconds=self.settings.provider_timeout_seconds + PROBE_MARGIN_SECONDS,
            )
        return self._inflight

    def drain(self, timeout: float) -> None:
        """Stop starting provider calls and wait, up to `timeout` seconds, for the group runs to end: the
        calls in flight finish and their answers are committed (the provider bills an answer it sent even
        if we die before keeping it). For a process about to be terminated (worker.signals); call it from
        any thread but the loop's."""

        async def halt_and_wait() -> None:
            self.draining = True
            for halt in list(self.halts):
                halt.set()
            try:
                async with asyncio.timeout(timeout):
                    await self.groups.drain()
            except TimeoutError:
                log.warning("drain: group runs still going after %.0f s", timeout)

        if not self.loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(halt_and_wait(), self.loop)
        try:
            future.result(timeout + 5)  # never hangs a dying process, whatever the loop is doing
        except concurrent.futures.TimeoutError:
            log.warning("drain: the loop did not answer within %.0f s", timeout + 5)

    def close(self) -> None:
        """Wait for the group runs still going, close clients, stop the loop's thread and close the loop
        (process shutdown)."""
        try:
            self.run(self.groups.drain())
            if self._circuit is not None:
                self.run(self._circuit.aclose())
            self.run(self.http.aclose())
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
    http = make_provider_client(settings)
    thread = threading.Thread(target=loop.run_forever, name="voxq-loop", daemon=True)
    thread.start()
    return Runtime(
        pid=os.getpid(),
        settings=settings,
        loop=loop,
        http=http,
        storage=Storage(settings),
        worker_name=f"{socket.gethostname()}:{os.getpid()}",
        thread=thread,
        groups=GroupRuns(limit=2 * settings.max_in_flight),
    )


def current_runtime() -> Runtime | None:
    """This process's runtime if it has built one (None: nothing to drain or close)."""
    with _lock:
        return _runtime if _runtime is not None and _runtime.pid == os.getpid() else None


def close_runtime() -> None:
    """Close this process's runtime if it has one."""
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.close()
        _runtime = None
