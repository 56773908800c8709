"""Circuit breaker and rate limiter against real Redis/Valkey, shared between independent instances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from core import names
from tests.pipeline_support import held_slots
from tests.support import Stack
from worker.circuit import CircuitBreaker, Ticket, provider_key
from worker.inflight import InFlightCaps
from worker.policy import Note
from worker.ratelimit import RateLimiter

T = TypeVar("T")
MODEL = "gpt-4o-mini-transcribe"


def _run(stack: Stack, body: Callable[[aioredis.Redis, aioredis.Redis], Awaitable[T]]) -> T:
    """Run `body` with two separate Redis clients (as two worker processes would have)."""

    async def main() -> T:
        first = aioredis.Redis.from_url(stack.redis_url)
        second = aioredis.Redis.from_url(stack.redis_url)
        try:
            return await body(first, second)
        finally:
            # Breakers with local reading follow circuit events on a task of their own: stop those first.
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}), return_exceptions=True)
            await first.aclose()
            await second.aclose()

    return asyncio.run(main())


def _gauge(model: str) -> float | None:
    return REGISTRY.get_sample_value("voxq_circuit_open", {"model": model})


# ---- circuit breaker ----


def test_breaker_opens_after_threshold_for_every_worker(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=3, open_seconds=30)
        await a.record_failure(MODEL)
        await b.record_failure(MODEL)
        assert await a.allow(MODEL) and await b.allow(MODEL)
        assert await b.state(MODEL) == "closed"
        assert _gauge(MODEL) == 0
        await a.record_failure(MODEL)  # third failure, counted across both instances
        assert await a.state(MODEL) == "open"
        assert not await a.allow(MODEL)
        assert not await b.allow(MODEL)
        assert _gauge(MODEL) == 1
        # A straggler's success (started before the circuit opened) does not close it.
        await b.record_success(MODEL)
        assert await a.state(MODEL) == "open"
        # Other models are unaffected.
        assert await b.allow("whisper-1")
        assert await r1.exists(names.KEY_CIRCUIT + MODEL)

    _run(stack, body)


def test_success_resets_consecutive_failures(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30)
        for _ in range(2):
            await a.record_failure(MODEL)
        await a.record_success(MODEL)
        for _ in range(2):
            await a.record_failure(MODEL)
        assert await a.state(MODEL) == "closed"
        await a.record_failure(MODEL)
        assert await a.state(MODEL) == "open"

    _run(stack, body)


def test_half_open_lets_exactly_one_probe(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=1.0)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=1.0)
        await a.record_failure(MODEL)
        assert not await b.allow(MODEL)
        await asyncio.sleep(1.1)
        assert await b.state(MODEL) == "half_open"
        # Many workers ask at once: exactly one gets the probe.
        tickets = await asyncio.gather(*[(a if i % 2 else b).admit(MODEL) for i in range(20)])
        probes = [t for t in tickets if t is not None]
        assert len(probes) == 1 and probes[0].probe
        # The probe fails: open again at once, for the full open period.
        await a.record_failure(MODEL, probes[0].probe)
        assert await a.state(MODEL) == "open"
        assert not await b.allow(MODEL)
        await asyncio.sleep(1.1)
        probe = await b.admit(MODEL)  # the next probe
        assert probe is not None and probe.probe
        assert not await a.allow(MODEL)
        await b.record_success(MODEL, probe.probe)  # the probe succeeds: closed for everyone
        assert await a.state(MODEL) == "closed"
        assert all(
            await asyncio.gather(*[a.allow(MODEL) for _ in range(5)], *[b.allow(MODEL) for _ in range(5)])
        )

    _run(stack, body)


def test_trip_opens_now_for_the_given_time(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=5, open_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=5, open_seconds=30)
        await a.trip(MODEL, seconds=1.0)  # e.g. insufficient_quota
        assert not await b.allow(MODEL)
        await asyncio.sleep(1.1)
        assert await b.state(MODEL) == "half_open"
        assert await b.allow(MODEL)
        await a.trip(MODEL)  # default: open_seconds
        ttl = await r1.pttl(names.KEY_CIRCUIT + MODEL)
        assert ttl > 29_000
        assert not await b.allow(MODEL)

    _run(stack, body)


def test_retire_is_shared_and_expires(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #16, item 13: a retirement (model_not_found) is seen by every worker and ends after
    `retired_seconds` (VOXQ_MODEL_RETIRED_SECONDS, 7 days by default) instead of never."""
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_ALLOWED_MODELS", "whisper-1")  # metric labels carry configured models only
    reset_settings_cache()

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=0.2, retired_seconds=1.5)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=0.2, retired_seconds=1.5)
        await a.retire("whisper-1")
        assert await b.state("whisper-1") == "retired"
        assert not await b.allow("whisper-1")
        await b.record_success("whisper-1")
        await asyncio.sleep(0.3)  # longer than open_seconds: still no probe
        assert not await a.allow("whisper-1")
        assert not await b.allow("whisper-1")
        assert await r1.get(names.KEY_MODEL_RETIRED + "whisper-1") == b"1"
        assert 0 < await r1.pttl(names.KEY_MODEL_RETIRED + "whisper-1") <= 1500  # it expires
        assert _gauge("whisper-1") == 1
        # A breaker built later (a new worker process) sees it too.
        fresh = CircuitBreaker(aioredis.Redis.from_url(stack.redis_url), failure_threshold=1, open_seconds=1)
        assert await fresh.state("whisper-1") == "retired"
        assert await fresh.allow(MODEL)
        await asyncio.sleep(1.3)
        assert await a.allow("whisper-1")  # retired no more: the model is called again
        default = CircuitBreaker(r1, failure_threshold=1, open_seconds=1)
        await default.retire("whisper-1")
        week = 7 * 86400 * 1000
        assert week - 5000 < await r1.pttl(names.KEY_MODEL_RETIRED + "whisper-1") <= week

    _run(stack, body)


