"""OpenAIProvider over the worker's httpx client (worker.provider_http.make_provider_client), on real sockets.

Against the fake OpenAI server (tests/fakes/openai_server.py) for the wire format and errors, and tiny
raw HTTP/1.1 servers on loopback for what the fake does not do (exact request bytes, chunked and gzip
answers, idle connections the server closed, cut answers, TLS, counting connections).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import json
import os
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.providers.base import ErrorKind, ProviderError, TranscriptionRequest, TranscriptionResult
from core.providers.openai import OpenAIProvider
from core.settings import Settings, get_settings
from tests.audio_fixtures import tones
from tests.fakes.fixtures import FAKE_OPENAI_API_KEY
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.support import transcription_request
from voxq.embedded import free_port
from worker.provider_http import SHARD_CONNECTIONS, ShardedTransport, make_provider_client, provider_transport

MINI = "gpt-4o-mini-transcribe"


def _req(audio: bytes, *, request_id: str = "att-1", **kw: Any) -> TranscriptionRequest:
    return transcription_request(audio, request_id=request_id, **kw)


def _settings(max_in_flight: int = 8, timeout: float = 10.0) -> Settings:
    return get_settings().model_copy(
        update={"max_in_flight": max_in_flight, "provider_timeout_seconds": timeout}
    )


def _provider(client: httpx.AsyncClient, url: str, timeout: float = 5.0, key: str = "sk-k") -> OpenAIProvider:
    return OpenAIProvider(client, base_url=url, api_key=key, timeout=timeout)


def _run(base_url: str, body: Callable[[OpenAIProvider], Awaitable[Any]], *, timeout: float = 10.0) -> Any:
    async def main() -> Any:
        async with make_provider_client(_settings(timeout=timeout)) as client:
            return await body(_provider(client, base_url, timeout, FAKE_OPENAI_API_KEY))

    return asyncio.run(main())


async def _catch(call: Awaitable[TranscriptionResult]) -> ProviderError:
    with pytest.raises(ProviderError) as info:
        await call
    return info.value


# ---- against the fake OpenAI server ----


def test_success_text_usage_and_request_ids(fake_openai: FakeOpenAI) -> None:
    audio = tones([440, 880])

    async def body(provider: OpenAIProvider) -> list[TranscriptionResult]:
        return [await provider.transcribe(_req(audio, request_id=f"att-{i}")) for i in range(3)]

    results = _run(fake_openai.base_url, body)
    assert [r.text for r in results] == ["tone440 tone880"] * 3
    usage = results[0].usage
    assert usage is not None and usage["type"] == "tokens" and usage["total_tokens"] > 0
    log = fake_openai.request_log()
    assert [e["request_id"] for e in log] == ["att-0", "att-1", "att-2"]  # X-Client-Request-Id
    assert [r.extra["provider_request_id"] for r in results] == [e["x_request_id"] for e in log]
    assert all(r.http_status == 200 and r.model == MINI for r in results)


def test_prompt_language_and_verbose_fields_reach_the_fake(fake_openai: FakeOpenAI) -> None:
    audio = tones([440])

    async def body(provider: OpenAIProvider) -> TranscriptionResult:
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

    async def body(provider: OpenAIProvider) -> ProviderError:
        return await _catch(provider.transcribe(_req(tones([440]))))

    err = _run(fake_openai.base_url, body)
    assert err.kind == ErrorKind.RETRY and err.code == "rate_limit_exceeded" and err.http_status == 429
    assert err.retry_after == pytest.approx(1.5)


def test_500_error_body_502_html_and_401_scrubbed(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(
        MINI,
        [Fault(kind="server_error", message="boom inside"), Fault(kind="server_error", status=502), "auth"],
    )

    async def body(provider: OpenAIProvider) -> list[ProviderError]:
        return [await _catch(provider.transcribe(_req(tones([440])))) for _ in range(3)]

    e500, e502, e401 = _run(fake_openai.base_url, body)
    assert (e500.kind, e500.http_status, str(e500)) == (ErrorKind.RETRY, 500, "boom inside")
    assert e500.code == "http_500"  # the fake's server_error has no code
    assert (e502.kind, e502.http_status, e502.code) == (ErrorKind.RETRY, 502, "http_502")  # HTML body
    assert e401.kind == ErrorKind.NEXT_MODEL and e401.code == "invalid_api_key"
    assert "sk-" not in str(e401) and FAKE_OPENAI_API_KEY not in str(e401)


def test_error_bodies_of_other_servers_keep_the_providers_message(fake_openai: FakeOpenAI) -> None:
    """Issue #16, item 15: the fake answers the error shapes OpenAI-compatible servers use; each keeps the
    provider's message (and what it says about the parameter) instead of "HTTP 400 from provider"."""
    message = "Invalid language 'xx'."
    shapes = ["openai", "fastapi", "detail_text", "validation", "text"]
    fake_openai.script(
        MINI,
        [
            Fault(
                kind="error", status=400, code="invalid_value", param="language", message=message, shape=shape
            )
            for shape in shapes
        ]
        + [Fault(kind="invalid_file", shape="fastapi"), Fault(kind="quota", shape="fastapi")],
    )

    async def body(provider: OpenAIProvider) -> list[ProviderError]:
        return [await _catch(provider.transcribe(_req(tones([440])))) for _ in range(len(shapes) + 2)]

    *errors, bad_audio, quota = _run(fake_openai.base_url, body)
    for shape, err in zip(shapes, errors, strict=True):
        expected = f"language: {message}" if shape == "validation" else message
        assert (shape, err.http_status, err.message) == (shape, 400, expected)
        assert err.kind is ErrorKind.NEXT_MODEL and not err.opens_circuit, shape  # a request bug, not audio
    assert errors[0].code == errors[1].code == "invalid_value"
    assert bad_audio.kind is ErrorKind.INVALID_AUDIO and bad_audio.code == "invalid_value"
    assert quota.kind is ErrorKind.NEXT_MODEL and quota.opens_circuit and quota.code == "insufficient_quota"
    assert [r["status"] for r in fake_openai.request_log()] == [400] * 6 + [429]


