"""Webhook signatures and the SSRF guard (no network: literal addresses only)."""

from __future__ import annotations

import time

import pytest

from core.webhook_security import WebhookRefused, check_url, resolve_checked, sign, verify_signature


def test_signature_is_hmac_over_timestamp_and_body() -> None:
    import hashlib
    import hmac

    header = sign("s3cret", b'{"a":1}', timestamp=1700000000)
    expected = hmac.new(b"s3cret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"


def test_verify_rejects_tampering_wrong_secret_stale_and_garbage() -> None:
    body = b'{"batch_id":"x"}'
    header = sign("k", body)
    assert verify_signature("k", header, body)
    assert not verify_signature("k", header, body + b" ")
    assert not verify_signature("other", header, body)
    assert not verify_signature("k", sign("k", body, timestamp=int(time.time()) - 3600), body)
    assert not verify_signature("k", "garbage", body)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://localhost/hook",
    ],
)
def test_private_loopback_link_local_and_ula_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url, allow_private=False)
    check_url(url, allow_private=True)  # allowed when explicitly configured


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "hook", "http:///nohost"])
def test_non_http_urls_are_refused_even_when_private_is_allowed(url: str) -> None:
    with pytest.raises(WebhookRefused):
        check_url(url, allow_private=True)


def test_public_addresses_are_allowed_and_are_what_delivery_connects_to() -> None:
    assert check_url("https://93.184.216.34/hook", allow_private=False) is None  # a literal: no DNS
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["93.184.216.34", "2606:4700::6810:84e5"]

    addresses = resolve_checked("https://hooks.example/x", allow_private=False, resolver=resolver)
    assert addresses == ["93.184.216.34", "2606:4700::6810:84e5"]  # every one public, in the resolver's order
    assert asked == [("hooks.example", 443)]
    # One private address among public ones refuses the host: delivery could be pointed at it.
    with pytest.raises(WebhookRefused):
        resolve_checked(
            "https://hooks.example/x", allow_private=False, resolver=lambda h, p: [*addresses, "10.0.0.7"]
        )


def test_a_redirect_to_a_private_address_is_refused() -> None:
    import httpx

    from worker.webhook_delivery import post_guarded

    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/meta-data"})

    with pytest.raises(WebhookRefused):
        post_guarded(
            "http://93.184.216.34/hook",
            b"{}",
            {},
            allow_private=False,
            transport=httpx.MockTransport(handler),
        )
    assert seen == ["http://93.184.216.34/hook"]  # the private hop was never requested


def test_redirects_are_followed_to_public_hosts() -> None:
    import httpx

    from worker.webhook_delivery import post_guarded

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/old":
            return httpx.Response(307, headers={"location": "/new"})
        return httpx.Response(200)

    response = post_guarded(
        "http://93.184.216.34/old", b"{}", {}, allow_private=False, transport=httpx.MockTransport(handler)
    )
    assert response.status_code == 200 and response.request.url.path == "/new"


def test_a_rotation_header_carries_one_signature_per_secret_and_any_verifies() -> None:
    body = b'{"batch_id":"y"}'
    header = sign(["new", "old"], body, timestamp=int(time.time()))
    ts, first, second = header.split(",")
    assert ts.startswith("t=") and first.startswith("v1=") and second.startswith("v1=")
    assert header.startswith(sign("new", body, timestamp=int(ts[2:])))  # newest first
    assert verify_signature("new", header, body) and verify_signature("old", header, body)
    assert not verify_signature("neither", header, body)
    assert verify_signature(["neither", "old"], header, body)
    assert not verify_signature("new", header.replace("v1=", "v2="), body)
    assert not verify_signature("new", f"t={ts[2:]}", body)
    with pytest.raises(ValueError):
        sign([], body)
