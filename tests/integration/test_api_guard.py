"""Unauthenticated load (issue #16 item 19): auth before any body is read, a cap on every body (also a
chunked one), /metrics behind a token, and jobs-by-status counted at most once per window.

The body tests speak raw HTTP over a socket so the server's behaviour is seen byte by byte: a request
announcing 50 MB gets its answer although not one byte of its body was ever sent.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from tests.api_helpers import (
    METRICS_TOKEN,
    ApiServer,
    make_key,
    sine_wav,
    start_api_server,
    stop_api_server,
    tenant_objects,
)
from tests.support import Stack

FIFTY_MB = 50 * 1024 * 1024


def _raw_request(url: str, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send `head` (request line + headers) and `body`, then read the answer; (status, raw, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw) < _answer_length(raw):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    status = int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0
    return status, raw, time.monotonic() - started


def _answer_length(raw: bytes) -> int:
    """How long the answer in `raw` is once its head has arrived (head + Content-Length of body)."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    if not sep:
        return 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value.strip())
    return len(head) + 4


def _head(path: str, *lines: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{line}\r\n" for line in lines)


def test_an_unauthenticated_50_mb_json_body_is_refused_before_it_is_read(api: ApiServer) -> None:
    # The body is announced but never sent: only an answer that does not wait for it can arrive.
    for auth in ([], ["Authorization: Bearer vq_not-a-real-key-0000000000000000"]):
        head = _head("/v1/batches", "Content-Type: application/json", f"Content-Length: {FIFTY_MB}", *auth)
        status, raw, seconds = _raw_request(api.url, head, b'{"name": "')
        assert status == 401, raw[:300]
        assert b"application/problem+json" in raw and seconds < 5
    # Chunked, no Content-Length: the same.
    head = _head("/v1/batches", "Content-Type: application/json", "Transfer-Encoding: chunked")
    status, raw, _ = _raw_request(api.url, head, b"10\r\n" + b"x" * 16 + b"\r\n")
    assert status == 401, raw[:300]


def test_every_body_has_a_cap_even_without_content_length(api: ApiServer) -> None:
    key = make_key("caps")
    auth = f"Authorization: Bearer {key}"
    # Announced too large: refused at once, nothing read.
    head = _head("/v1/batches", "Content-Type: application/json", f"Content-Length: {FIFTY_MB}", auth)
    status, raw, seconds = _raw_request(api.url, head)
    assert status == 413 and b'"body_too_large"' in raw and seconds < 5, raw[:300]
    # Chunked JSON past 1 MiB: cut off while it streams (the client may still be sending).
    padding = b" " * (1024 * 1024 + 10)

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "x",'
        for i in range(0, len(padding), 65536):
            yield padding[i : i + 65536]
        yield b'"priority": "low"}'

    with api.client(key) as c:
        big = c.post("/v1/batches", content=chunks(), headers={"Content-Type": "application/json"})
        assert big.status_code == 413 and big.json()["code"] == "body_too_large"
        assert "content-length" not in big.request.headers  # it really was chunked
        small = c.post("/v1/batches", json={"name": "fine"})
        assert small.status_code == 201
        assert c.get("/v1/batches").json()["items"][0]["name"] == "fine"


@pytest.fixture
def small_upload_api(stack: Stack) -> Iterator[ApiServer]:
    server = start_api_server(stack, VOXQ_MAX_UPLOAD_BYTES=str(1024 * 1024))
    try:
        yield server
    finally:
        stop_api_server(server)


def test_a_chunked_upload_over_the_request_cap_is_refused_and_leaves_nothing(
    small_upload_api: ApiServer,
) -> None:
    key = make_key("chunky")
    # Four files of ~640 KB: each under the 1 MiB per-file limit, 2.5 MB together (cap: 1 MiB + 1 MiB of
    # multipart framing). Sent chunked, so no Content-Length tells the server in advance.
    files = [sine_wav(20.0, freq=300 + 50 * i) for i in range(4)]
    boundary = "b0undary"
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f{i}.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    assert len(body) > 2 * 1024 * 1024 + 100_000

    def stream() -> Iterator[bytes]:
        for i in range(0, len(body), 32768):
            yield body[i : i + 32768]

    with small_upload_api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()["id"]
        resp = c.post(
            f"/v1/batches/{batch}/files",
            content=stream(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert resp.status_code == 413, resp.text[:300]
        assert resp.json()["code"] == "file_too_large"
        assert c.get(f"/v1/batches/{batch}").json()["total_jobs"] == 0
        # the same files in two requests are fine
        for half in (files[:2], files[2:]):
            ok = c.post(
                f"/v1/batches/{batch}/files", files=[("file", (f"g{i}.wav", d)) for i, d in enumerate(half)]
            )
            assert ok.status_code == 201, ok.text[:300]
    assert len([k for k in tenant_objects("chunky") if "/incoming/" in k]) == 0


def test_metrics_need_the_token(api: ApiServer) -> None:
    assert httpx.get(api.url + "/metrics").status_code == 401
    wrong = httpx.get(api.url + "/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and wrong.json()["code"] == "unauthorized"
    ok = httpx.get(api.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200 and "voxq_jobs" in ok.text


def test_jobs_by_status_is_counted_at_most_once_per_window(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from api import metrics as api_metrics
    from api.main import create_app
    from core.db import get_engine
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("VOXQ_FLEET_JOBS_SECONDS", "2")
    reset_settings_cache()
    api_metrics.reset_jobs_memo()
    counts: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "GROUP BY status" in statement:
            counts.append(statement)

    engine = get_engine()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        client = TestClient(create_app(), headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        for _ in range(5):
            assert client.get("/metrics").status_code == 200
        assert len(counts) == 1
        # Another API process (its own memo empty) takes the fleet's reading from Redis: no count.
        api_metrics.reset_jobs_memo()
        for _ in range(3):
            assert 'voxq_jobs{status="queued"}' in client.get("/metrics").text
        assert len(counts) == 1
        time.sleep(2.2)
        client.get("/metrics")
        assert len(counts) == 2  # the window passed: counted again, once
    finally:
        event.remove(engine, "before_cursor_execute", seen)
