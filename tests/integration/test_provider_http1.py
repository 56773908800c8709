"""OpenAIProvider over the lean HTTP/1.1 pool (core/providers/http1.py): the same request bytes as httpx,
the same answers and errors, keep-alive connections reused only when that is safe.

Against the real fake OpenAI server (tests/fakes/openai_server.py) and tiny raw HTTP/1.1 servers on
loopback for what the fake does not do (chunked answers, closing idle connections, cut answers, gzip).
The httpx client handed to the provider fails every request, so every call here provably went through
the lean path.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult
from core.providers.http1 import USER_AGENT, Http1Pool, multipart_body
from core.providers.openai import OpenAIProvider
from tests.audio_fixtures import tones
from tests.fakes.fixtures import FAKE_OPENAI_API_KEY
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.support import transcription_request
from voxq.embedded import free_port
from worker.runtime import SlotTransport

MINI = "gpt-4o-mini-transcribe"


class _NoHttpx(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"httpx used for {request.method} {request.url}")


def _req(audio: bytes, *, request_id: str = "att-1", **kw: Any) -> TranscriptionRequest:
    return transcription_request(audio, request_id=request_id, **kw)


def _run(
    base_url: str,
    body: Callable[[OpenAIProvider, Http1Pool], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    keepalive_expiry: float = 5.0,
) -> Any:
    async def main() -> Any:
        pool = Http1Pool(base_url, keepalive_expiry=keepalive_expiry)
        async with httpx.AsyncClient(transport=_NoHttpx()) as client:
            provider = OpenAIProvider(
                client, base_url=base_url, api_key=FAKE_OPENAI_API_KEY, timeout=timeout, http1=pool
            )
            try:
                return await body(provider, pool)
            finally:
                await pool.aclose()

    return asyncio.run(main())


async def _catch(call: Awaitable[TranscriptionResult]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


# ---- against the fake OpenAI server ----


def test_success_text_usage_and_one_reused_connection(fake_openai: FakeOpenAI) -> None:
    audio = tones([440, 880])

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> tuple[list[TranscriptionResult], int]:
        results = [await provider.transcribe(_req(audio, request_id=f"att-{i}")) for i in range(3)]
        return results, len(pool._open)

    results, connections = _run(fake_openai.base_url, body)
    assert [r.text for r in results] == ["tone440 tone880"] * 3
    usage = results[0].usage
    assert usage is not None and usage["type"] == "tokens" and usage["total_tokens"] > 0
    log = fake_openai.request_log()
    assert [e["request_id"] for e in log] == ["att-0", "att-1", "att-2"]
    assert [r.extra["provider_request_id"] for r in results] == [e["x_request_id"] for e in log]
    assert all(r.http_status == 200 and r.model == MINI for r in results)
    assert connections == 1  # keep-alive: the three calls shared one connection


def test_prompt_language_and_verbose_fields_reach_the_fake(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> TranscriptionResult:
        return await provider.transcribe(
            _req(audio, model="whisper-1", want_timestamps=True, language="en", prompt='say "hi"')
        )

    result = _run(fake_openai.base_url, body)
    assert result.text == "tone440"
    assert result.segments and result.segments[0]["words"]  # verbose_json + both granularities
    [entry] = fake_openai.request_log()
    assert entry["prompt"] == 'say "hi"' and entry["model"] == "whisper-1"


def test_429_with_retry_after(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(MINI, [Fault(kind="rate_limit", retry_after_ms=1500)])

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> ProviderError:
        return await _catch(provider.transcribe(_req(tones([440]))))

    err = _run(fake_openai.base_url, body)
    assert err.kind == ErrorKind.RETRY and err.code == "rate_limit_exceeded" and err.http_status == 429
    assert err.retry_after == pytest.approx(1.5)


def test_500_error_body_502_html_and_401_scrubbed(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        MINI,
        [Fault(kind="server_error", message="boom inside"), Fault(kind="server_error", status=502), "auth"],
    )

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> list[ProviderError]:
        return [await _catch(provider.transcribe(_req(tones([440])))) for _ in range(3)]

    e500, e502, e401 = _run(fake_openai.base_url, body)
    assert (e500.kind, e500.http_status, str(e500)) == (ErrorKind.RETRY, 500, "boom inside")
    assert e500.code == "http_500"  # the fake's server_error has no code
    assert (e502.kind, e502.http_status, e502.code) == (ErrorKind.RETRY, 502, "http_502")  # HTML body
    assert e401.kind == ErrorKind.NEXT_MODEL and e401.code == "invalid_api_key"
    assert "sk-" not in str(e401) and FAKE_OPENAI_API_KEY not in str(e401)


def test_timeout_then_a_fresh_connection(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(MINI, [Fault(kind="timeout", seconds=5)])

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> tuple[ProviderError, str, int]:
        err = await _catch(provider.transcribe(_req(tones([440]))))
        after_error = len(pool._open)  # the timed-out connection is closed, not pooled
        ok = await provider.transcribe(_req(tones([880])))
        return err, ok.text, after_error

    err, text, after_error = _run(fake_openai.base_url, body, timeout=0.5)
    assert (err.kind, err.code) == (ErrorKind.RETRY, "timeout")
    assert after_error == 0 and text == "tone880"


def test_connect_refused_is_connect_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"

    async def body(provider: OpenAIProvider, pool: Http1Pool) -> ProviderError:
        return await _catch(provider.transcribe(_req(b"x")))

    err = _run(url, body)
    assert (err.kind, err.code) == (ErrorKind.RETRY, "connect_error")


def test_runtime_transport_hands_out_one_pool_per_base_url(fake_openai: FakeOpenAI) -> None:
    transport = SlotTransport()
    assert transport.http1(fake_openai.base_url) is transport.http1(fake_openai.base_url)
    assert transport.http1("unix:///tmp/x.sock") is None
    asyncio.run(transport.aclose())


# ---- the exact request ----


async def _capture_server(answers: list[bytes], got: list[bytes]) -> asyncio.Server:
    """Reads one request (head + Content-Length body) per connection, answers the next answer, closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answer in answers[len(got) : len(got) + 1]:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                got.append(head + await reader.readexactly(length))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _ok(text: str = "hello", extra_headers: bytes = b"") -> bytes:
    body = json.dumps({"text": text, "usage": {"type": "duration", "seconds": 1}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra_headers,
        len(body),
        body,
    )


def test_same_request_as_httpx_apart_from_accept_encoding() -> None:
    """Headers (order, names, values) and the multipart body the server receives are httpx's, except
    Accept-Encoding (identity: the answer is never compressed) and the random boundary."""
    request = _req(b"\x00flac\r\n--bytes", model="whisper-1", want_timestamps=True, language="en", prompt="p")

    async def main() -> list[bytes]:
        got: list[bytes] = []
        server = await _capture_server([_ok(), _ok()], got)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        pool = Http1Pool(url)
        async with httpx.AsyncClient() as client:
            lean = OpenAIProvider(client, base_url=url, api_key="sk-k", timeout=5, http1=pool)
            plain = OpenAIProvider(client, base_url=url, api_key="sk-k", timeout=5)
            await lean.transcribe(request)
            await plain.transcribe(request)
        await pool.aclose()
        server.close()
        return got

    lean_raw, httpx_raw = asyncio.run(main())

    def split(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes, bytes]:
        head, body = raw.split(b"\r\n\r\n", 1)
        start, *lines = head.split(b"\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in lines]
        return headers, start, body  # type: ignore[return-value]

    lean_headers, lean_start, lean_body = split(lean_raw)
    httpx_headers, httpx_start, httpx_body = split(httpx_raw)
    assert lean_start == httpx_start == b"POST /v1/audio/transcriptions HTTP/1.1"
    boundary = dict(lean_headers)[b"Content-Type"].split(b"boundary=")[1]
    httpx_boundary = dict(httpx_headers)[b"Content-Type"].split(b"boundary=")[1]
    assert len(boundary) == len(httpx_boundary) == 32
    assert lean_body == httpx_body.replace(httpx_boundary, boundary)

    def normal(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return [
            (k.lower(), b"B" if k.lower() == b"content-type" else v)
            for k, v in headers
            if k.lower() != b"accept-encoding"
        ]

    assert normal(lean_headers) == normal(httpx_headers)
    names = [k.lower() for k, _ in lean_headers]
    assert names == [
        b"host",
        b"accept-encoding",
        b"connection",
        b"user-agent",
        b"accept",
        b"authorization",
        b"x-client-request-id",
        b"content-length",
        b"content-type",
    ]
    lean = dict(lean_headers)
    assert lean[b"Accept-Encoding"] == b"identity" and lean[b"User-Agent"] == USER_AGENT.encode()
    assert lean[b"Authorization"] == b"Bearer sk-k" and lean[b"X-Client-Request-Id"] == b"att-1"


def test_multipart_body_matches_httpx_for_odd_names() -> None:
    boundary = b"0123456789abcdef0123456789abcdef"
    data: dict[str, str | list[str]] = {
        "model": "m",
        "timestamp_granularities[]": ["segment", "word"],
        "prompt": 'a "quoted"\nline \\ é',
    }
    files = {"file": ('we"ird\n.flac', b"\x00\xff--", "audio/flac")}
    built = httpx.Request(
        "POST",
        "http://x/",
        data=data,
        files=files,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary.decode()}"},
    )
    assert built.read() == multipart_body(data, files, boundary)


# ---- raw servers: what the fake does not do ----


async def _serve_raw(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> str:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


def _provider(url: str, pool: Http1Pool, timeout: float = 5.0) -> OpenAIProvider:
    return OpenAIProvider(
        httpx.AsyncClient(transport=_NoHttpx()), base_url=url, api_key="sk-k", timeout=timeout, http1=pool
    )


def test_chunked_answer_and_gzip_answer() -> None:
    payload = json.dumps({"text": "chunked words", "usage": {"type": "duration", "seconds": 2}}).encode()
    zipped = gzip.compress(json.dumps({"text": "zipped"}).encode())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head)
        for i in range(0, len(payload), 7):
            part = payload[i : i + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await _read_request(reader)  # the same connection: chunked framing ended the first answer
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(zipped), zipped)
        )
        await writer.drain()
        writer.close()

    async def main() -> tuple[TranscriptionResult, TranscriptionResult]:
        url = await _serve_raw(handle)
        pool = Http1Pool(url)
        provider = _provider(url, pool)
        first = await provider.transcribe(_req(b"a"))
        second = await provider.transcribe(_req(b"b"))
        await pool.aclose()
        return first, second

    first, second = asyncio.run(main())
    assert first.text == "chunked words" and first.usage == {"type": "duration", "seconds": 2}
    assert second.text == "zipped"


def test_idle_connection_closed_by_server_is_not_used_and_the_post_is_sent_once() -> None:
    requests_per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests_per_connection.append(0)
        me = len(requests_per_connection) - 1
        try:
            await _read_request(reader)
            requests_per_connection[me] += 1
            writer.write(_ok("first" if me == 0 else "again"))
            await writer.drain()
        finally:
            writer.close()  # closes the idle keep-alive connection right after answering

    async def main() -> tuple[list[str], int]:
        url = await _serve_raw(handle)
        pool = Http1Pool(url)
        provider = _provider(url, pool)
        texts = [(await provider.transcribe(_req(b"a"))).text]
        await asyncio.sleep(0.1)  # the server's FIN arrives while the connection is idle
        texts.append((await provider.transcribe(_req(b"b"))).text)
        open_now = len(pool._open)
        await pool.aclose()
        return texts, open_now

    texts, open_now = asyncio.run(main())
    assert texts == ["first", "again"]
    assert requests_per_connection == [1, 1]  # the closed one was never written to
    assert open_now == 1


def test_connection_close_header_is_honoured() -> None:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await _read_request(reader)
        writer.write(_ok(extra_headers=b"Connection: close\r\n"))
        await writer.drain()
        # The server does not close: the client must not reuse the connection anyway.
        await asyncio.sleep(1)
        writer.close()

    async def main() -> int:
        url = await _serve_raw(handle)
        pool = Http1Pool(url)
        provider = _provider(url, pool)
        await provider.transcribe(_req(b"a"))
        idle = len(pool._idle)
        await provider.transcribe(_req(b"b"))
        await pool.aclose()
        return idle

    assert asyncio.run(main()) == 0
    assert len(connections) == 2


def test_cut_answer_is_a_transport_error_and_the_connection_is_dropped() -> None:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await _read_request(reader)
            if len(connections) == 1:
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"text": ')
                await writer.drain()
                writer.close()
                return
            writer.write(_ok("whole"))
            await writer.drain()
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def main() -> tuple[ProviderError, str]:
        url = await _serve_raw(handle)
        pool = Http1Pool(url)
        provider = _provider(url, pool)
        err = await _catch(provider.transcribe(_req(b"a")))
        ok = await provider.transcribe(_req(b"b"))
        await pool.aclose()
        return err, ok.text

    err, text = asyncio.run(main())
    assert (err.kind, err.code) == (ErrorKind.RETRY, "transport_error")
    assert text == "whole" and len(connections) == 2


def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(1000))
        writer.close()

    async def main() -> ProviderError:
        url = await _serve_raw(handle)
        pool = Http1Pool(url)
        try:
            return await _catch(_provider(url, pool).transcribe(_req(b"a", request_id="x\r\nEvil: 1")))
        finally:
            await pool.aclose()
            await asyncio.sleep(0.05)

    err = asyncio.run(main())
    assert (err.kind, err.code) == (ErrorKind.RETRY, "transport_error")
    assert received == [b""]  # nothing was written


