"""A lean HTTP/1.1 client for one kind of call: a POST with a body in memory, its whole answer read back.

Why: the transcribe worker's provider call through httpx (client, httpcore pool, h11, anyio streams) cost
~1 ms of CPU per request, the largest item of the worker's per-file CPU (benchmark P1). This sends a
prebuilt request head and body on an asyncio stream and reads the answer with `h11` (Content-Length,
chunked, keep-alive and `Connection: close` handled by it), ~0.1-0.2 ms.

The connection model is `worker.runtime.SlotTransport`'s: each request in flight has a keep-alive
connection of its own, taken from a stack of idle ones (the most recently used first) or made new, and
put back only after a complete, clean exchange that both sides want to keep alive. A connection is never
reused after an error, a timeout, a cancellation or an incomplete read.

A POST is not idempotent, so a request is only ever sent once here: an idle connection is checked before
anything is written on it (server closed it / sent something unasked / past `keepalive_expiry`) and, if
it is stale, dropped and the next one (or a new one) is used -- the only case where nothing of the request
could have reached the server. Any failure after the first byte was written is raised for the caller's
retry logic to decide.

Failures are raised as the httpx exceptions httpx would raise for them (`ConnectTimeout`, `ConnectError`,
`ReadTimeout`, `WriteTimeout`, `ReadError`, `WriteError`, `RemoteProtocolError`, `LocalProtocolError`), so
`core.providers.openai.translate_error` maps them to the same ProviderError kinds and codes as before.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import httpx
from httpcore._utils import is_socket_readable

# The User-Agent httpx sends (kept, so the provider sees the same client as before).
USER_AGENT = f"python-httpx/{httpx.__version__}"
_READ_SIZE = 64 * 1024
# Field names and filenames in a multipart body are escaped the way httpx (and HTML5 forms) do.
_FORM_REPLACEMENTS = {'"': "%22", "\\": "\\\\"}
_FORM_REPLACEMENTS.update({chr(c): f"%{c:02X}" for c in range(0x20) if c != 0x1B})
_FORM_RE = re.compile("|".join(re.escape(c) for c in _FORM_REPLACEMENTS))


def _form_param(name: str, value: str) -> bytes:
    return f'{name}="{_FORM_RE.sub(lambda m: _FORM_REPLACEMENTS[m.group(0)], value)}"'.encode()


def new_boundary() -> bytes:
    """A multipart boundary like httpx's (32 hex digits)."""
    return os.urandom(16).hex().encode("ascii")


def multipart_body(
    data: dict[str, str | list[str]],
    files: dict[str, tuple[str, bytes, str]],
    boundary: bytes,
) -> bytes:
    """The multipart/form-data body httpx builds for `data=data, files=files` with this boundary, byte for
    byte: the data fields first (a list as one part per item, in order), then the files."""
    parts: list[bytes] = []
    delimiter = b"--" + boundary + b"\r\n"
    for name, value in data.items():
        for item in value if isinstance(value, list | tuple) else [value]:
            parts += (
                delimiter,
                b"Content-Disposition: form-data; ",
                _form_param("name", name),
                b"\r\n\r\n",
                item.encode(),
                b"\r\n",
            )
    for name, (filename, content, content_type) in files.items():
        parts += (delimiter, b"Content-Disposition: form-data; ", _form_param("name", name))
        if filename:
            parts += (b"; ", _form_param("filename", filename))
        parts += (b"\r\nContent-Type: ", content_type.encode(), b"\r\n\r\n", content, b"\r\n")
    parts.append(b"--" + boundary + b"--\r\n")
    return b"".join(parts)


