"""Token-bucket rate limiters in Redis, shared by every worker: requests/min and audio-s/min, per model
and per provider.

Two levels, both optional, and a call takes from every bucket that applies (one Lua script: all or none):
- per model (its chain entry): `VOXQ_MODEL_RPM_LIMIT` and `VOXQ_MODEL_AUDIO_SECONDS_PER_MINUTE`, the same
  limits for every model, as before providers existed (env-only setups keep them);
- per provider (issue #17): the providers file's `limits.rpm` and `limits.audio_seconds_per_hour` of that
  provider (`provider_limits`), shared by all of its models — an account's limits, whichever model is
  called. With both set, a call waits for the tighter.

Each model has two buckets (requests, audio seconds) that refill continuously at rate/60 per second and
hold at most `burst_seconds` worth of tokens, so a fleet starting cold cannot fire a minute's quota in
one instant (providers enforce per-minute limits over shorter windows). One Lua script refills both,
checks both, and takes from both only when both allow, so concurrent workers never overdraw. A call
needing more audio-seconds than a full bucket holds goes when the bucket is full and leaves it in debt,
so long chunks are never starved and the average rate still holds.

`penalize(model, retry_after)` pauses the model — not its provider — for the whole fleet (a 429
`rate_limit_exceeded` at OpenAI is a limit of one model for the organisation; quota is not a rate limit,
it opens the provider's circuit): after one 429 (its Retry-After, its
`x-ratelimit-reset-*`, else the retry's backoff), no worker sends to that model until the pause ends.
The chain calls `acquire` before every call, limits configured or not, so the pause always holds; and
a call of the process that saw the 429 checks again right before its send (`paused_here`). Time comes
from the Redis server (`TIME`). A rate of 0 means unlimited.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import redis.asyncio as aioredis

from core import metrics, names

# Waiters re-check at least this often, so a pause or a refill is noticed promptly.
MAX_SLEEP_STEP = 0.25

# KEYS: request bucket, audio bucket, pause key (the model's), request bucket, audio bucket (the provider's).
# ARGV: rpm, audio seconds per minute, audio seconds needed, burst seconds, provider rpm, provider audio
# seconds per minute.
# -> "0" when granted (tokens taken), else milliseconds to wait, as a string (Lua numbers become ints).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
if pause > now then return tostring(pause - now) end
local burst = tonumber(ARGV[4])
local function look(key, per_minute, need)
  if per_minute <= 0 then return nil end
  local capacity = per_minute * burst / 60
  if capacity < 1 then capacity = 1 end
  local data = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(data[1]) or capacity
  local ts = tonumber(data[2]) or now
  if now > ts then tokens = tokens + (now - ts) * per_minute / 60000 end
  if tokens > capacity then tokens = capacity end
  local want = need
  if want > capacity then want = capacity end
  local wait = 0
  if tokens < want then wait = (want - tokens) * 60000 / per_minute end
  return {tokens = tokens, wait = wait, capacity = capacity}
end
local rpm = tonumber(ARGV[1])
local aspm = tonumber(ARGV[2])
local need_audio = tonumber(ARGV[3])
local prpm = tonumber(ARGV[5])
local paspm = tonumber(ARGV[6])
local buckets = {
  {KEYS[1], rpm, 1, look(KEYS[1], rpm, 1)},
  {KEYS[2], aspm, need_audio, look(KEYS[2], aspm, need_audio)},
  {KEYS[4], prpm, 1, look(KEYS[4], prpm, 1)},
  {KEYS[5], paspm, need_audio, look(KEYS[5], paspm, need_audio)},
}
local wait = 0
for _, b in ipairs(buckets) do
  if b[4] and b[4].wait > wait then wait = b[4].wait end
end
if wait > 0 then return tostring(wait) end
for _, b in ipairs(buckets) do
  local got = b[4]
  if got then
    redis.call('HSET', b[1], 'tokens', tostring(got.tokens - b[3]), 'ts', tostring(now))
    local refill_ms = math.ceil((got.capacity - got.tokens + b[3]) * 60000 / b[2])
    redis.call('PEXPIRE', b[1], refill_ms + 120000)
  end
end
return '0'
"""

# KEYS: pause key. ARGV: pause ms. Extends (never shortens) the model's fleet-wide pause.
_PENALIZE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local target = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > current then
  redis.call('SET', KEYS[1], tostring(target), 'PX', math.ceil(tonumber(ARGV[1])) + 1000)