def test_timeout_then_a_fresh_connection(fake_openai: FakeOpenAI) -> None:
    fake_openai.script(MINI, [Fault(kind="timeout", seconds=5)])

    async def body(provider: OpenAIProvider) -> tuple[ProviderError, str]:
        err = await _catch(provider.transcribe(_req(tones([440]))))
        ok = await provider.transcribe(_req(tones([880])))
        return err, ok.text

    err, text = _run(fake_openai.base_url, body, timeout=0.5)
    assert (err.kind, err.code) == (ErrorKind.RETRY, "timeout")
    assert text == "tone880"


def test_connect_refused_is_connect_error() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"

    async def body(provider: OpenAIProvider) -> ProviderError:
        return await _catch(provider.transcribe(_req(b"x")))

    err = _run(url, body)
    assert (err.kind, err.code) == (ErrorKind.RETRY, "connect_error")


def test_the_worker_runtime_provider_calls_through_its_client(fake_openai: FakeOpenAI) -> None:
    from worker.runtime import _build

    runtime = _build()
    try:
        result = runtime.run(runtime.provider().transcribe(_req(tones([440]), request_id="att-rt")))
        assert result.text == "tone440"
        assert [e["request_id"] for e in fake_openai.request_log()] == ["att-rt"]
    finally:
        runtime.close()


# ---- raw servers: what the fake does not do ----


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await reader.readexactly(length)


def _ok(text: str = "hello", extra_headers: bytes = b"") -> bytes:
    body = json.dumps({"text": text, "usage": {"type": "duration", "seconds": 1}}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        extra_headers,
        len(body),
        body,
    )


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler, ssl_context: ssl.SSLContext | None = None) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_context)
    scheme = "https" if ssl_context is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


def _multipart_fields(head: bytes, body: bytes) -> list[tuple[str, str | None, str | None, bytes]]:
    """(name, filename, content type, value) of each part, in order."""
    content_type = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    assert content_type.startswith(b"multipart/form-data; boundary=")
    boundary = content_type.split(b"boundary=", 1)[1]
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = body.split(b"--" + boundary)[1:-1]
    fields = []
    for part in parts:
        part_head, value = part[2:].split(b"\r\n\r\n", 1)
        lines = part_head.decode().split("\r\n")
        disposition = lines[0]
        assert disposition.startswith("Content-Disposition: form-data; ")
        params = dict(
            p.split("=", 1) for p in disposition.removeprefix("Content-Disposition: form-data; ").split("; ")
        )
        ctype = next((ln.split(": ", 1)[1] for ln in lines[1:] if ln.startswith("Content-Type: ")), None)
        filename = params["filename"].strip('"') if "filename" in params else None
        fields.append((params["name"].strip('"'), filename, ctype, value.removesuffix(b"\r\n")))
    return fields