def test_only_the_probe_closes_or_reopens_a_half_open_circuit(stack: Stack) -> None:
    """Issue #16, item 13: calls that started before the circuit opened and end while it is half-open
    (leftovers) change nothing; the probe's own outcome does."""

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=0.5, probe_timeout_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=0.5, probe_timeout_seconds=30)
        await a.trip(MODEL)
        await asyncio.sleep(0.6)
        probe = await b.admit(MODEL)
        assert probe is not None and probe.probe
        await a.record_success(MODEL)  # a leftover's success: still half-open, the probe still out
        assert await a.state(MODEL) == "half_open" and not await a.allow(MODEL)
        await a.record_failure(MODEL)  # a leftover's failure: does not reopen it
        assert await a.state(MODEL) == "half_open"
        await a.record_failure(MODEL, "not-the-probe")
        assert await a.state(MODEL) == "half_open"
        await b.record_success(MODEL, probe.probe)  # the probe's success closes it
        assert await a.state(MODEL) == "closed"
        # And the probe's failure reopens it.
        await a.trip(MODEL)
        await asyncio.sleep(0.6)
        probe = await a.admit(MODEL)
        assert probe is not None
        await b.record_failure(MODEL, probe.probe)
        assert await b.state(MODEL) == "open"

    _run(stack, body)


def test_one_probe_while_it_waits_for_a_slow_provider(stack: Stack) -> None:
    """Issue #16, item 13: the probe key outlives a provider call (the runtime's probe time is the provider
    timeout plus a margin), so a probe slower than the open period gets no second probe beside it."""
    from worker.runtime import get_runtime

    rt = get_runtime()
    breaker = rt.circuit()
    assert breaker.probe_timeout_seconds > rt.settings.provider_timeout_seconds
    assert breaker.retired_seconds == rt.settings.model_retired_seconds == 7 * 86400

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        timeout = rt.settings.provider_timeout_seconds
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=0.3, probe_timeout_seconds=timeout + 30)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=0.3, probe_timeout_seconds=timeout + 30)
        await a.trip(MODEL)
        await asyncio.sleep(0.4)
        assert await a.admit(MODEL) is not None
        assert await r1.pttl(names.KEY_CIRCUIT + MODEL + ":probe") > timeout * 1000
        await asyncio.sleep(0.4)  # past the open period again: the probe is still out
        assert await b.admit(MODEL) is None

    _run(stack, body)