end
return tostring(target - now)
"""


def _float(value: Any) -> float:
    return float(value.decode() if isinstance(value, bytes) else value)


class RateLimiter:
    """Fleet-wide limits on requests/min and audio-seconds/min (0 = unlimited): `rpm` and
    `audio_seconds_per_minute` for each model, `provider_limits` (provider -> (rpm, audio seconds per
    minute)) for all the models of a provider together."""

    def __init__(
        self,
        redis_async: aioredis.Redis,
        *,
        rpm: int,
        audio_seconds_per_minute: float,
        burst_seconds: float = 1.0,
        provider_limits: dict[str, tuple[int, float]] | None = None,
    ) -> None:
        self._redis = redis_async
        self.rpm = max(int(rpm), 0)
        self.audio_seconds_per_minute = max(float(audio_seconds_per_minute), 0.0)
        self.provider_limits = {
            name: (max(int(r), 0), max(float(a), 0.0)) for name, (r, a) in (provider_limits or {}).items()
        }
        self.burst_seconds = max(float(burst_seconds), 0.001)
        # model -> loop time until which this process's own penalize() pauses it: set before the Redis
        # write, and checked again right before a send (`paused_here`), so calls of this process that
        # passed `acquire` and then waited for a slot do not go out during the pause.
        self._paused_until: dict[str, float] = {}
        self._acquire = redis_async.register_script(_ACQUIRE)
        self._penalize = redis_async.register_script(_PENALIZE)

    @staticmethod
    def _keys(model: str) -> list[str]:
        prefix = names.KEY_RATE + model + ":"
        return [prefix + "requests", prefix + "audio_seconds", prefix + "pause"]

    @staticmethod
    def _provider_keys(provider: str | None) -> list[str]:
        # Not a model's key: a model's is its chain entry, and no entry starts with "provider/".
        prefix = names.KEY_RATE + "provider/" + (provider or "") + ":"
        return [prefix + "requests", prefix + "audio_seconds"]

    async def try_acquire(self, model: str, audio_seconds: float, provider: str | None = None) -> float:
        """Take the tokens now and return 0, or take nothing and return the seconds to wait first."""
        prpm, paspm = self.provider_limits.get(provider or "", (0, 0.0))
        wait_ms = await self._acquire(
            keys=self._keys(model) + self._provider_keys(provider),
            args=[
                self.rpm,
                repr(self.audio_seconds_per_minute),
                repr(max(float(audio_seconds), 0.0)),
                repr(self.burst_seconds),
                prpm,
                repr(paspm),
            ],
        )
        return _float(wait_ms) / 1000.0

    async def acquire(self, model: str, audio_seconds: float, provider: str | None = None) -> float:
        """Wait until every bucket of the call (the model's, its provider's) and any fleet-wide pause of
        the model allow it; return the seconds waited."""
        loop = asyncio.get_running_loop()
        started: float | None = None
        while True:
            wait = await self.try_acquire(model, audio_seconds, provider)
            if wait <= 0:
                break
            if started is None:
                started = loop.time()
            # Small steps with a little jitter: waiters re-check often and do not all wake together.
            await asyncio.sleep(min(wait, MAX_SLEEP_STEP) + random.uniform(0.0, 0.01))
        if started is None:
            return 0.0
        waited = loop.time() - started
        metrics.RATE_LIMIT_WAITS.labels(model=model).inc()
        metrics.RATE_LIMIT_WAIT_SECONDS.labels(model=model).inc(waited)
        return waited

    async def penalize(self, model: str, retry_after: float) -> None:
        """Pause every worker's calls to `model` for `retry_after` seconds (a 429's Retry-After)."""
        if retry_after > 0:
            until = asyncio.get_running_loop().time() + float(retry_after)
            self._paused_until[model] = max(self._paused_until.get(model, 0.0), until)
            await self._penalize(keys=[self._keys(model)[2]], args=[repr(float(retry_after) * 1000.0)])

    def paused_here(self, model: str) -> float:
        """Seconds left on a pause this process set on `model` (its own penalize), 0 when none; no Redis."""
        until = self._paused_until.get(model)
        return max(until - asyncio.get_running_loop().time(), 0.0) if until is not None else 0.0

    async def sleep_in_pause(self, model: str) -> None:
        """Sleep a step (at most MAX_SLEEP_STEP) of a pause this process set on `model`, if one runs."""
        await asyncio.sleep(min(self.paused_here(model), MAX_SLEEP_STEP))

    async def pause_remaining(self, model: str) -> float:
        """Seconds left on the model's fleet-wide pause (0 when none)."""
        raw = await self._redis.get(self._keys(model)[2])
        if raw is None:
            return 0.0
        now_s, now_us = await self._redis.time()
        return max(_float(raw) / 1000.0 - (now_s + now_us / 1_000_000), 0.0)