def test_the_request_the_server_receives() -> None:
    """Path, headers and multipart fields on the wire: what OpenAI (and the fake) read."""
    audio = b"\x00flac\r\n--bytes"
    request = _req(audio, model="whisper-1", want_timestamps=True, language="en", prompt='say "p"')
    got: list[tuple[bytes, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await _read_request(reader))
        writer.write(_ok())
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, url = await _serve(handle)
        async with make_provider_client(_settings()) as client:
            await _provider(client, url).transcribe(request)
        server.close()

    asyncio.run(main())
    [(head, body)] = got
    start, *lines = head.rstrip(b"\r\n").split(b"\r\n")
    assert start == b"POST /v1/audio/transcriptions HTTP/1.1"
    headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines)}
    assert headers[b"authorization"] == b"Bearer sk-k"
    assert headers[b"x-client-request-id"] == b"att-1"
    assert headers[b"accept"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body)
    assert _multipart_fields(head, body) == [
        ("model", None, None, b"whisper-1"),
        ("response_format", None, None, b"verbose_json"),
        ("timestamp_granularities[]", None, None, b"segment"),
        ("timestamp_granularities[]", None, None, b"word"),
        ("language", None, None, b"en"),
        ("prompt", None, None, b'say "p"'),
        ("file", "clip.flac", "audio/flac", audio),
    ]


def test_chunked_answer_and_gzip_answer() -> None:
    payload = json.dumps({"text": "chunked words", "usage": {"type": "duration", "seconds": 2}}).encode()
    zipped = gzip.compress(json.dumps({"text": "zipped"}).encode())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
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
        server, url = await _serve(handle)
        async with make_provider_client(_settings()) as client:
            provider = _provider(client, url)
            first = await provider.transcribe(_req(b"a"))
            second = await provider.transcribe(_req(b"b"))
        server.close()
        return first, second

    first, second = asyncio.run(main())
    assert first.text == "chunked words" and first.usage == {"type": "duration", "seconds": 2}
    assert second.text == "zipped"


def test_an_idle_connection_the_server_closed_is_not_used_and_the_post_is_sent_once() -> None:
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

    async def main() -> list[str]:
        server, url = await _serve(handle)
        async with make_provider_client(_settings()) as client:
            provider = _provider(client, url)
            texts = [(await provider.transcribe(_req(b"a"))).text]
            await asyncio.sleep(0.1)  # the server's FIN arrives while the connection is idle
            texts.append((await provider.transcribe(_req(b"b"))).text)
        server.close()
        return texts

    assert asyncio.run(main()) == ["first", "again"]
    assert requests_per_connection == [1, 1]  # the closed one was never written to


def test_a_connection_close_answer_is_not_reused() -> None:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await _read_request(reader)
            writer.write(_ok(extra_headers=b"Connection: close\r\n"))
            await writer.drain()
            await asyncio.sleep(1)  # the server does not close: the client must not reuse it anyway
        finally:
            writer.close()

    async def main() -> None:
        server, url = await _serve(handle)
        async with make_provider_client(_settings()) as client:
            provider = _provider(client, url)
            await provider.transcribe(_req(b"a"))
            await provider.transcribe(_req(b"b"))
        server.close()

    asyncio.run(main())
    assert len(connections) == 2


def test_a_cut_answer_is_a_transport_error_and_the_next_call_gets_a_whole_one() -> None:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await _read_request(reader)
            if len(connections) == 1:
                writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"text": ')
                await writer.drain()
                return
            writer.write(_ok("whole"))
            await writer.drain()
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    async def main() -> tuple[ProviderError, str]:
        server, url = await _serve(handle)
        async with make_provider_client(_settings()) as client:
            provider = _provider(client, url)
            err = await _catch(provider.transcribe(_req(b"a")))
            ok = await provider.transcribe(_req(b"b"))
        server.close()
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
        server, url = await _serve(handle)
        try:
            async with make_provider_client(_settings()) as client:
                return await _catch(_provider(client, url).transcribe(_req(b"a", request_id="x\r\nEvil: 1")))
        finally:
            await asyncio.sleep(0.05)
            server.close()

    err = asyncio.run(main())
    assert (err.kind, err.code) == (ErrorKind.RETRY, "transport_error")
    assert b"Evil" not in b"".join(received)  # nothing of the request was written