# ---- circuit breaker: a process's local reading of a clean circuit (local_seconds) ----


async def _scripts_run(client: aioredis.Redis) -> int:
    """Lua calls the server has run so far (the breaker's every transition is one)."""
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_a_clean_circuit_is_read_locally_and_successes_are_not_written(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30, local_seconds=30)
        off = CircuitBreaker(r2, failure_threshold=3, open_seconds=30)  # local reading off: as before
        assert await a.allow(MODEL)  # asks Redis once: closed, no failure counted
        await _subscribed(a)
        before = await _scripts_run(r2)
        for _ in range(100):
            assert await a.allow(MODEL)
            await a.record_success(MODEL)
        assert await _scripts_run(r2) - before == 0  # 200 calls, no round trip
        for _ in range(10):
            assert await off.allow(MODEL)
            await off.record_success(MODEL)
        assert await _scripts_run(r2) - before >= 20  # without it, every call is two

    _run(stack, body)


def test_a_circuit_opened_elsewhere_ends_the_local_reading_at_once(stack: Stack) -> None:
    """Issue #16, item 10: a process reading a clean circuit locally hears at once (Redis pub/sub) when
    another process trips, opens or retires it, instead of sending to it for up to `local_seconds`."""

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=30, local_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=30, local_seconds=30)
        for model in (MODEL, "whisper-1", "gpt-4o-transcribe"):
            assert await a.allow(model)
        await _subscribed(a)
        await b.trip(MODEL)  # another worker's insufficient_quota
        await b.record_failure("whisper-1")  # another worker's failure opens it (threshold 1)
        await b.retire("gpt-4o-transcribe")
        await asyncio.sleep(0.1)
        assert not await a.allow(MODEL)
        assert not await a.allow("whisper-1")
        assert not await a.allow("gpt-4o-transcribe")
        await a.aclose()
        await b.aclose()

    _run(stack, body)


async def _subscribed(breaker: CircuitBreaker) -> None:
    """Wait until the breaker follows the fleet's circuit events (its local reading needs them)."""
    for _ in range(100):
        if breaker.listening:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the breaker never subscribed to circuit events")


def test_a_failure_in_the_process_ends_its_local_reading_at_once(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=2, open_seconds=30, local_seconds=30)
        assert await a.allow(MODEL)
        await a.record_failure(MODEL)
        # One failure counted: no local reading; the next success is written and resets the count.
        await a.record_success(MODEL)
        assert await r1.hget(names.KEY_CIRCUIT + MODEL, "failures") is None
        await a.record_failure(MODEL)
        await a.record_failure(MODEL)
        assert not await a.allow(MODEL)  # opened by its own failures: seen at once
        # trip and retire end it too.
        assert await a.allow("whisper-1")
        await a.trip("whisper-1", seconds=30)
        assert not await a.allow("whisper-1")
        assert await a.allow("gpt-4o-transcribe")
        await a.retire("gpt-4o-transcribe")
        assert not await a.allow("gpt-4o-transcribe")

    _run(stack, body)


