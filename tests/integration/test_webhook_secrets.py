"""Per-tenant webhook signing secrets (issue #16 item 16), against real Postgres and a real receiver.

Each tenant's deliveries verify with its own secret only; a rotation signs with both secrets during the
overlap window (`t=…,v1=<new>,v1=<old>`) and with the new one only after it; the secret is shown once
(CLI stdout, API answer) and is stored encrypted, never in plaintext (not even in the idempotency store).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select, text

from core.db import session_scope
from core.models import Batch, WebhookDelivery
from core.settings import reset_settings_cache
from core.statuses import WebhookStatus
from core.webhook_security import SIGNATURE_HEADER, verify_signature
from tests.api_helpers import ApiServer, make_key
from tests.support import Stack


class Receiver:
    """A real HTTP server on 127.0.0.1 that keeps every request and answers 204."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.received.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings_cache()
    r = Receiver()
    yield r
    r.close()


def _tenant(name: str) -> tuple[uuid.UUID, str]:
    from core import auth

    with session_scope() as session:
        issued = auth.create_key(session, name)
    assert issued.webhook_secret is not None and issued.webhook_secret.startswith("whsec_")
    return uuid.UUID(issued.tenant_id), issued.webhook_secret


def _batch(tenant_id: uuid.UUID, url: str) -> uuid.UUID:
    with session_scope() as session:
        batch = Batch(tenant_id=tenant_id, webhook_url=url, status="completed")
        session.add(batch)
        session.flush()
        return batch.id


def _deliver(receiver: Receiver, batch_id: uuid.UUID) -> tuple[str, bytes]:
    from worker.webhook_delivery import deliver

    before = len(receiver.received)
    assert deliver(batch_id, attempt=1).status == WebhookStatus.DELIVERED
    headers, body = receiver.received[before]
    return headers[SIGNATURE_HEADER], body


def test_each_tenant_verifies_only_with_its_own_secret_and_rotation_overlaps(
    receiver: Receiver, capsys: pytest.CaptureFixture[str]
) -> None:
    from core.settings import get_settings
    from voxq.cli import main

    a_id, a_secret = _tenant("acme")
    b_id, b_secret = _tenant("bolt")
    a_batch, b_batch = _batch(a_id, receiver.url), _batch(b_id, receiver.url)
    legacy = get_settings().webhook_secret
    assert legacy is not None

    a_header, a_body = _deliver(receiver, a_batch)
    b_header, b_body = _deliver(receiver, b_batch)
    assert a_secret != b_secret
    assert verify_signature(a_secret, a_header, a_body) and not verify_signature(b_secret, a_header, a_body)
    assert verify_signature(b_secret, b_header, b_body) and not verify_signature(a_secret, b_header, b_body)
    for header, body in ((a_header, a_body), (b_header, b_body)):
        assert not verify_signature(legacy.get_secret_value(), header, body)  # no shared secret signs
        assert header.count("v1=") == 1

    # The operator rotates acme's secret with a 2 s overlap: the new one is printed once, on stdout.
    capsys.readouterr()
    assert main(["webhooks", "rotate-secret", "--tenant", "acme", "--overlap-hours", str(2 / 3600)]) == 0
    out = capsys.readouterr()
    new_secret = out.out.strip()
    assert new_secret.startswith("whsec_") and new_secret != a_secret
    assert new_secret not in out.err and "not shown again" in out.err
    rotated_at = time.monotonic()
    during, body = _deliver(receiver, a_batch)
    assert time.monotonic() - rotated_at < 2.0, "the overlap check ran too late to mean anything"
    assert during.count("v1=") == 2  # t=…,v1=<new>,v1=<old>
    assert verify_signature(new_secret, during, body) and verify_signature(a_secret, during, body)
    assert not verify_signature(b_secret, during, body)
    assert verify_signature([b_secret, new_secret], during, body)  # a receiver may try several
    # bolt is untouched by acme's rotation
    assert verify_signature(b_secret, *_deliver(receiver, b_batch))

    time.sleep(max(0.0, 2.2 - (time.monotonic() - rotated_at)))
    after, body = _deliver(receiver, a_batch)
    assert after.count("v1=") == 1
    assert verify_signature(new_secret, after, body) and not verify_signature(a_secret, after, body)

    # Stored encrypted: no secret appears in any column of the table.
    with session_scope() as session:
        dump = " ".join(str(r) for r in session.execute(text("SELECT * FROM webhook_secrets")).all())
    for secret in (a_secret, b_secret, new_secret):
        assert secret not in dump and secret[6:] not in dump
    capsys.readouterr()
    assert main(["webhooks", "secrets", "--tenant", "acme"]) == 0
    listed = capsys.readouterr().out
    assert new_secret[:12] in listed and new_secret not in listed


