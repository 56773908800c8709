"""A circuit breaker per model, kept in Redis so every worker of the fleet sees the same state.

    closed ──(failure_threshold consecutive failures, or trip())──▶ open
    open ──(open_seconds pass)──▶ half_open: exactly one probe call is let through (SET NX)
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open again
    retire() (model_not_found) ──▶ retired, for good (only an operator deleting the key undoes it)

Every transition is one Lua script, so concurrent workers cannot interleave a read and a write, and
time comes from the Redis server (`TIME`), so hosts with skewed clocks agree on when a circuit reopens.
A success or failure reported while the circuit is open (a call that started before it opened) changes
nothing: only calls the breaker let through decide when it closes.

Local reading of a clean circuit (`local_seconds` > 0, `VOXQ_CIRCUIT_LOCAL_SECONDS`, 1 s by default in
workers): at hundreds of calls in flight, two Lua round trips per call (allow, then record the success)
were the worker's busiest Redis traffic although the circuit was closed nearly always. When a process
has seen the circuit closed with no failure counted — by `allow` or by its own success resetting it —
it lets calls through and skips writing successes without asking Redis, for `local_seconds`. Anything
else goes to Redis as before: open, half-open (the probe is still one SET NX for the whole fleet),
retired, or failures counted. A failure, trip or retirement in this process ends the local reading at
once (its next call asks Redis). What changes, for at most `local_seconds`: a circuit opened by another
process is seen that much later (calls already let through meanwhile are counted as usual), and a
success in this process does not reset failures another process counted meanwhile.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from core import metrics, names
from core.statuses import CircuitState

CLOSED = CircuitState.CLOSED.value
OPEN = CircuitState.OPEN.value
HALF_OPEN = CircuitState.HALF_OPEN.value
RETIRED = CircuitState.RETIRED.value

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: circuit hash, probe key, retired key. ARGV: probe ttl ms.
# -> state, allowed (1/0), failures counted (while closed)
_ALLOW = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'retired', 0} end
local fields = redis.call('HMGET', KEYS[1], 'open_until', 'failures')
local open_until = tonumber(fields[1] or '0')
if open_until == 0 then return {'closed', 1, tonumber(fields[2] or '0')} end
if now < open_until then return {'open', 0} end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {'half_open', 1} end
return {'half_open', 0}
"""
)

# KEYS: circuit hash, probe key, retired key. ARGV: threshold, open ms, failure window ms. -> state
_FAILURE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local open_ms = tonumber(ARGV[2])
if open_until > 0 then
  if now < open_until then return 'open' end
  redis.call('HSET', KEYS[1], 'open_until', now + open_ms, 'failures', 0)
  redis.call('PEXPIRE', KEYS[1], open_ms + 86400000)
  redis.call('DEL', KEYS[2])
  return 'open'
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', now + open_ms, 'failures', 0)
  redis.call('PEXPIRE', KEYS[1], open_ms + 86400000)
  redis.call('DEL', KEYS[2])
  return 'open'
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'closed'
"""
)

# KEYS: circuit hash, probe key, retired key. -> state
_SUCCESS = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > 0 and now < open_until then return 'open' end
redis.call('DEL', KEYS[1], KEYS[2])
return 'closed'
"""
)

# KEYS: circuit hash, probe key, retired key. ARGV: open ms. -> state
_TRIP = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local target = now + tonumber(ARGV[1])
if target > open_until then
  redis.call('HSET', KEYS[1], 'open_until', target, 'failures', 0)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 86400000)