def test_the_pool_holds_one_connection_per_call_in_flight_up_to_the_limit() -> None:
    """`VOXQ_MAX_IN_FLIGHT` calls at once get a connection each; more wait for one; all are reused."""
    open_now = 0
    most = 0
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        connections.append(1)
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                await _read_request(reader)
                await asyncio.sleep(0.1)
                writer.write(_ok())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_now -= 1
            writer.close()

    async def main() -> tuple[int, int]:
        server, url = await _serve(handle)
        async with make_provider_client(_settings(max_in_flight=4)) as client:
            provider = _provider(client, url)
            results = await asyncio.gather(*(provider.transcribe(_req(b"x" * i)) for i in range(10)))
            assert [r.text for r in results] == ["hello"] * 10
            opened_by_burst = len(connections)
            for i in range(5):
                await provider.transcribe(_req(b"y" * i))
        server.close()
        return opened_by_burst, len(connections)

    opened_by_burst, opened = asyncio.run(main())
    assert opened_by_burst == most == 4  # ten calls at once: four connections, six calls waited for one
    assert opened == 4  # the calls after them reused those


def test_a_burst_gets_a_connection_per_call_and_every_one_stays_open_for_the_next() -> None:
    """A burst as large as the in-flight limit (64: eight shards of 8) opens a connection per call, with
    8 requests in each shard; every connection stays alive after the burst and the next burst reuses all
    of them (no TCP/TLS handshake per call), and every shard slot is given back."""
    BURST = 64
    open_now = 0
    most = 0
    connections: list[int] = []
    per_shard_at_peak: list[list[int]] = []
    transport: ShardedTransport | None = None

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, most
        connections.append(1)
        open_now += 1
        most = max(most, open_now)
        try:
            while True:
                await _read_request(reader)
                await asyncio.sleep(0.1)
                if transport is not None and sum(transport.direct.open_requests) == BURST:
                    per_shard_at_peak.append(list(transport.direct.open_requests))
                writer.write(_ok())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            open_now -= 1
            writer.close()

    async def main() -> tuple[int, int, list[int]]:
        nonlocal transport
        server, url = await _serve(handle)
        transport = provider_transport(_settings(max_in_flight=BURST))
        async with make_provider_client(_settings(max_in_flight=BURST), transport) as client:
            assert len(transport.direct.transports) == BURST // SHARD_CONNECTIONS
            provider = _provider(client, url)
            results = await asyncio.gather(*(provider.transcribe(_req(b"x" * i)) for i in range(BURST)))
            assert [r.text for r in results] == ["hello"] * BURST
            await asyncio.sleep(0.2)  # the server would see closes
            open_after_burst = open_now
            results = await asyncio.gather(*(provider.transcribe(_req(b"y" * i)) for i in range(BURST)))
            assert [r.text for r in results] == ["hello"] * BURST
            left = list(transport.direct.open_requests)
        server.close()
        return open_after_burst, len(connections), left

    open_after_burst, opened, left = asyncio.run(main())
    assert most == BURST  # no call of the burst waited for a connection
    assert per_shard_at_peak and all(
        p == [SHARD_CONNECTIONS] * 8 for p in per_shard_at_peak
    )  # balanced shards
    assert open_after_burst == BURST  # all kept alive
    assert opened == BURST  # the second burst reused every connection
    assert left == [0] * 8


