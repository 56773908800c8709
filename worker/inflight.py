"""A provider's in-flight cap, shared by the fleet: at most `limits.max_in_flight` calls to it at once.

`VOXQ_MAX_IN_FLIGHT` bounds one process; a provider's cap (the providers file's `limits.max_in_flight`,
0: none) bounds every process together — a self-hosted server with one GPU, or an account's concurrency
limit. It is a counting semaphore in Redis with leases: a sorted set per provider (`names.KEY_INFLIGHT`
+ provider) of holder ids scored by when their lease ends (Redis server time). Taking a slot is one Lua
script: drop the expired leases, then add the holder if fewer than the cap remain. Giving it back removes
the holder. A worker killed mid-call (SIGKILL, OOM) cannot give its slots back; its leases end after
`lease_seconds` (the provider timeout plus a margin: no call of a live worker takes longer) and the next
taker reclaims them, so a dead holder never leaks a slot for good.

A call takes its provider's slot first, then its process's semaphore (`call_slot`), and renews the lease
once it holds both (the semaphore may have kept it waiting); both are given back when the call ends. A
call waiting for a slot stops when its job is halted or when a call started after the wait could not end
before the task's deadline: `Slot.held` is False then, and the chain gives up the call (worker.chain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from core import metrics, names
from core.errors import ModelUnavailable
from core.statuses import JobStatus
from worker.circuit import LUA_NOW_MS
from worker.outcomes import JobEnded

if TYPE_CHECKING:
    from worker.pieces import Piece
    from worker.runtime import Runtime

log = logging.getLogger(__name__)

# Waiters look again at least this often (a slot given back is noticed within a step).
WAIT_STEP_SECONDS = 0.05
MAX_WAIT_STEP_SECONDS = 0.25

# KEYS: the provider's holders. ARGV: cap, lease ms, holder id. -> {1 taken / 0 full, holders now}
_ACQUIRE = (
    LUA_NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return {0, held} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 60000)
return {1, held + 1}
"""
)

# KEYS: the provider's holders. ARGV: cap, lease ms, holder id. -> 1 when the holder has its slot for
# another lease: still held, or ended but free (nobody took it meanwhile); 0 when the cap is full without it.
_RENEW = (
    LUA_NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) + 60000)
return 1
"""
)

# KEYS: the provider's holders. ARGV: holder id. -> holders now
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""


class InFlightCaps:
    """Fleet-wide in-flight caps per provider (`caps`: provider -> max calls at once; absent or 0: none)."""

    def __init__(self, redis: aioredis.Redis, *, caps: dict[str, int], lease_seconds: float) -> None:
        self._redis = redis
        self.caps = {name: int(cap) for name, cap in caps.items() if int(cap) > 0}
        self.lease_seconds = max(float(lease_seconds), 0.01)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def cap(self, provider: str) -> int:
        """The provider's cap, 0 when it has none."""
        return self.caps.get(provider, 0)

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    async def try_acquire(self, provider: str) -> str | None:
        """A holder id when a slot of `provider` was free (and is now taken), else None."""
        holder = uuid.uuid4().hex
        taken, held = await self._acquire(
            keys=[names.KEY_INFLIGHT + provider], args=[self.cap(provider), self._lease_ms, holder]
        )
        metrics.PROVIDER_IN_FLIGHT.labels(provider=provider).set(int(held))
        return holder if int(taken) else None

    async def acquire(self, provider: str, *, until: float, piece: Piece | None = None) -> str | None:
        """Wait for a slot of `provider`: its holder id, or None when `piece` was halted or `until`
        (time.monotonic()) passed first."""
        step = WAIT_STEP_SECONDS
        while True:
            holder = await self.try_acquire(provider)
            if holder is not None:
                return holder
            if (piece is not None and piece.halted) or time.monotonic() >= until:
                return None
            pause = min(step, max(until - time.monotonic(), 0.0)) + random.uniform(0.0, 0.01)
            if piece is not None:
                await piece.pause(pause)
            else:
                await asyncio.sleep(pause)
            step = min(step * 2, MAX_WAIT_STEP_SECONDS)

    async def renew(self, provider: str, holder: str) -> bool:
        """Start the lease again (the call is about to be sent); False when it had ended and another call
        took the slot meanwhile."""
        args: list[int | str] = [self.cap(provider), self._lease_ms, holder]
        return bool(await self._renew(keys=[names.KEY_INFLIGHT + provider], args=args))

    async def release(self, provider: str, holder: str) -> None:
        """Give the slot back."""
        held = await self._release(keys=[names.KEY_INFLIGHT + provider], args=[holder])
        metrics.PROVIDER_IN_FLIGHT.labels(provider=provider).set(int(held))


@dataclass
class Slot:
    """What `call_slot` got: `held` is False when the wait for the provider's slot ended without one
    (the job halted, or too late for a call); `late()` is how the job ends then, unless halted."""

    provider: str
    cap: int
    held: bool = True

    def late(self) -> JobEnded:
        """The job's end when the provider's slots stayed taken until the task's deadline."""
        return JobEnded(
            JobStatus.FAILED,
            ModelUnavailable.code,
            f"provider {self.provider}'s {self.cap} in-flight slots stayed taken until the task's deadline",
        )


@contextlib.asynccontextmanager
async def call_slot(rt: Runtime, piece: Piece, provider: str, deadline: float) -> AsyncIterator[Slot]:
    """The provider's fleet-wide slot (when it has a cap), then the process's `VOXQ_MAX_IN_FLIGHT`
    semaphore; both given back on the way out. Yields `Slot(held=False)` without waiting for the
    semaphore when the provider's slot was not had (see `Slot`)."""
    caps = rt.inflight()
    cap = caps.cap(provider)
    holder: str | None = None
    if cap:
        # A call that starts later than this could not end before the deadline.
        until = deadline - rt.settings.provider_timeout_seconds
        holder = await caps.acquire(provider, until=until, piece=piece)
        if holder is None:
            yield Slot(provider, cap, held=False)
            return
    try:
        async with rt.semaphore:
            if holder is not None and not await caps.renew(provider, holder):
                # Its lease ended while the process's semaphore kept it waiting (longer than a provider
                # call) and another call took the slot. Sent all the same (rare), and said so.
                log.warning("in-flight lease of %s ended before the send: the cap is passed by one", provider)
            yield Slot(provider, cap)
    finally:
        if holder is not None:
            await _released(caps, provider, holder)


async def _released(caps: InFlightCaps, provider: str, holder: str) -> None:
    # Shielded: a call cancelled (a task's time limit) still gives its slot back; a Redis blip leaves it
    # to the lease's end.
    try:
        await asyncio.shield(caps.release(provider, holder))
    except Exception as exc:  # the lease ends on its own
        log.warning("in-flight slot not given back (%s): free again when its lease ends", type(exc).__name__)