end
redis.call('DEL', KEYS[2])
return 'open'
"""
)

# KEYS: circuit hash, probe key, retired key. -> state
_STATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return 'closed' end
if now < open_until then return 'open' end
return 'half_open'
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CircuitBreaker:
    """Per-model circuit breaker shared by all workers through Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        failure_threshold: int,
        open_seconds: float,
        failure_window_seconds: float = 60.0,
        probe_timeout_seconds: float | None = None,
        local_seconds: float = 0.0,
    ) -> None:
        self._redis = redis
        self.failure_threshold = max(int(failure_threshold), 1)
        self.open_seconds = max(float(open_seconds), 0.001)
        # Failures further apart than this do not add up (the count expires).
        self.failure_window_seconds = failure_window_seconds
        # If the probe's worker dies without reporting, another probe may go after this long.
        self.probe_timeout_seconds = probe_timeout_seconds or max(self.open_seconds, 1.0)
        # How long this process trusts having seen a model's circuit closed with no failure counted.
        self.local_seconds = max(float(local_seconds), 0.0)
        self._clean_until: dict[str, float] = {}  # model -> time.monotonic() deadline
        self._generation: dict[str, int] = {}  # bumped by each failure/trip/retire in this process
        self._allow = redis.register_script(_ALLOW)
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._trip = redis.register_script(_TRIP)
        self._state = redis.register_script(_STATE)

    @staticmethod
    def _keys(model: str) -> list[str]:
        return [
            names.KEY_CIRCUIT + model,
            names.KEY_CIRCUIT + model + ":probe",
            names.KEY_MODEL_RETIRED + model,
        ]

    @staticmethod
    def _publish(model: str, state: str) -> str:
        metrics.CIRCUIT_STATE.labels(model=model).set(0 if state == CLOSED else 1)
        return state

    def _is_clean(self, model: str) -> bool:
        """Seen closed with no failure counted less than `local_seconds` ago (see the module docstring)."""
        until = self._clean_until.get(model)
        return until is not None and time.monotonic() < until

    def _seen_clean(self, model: str, generation: int) -> None:
        # Not when a failure of this process came in while Redis was being read: it is counted now.
        if self.local_seconds and self._generation.get(model, 0) == generation:
            self._clean_until[model] = time.monotonic() + self.local_seconds

    def _dirty(self, model: str) -> None:
        self._clean_until.pop(model, None)
        self._generation[model] = self._generation.get(model, 0) + 1

    async def allow(self, model: str) -> bool:
        """True when a call to `model` may go now (closed, or the single half-open probe)."""
        if self._is_clean(model):
            return True
        generation = self._generation.get(model, 0)
        answer = await self._allow(keys=self._keys(model), args=[int(self.probe_timeout_seconds * 1000)])
        state = _text(answer[0])
        self._publish(model, state)
        if state == CLOSED and int(answer[2]) == 0:
            self._seen_clean(model, generation)
        return bool(int(answer[1]))

    async def record_success(self, model: str) -> None:
        """A call the breaker let through succeeded: close the circuit (a half-open probe closes it) and
        reset its failure count. Skipped while this process has seen it clean (nothing to reset)."""
        if self._is_clean(model):
            return
        generation = self._generation.get(model, 0)
        state = self._publish(model, _text(await self._success(keys=self._keys(model))))
        if state == CLOSED:
            self._seen_clean(model, generation)

    async def record_failure(self, model: str) -> None:
        """A retryable failure: count it; open at the threshold; a failed probe reopens at once."""
        self._dirty(model)
        state = await self._failure(
            keys=self._keys(model),
            args=[
                self.failure_threshold,
                int(self.open_seconds * 1000),
                int(self.failure_window_seconds * 1000),
            ],
        )
        self._publish(model, _text(state))

    async def trip(self, model: str, seconds: float | None = None) -> None:
        """Open now (quota exhausted, auth refused) for `seconds` (default open_seconds)."""
        duration = self.open_seconds if seconds is None else max(float(seconds), 0.001)
        self._dirty(model)
        self._publish(model, _text(await self._trip(keys=self._keys(model), args=[int(duration * 1000)])))

    async def retire(self, model: str) -> None:
        """The provider says the model is gone: open for good, for every worker."""
        self._dirty(model)
        await self._redis.set(names.KEY_MODEL_RETIRED + model, "1")
        self._publish(model, RETIRED)

    async def state(self, model: str) -> str:
        """closed, open, half_open or retired."""
        return self._publish(model, _text(await self._state(keys=self._keys(model))))