def test_a_failed_call_gives_its_shard_slot_back() -> None:
    """Refused connections, timeouts and cancelled calls release the shard slot, so later calls still
    spread evenly."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(2)
        writer.close()

    async def main() -> list[int]:
        server, url = await _serve(slow)
        transport = provider_transport(_settings(max_in_flight=64))
        async with make_provider_client(_settings(max_in_flight=64, timeout=0.2), transport) as client:
            dead = _provider(client, f"http://127.0.0.1:{free_port()}/v1", timeout=0.2)
            for i in range(3):
                assert (await _catch(dead.transcribe(_req(b"x" * i)))).kind is ErrorKind.RETRY
            provider = _provider(client, url, timeout=0.2)
            errors = await asyncio.gather(*(_catch(provider.transcribe(_req(b"z" * i))) for i in range(5)))
            assert all(e.kind is ErrorKind.RETRY for e in errors)
            # calls cancelled while waiting for their answer (a drain halting a group) give theirs back too
            calls = [asyncio.ensure_future(provider.transcribe(_req(b"c" * i))) for i in range(3)]
            await asyncio.sleep(0.05)
            assert sum(transport.direct.open_requests) == 3
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            left = list(transport.direct.open_requests)
        server.close()
        return left

    assert asyncio.run(main()) == [0] * (64 // SHARD_CONNECTIONS)


@pytest.mark.parametrize("bypass", [False, True])
def test_proxy_environment_variables_route_provider_calls_as_httpx_does(
    monkeypatch: pytest.MonkeyPatch, bypass: bool
) -> None:
    """`HTTP_PROXY` sends provider calls through the proxy (absolute-form request line), as httpx's own
    client would; a host listed in `NO_PROXY` is called directly."""
    seen: dict[str, list[bytes]] = {"proxy": [], "provider": []}

    def recorder(name: str) -> Handler:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head, _ = await _read_request(reader)
            seen[name].append(head.split(b"\r\n", 1)[0])
            writer.write(_ok(name))
            await writer.drain()
            writer.close()

        return handle

    async def main() -> str:
        proxy, proxy_url = await _serve(recorder("proxy"))
        server, url = await _serve(recorder("provider"))
        monkeypatch.setenv("HTTP_PROXY", proxy_url.removesuffix("/v1"))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1" if bypass else "gpu.internal")
        async with make_provider_client(_settings()) as client:
            text = (await _provider(client, url).transcribe(_req(b"x"))).text
        proxy.close()
        server.close()
        return text

    text = asyncio.run(main())
    if bypass:
        assert (text, seen["proxy"]) == ("provider", [])
        assert seen["provider"] == [b"POST /v1/audio/transcriptions HTTP/1.1"]
    else:
        assert (text, seen["provider"]) == ("proxy", [])
        assert seen["proxy"][0].startswith(b"POST http://127.0.0.1:")
        assert seen["proxy"][0].endswith(b"/v1/audio/transcriptions HTTP/1.1")


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_the_shards_of_a_large_in_flight_limit_share_one_tls_context() -> None:
    """A process with 256 in flight builds 32 shards; they share one TLS context (httpx builds one per
    transport: ~0.9 MB of CA certificates each, 28 MB and half a second per process)."""
    gc.collect()
    before = _rss_bytes()
    kept = [provider_transport(_settings(max_in_flight=256)) for _ in range(4)]
    grown = _rss_bytes() - before
    assert len(kept[0].direct.transports) == 256 // SHARD_CONNECTIONS
    assert grown < 20 * 2**20, f"four 256-slot transports took {grown / 2**20:.1f} MB"


def _self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    return cert, server_ctx


def test_https_is_verified_against_the_ca_bundle_ssl_cert_file_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client trusts the CA file in `SSL_CERT_FILE` (httpx's own setting, for a provider behind a
    private CA); without it the default bundle refuses the certificate: connect_error."""
    cert, server_ctx = _self_signed(tmp_path)
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
        server, url = await _serve(handle, server_ctx)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with make_provider_client(_settings()) as client:
            provider = _provider(client, url)
            texts = [(await provider.transcribe(_req(b"a"))).text for _ in range(2)]
        monkeypatch.delenv("SSL_CERT_FILE")
        async with make_provider_client(_settings()) as client:
            err = await _catch(_provider(client, url).transcribe(_req(b"b")))
        await asyncio.sleep(0.05)  # the handler sees the EOF
        server.close()
        return texts, err

    texts, err = asyncio.run(main())
    assert texts == ["over tls", "over tls"]
    assert (err.kind, err.code) == (ErrorKind.RETRY, "connect_error")
    assert len(connections) == 1  # one kept-alive connection for both calls; a refused handshake none
