"""Circuit breakers per model and per provider account, kept in Redis so every worker of the fleet sees
the same state.

Two levels (issue #17). A provider's account — its key, its quota, its billing — has a circuit of its own
(`provider_key`, "provider:<name>"): quota, billing and auth refusals open it (worker.policy: `Note.ACCOUNT`,
`Note.AUTH`), and while it is open no model of that provider is sent a request. A model has its circuit
under its `provider:model` key: `model_not_found` retires it, repeated retryable failures open it. A call
passes both (`peek_call`, `admit_call`: the provider's first, then the model's); when the provider's
circuit half-opens, exactly one call of the whole account is its probe (`Ticket.account_probe`), and what
that call comes back with decides (`settle`): an answer or a refusal of the model only closes the
provider's circuit, an account refusal opens it again, a 5xx or a timeout hands the probe to the next call.
The keys below are either kind: the state machine is the same.

    closed ──(failure_threshold consecutive failures, or trip())──▶ open
    open ──(open_seconds pass)──▶ half_open: exactly one probe call is let through (SET NX of a token)
    half_open ──probe succeeds──▶ closed        half_open ──probe fails──▶ open again
    retire() (model_not_found) ──▶ retired for `retired_seconds` (7 days by default), for every worker

Only the probe decides a half-open circuit: its outcome is reported with its token (`Ticket.probe`), and
a success or failure without it — a call that started before the circuit opened and ends now — changes
nothing. The probe key lives `probe_timeout_seconds`, longer than a provider call can take (the runtime
sets the provider timeout plus a margin), so a slow probe is not joined by a second one; a probe whose
worker died frees the key when it expires. A retirement expires too: a provider may bring a model back,
and an operator's mistake (a wrong base URL answering 404) must not outlive a week.

A call asks twice: `peek` before the rate limiter and the budget (an open circuit costs nothing more),
and `admit` right before the send (after waiting for a slot), so a circuit opened meanwhile — by
`insufficient_quota` on a sibling call — stops every call not yet sent, retries included.

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
once (its next call asks Redis). A circuit opened, tripped or retired by another process ends the local
reading too, at once: every such change is published on `CHANNEL_CIRCUIT_EVENTS` and each process follows
the channel on a task of its own; local reading is trusted only while that subscription stands (a lost
one means asking Redis on every call until it is back). What changes, for at most `local_seconds`: a
success in this process does not reset failures another process counted meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core import metrics, names
from core.model_access import PROVIDER_CIRCUIT_PREFIX
from core.statuses import CircuitState
from worker.entries import Target
from worker.policy import Note

log = logging.getLogger(__name__)

CLOSED = CircuitState.CLOSED.value
OPEN = CircuitState.OPEN.value
HALF_OPEN = CircuitState.HALF_OPEN.value
RETIRED = CircuitState.RETIRED.value
# The circuit key of a provider's account; a model's key is `provider:model` (a model name is never empty,
# and `provider` is not a provider the catalogue lets anyone name a model after: see `provider_key`). One
# constant with the API's metric labels, which read these keys back (core.model_access.circuit_label).
PROVIDER_KEY_PREFIX = PROVIDER_CIRCUIT_PREFIX


def provider_key(provider: str) -> str:
    """The circuit key of `provider`'s account (quota, billing, auth): open, no model of it is called."""
    return PROVIDER_KEY_PREFIX + provider


def call_keys(to: Target) -> tuple[str, str, str]:
    """A call's provider, its account's circuit key and its model's `provider:model` circuit key (the
    chain entry resolved as the call is routed: worker.entries)."""
    return to.provider, provider_key(to.provider), f"{to.provider}:{to.model}"


