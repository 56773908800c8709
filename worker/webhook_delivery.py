"""Delivery of a finished batch's webhook: signed POST, recorded, retried with backoff.

Each delivery is signed with the batch's tenant's own secrets (core/webhook_secrets.py: one signature
per live secret, so two during a rotation's overlap window); a tenant created before per-tenant secrets
is signed with the legacy shared `VOXQ_WEBHOOK_SECRET` while it is set, and otherwise refused (recorded
`refused`: nothing unsigned is ever sent).

Each try is one `webhook_deliveries` row (attempt number, HTTP status, error). A 2xx is delivered; any
other answer or a network error is retried with exponential backoff (1 s, 2 s, 4 s … capped at 10 min, a
countdown well under the broker's visibility timeout) up to `VOXQ_WEBHOOK_MAX_ATTEMPTS`, then the last row
is `gave_up`. A URL the SSRF guard refuses (core.webhook_security) is recorded `refused` and never retried; a
host that does not resolve right now is a failed try (retried). Redirects are followed by hand (at most
3) so every hop passes the guard.

Connections are pinned: each hop's host is resolved once, by the guard, and the request is sent to one
of exactly those checked addresses (the address in the URL httpx connects to) — nothing resolves the name
again, so a rebinding DNS answer (public for the check, private for the connection) cannot reach a
private address. The Host header, TLS SNI and certificate verification are for the name
(httpx's `sni_hostname` request extension).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import metrics, webhook_secrets
from core.backoff import backoff_delay
from core.db import session_scope
from core.errors import ConfigError
from core.ids import uuid7
from core.models import Batch, WebhookDelivery
from core.settings import get_settings
from core.statuses import WebhookStatus
from core.webhook_security import (
    SIGNATURE_HEADER,
    Resolver,
    WebhookRefused,
    WebhookUnresolvable,
    resolve_checked,
    sign,
)
from worker.completion import batch_summary
from worker.store.sql import now

log = logging.getLogger(__name__)

EVENT = "batch.finished"
MAX_REDIRECTS = 3
TIMEOUT_SECONDS = 10.0
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 600.0  # a countdown well under the broker's visibility timeout
UNSIGNABLE = (
    "the tenant has no webhook signing secret: create one (POST /v1/webhook-secrets, or "
    "voxq webhooks rotate-secret --tenant NAME)"
)


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery try did, and when to try again (None: never)."""

    status: WebhookStatus
    retry_in: float | None


def retry_delay(attempt: int) -> float:
    """Seconds before try `attempt + 1`: the project's backoff without jitter (1 s, 2 s, 4 s, ... 10 min)."""
    return backoff_delay(attempt, base=RETRY_BASE_SECONDS, cap=RETRY_MAX_SECONDS, jitter=False)