def test_failures_another_process_counted_are_reset_only_by_a_written_success(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30, local_seconds=0.3)
        b = CircuitBreaker(r2, failure_threshold=3, open_seconds=30, local_seconds=0.3)
        assert await a.allow(MODEL)
        await _subscribed(a)
        assert await a.allow(MODEL)  # seen clean while subscribed
        await b.record_failure(MODEL)
        await b.record_failure(MODEL)
        await a.record_success(MODEL)  # within a's local time: not written, the two failures stand
        assert await r1.hget(names.KEY_CIRCUIT + MODEL, "failures") == b"2"
        await asyncio.sleep(0.35)
        assert await a.allow(MODEL)  # asks Redis: closed, but failures counted -> no local reading
        await a.record_success(MODEL)  # written: consecutive failures reset for everyone
        assert await r1.hget(names.KEY_CIRCUIT + MODEL, "failures") is None
        await b.record_failure(MODEL)
        await b.record_failure(MODEL)
        assert await b.state(MODEL) == "closed"

    _run(stack, body)


def test_half_open_still_lets_exactly_one_probe_with_local_reading(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=1, open_seconds=1.0, local_seconds=0.5)
        b = CircuitBreaker(r2, failure_threshold=1, open_seconds=1.0, local_seconds=0.5)
        assert await a.allow(MODEL) and await b.allow(MODEL)  # both read it clean
        await a.record_failure(MODEL)
        await asyncio.sleep(1.1)  # past open_seconds and both local times
        tickets = await asyncio.gather(*[(a if i % 2 else b).admit(MODEL) for i in range(20)])
        assert sum(t is not None for t in tickets) == 1
        # The probe's success (written: no process reads a half-open circuit locally) closes it.
        index = next(i for i, t in enumerate(tickets) if t is not None)
        prober = a if index % 2 else b
        await prober.record_success(MODEL, tickets[index].probe)  # type: ignore[union-attr]
        assert await a.state(MODEL) == "closed"
        assert all(
            await asyncio.gather(*[a.allow(MODEL) for _ in range(5)], *[b.allow(MODEL) for _ in range(5)])
        )

    _run(stack, body)


def test_the_worker_runtime_shares_one_breaker_per_process(stack: Stack) -> None:
    from worker.runtime import get_runtime

    rt = get_runtime()
    assert rt.circuit() is rt.circuit()
    assert rt.circuit().local_seconds == rt.settings.circuit_local_seconds == 1.0
    # The Redis pool's connections share one driver description (not a package-metadata lookup each).
    pool = rt.redis.connection_pool
    assert pool.make_connection().driver_info is pool.make_connection().driver_info


# ---- rate limiter ----


async def _hammer(limiters: list[RateLimiter], model: str, seconds: float, cost: float = 0.0) -> int:
    """Acquire as fast as the limiters allow, from 8 tasks per limiter, for `seconds`; return grants."""
    granted = 0
    deadline = time.monotonic() + seconds

    async def worker(limiter: RateLimiter) -> None:
        nonlocal granted
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(limiter.acquire(model, cost), timeout=remaining)
            except TimeoutError:
                return
            if time.monotonic() <= deadline:
                granted += 1

    await asyncio.gather(*[worker(limiter) for limiter in limiters for _ in range(8)])
    return granted