@dataclass(slots=True)
class Http1Response:
    """A whole answer: status, headers as received (names lower-cased by h11), the body as sent."""

    status_code: int
    raw_headers: list[tuple[bytes, bytes]]
    content: bytes

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower case), else None."""
        for key, value in self.raw_headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def to_httpx(self) -> httpx.Response:
        """The same answer as an `httpx.Response` (its body decoded if it came content-encoded)."""
        return httpx.Response(self.status_code, headers=self.raw_headers, content=self.content)


class _Conn:
    __slots__ = ("h11", "idle_since", "reader", "socket", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.socket = writer.get_extra_info("socket")
        self.idle_since = 0.0

    def stale(self, now: float, expiry: float) -> bool:
        """True when this idle connection must not carry a request (nothing has been written on it)."""
        return (
            now - self.idle_since > expiry
            or self.writer.is_closing()
            or self.reader.at_eof()
            or self.reader._buffer  # type: ignore[attr-defined]  # bytes nobody asked for
            or self.socket is None
            or is_socket_readable(self.socket)  # EOF or data the loop has not read yet
        )

    def close(self) -> None:
        self.writer.close()


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one origin (http or https), one per request in flight."""

    def __init__(
        self,
        base_url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = 5.0,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.https = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if self.https else 80)
        default_port = 443 if self.https else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.path = url.path.rstrip("/")
        self._ssl = (ssl_context or httpx.create_ssl_context()) if self.https else None
        self._expiry = keepalive_expiry
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()

    @staticmethod
    def supports(base_url: str) -> bool:
        """Whether a pool can serve this base URL (http or https with a host)."""
        try:
            url = urlsplit(base_url)
            return url.scheme in ("http", "https") and bool(url.hostname) and (url.port or 1) > 0
        except ValueError:
            return False

    async def _connect(self, timeout: float) -> _Conn:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                    limit=_READ_SIZE,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout("connect timed out") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError)
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from None
        conn = _Conn(reader, writer)
        self._open.add(conn)
        return conn

    def _drop(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.close()

    async def _take(self, connect_timeout: float) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.stale(now, self._expiry):
                self._drop(conn)  # nothing was written on it: the request goes on another connection
                continue
            return conn
        return await self._connect(connect_timeout)

    async def post(
        self,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        content_type: str | None = None,
        timeout: float,  # noqa: ASYNC109
        connect_timeout: float,
    ) -> Http1Response:
        """POST `body` to `path` (under the base URL's path) and read the whole answer.

        Sent headers, in httpx's order: Host, Accept (unless given), Accept-Encoding: identity,
        Connection: keep-alive, User-Agent (httpx's), `headers`, Content-Length, Content-Type. `timeout`
        bounds the send and each read (as httpx's write and read timeouts do), `connect_timeout` the
        connection (and TLS handshake).
        """
        head: list[tuple[str, str]] = [("Host", self.host_header)]
        if not any(name.lower() == "accept" for name, _ in headers):
            head.append(("Accept", "*/*"))
        head += [("Accept-Encoding", "identity"), ("Connection", "keep-alive"), ("User-Agent", USER_AGENT)]
        head += headers
        head.append(("Content-Length", str(len(body))))
        if content_type is not None:
            head.append(("Content-Type", content_type))
        conn = await self._take(connect_timeout)
        try:
            response = await self._exchange(conn, self.path + path, head, body, timeout)
        except BaseException:
            self._drop(conn)  # errors, timeouts, cancellation: never reuse
            raise
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:  # `Connection: close`, HTTP/1.0, or an answer that ended the connection
            self._drop(conn)
        return response

    async def _exchange(
        self,
        conn: _Conn,
        target: str,
        head: list[tuple[str, str]],
        body: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> Http1Response:
        machine = conn.h11
        try:
            out = machine.send(h11.Request(method="POST", target=target, headers=head))
            assert out is not None
            out += machine.send(h11.Data(data=body)) or b""
            out += machine.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:  # e.g. a header value with a line break
            raise httpx.LocalProtocolError(str(exc)) from None
        write_error: BaseException | None = None
        try:
            conn.writer.write(out)
            async with asyncio.timeout(timeout):
                await conn.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("write timed out") from None
        except OSError as exc:
            # The server may have answered early and closed (e.g. a 413): read what it sent first.
            write_error = exc
        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        while True:
            try:
                event = machine.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc)) from None
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await conn.reader.read(_READ_SIZE)
                except TimeoutError:
                    raise httpx.ReadTimeout("read timed out") from None
                except OSError as exc:
                    if write_error is not None:
                        raise httpx.WriteError(str(write_error) or type(write_error).__name__) from None
                    raise httpx.ReadError(str(exc) or type(exc).__name__) from None
                machine.receive_data(data)
                continue
            kind = type(event)
            if kind is h11.Response:
                status = event.status_code  # type: ignore[union-attr]
                headers = list(event.headers)  # type: ignore[union-attr]
            elif kind is h11.Data:
                chunks.append(bytes(event.data))  # type: ignore[union-attr]
            elif kind is h11.EndOfMessage:
                break
            elif kind is h11.ConnectionClosed:
                if write_error is not None:
                    raise httpx.WriteError(str(write_error) or type(write_error).__name__)
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            # h11.InformationalResponse (1xx): skip, the final answer follows.
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Http1Response(status, headers, content)

    async def aclose(self) -> None:
        """Close every connection (idle or in use)."""
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