# Lua: `now`, Redis's clock in whole milliseconds (every process of the fleet reads the same clock).
LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: circuit hash, probe key, retired key. ARGV: probe ttl ms, probe token.
# -> state, allowed (1/0), failures counted (while closed)
_ALLOW = (
    LUA_NOW_MS
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'retired', 0} end
local fields = redis.call('HMGET', KEYS[1], 'open_until', 'failures')
local open_until = tonumber(fields[1] or '0')
if open_until == 0 then return {'closed', 1, tonumber(fields[2] or '0')} end
if now < open_until then return {'open', 0} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[1]) then return {'half_open', 1} end
return {'half_open', 0}
"""
)

# KEYS: circuit hash, probe key, retired key. ARGV: threshold, open ms, failure window ms, probe token
# ('' when the call was not the probe). -> state
_FAILURE = (
    LUA_NOW_MS
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
local open_ms = tonumber(ARGV[2])
if open_until > 0 then
  if now < open_until then return 'open' end
  if ARGV[4] == '' or redis.call('GET', KEYS[2]) ~= ARGV[4] then return 'half_open' end
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

# KEYS: circuit hash, probe key, retired key. ARGV: probe token ('' when the call was not the probe).
# -> state
_SUCCESS = (
    LUA_NOW_MS
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return 'retired' end
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until > 0 then
  if now < open_until then return 'open' end
  if ARGV[1] == '' or redis.call('GET', KEYS[2]) ~= ARGV[1] then return 'half_open' end
end
redis.call('DEL', KEYS[1], KEYS[2])
return 'closed'
"""
)

