"""Webhook signing and the SSRF guard, shared by the API (validating URLs) and the workers (delivering).

Signature: `X-Voxq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=…]`, one
`v1` per live secret of the tenant (core/webhook_secrets.py: newest first; two during a rotation's overlap
window). Receivers recompute it over the raw body with their secret, accept when any `v1` matches, and
reject stale timestamps (replay protection); `verify_signature` does exactly that.

SSRF guard: a webhook URL must be http(s) and every address its host resolves to must be public —
private (RFC 1918), loopback, link-local, unique-local (fc00::/7), multicast, reserved and unspecified
addresses are refused, on the first request and on every redirect hop, unless
`VOXQ_WEBHOOK_ALLOW_PRIVATE=true` (development, tests). `resolve_checked` returns the addresses it
checked, and delivery (worker.webhook_delivery) connects to exactly those: the host is never resolved a second
time, so a DNS answer that changes between the check and the connection (DNS rebinding) cannot slip a
private address in. The resolver is a parameter (default: the system's `getaddrinfo`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from core.errors import VoxqError

SIGNATURE_HEADER = "X-Voxq-Signature"

# (host, port) -> the addresses it resolves to, in the order to try them.
Resolver = Callable[[str, int], list[str]]


class WebhookRefused(VoxqError):
    """Raised when a webhook URL is not allowed (scheme, or an address that is not public)."""

    code = "webhook_url_refused"


class WebhookUnresolvable(WebhookRefused):
    """Raised when a webhook host does not resolve (may be transient; delivery checks again)."""


def _mac(secret: str, ts: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str | Sequence[str], body: bytes, *, timestamp: int | None = None) -> str:
    """The `X-Voxq-Signature` header value for this body: one `v1=` per secret, in the order given.

    A tenant's secrets are given newest first: during a rotation's overlap window the header carries a
    signature by the new secret and one by each older secret still live (as Stripe does).
    """
    ts = int(time.time()) if timestamp is None else timestamp
    keys = [secret] if isinstance(secret, str) else list(secret)
    if not keys:
        raise ValueError("at least one secret is needed to sign")
    return f"t={ts}," + ",".join(f"v1={_mac(key, ts, body)}" for key in keys)


def verify_signature(
    secret: str | Sequence[str], header: str, body: bytes, *, tolerance: float = 300.0
) -> bool:
    """Whether `header` is a valid, fresh signature of `body` (what a receiver should check).

    Valid when any `v1=` in the header is the HMAC by any of the given secrets (a receiver rotating its
    own copy may pass both), and `t` is within `tolerance` seconds of now.
    """
    ts: int | None = None
    given: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            try:
                ts = int(value)
            except ValueError:
                return False
        elif name == "v1":
            given.append(value)
    if ts is None or not given or abs(time.time() - ts) > tolerance:
        return False
    keys = [secret] if isinstance(secret, str) else list(secret)
    expected = [_mac(key, ts, body) for key in keys]
    # Every pair is compared (no early exit), so timing tells nothing about which one matched.
    matches = [hmac.compare_digest(e, g) for e in expected for g in given]
    return any(matches)


def _forbidden(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return _forbidden(addr.ipv4_mapped)
    return bool(
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or (isinstance(addr, ipaddress.IPv6Address) and addr in ipaddress.ip_network("fc00::/7"))
        or not addr.is_global
    )


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host`, in its order, without duplicates."""
    out: list[str] = []
    for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(info[4][0])
        if address not in out:
            out.append(address)
    return out


def _http_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook URL must be an absolute http(s) URL")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def resolve_checked(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> list[str]:
    """The addresses to connect to for `url`, every one public (unless `allow_private`).

    Raise WebhookRefused for a non-http(s) URL or a host with any non-public address, and
    WebhookUnresolvable when the host does not resolve.
    """
    host, port = _http_url(url)
    try:
        addresses = (resolver or system_resolver)(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUnresolvable(f"webhook host {host!r} does not resolve") from exc
    if not addresses:
        raise WebhookUnresolvable(f"webhook host {host!r} does not resolve")
    if not allow_private:
        for address in addresses:
            if _forbidden(ipaddress.ip_address(address.split("%", 1)[0])):
                raise WebhookRefused(f"webhook host {host!r} resolves to a non-public address")
    return addresses


def check_url(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> None:
    """Raise WebhookRefused unless `url` is http(s) to a host whose every address is public."""
    _http_url(url)
    if allow_private:
        return
    resolve_checked(url, allow_private=False, resolver=resolver)