def test_a_tenant_without_a_secret_is_never_sent_unsigned(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.models import Tenant
    from worker.webhook_delivery import deliver

    with session_scope() as session:
        old = Tenant(name="from-before-per-tenant-secrets")
        session.add(old)
        session.flush()
        old_id = old.id
    batch = _batch(old_id, receiver.url)
    # Production without the legacy shared secret: refused, nothing sent.
    monkeypatch.setenv("VOXQ_ENVIRONMENT", "production")
    monkeypatch.setenv("VOXQ_SECRETS_KEY", "k" * 40)
    monkeypatch.setenv("VOXQ_FLOWER_PASSWORD", "p" * 20)
    monkeypatch.delenv("VOXQ_WEBHOOK_SECRET", raising=False)
    reset_settings_cache()
    result = deliver(batch, attempt=1)
    assert (result.status, result.retry_in) == (WebhookStatus.REFUSED, None)
    assert receiver.received == []
    with session_scope() as session:
        (row,) = session.scalars(select(WebhookDelivery)).all()
    assert row.status == "refused" and "no webhook signing secret" in (row.error or "")
    # With the legacy secret set, such a tenant is signed with it until it gets its own.
    monkeypatch.setenv("VOXQ_WEBHOOK_SECRET", "legacy-shared-" + "x" * 20)
    reset_settings_cache()
    header, body = _deliver(receiver, batch)
    assert verify_signature("legacy-shared-" + "x" * 20, header, body)


def test_tenants_rotate_their_own_secret_over_the_api(api: ApiServer, stack: Stack) -> None:
    key = make_key("self-service")
    other = make_key("someone-else")
    with api.client(key) as c:
        first = c.get("/v1/webhook-secrets").json()["items"]
        assert len(first) == 1 and first[0]["expires_at"] is None and "secret" not in first[0]
        rotated = c.post(
            "/v1/webhook-secrets", json={"overlap_seconds": 3600}, headers={"Idempotency-Key": "r1"}
        )
        assert rotated.status_code == 201, rotated.text
        assert rotated.headers["cache-control"] == "no-store"
        issued = rotated.json()
        assert issued["secret"].startswith("whsec_") and issued["prefix"] == issued["secret"][:12]
        assert issued["previous_expire_at"] is not None
        listed = c.get("/v1/webhook-secrets").json()["items"]
        assert [r["id"] for r in listed] == [issued["id"], first[0]["id"]]
        assert listed[1]["expires_at"] is not None and issued["secret"] not in str(listed)
        # An answer carrying a secret is never stored for replay (nor anywhere in plaintext).
        with session_scope() as session:
            stored = " ".join(str(r) for r in session.execute(text("SELECT * FROM idempotency_keys")).all())
            secrets_dump = " ".join(
                str(r) for r in session.execute(text("SELECT * FROM webhook_secrets")).all()
            )
        assert issued["secret"] not in stored and issued["secret"] not in secrets_dump
        assert c.post("/v1/webhook-secrets", json={"overlap_seconds": -1}).status_code == 422
    with api.client(other) as c:  # another tenant sees only its own
        assert [r["prefix"] for r in c.get("/v1/webhook-secrets").json()["items"]] != [issued["prefix"]]
        assert len(c.get("/v1/webhook-secrets").json()["items"]) == 1
    with api.client() as c:
        assert c.post("/v1/webhook-secrets", json={}).status_code == 401
