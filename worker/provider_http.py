"""The worker's httpx client for provider calls: one `httpx.AsyncClient` per process whose connection pool
is sized to the in-flight limit and split into shards of at most `SHARD_CONNECTIONS` connections.

Why shards: httpcore's pool walks all its connections on every request and every response close, and for
each idle connection counts the whole pool again (`_assign_requests_to_connections`, httpcore 1.0.9). One
pool of 256 kept-alive connections made that quadratic (P2: 22.3 ms of worker CPU per file, 28% of
ideal); capping keep-alive at 8 kept the walk short but closed every connection that went idle once more
than 8 were open, so almost every call opened a new connection (a TCP and, to a real provider, a TLS
handshake per call; P2 85-89% of ideal on a quiet host). A shard is an ordinary `httpx.AsyncHTTPTransport`
with `max_connections == max_keepalive_connections == SHARD_CONNECTIONS`: its walk is over 8 connections
and every connection stays alive between calls. `ShardedTransport` (httpx's public transport API) sends
each request through the shard with the fewest requests open, so while the in-flight semaphore lets at
most `max_in_flight` calls through, no shard holds more than its share and no call waits for a connection.
"""

from __future__ import annotations

import math
import ssl
import urllib.request
from collections.abc import AsyncIterator

import httpx

from core.settings import Settings

# Connections per shard. httpcore's walk on every request and response close asks each idle connection
# whether it expired (a socket poll through anyio's extra attributes), so it costs per connection of the
# shard; choosing the least-busy shard is one `min` over the shards. Alternating runs on one quiet host
# (2026-12-05): 32 per shard -> P2 91.3-91.6% of ideal, P1 transcribe worker 2.3-2.8 ms per file; 8 ->
# 93.3-93.6%, 1.9-2.1 ms (one pool with keep-alive capped at 8: 89.1-89.3%, 2.3 ms).
SHARD_CONNECTIONS = 8
KEEPALIVE_EXPIRY_SECONDS = 5.0


class _CountedStream(httpx.AsyncByteStream):
    """A response body that gives its shard's slot back once it is closed (the request is over then)."""

    def __init__(self, inner: httpx.AsyncByteStream, release: _Release) -> None:
        self._inner = inner
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._release()


class _Release:
    """Gives one request's slot in shard `index` back, once."""

    def __init__(self, open_requests: list[int], index: int) -> None:
        self._open = open_requests
        self._index = index
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._open[self._index] -= 1


class _Shards:
    """`httpx.AsyncHTTPTransport` pools (all direct, or all through one proxy) and their open requests."""

    def __init__(self, count: int, limits: httpx.Limits, proxy: str | None, verify: ssl.SSLContext) -> None:
        self.transports = [
            httpx.AsyncHTTPTransport(verify=verify, limits=limits, proxy=proxy) for _ in range(count)
        ]
        self.open_requests = [0] * count

    async def send(self, request: httpx.Request) -> httpx.Response:
        index = min(range(len(self.transports)), key=self.open_requests.__getitem__)
        release = _Release(self.open_requests, index)
        self.open_requests[index] += 1
        try:
            response = await self.transports[index].handle_async_request(request)
        except BaseException:
            release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _CountedStream(response.stream, release)
        return response


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several `httpx.AsyncHTTPTransport` pools behind one transport; each request goes to the shard with
    the fewest open requests (ties: the first). Used from one event loop (the worker's runtime loop).

    Proxies as httpx's own client takes them from the environment (a client given a transport does not):
    `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`, read once when built, and `NO_PROXY` (the standard library's
    `urllib.request.getproxies` / `proxy_bypass`); proxied requests get shards of their own. All shards
    share one TLS context (httpx's default, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured): one per shard cost
    ~17 ms and ~0.9 MB each, 0.54 s and 28 MB for a process with 256 in flight."""

    def __init__(
        self, shards: int, connections_per_shard: int, keepalive_expiry: float, trust_env: bool = True
    ) -> None:
        if shards < 1 or connections_per_shard < 1:
            raise ValueError("a sharded transport needs at least one shard of at least one connection")
        self._count = shards
        self._limits = httpx.Limits(
            max_connections=connections_per_shard,
            max_keepalive_connections=connections_per_shard,
            keepalive_expiry=keepalive_expiry,
        )
        self._proxies = urllib.request.getproxies() if trust_env else {}
        self._bypass: dict[str, bool] = {}
        self._tls = httpx.create_ssl_context(trust_env=trust_env)
        self.direct = _Shards(shards, self._limits, None, self._tls)
        self._by_proxy: dict[str, _Shards] = {}

    def _proxy_for(self, url: httpx.URL) -> str | None:
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if not proxy:
            return None
        bypass = self._bypass.get(url.host)
        if bypass is None:
            bypass = self._bypass[url.host] = bool(urllib.request.proxy_bypass(url.host))
        if bypass:
            return None
        return proxy if "://" in proxy else f"http://{proxy}"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        proxy = self._proxy_for(request.url)
        if proxy is None:
            return await self.direct.send(request)
        shards = self._by_proxy.get(proxy)
        if shards is None:
            shards = self._by_proxy[proxy] = _Shards(self._count, self._limits, proxy, self._tls)
        return await shards.send(request)

    async def aclose(self) -> None:
        for shards in [self.direct, *self._by_proxy.values()]:
            for transport in shards.transports:
                await transport.aclose()


def provider_transport(settings: Settings) -> ShardedTransport:
    """Shards of at most `SHARD_CONNECTIONS` connections, `max_in_flight` connections in all."""
    in_flight = max(1, settings.max_in_flight)
    shards = math.ceil(in_flight / SHARD_CONNECTIONS)
    return ShardedTransport(
        shards=shards,
        connections_per_shard=math.ceil(in_flight / shards),
        keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
    )


def make_provider_client(settings: Settings, transport: ShardedTransport | None = None) -> httpx.AsyncClient:
    """The process's one httpx client for provider calls: a connection for each call the in-flight
    semaphore lets through (no call waits for a connection), all of them kept alive between calls, in
    shards of at most `SHARD_CONNECTIONS` (`transport`: one built by `provider_transport`)."""
    return httpx.AsyncClient(
        transport=transport or provider_transport(settings), timeout=settings.provider_timeout_seconds
    )
