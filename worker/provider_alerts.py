"""Telling operators that a provider refused the fleet's API key (see core.provider_health).

A 401/403 is not a model's trouble but the provider's: every call with that key fails the same way. It
opens the provider's circuit (worker.circuit: no model of that provider is called until its probe gets
through) and jobs move on to the next provider of their chain, so a fleet could move all its work to
another vendor or the local engine without anyone noticing. Here it becomes loud, for each provider
apart: a warning naming the environment variable its key comes from (never the key nor the provider's
message, which may echo part of it), `voxq_provider_auth_failures_total{provider}`, and a Redis record
`/readyz` reports as degraded until it expires or the provider's probe gets through again.
"""

from __future__ import annotations

import logging

from core import metrics
from core.provider_health import auth_failure, auth_key
from worker.runtime import Runtime

log = logging.getLogger(__name__)


async def auth_refused(
    rt: Runtime, provider: str, model: str, http_status: int | None, code: str | None
) -> None:
    """Count, log and record (for /readyz) that `provider` refused the API key for a call to `model`."""
    from core.providers.config import load_catalogue

    metrics.PROVIDER_AUTH_FAILURES.labels(provider=provider).inc()
    config = load_catalogue(rt.settings).providers.get(provider)
    log.warning(
        "provider %s refused the API key (HTTP %s %s) calling %s: check %s; none of its models is "
        "called until a probe gets through, jobs move on to the next provider of their chain",
        provider,
        http_status,
        code or "-",
        model,
        (config.api_key_env if config is not None else None) or "its API key",
    )
    record = auth_failure(provider, model, http_status, code)
    ttl_ms = int(rt.settings.provider_auth_alert_seconds * 1000)
    await rt.redis.set(auth_key(provider), record.encode(), px=ttl_ms)


async def auth_restored(rt: Runtime, provider: str) -> None:
    """A probe got through: the provider accepts the key again."""
    await rt.redis.delete(auth_key(provider))