def test_the_worker_runtime_provider_uses_the_lean_pool(fake_openai: FakeOpenAI) -> None:
    from worker.runtime import _build

    runtime = _build()
    try:
        provider = runtime.provider()
        transport = runtime.http._transport
        assert isinstance(transport, SlotTransport)
        pool = transport.http1(fake_openai.base_url)
        assert pool is not None and provider._http1 is pool  # type: ignore[attr-defined]
        result = runtime.run(provider.transcribe(_req(tones([440]))))
        assert result.text == "tone440" and len(pool._open) == 1
        assert not transport._all  # no httpx connection was made
    finally:
        runtime.close()


def test_https_with_certificate_check(tmp_path: Any) -> None:
    """TLS through the loop's ssl support: verified against the given CA, refused (connect_error) without."""
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                await _read_request(reader)
                writer.write(_ok("over tls"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def main() -> tuple[list[str], ProviderError]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        trusted = Http1Pool(url, ssl_context=ssl.create_default_context(cafile=str(cert)))
        texts = [(await _provider(url, trusted).transcribe(_req(b"a"))).text for _ in range(2)]
        untrusted = Http1Pool(url)  # the default CA bundle does not know this certificate
        err = await _catch(_provider(url, untrusted).transcribe(_req(b"b")))
        await trusted.aclose()
        await untrusted.aclose()
        await asyncio.sleep(0.05)  # the handler sees the EOF
        server.close()
        return texts, err

    texts, err = asyncio.run(main())
    assert texts == ["over tls", "over tls"]
    assert (err.kind, err.code) == (ErrorKind.RETRY, "connect_error")
    # One kept-alive connection for both calls (a refused handshake never reaches the handler).
    assert len(connections) == 1