# KEYS: circuit hash, probe key, retired key. ARGV: open ms. -> state
_TRIP = (
    LUA_NOW_MS
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

# KEYS: probe key. ARGV: probe token. Gives the probe back (another call may take it) if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: circuit hash, probe key, retired key. -> state
_STATE = (
    LUA_NOW_MS
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


async def _close_quietly(pubsub: Any) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await pubsub.aclose()


@dataclass(frozen=True)
class Ticket:
    """A call `admit` let through: `probe` is the half-open probe's token (None for a closed circuit);
    with `admit_call`, `account_probe` is the provider's (its account's one probe)."""

    probe: str | None = None
    account_probe: str | None = None


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
        retired_seconds: float = 7 * 86400.0,
    ) -> None:
        self._redis = redis
        self.failure_threshold = max(int(failure_threshold), 1)
        self.open_seconds = max(float(open_seconds), 0.001)
        # Failures further apart than this do not add up (the count expires).
        self.failure_window_seconds = failure_window_seconds
        # If the probe's worker dies without reporting, another probe may go after this long: longer than
        # a provider call can take (else a slow probe gets company).
        self.probe_timeout_seconds = probe_timeout_seconds or max(self.open_seconds, 1.0)
        # A model the provider said is gone is not called for this long (every worker).
        self.retired_seconds = max(float(retired_seconds), 1.0)
        # How long this process trusts having seen a model's circuit closed with no failure counted.
        self.local_seconds = max(float(local_seconds), 0.0)
        self._clean_until: dict[str, float] = {}  # model -> time.monotonic() deadline
        self._generation: dict[str, int] = {}  # bumped by each failure/trip/retire in this process
        # model -> time.monotonic() until which this process refuses calls without asking Redis: set
        # (before the Redis write) by its own trip or retirement, so a call of this process waiting to
        # start cannot slip through while the write is on its way (or its script is being loaded).
        self._refused_until: dict[str, tuple[float, str]] = {}
        # With local reading: a task subscribed to the fleet's circuit events (a circuit opened, tripped
        # or retired by any process), which ends this process's local reading of that model at once.
        # Local reading is trusted only while it is subscribed.
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._listening = False
        self._allow = redis.register_script(_ALLOW)
        self._failure = redis.register_script(_FAILURE)
        self._success = redis.register_script(_SUCCESS)
        self._trip = redis.register_script(_TRIP)
        self._state = redis.register_script(_STATE)
        self._release = redis.register_script(_RELEASE)

    @staticmethod
    def _keys(model: str) -> list[str]:
        return [
            names.KEY_CIRCUIT + model,
            names.KEY_CIRCUIT + model + ":probe",
            names.KEY_MODEL_RETIRED + model,
        ]

    @staticmethod
    def _publish(model: str, state: str) -> str:
        value = 0 if state == CLOSED else 1
        if model.startswith(PROVIDER_KEY_PREFIX):
            metrics.PROVIDER_CIRCUIT_STATE.labels(provider=model[len(PROVIDER_KEY_PREFIX) :]).set(value)
        else:
            metrics.CIRCUIT_STATE.labels(model=model).set(value)
        return state

    def _is_clean(self, model: str) -> bool:
        """Seen closed with no failure counted less than `local_seconds` ago (see the module docstring)."""
        until = self._clean_until.get(model)
        return self._listening and until is not None and time.monotonic() < until

    def _seen_clean(self, model: str, generation: int) -> None:
        # Not when a failure of this process came in while Redis was being read: it is counted now.
        if self.local_seconds and self._generation.get(model, 0) == generation:
            self._clean_until[model] = time.monotonic() + self.local_seconds

    def _ensure_listener(self) -> None:
        if self.local_seconds and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Follow the fleet's circuit events: each names a model whose circuit is no longer closed."""
        while True:
            self._pubsub = pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(names.CHANNEL_CIRCUIT_EVENTS)
                async for message in pubsub.listen():
                    if message["type"] == "subscribe":
                        self._listening = True
                    elif message["type"] == "message":
                        self._clean_until.pop(_text(message["data"]), None)
            except (RedisError, OSError) as exc:
                # Once per lost subscription, not once a second while Redis is away.
                (log.warning if self._listening else log.debug)(
                    "circuit events: %s; circuits are read from Redis until resubscribed", type(exc).__name__
                )
            finally:
                self._listening = False
                self._clean_until.clear()
            # Not when cancelled (aclose closes it then): a cancelled task must not wait on the connection.
            await _close_quietly(pubsub)
            await asyncio.sleep(1.0)

    @property
    def listening(self) -> bool:
        """Whether this process follows the fleet's circuit events now (its local reading needs them)."""
        return self._listening

    async def aclose(self) -> None:
        """Stop following the fleet's circuit events (process shutdown)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            if self._pubsub is not None:
                await _close_quietly(self._pubsub)

    async def _announce(self, model: str, state: str) -> None:
        """Tell every process that `model`'s circuit is not closed any more (ends their local reading)."""
        if state in (OPEN, RETIRED):
            await self._redis.publish(names.CHANNEL_CIRCUIT_EVENTS, model)

    def _dirty(self, model: str) -> None:
        self._clean_until.pop(model, None)
        self._generation[model] = self._generation.get(model, 0) + 1

    def _refuse_locally(self, model: str, seconds: float, state: str) -> None:
        # At most open_seconds: after that, Redis (which an operator may have changed) decides again.
        self._refused_until[model] = (time.monotonic() + min(seconds, self.open_seconds), state)

    def _refused(self, model: str) -> str | None:
        """OPEN or RETIRED while this process's own trip or retirement holds, else None."""
        until, state = self._refused_until.get(model, (0.0, CLOSED))
        return state if time.monotonic() < until else None

    async def admit(self, model: str) -> Ticket | None:
        """A ticket when a call to `model` may go now (closed, or the single half-open probe), else None.
        Asked right before the send; the ticket goes back with the call's outcome."""
        if self._refused(model) is not None:
            return None
        if self._is_clean(model):
            return Ticket()
        self._ensure_listener()
        generation = self._generation.get(model, 0)
        token = uuid.uuid4().hex
        answer = await self._allow(
            keys=self._keys(model), args=[int(self.probe_timeout_seconds * 1000), token]
        )
        state = _text(answer[0])
        self._publish(model, state)
        if state == CLOSED and int(answer[2]) == 0:
            self._seen_clean(model, generation)
        if not int(answer[1]):
            return None
        return Ticket(probe=token if state == HALF_OPEN else None)

    async def allow(self, model: str) -> bool:
        """True when a call to `model` may go now (closed, or the single half-open probe)."""
        return await self.admit(model) is not None

    async def peek(self, model: str) -> str:
        """The circuit's state without taking the probe (closed, from the local reading, when clean)."""
        refused = self._refused(model)
        if refused is not None:
            return refused
        if self._is_clean(model):
            return CLOSED
        return await self.state(model)

    async def record_success(self, model: str, probe: str | None = None) -> None:
        """A call the breaker let through succeeded: reset the failure count; the probe's success (its
        token) closes a half-open circuit. Skipped while this process has seen it clean."""
        if probe is None and self._is_clean(model):
            return
        generation = self._generation.get(model, 0)
        state = self._publish(model, _text(await self._success(keys=self._keys(model), args=[probe or ""])))
        if state == CLOSED:
            self._seen_clean(model, generation)

    async def record_failure(self, model: str, probe: str | None = None) -> None:
        """A retryable failure: count it; open at the threshold; the probe's failure reopens at once (a
        failure without the probe's token leaves a half-open circuit alone)."""
        self._dirty(model)
        state = await self._failure(
            keys=self._keys(model),
            args=[
                self.failure_threshold,
                int(self.open_seconds * 1000),
                int(self.failure_window_seconds * 1000),
                probe or "",
            ],
        )
        await self._announce(model, self._publish(model, _text(state)))

    async def trip(self, model: str, seconds: float | None = None) -> None:
        """Open now (quota exhausted, auth refused) for `seconds` (default open_seconds)."""
        duration = self.open_seconds if seconds is None else max(float(seconds), 0.001)
        self._dirty(model)
        self._refuse_locally(model, duration, OPEN)
        state = self._publish(
            model, _text(await self._trip(keys=self._keys(model), args=[int(duration * 1000)]))
        )
        await self._announce(model, state)

    async def retire(self, model: str) -> None:
        """The provider says the model is gone: not called for `retired_seconds`, by any worker."""
        self._dirty(model)
        self._refuse_locally(model, self.retired_seconds, RETIRED)
        await self._redis.set(names.KEY_MODEL_RETIRED + model, "1", px=int(self.retired_seconds * 1000))
        await self._announce(model, self._publish(model, RETIRED))

    async def state(self, model: str) -> str:
        """closed, open, half_open or retired."""
        return self._publish(model, _text(await self._state(keys=self._keys(model))))

    # ---- a call: the provider's circuit, then the model's ----

    async def peek_call(self, account: str, model: str) -> tuple[str, str]:
        """(state, key) a call to `model` (its `provider:model` key) of `account` (`provider_key`) meets
        without taking a probe: the provider's circuit when it is open, else the model's."""
        state = await self.peek(account)
        if state in (OPEN, RETIRED):
            return state, account
        return await self.peek(model), model

    async def admit_call(self, account: str, model: str) -> Ticket | None:
        """A ticket when a call to `model` may go now: the provider's circuit lets it through (closed, or
        the account's one probe) and so does the model's; else None (a probe taken is given back)."""
        outer = await self.admit(account)
        if outer is None:
            return None
        inner = await self.admit(model)
        if inner is None:
            if outer.probe:
                await self.give_back(account, outer.probe)
            return None
        return Ticket(probe=inner.probe, account_probe=outer.probe)

    async def state_call(self, account: str, model: str) -> tuple[str, str]:
        """(state, key) from Redis: the provider's circuit when it is not closed, else the model's."""
        state = await self.state(account)
        if state != CLOSED:
            return state, account
        return await self.state(model), model

    async def give_back(self, key: str, probe: str) -> None:
        """A probe that decided nothing: the next call may take it (instead of waiting for it to expire)."""
        await self._release(keys=[self._keys(key)[1]], args=[probe])

    async def settle(self, account: str, model: str, note: Note | None, ticket: Ticket) -> bool:
        """A call's circuit bookkeeping (worker.policy's `note`): the model's circuit, and the provider's
        for an account's refusal or the account's probe. True when the account's probe closed the
        provider's circuit (its key works again)."""
        if note == Note.FAILURE:
            await self.record_failure(model, ticket.probe)
        elif note == Note.SUCCESS or (ticket.probe and note in (None, Note.PENALIZE)):
            # A probe answered (a refusal of this request, a 429 included): the model serves again.
            await self.record_success(model, ticket.probe)
        if note is not None and note.scope == "provider":
            await self.trip(account)  # every model of the account (the account's probe reopens it)
            if ticket.probe:
                await self.give_back(model, ticket.probe)  # says nothing about the model
            return False
        if note == Note.TRIP:
            await self.trip(model)
        elif note == Note.RETIRE:
            await self.retire(model)
        if ticket.account_probe is None:
            return False
        if note == Note.FAILURE:  # a 5xx or a timeout says nothing about the account: the next call probes
            await self.give_back(account, ticket.account_probe)
            return False
        await self.record_success(account, ticket.account_probe)
        return True
