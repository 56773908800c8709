"""Webhook delivery sends each request only to the addresses the SSRF guard checked (DNS rebinding).

The resolver is our own seam (core.webhook_security.Resolver); below httpx is `httpx.MockTransport`,
recording where each request was addressed, its Host header and its TLS server name — nothing leaves
the process. tests/integration/test_webhook_ssrf.py checks the same over a real TLS connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.webhook_security import WebhookRefused
from worker.webhook_delivery import post_guarded

PUBLIC = "93.184.216.34"
PRIVATE = "10.0.0.7"


class Recorder:
    """A MockTransport handler answering `answer(request)`; records (URL host, port, Host, SNI) of each."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.seen: list[tuple[str, int | None, str, Any]] = []
        self.answer = answer or (lambda request: httpx.Response(204))

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(
            (
                request.url.host,
                request.url.port,
                request.headers["host"],
                request.extensions.get("sni_hostname"),
            )
        )
        return self.answer(request)


def rebinding_resolver(calls: list[str]) -> Any:
    """Answers a public address the first time and a private one every time after (DNS rebinding)."""

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return [PUBLIC] if len(calls) == 1 else [PRIVATE]

    return resolve


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_rebinding_answer_never_reaches_the_connection(scheme: str) -> None:
    calls: list[str] = []
    network = Recorder()
    response = post_guarded(
        f"{scheme}://hooks.example/in",
        b"{}",
        {},
        allow_private=False,
        resolver=rebinding_resolver(calls),
        transport=httpx.MockTransport(network),
    )
    assert response.status_code == 204
    # Resolved once (by the guard), and sent to the address it checked — not to a second answer; the
    # request still names the host: Host header, and the TLS server name (SNI, certificate).
    assert calls == ["hooks.example"]
    assert network.seen == [(PUBLIC, None, "hooks.example", "hooks.example")]


def test_a_port_and_an_international_name_keep_their_form() -> None:
    network = Recorder()
    post_guarded(
        "https://bücher.example:8443/in",
        b"{}",
        {},
        allow_private=False,
        resolver=lambda host, port: [PUBLIC],
        transport=httpx.MockTransport(network),
    )
    assert network.seen == [(PUBLIC, 8443, "xn--bcher-kva.example:8443", "xn--bcher-kva.example")]


def test_a_redirect_hop_is_checked_and_pinned_again() -> None:
    calls: list[str] = []
    network = Recorder(lambda request: httpx.Response(307, headers={"Location": "http://other.example/x"}))
    # The first host is public; the redirect's host answers private: refused before any request to it.
    with pytest.raises(WebhookRefused, match="non-public"):
        post_guarded(
            "http://hooks.example/in",
            b"{}",
            {},
            allow_private=False,
            resolver=rebinding_resolver(calls),
            transport=httpx.MockTransport(network),
        )
    assert calls == ["hooks.example", "other.example"]
    assert network.seen == [(PUBLIC, None, "hooks.example", "hooks.example")]


def test_the_checked_addresses_are_tried_in_order() -> None:
    def first_refuses(request: httpx.Request) -> httpx.Response:
        if request.url.host == PUBLIC:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(204)

    network = Recorder(first_refuses)
    response = post_guarded(
        "http://hooks.example/in",
        b"{}",
        {},
        allow_private=False,
        resolver=lambda host, port: [PUBLIC, "93.184.216.35"],
        transport=httpx.MockTransport(network),
    )
    assert response.status_code == 204
    assert [seen[0] for seen in network.seen] == [PUBLIC, "93.184.216.35"]


def test_when_no_checked_address_answers_the_last_error_is_raised() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"refused by {request.url.host}", request=request)

    with pytest.raises(httpx.ConnectError, match=r"93\.184\.216\.35"):
        post_guarded(
            "http://hooks.example/in",
            b"{}",
            {},
            allow_private=False,
            resolver=lambda host, port: [PUBLIC, "93.184.216.35"],
            transport=httpx.MockTransport(refuse),
        )
