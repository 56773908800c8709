"""Batch webhooks through real workers: signed, retried with backoff, recorded; private URLs refused."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import WebhookDelivery
from core.webhook_security import SIGNATURE_HEADER, verify_signature
from tests.pipeline_support import Pipeline, hosted_env, tones
from tests.support import Stack, celery_worker, wait_until

SECRET = "webhook-test-secret-123"


class Receiver:
    """A real HTTP server on 127.0.0.1 that fails the first `fail_first` deliveries with 500."""

    def __init__(self, fail_first: int) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.received.append((dict(self.headers.items()), body))
                self.send_response(500 if len(outer.received) <= outer.fail_first else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/voxq"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def deliveries(pipeline: Pipeline) -> list[WebhookDelivery]:
    with Session(pipeline.engine) as s:
        return list(s.execute(select(WebhookDelivery).order_by(WebhookDelivery.attempt_number)).scalars())


def test_webhook_is_signed_retried_and_recorded(stack: Stack, pipeline: Pipeline) -> None:
    with Receiver(fail_first=2) as receiver:
        tenant = pipeline.tenant()
        batch = pipeline.batch(tenant, webhook_url=receiver.url)
        jobs = [pipeline.job(tenant, batch, tones(400)), pipeline.job(tenant, batch, b"not audio")]
        env = hosted_env(VOXQ_WEBHOOK_ALLOW_PRIVATE="true", VOXQ_WEBHOOK_SECRET=SECRET)
        with celery_worker(stack, env=env):
            pipeline.submit(jobs)
            wait_until(
                lambda: [d.status for d in deliveries(pipeline)] == ["failed", "failed", "delivered"],
                timeout=60,
                what="two failed deliveries then one delivered",
            )
    rows = deliveries(pipeline)
    assert [d.attempt_number for d in rows] == [1, 2, 3]
    assert [d.http_status for d in rows] == [500, 500, 204]
    # Backoff: the retries were not immediate.
    assert (rows[2].created_at - rows[0].created_at).total_seconds() >= 2.5
    assert len(receiver.received) == 3
    for headers, body in receiver.received:
        assert verify_signature(SECRET, headers[SIGNATURE_HEADER], body)
        assert not verify_signature("another-secret", headers[SIGNATURE_HEADER], body)
        payload = json.loads(body)
        assert payload["batch_id"] == str(batch)
        assert payload["status"] == "completed"
        assert payload["counts"] == {"total": 2, "succeeded": 1, "failed": 1}
        b = pipeline.batch_row(batch)
        assert payload["cost_usd"] == str(b.cost_usd)
    # A tampered body does not verify.
    headers, body = receiver.received[-1]
    assert not verify_signature(SECRET, headers[SIGNATURE_HEADER], body.replace(b"completed", b"failed"))


def test_webhook_to_a_private_address_is_refused(stack: Stack, pipeline: Pipeline) -> None:
    with Receiver(fail_first=0) as receiver:
        tenant = pipeline.tenant()
        batch = pipeline.batch(tenant, webhook_url=receiver.url)
        job = pipeline.job(tenant, batch, tones(450))
        env = hosted_env(VOXQ_WEBHOOK_ALLOW_PRIVATE="false")
        with celery_worker(stack, env=env):
            pipeline.submit([job])
            wait_until(lambda: deliveries(pipeline), timeout=60, what="a delivery row")
            rows = wait_until(
                lambda: [d for d in deliveries(pipeline) if d.status != "pending"], timeout=30, what="closed"
            )
    assert [d.status for d in rows] == ["refused"]
    assert "non-public" in (rows[0].error or "")
    assert receiver.received == []


def test_deliver_in_process_records_each_try(
    stack: Stack, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache
    from core.statuses import WebhookStatus
    from worker.webhook_delivery import deliver

    with Receiver(fail_first=1) as receiver:
        tenant = pipeline.tenant()
        batch = pipeline.batch(tenant, webhook_url=receiver.url)
        monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "true")
        monkeypatch.setenv("VOXQ_WEBHOOK_MAX_ATTEMPTS", "2")
        reset_settings_cache()
        first = deliver(batch, attempt=1)
        second = deliver(batch, attempt=2)
        monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "false")
        reset_settings_cache()
        third = deliver(batch, attempt=3)
    assert (first.status, first.retry_in) == (WebhookStatus.FAILED, 1.0)
    assert (second.status, second.retry_in) == (WebhookStatus.DELIVERED, None)
    assert (third.status, third.retry_in) == (WebhookStatus.REFUSED, None)
    assert len(receiver.received) == 2
    assert [d.status for d in deliveries(pipeline)] == ["failed", "delivered", "refused"]


def test_delivery_gives_up_after_the_last_attempt(
    stack: Stack, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache
    from core.statuses import WebhookStatus
    from worker.webhook_delivery import deliver, retry_delay

    monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "true")
    monkeypatch.setenv("VOXQ_WEBHOOK_MAX_ATTEMPTS", "3")
    reset_settings_cache()
    with Receiver(fail_first=100) as receiver:
        tenant = pipeline.tenant()
        batch = pipeline.batch(tenant, webhook_url=receiver.url)
        results = [deliver(batch, attempt=n) for n in (1, 2, 3)]
    assert [(r.status, r.retry_in) for r in results] == [
        (WebhookStatus.FAILED, retry_delay(1)),
        (WebhookStatus.FAILED, retry_delay(2)),
        (WebhookStatus.GAVE_UP, None),
    ]
    assert retry_delay(1) < retry_delay(2) < retry_delay(20) == 600
    assert [d.status for d in deliveries(pipeline)] == ["failed", "failed", "gave_up"]


def test_delivery_to_a_hostname_goes_to_its_checked_address_and_dns_failure_is_retried(
    stack: Stack, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache
    from core.statuses import WebhookStatus
    from worker.webhook_delivery import deliver

    monkeypatch.setenv("VOXQ_WEBHOOK_ALLOW_PRIVATE", "true")
    reset_settings_cache()
    with Receiver(fail_first=0) as receiver:
        tenant = pipeline.tenant()
        # A name, not an address: resolved once by the guard, then connected by address (pinned).
        url = receiver.url.replace("127.0.0.1", "localhost")
        named = pipeline.batch(tenant, webhook_url=url)
        delivered = deliver(named, attempt=1)
        unresolvable = pipeline.batch(tenant, webhook_url="http://hooks.voxq-test.invalid/x")
        dns_down = deliver(unresolvable, attempt=1)
    assert delivered.status == WebhookStatus.DELIVERED
    ((headers, _),) = receiver.received
    assert headers["Host"] == url.split("/")[2]  # the name, not the address
    # A host that does not resolve right now is a failed try, retried later (not refused for good).
    assert (dns_down.status, dns_down.retry_in) == (WebhookStatus.FAILED, 1.0)
    rows = {d.batch_id: d for d in deliveries(pipeline)}
    assert "does not resolve" in (rows[unresolvable].error or "")