def post_guarded(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    transport: httpx.BaseTransport | None = None,
    resolver: Resolver | None = None,
) -> httpx.Response:
    """POST, following redirects by hand; every hop passes the SSRF guard and is sent to one of the
    addresses the guard checked. `transport` replaces httpx's own (tests without a network)."""
    # An explicit transport: proxy environment variables never reroute a webhook (httpx's client ignores
    # them when given one); SSL_CERT_FILE still names the CA bundle.
    with httpx.Client(
        timeout=TIMEOUT_SECONDS, follow_redirects=False, transport=transport or httpx.HTTPTransport()
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            addresses = resolve_checked(url, allow_private=allow_private, resolver=resolver)
            response = _post_pinned(client, url, addresses, body, headers)
            if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            return response
    raise httpx.TooManyRedirects("too many redirects", request=httpx.Request("POST", url))


def _post_pinned(
    client: httpx.Client, url: str, addresses: list[str], body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """POST to `url` at the first of `addresses` that takes the connection, never resolving its name again.

    The URL's host is replaced by the address, so httpx connects exactly there; the Host header and the
    TLS server name (`sni_hostname`, which is also the name the certificate is verified for) keep the
    URL's name.
    """
    target = httpx.URL(url)
    named = {**headers, "Host": target.netloc.decode("ascii")}
    error: httpx.TransportError | None = None
    for address in addresses:
        try:
            return client.post(
                target.copy_with(host=address),
                content=body,
                headers=named,
                extensions={"sni_hostname": target.raw_host.decode("ascii")},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            error = exc
    assert error is not None  # resolve_checked never returns no address
    raise error


def _signing_secrets(session: Session, tenant_id: uuid.UUID) -> list[str]:
    """The tenant's live secrets, newest first; for a tenant that has none yet (created before per-tenant
    secrets), the legacy shared `VOXQ_WEBHOOK_SECRET` while it is set; else none."""
    own = webhook_secrets.signing_secrets(session, tenant_id)
    if own:
        return own
    legacy = get_settings().webhook_secret
    if legacy is None:
        return []
    log.warning(
        "tenant %s has no webhook secret of its own: signed with the shared VOXQ_WEBHOOK_SECRET "
        "(give it one: voxq webhooks rotate-secret --tenant NAME)",
        tenant_id,
    )
    return [legacy.get_secret_value()]


def deliver(batch_id: uuid.UUID, *, attempt: int) -> DeliveryResult:
    """Try to deliver the batch's webhook once and record the try."""
    settings = get_settings()
    keys: list[str] = []
    key_error: str | None = None
    with session_scope() as session:
        batch = session.execute(
            select(Batch.tenant_id, Batch.webhook_url).where(Batch.id == batch_id)
        ).first()
        if batch is not None:
            try:
                keys = _signing_secrets(session, batch.tenant_id)
            except ConfigError as exc:  # VOXQ_SECRETS_KEY lost or changed: retried once it is fixed
                key_error = exc.message
    payload = batch_summary(batch_id)
    if batch is None or not batch.webhook_url or payload is None:
        return DeliveryResult(WebhookStatus.GAVE_UP, None)
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "voxq-webhooks/1",
        "X-Voxq-Event": EVENT,
        "X-Voxq-Delivery-Attempt": str(attempt),
    }
    if keys:
        headers[SIGNATURE_HEADER] = sign(keys, body)
    delivery_id = uuid7()
    with session_scope() as session:
        session.execute(
            insert(WebhookDelivery).values(
                id=delivery_id,
                tenant_id=batch.tenant_id,
                batch_id=batch_id,
                url=batch.webhook_url,
                event=EVENT,
                payload=payload,
                attempt_number=attempt,
                status=WebhookStatus.PENDING.value,
            )
        )
    if key_error is not None:
        return _record(delivery_id, WebhookStatus.FAILED, None, key_error, retry_delay(attempt))
    if not keys:
        return _record(delivery_id, WebhookStatus.REFUSED, None, UNSIGNABLE, None)
    http_status: int | None = None
    error: str | None = None
    try:
        response = post_guarded(
            batch.webhook_url, body, headers, allow_private=settings.webhook_allow_private
        )
        http_status = response.status_code
        ok = 200 <= response.status_code < 300
        if not ok:
            error = f"HTTP {response.status_code}"
    except WebhookUnresolvable as exc:
        ok = False  # DNS may be down right now: a failed try, retried like any other
        error = exc.message
    except WebhookRefused as exc:
        return _record(delivery_id, WebhookStatus.REFUSED, None, exc.message, None)
    except httpx.HTTPError as exc:
        ok = False
        error = f"{type(exc).__name__}"
    if ok:
        return _record(delivery_id, WebhookStatus.DELIVERED, http_status, None, None)
    if attempt >= settings.webhook_max_attempts:
        return _record(delivery_id, WebhookStatus.GAVE_UP, http_status, error, None)
    return _record(delivery_id, WebhookStatus.FAILED, http_status, error, retry_delay(attempt))


def _record(
    delivery_id: uuid.UUID,
    status: WebhookStatus,
    http_status: int | None,
    error: str | None,
    retry_in: float | None,
) -> DeliveryResult:
    ts = now()
    from datetime import timedelta

    with session_scope() as session:
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(
                status=status.value,
                http_status=http_status,
                error=error,
                delivered_at=ts if status == WebhookStatus.DELIVERED else None,
                next_attempt_at=ts + timedelta(seconds=retry_in) if retry_in is not None else None,
            )
        )
    metrics.WEBHOOK_DELIVERIES.labels(outcome=status.value).inc()
    return DeliveryResult(status, retry_in)
