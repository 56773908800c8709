"""Webhook delivery connects only to the addresses the SSRF guard checked (DNS rebinding).

The resolver is our own seam (core.webhook_security.Resolver); the network below httpx is httpcore's
MockStream, recording where a connection went, what was written and the TLS server name
— nothing leaves the process.
"""

from __future__ import annotations

import ssl
from typing import Any

import httpcore
import pytest

from core.webhook_security import WebhookRefused
from worker.webhook_delivery import post_guarded

PUBLIC = "93.184.216.34"
PRIVATE = "10.0.0.7"
NO_CONTENT = [b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"]


class RecordingStream(httpcore.MockStream):
    def __init__(self, log: dict[str, Any], buffer: list[bytes]) -> None:
        super().__init__(buffer)
        self.log = log

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.log["written"] += buffer

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        self.log["server_hostname"] = server_hostname
        return self


class RecordingBackend(httpcore.MockBackend):
    """Answers every connection with `buffer`; records (address, port) of each connection."""

    def __init__(self, buffer: list[bytes]) -> None:
        super().__init__(buffer)
        self.connected: list[tuple[str, int]] = []
        self.log: dict[str, Any] = {"written": b"", "server_hostname": None}

    def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        self.connected.append((host, port))
        return RecordingStream(self.log, list(self._buffer))


def rebinding_resolver(calls: list[str]) -> Any:
    """Answers a public address the first time and a private one every time after (DNS rebinding)."""

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return [PUBLIC] if len(calls) == 1 else [PRIVATE]

    return resolve


@pytest.mark.parametrize(("scheme", "port"), [("http", 80), ("https", 443)])
def test_a_rebinding_answer_never_reaches_the_connection(scheme: str, port: int) -> None:
    calls: list[str] = []
    network = RecordingBackend(NO_CONTENT)
    response = post_guarded(
        f"{scheme}://hooks.example/in",
        b"{}",
        {},
        allow_private=False,
        resolver=rebinding_resolver(calls),
        network_backend=network,
    )
    assert response.status_code == 204
    # Resolved once (by the guard), and connected to the address it checked — not to a second answer.
    assert calls == ["hooks.example"]
    assert network.connected == [(PUBLIC, port)]
    # The request still names the host: Host header, and for TLS the server name (SNI, certificate).
    assert b"\r\nHost: hooks.example\r\n" in network.log["written"]
    if scheme == "https":
        assert network.log["server_hostname"] == "hooks.example"


def test_a_redirect_hop_is_checked_and_pinned_again() -> None:
    calls: list[str] = []
    redirect = [
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://other.example/x\r\nContent-Length: 0\r\n\r\n"
    ]
    network = RecordingBackend(redirect)
    # The first host is public; the redirect's host answers private: refused before any connection to it.
    with pytest.raises(WebhookRefused, match="non-public"):
        post_guarded(
            "http://hooks.example/in",
            b"{}",
            {},
            allow_private=False,
            resolver=rebinding_resolver(calls),
            network_backend=network,
        )
    assert calls == ["hooks.example", "other.example"]
    assert network.connected == [(PUBLIC, 80)]


def test_the_checked_addresses_are_tried_in_order() -> None:
    class FirstRefuses(RecordingBackend):
        def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
            if not self.connected:
                self.connected.append((host, port))
                raise httpcore.ConnectError("refused")
            return super().connect_tcp(host, port, *args, **kwargs)

    network = FirstRefuses(NO_CONTENT)
    response = post_guarded(
        "http://hooks.example/in",
        b"{}",
        {},
        allow_private=False,
        resolver=lambda host, port: [PUBLIC, "93.184.216.35"],
        network_backend=network,
    )
    assert response.status_code == 204
    assert network.connected == [(PUBLIC, 80), ("93.184.216.35", 80)]
