"""Telling operators that a provider refused the fleet's API key (see core.provider_health).

A 401/403 moves the job on to the next model like any model that cannot serve, but it is not a model's
trouble: every call with that key fails the same way, so a fleet could move all its work to the local
engine without anyone noticing. Here it becomes loud: a warning (never the key nor the provider's message,
which may echo part of it), `voxq_provider_auth_failures_total{provider}`, and a Redis record `/readyz`
reports as degraded until it expires or a probe gets through again.
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
    metrics.PROVIDER_AUTH_FAILURES.labels(provider=provider).inc()
    log.warning(
        "provider %s refused the API key (HTTP %s %s) calling %s: check OPENAI_API_KEY; "
        "jobs move on to the next model of their chain",
        provider,
        http_status,
        code or "-",
        model,
    )
    record = auth_failure(provider, model, http_status, code)
    ttl_ms = int(rt.settings.provider_auth_alert_seconds * 1000)
    await rt.redis.set(auth_key(provider), record.encode(), px=ttl_ms)


async def auth_restored(rt: Runtime, provider: str) -> None:
    """A probe got through: the provider accepts the key again."""
    await rt.redis.delete(auth_key(provider))