def test_rate_limiter_holds_requests_per_minute(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> int:
        limiter = RateLimiter(r1, rpm=600, audio_seconds_per_minute=0)  # 10/s, burst of 10
        return await _hammer([limiter], MODEL, 2.0)

    granted = _run(stack, body)
    expected = 10 + 10 * 2.0  # the burst, then the refill rate
    assert expected * 0.85 <= granted <= expected + 2, granted


def test_two_limiters_share_one_bucket(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> int:
        first = RateLimiter(r1, rpm=600, audio_seconds_per_minute=0)
        second = RateLimiter(r2, rpm=600, audio_seconds_per_minute=0)
        return await _hammer([first, second], "whisper-1", 2.0)

    granted = _run(stack, body)
    expected = 10 + 10 * 2.0  # the same as one limiter: the bucket is in Redis, not in the process
    assert expected * 0.85 <= granted <= expected + 2, granted


def test_audio_seconds_per_minute_and_debt_for_long_chunks(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[int, float, float]:
        limiter = RateLimiter(r1, rpm=0, audio_seconds_per_minute=600)  # 10 audio-s/s, burst 10
        granted = await _hammer([limiter], "gpt-4o-transcribe", 1.5, cost=2.0)
        slow = RateLimiter(r2, rpm=0, audio_seconds_per_minute=120)  # 2 audio-s/s, bucket of 2
        first = await slow.acquire("m-long", 4.0)  # bigger than the bucket: goes at once, leaves debt
        second = await slow.acquire("m-long", 1.0)  # waits for the debt and its own second: 3 / 2 s
        return granted, first, second

    granted, first, second = _run(stack, body)
    expected = (10 + 10 * 1.5) / 2.0  # audio-seconds allowed / 2 s per call
    assert expected * 0.8 <= granted <= expected + 1, granted
    assert first == 0.0
    assert 1.3 <= second <= 2.5, second


def test_unlimited_and_penalize_pauses_the_fleet(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> dict[str, Any]:
        a = RateLimiter(r1, rpm=0, audio_seconds_per_minute=0)
        b = RateLimiter(r2, rpm=0, audio_seconds_per_minute=0)
        started = time.monotonic()
        waits = await asyncio.gather(*[a.acquire(MODEL, 60.0) for _ in range(50)])
        unlimited = time.monotonic() - started
        await a.penalize(MODEL, 0.6)  # a 429 with Retry-After seen by one worker
        await a.penalize(MODEL, 0.1)  # a shorter one never shortens the pause
        remaining = await b.pause_remaining(MODEL)
        before = REGISTRY.get_sample_value("voxq_rate_limiter_waits_total", {"model": MODEL}) or 0.0
        paused = await b.acquire(MODEL, 1.0)
        after = REGISTRY.get_sample_value("voxq_rate_limiter_waits_total", {"model": MODEL}) or 0.0
        other = await b.acquire("whisper-1", 1.0)
        return {
            "waits": waits,
            "unlimited": unlimited,
            "remaining": remaining,
            "paused": paused,
            "other": other,
            "metric": after - before,
        }

    out = _run(stack, body)
    assert max(out["waits"]) == 0.0
    assert out["unlimited"] < 2.0
    assert 0.45 <= out["remaining"] <= 0.6
    assert 0.45 <= out["paused"] <= 1.5
    assert out["other"] == 0.0
    assert out["metric"] == 1.0


# ---- issue #17: a provider's account has a circuit of its own; in-flight caps per provider ----

A, B = provider_key("acme"), provider_key("bravo")
A_MINI, A_FULL, B_TURBO = (
    "acme:gpt-4o-mini-transcribe",
    "acme:gpt-4o-transcribe",
    "bravo:whisper-large-v3-turbo",
)


def test_an_open_provider_circuit_refuses_every_model_of_it_and_no_other(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=3, open_seconds=30)
        # insufficient_quota on one model of acme: the account's circuit opens (worker.policy Note.ACCOUNT).
        assert await a.settle(A, A_MINI, Note.ACCOUNT, Ticket()) is False
        assert await b.peek_call(A, A_FULL) == ("open", A)  # another model of acme, another worker
        assert await b.admit_call(A, A_FULL) is None
        assert await b.state_call(A, A_MINI) == ("open", A)
        assert await b.admit_call(B, B_TURBO) is not None  # another provider is called
        # The model's own circuit was not touched: it is the account that cannot serve.
        assert await b.state(A_MINI) == "closed"
        assert REGISTRY.get_sample_value("voxq_provider_circuit_open", {"provider": "acme"}) == 1

    _run(stack, body)


def test_model_not_found_closes_only_that_model(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30)
        await a.settle(A, A_MINI, Note.RETIRE, Ticket())
        assert await a.peek_call(A, A_MINI) == ("retired", A_MINI)
        assert await a.admit_call(A, A_MINI) is None
        assert await a.admit_call(A, A_FULL) is not None  # the same account's other model: called
        assert await a.state(A) == "closed"
        # Repeated retryable failures open the model's circuit, not the account's.
        for _ in range(3):
            await a.settle(A, A_FULL, Note.FAILURE, Ticket())
        assert await a.peek_call(A, A_FULL) == ("open", A_FULL)
        assert await a.state(A) == "closed"

    _run(stack, body)


def test_a_half_open_provider_lets_one_probe_for_the_whole_account(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=0.5, probe_timeout_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=3, open_seconds=0.5, probe_timeout_seconds=30)
        await a.settle(A, A_MINI, Note.AUTH, Ticket())  # a refused key
        await asyncio.sleep(0.6)
        models = [A_MINI, A_FULL]
        tickets = await asyncio.gather(*[(a, b)[i % 2].admit_call(A, models[i % 2]) for i in range(20)])
        probes = [t for t in tickets if t is not None]
        assert len(probes) == 1 and probes[0].account_probe and probes[0].probe is None
        # The probe met a 5xx: nothing said about the account; the next call is the probe.
        assert await b.settle(A, A_FULL, Note.FAILURE, probes[0]) is False
        again = await a.admit_call(A, A_MINI)
        assert again is not None and again.account_probe
        assert await b.admit_call(A, A_FULL) is None
        # The probe is refused for the account again: open again, at once.
        assert await a.settle(A, A_MINI, Note.ACCOUNT, again) is False
        assert await b.state(A) == "open"
        await asyncio.sleep(0.6)
        third = await b.admit_call(A, A_FULL)
        assert third is not None and third.account_probe
        assert await b.settle(A, A_FULL, Note.SUCCESS, third) is True  # answered: the account serves
        assert await a.state(A) == "closed"
        assert all(await asyncio.gather(*[a.admit_call(A, m) for m in models for _ in range(3)]))

    _run(stack, body)


def test_a_provider_opened_elsewhere_ends_the_local_reading_at_once(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> None:
        a = CircuitBreaker(r1, failure_threshold=3, open_seconds=30, local_seconds=30)
        b = CircuitBreaker(r2, failure_threshold=3, open_seconds=30, local_seconds=30)
        assert await a.admit_call(A, A_MINI) is not None  # read clean: no Redis for 30 s
        await _subscribed(a)
        assert await a.admit_call(A, A_MINI) is not None
        await b.settle(A, A_FULL, Note.ACCOUNT, Ticket())  # another process's quota answer
        await asyncio.sleep(0.1)
        assert await a.admit_call(A, A_MINI) is None
        assert await a.admit_call(B, B_TURBO) is not None
        await a.aclose()
        await b.aclose()

    _run(stack, body)


def test_provider_rate_limits_are_shared_by_its_models(stack: Stack) -> None:
    """The providers file's limits.rpm holds for all the provider's models together; the per-model env
    limit (0 here) and other providers are apart."""

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[int, float]:
        limits = {"acme": (600, 0.0)}  # 10/s, burst of 10, for acme's models together
        first = RateLimiter(r1, rpm=0, audio_seconds_per_minute=0, provider_limits=limits)
        second = RateLimiter(r2, rpm=0, audio_seconds_per_minute=0, provider_limits=limits)
        granted = 0
        deadline = time.monotonic() + 2.0

        async def worker(limiter: RateLimiter, model: str) -> None:
            nonlocal granted
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(limiter.acquire(model, 1.0, "acme"), timeout=remaining)
                except TimeoutError:
                    return
                granted += time.monotonic() <= deadline

        await asyncio.gather(*[worker(lim, m) for lim in (first, second) for m in (A_MINI, A_FULL)])
        other = await first.acquire(B_TURBO, 1.0, "bravo")  # another provider: no wait
        return granted, other

    granted, other = _run(stack, body)
    expected = 10 + 10 * 2.0  # one bucket for the provider, however many models and processes
    assert expected * 0.85 <= granted <= expected + 2, granted
    assert other == 0.0


def test_the_in_flight_cap_holds_across_processes_and_a_dead_holders_lease_ends(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[int, int, int, bool, bool]:
        first = InFlightCaps(r1, caps={"acme": 2}, lease_seconds=30)
        second = InFlightCaps(r2, caps={"acme": 2}, lease_seconds=30)
        now = peak = calls = 0

        async def call(caps: InFlightCaps) -> None:
            nonlocal now, peak, calls
            holder = await caps.acquire("acme", until=time.monotonic() + 30)
            assert holder is not None
            try:
                now += 1
                peak = max(peak, now)
                await asyncio.sleep(0.05)
                now -= 1
                calls += 1
            finally:
                await caps.release("acme", holder)

        await asyncio.gather(*[call((first, second)[i % 2]) for i in range(20)])
        held_after = await held_slots(r1, "acme")
        # A worker killed mid-call (SIGKILL): its slots are never given back, and end with their lease.
        dying = InFlightCaps(r1, caps={"acme": 2}, lease_seconds=0.5)
        assert await dying.try_acquire("acme") and await dying.try_acquire("acme")
        blocked = await second.try_acquire("acme") is None
        await asyncio.sleep(0.6)
        reclaimed = await second.try_acquire("acme") is not None
        return peak, calls, held_after, blocked, reclaimed

    peak, calls, held_after, blocked, reclaimed = _run(stack, body)
    assert (peak, calls, held_after) == (2, 20, 0)
    assert blocked and reclaimed


def test_a_wait_for_a_slot_ends_at_its_deadline(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[str | None, float]:
        caps = InFlightCaps(r1, caps={"acme": 1}, lease_seconds=30)
        assert await caps.try_acquire("acme")
        started = time.monotonic()
        late = await caps.acquire("acme", until=started + 0.3)
        return late, time.monotonic() - started

    late, waited = _run(stack, body)
    assert late is None and 0.3 <= waited < 1.0


def test_a_wait_for_a_slot_ends_when_the_job_is_halted(stack: Stack) -> None:
    from worker.pieces import Piece

    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[str | None, float]:
        caps = InFlightCaps(r1, caps={"acme": 1}, lease_seconds=30)
        assert await caps.try_acquire("acme")
        halt = asyncio.Event()
        piece = Piece(None, None, None, "k", 0.0, 1.0, halt)  # type: ignore[arg-type]  # only its halt
        asyncio.get_running_loop().call_later(0.2, halt.set)  # a sibling chunk ended the job
        started = time.monotonic()
        got = await caps.acquire("acme", until=started + 30, piece=piece)
        return got, time.monotonic() - started

    got, waited = _run(stack, body)
    assert got is None and 0.2 <= waited < 1.0


def test_a_lease_is_renewed_before_the_send_unless_it_already_ended(stack: Stack) -> None:
    async def body(r1: aioredis.Redis, r2: aioredis.Redis) -> tuple[bool, int, bool, bool, bool]:
        caps = InFlightCaps(r1, caps={"acme": 1}, lease_seconds=0.3)
        holder = await caps.try_acquire("acme")
        assert holder is not None
        await asyncio.sleep(0.2)
        renewed = await caps.renew("acme", holder)  # before its end: another 0.3 s from now
        await asyncio.sleep(0.2)
        held = await held_slots(r1, "acme")  # 0.4 s after the take: still held thanks to the renewal
        await asyncio.sleep(0.2)
        free = await caps.renew("acme", holder)  # ended, but nobody took the slot: taken again
        await asyncio.sleep(0.4)
        other = await InFlightCaps(r2, caps={"acme": 1}, lease_seconds=30).try_acquire("acme")
        taken = await caps.renew("acme", holder)  # ended and another call took it: not renewed
        return renewed, held, free, other is not None, taken

    renewed, held, free, other, taken = _run(stack, body)
    assert renewed and held == 1 and free and other and not taken
