"""Bad input gets a clear problem with a stable code, and leaves nothing behind in S3 or Postgres."""

from __future__ import annotations

import os
import select as io_select
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Job
from tests.api_helpers import (
    ApiServer,
    make_key,
    sine_wav,
    start_api_server,
    stop_api_server,
    tenant_objects,
)
from tests.support import Stack, wait_until

SMALL_LIMIT = 256 * 1024


def _jobs() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def _assert_problem(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body = resp.json()
    assert body["code"] == code and body["status"] == status
    assert set(body) >= {"type", "title", "status", "detail", "code"} and body["type"].endswith(code)


@pytest.mark.parametrize(
    ("name", "payload", "status", "code"),
    [
        ("empty.wav", b"", 400, "empty_file"),
        ("random.mp3", os.urandom(300_000), 415, "unsupported_media"),
        (
            "report.mp3",
            b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n" + os.urandom(20_000),
            415,
            "unsupported_media",
        ),
        ("notes.wav", b"just some text, not audio\n" * 2000, 415, "unsupported_media"),
        ("header-only.wav", sine_wav(0.0), 400, "empty_audio"),
    ],
)
def test_bad_files_are_refused_and_leave_nothing(
    api: ApiServer, name: str, payload: bytes, status: int, code: str
) -> None:
    with api.client(make_key("acme")) as c:
        batch = c.post("/v1/batches", json={}).json()
        resp = c.post(f"/v1/batches/{batch['id']}/files", files=[("file", (name, payload, "audio/mpeg"))])
        _assert_problem(resp, status, code)
        # one bad file among good ones: the whole request is refused, the good file is not kept
        mixed = c.post(
            f"/v1/batches/{batch['id']}/files",
            files=[
                ("file", ("good.wav", sine_wav(1.0), "audio/wav")),
                ("file", (name, payload, "audio/wav")),
            ],
        )
        _assert_problem(mixed, status, code)
        single = c.post("/v1/jobs", files=[("file", (name, payload, "audio/wav"))])
        _assert_problem(single, status, code)
        assert c.get("/v1/batches").json()["items"][0]["id"] == batch["id"]  # /v1/jobs made no batch
    assert _jobs() == 0
    assert tenant_objects("acme") == []


@pytest.fixture
def small_api(stack: Stack) -> Iterator[ApiServer]:
    """A server with a 256 KiB upload limit."""
    server = start_api_server(stack, VOXQ_MAX_UPLOAD_BYTES=str(SMALL_LIMIT))
    try:
        yield server
    finally:
        stop_api_server(server)


def test_too_big_by_content_length_is_413_before_the_body_is_read(small_api: ApiServer) -> None:
    key = make_key("acme")
    with small_api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
    port = int(small_api.url.rsplit(":", 1)[1])
    announced = 50 * 1024**3  # 50 GiB announced; we send only the headers and a few bytes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/batches/{batch_id}/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {announced}\r\n\r\n"
                '--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\nRIFF'
            ).encode()
        )
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert time.monotonic() - started < 15  # an answer at all proves it: we sent only the headers
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/problem+json" in head and b'"file_too_large"' in body
    assert tenant_objects("acme") == [] and _jobs() == 0


def test_too_big_while_streaming_is_413_and_aborts_the_s3_upload(small_api: ApiServer) -> None:
    key = make_key("acme")
    with small_api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
    port = int(small_api.url.rsplit(":", 1)[1])
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # chunked: no Content-Length, so only counting the bytes can catch the oversized file
        sock.sendall(
            (
                f"POST /v1/batches/{batch_id}/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: multipart/form-data; boundary=bb\r\nTransfer-Encoding: chunked\r\n\r\n"
            ).encode()
        )
        first = b'--bb\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n' + sine_wav(
            1.0
        )
        sock.sendall(b"%x\r\n%s\r\n" % (len(first), first))
        block = b"\0" * (64 * 1024)
        for _ in range(10_000):  # up to 640 MB offered; stop as soon as the server has answered
            ready, _, _ = io_select.select([sock], [], [], 0)
            if ready:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
            except OSError:
                break  # the server closed the connection on us: it is not reading the rest
            sent += len(block)
        sock.settimeout(10)
        while b"file_too_large" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"application/problem+json" in answer and b'"file_too_large"' in answer
    assert sent < SMALL_LIMIT + 8 * 1024 * 1024  # answered long before the 640 MB were offered
    assert tenant_objects("acme") == [] and _jobs() == 0
    with small_api.client(key) as c:  # presigned uploads respect the limit too
        ask = c.post(f"/v1/batches/{batch_id}/uploads", json={"filename": "p.wav", "bytes": SMALL_LIMIT + 1})
        _assert_problem(ask, 413, "file_too_large")


def test_unknown_fields_and_bad_values_are_422(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        _assert_problem(c.post("/v1/batches", json={"name": "x", "colour": "red"}), 422, "unknown_field")
        _assert_problem(c.post("/v1/batches", json={"profile": "opera"}), 422, "validation_error")
        _assert_problem(c.post("/v1/batches", json={"language": "english"}), 422, "validation_error")
        _assert_problem(c.post("/v1/batches", json={"budget_usd": -1}), 422, "validation_error")
        _assert_problem(c.post("/v1/batches", json={"webhook_url": "not a url"}), 422, "validation_error")
        _assert_problem(
            c.post("/v1/batches", content=b"{not json", headers={"Content-Type": "application/json"}),
            422,
            "validation_error",
        )
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        _assert_problem(
            c.post(f"/v1/batches/{batch_id}/uploads", json={"filename": "a", "bytes": 1, "extra": 1}),
            422,
            "unknown_field",
        )
        _assert_problem(
            c.post(
                f"/v1/batches/{batch_id}/files",
                files=[("file", ("a.wav", sine_wav(0.5), "audio/wav"))],
                data={"profile": "podcast"},
            ),
            422,
            "unknown_field",
        )
        _assert_problem(
            c.post(f"/v1/batches/{batch_id}/files", json={"file": "x"}), 415, "unsupported_content_type"
        )
        _assert_problem(c.get("/v1/jobs/not-a-uuid"), 422, "validation_error")
        _assert_problem(
            c.get(f"/v1/batches/{batch_id}/jobs", params={"status": "bogus"}), 422, "validation_error"
        )
        _assert_problem(c.get(f"/v1/batches/{batch_id}/jobs", params={"limit": 0}), 422, "validation_error")
        _assert_problem(c.get("/v1/nothing-here"), 404, "not_found")
        _assert_problem(c.put("/v1/batches"), 405, "method_not_allowed")
        _assert_problem(c.get("/v1/usage", params={"from": "yesterday"}), 400, "invalid_date")
    assert _jobs() == 0


def test_filenames_are_data_only(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        wav = sine_wav(0.5)
        raw_name = "../../etc/pa\x07ss\x1bwd \u00fcber\u2028 \U0001f3b5\x7f.wav".encode()
        body = (
            b'--xx\r\nContent-Disposition: form-data; name="file"; filename="' + raw_name + b'"\r\n'
            b"Content-Type: audio/wav\r\n\r\n" + wav + b"\r\n--xx--\r\n"
        )
        resp = c.post(
            f"/v1/batches/{batch_id}/files",
            content=body,
            headers={"Content-Type": "multipart/form-data; boundary=xx"},
        )
        assert resp.status_code == 201, resp.text
        job = resp.json()["jobs"][0]
        assert job["filename"] == "../../etc/passwd \u00fcber \U0001f3b5.wav"
    with session_scope() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.object_key is not None
        assert row.object_key.endswith(job["sha256"]) and "etc" not in row.object_key


def test_client_going_away_mid_upload_leaves_nothing(api: ApiServer) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST /v1/batches/{batch_id}/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {200 * 1024 * 1024}\r\n\r\n"
                '--b\r\nContent-Disposition: form-data; name="file"; filename="cut.wav"\r\n\r\n'
            ).encode()
            + sine_wav(1.0)
        )
        for _ in range(40):  # 40 MB: several S3 parts are written before we vanish
            sock.sendall(b"\0" * (1024 * 1024))
        # the upload really is under way in S3 (a multipart upload exists) before we go away
        wait_until(lambda: tenant_objects("acme"), timeout=30, what="the upload to reach S3")
    wait_until(lambda: tenant_objects("acme") == [], timeout=30, what="the partial upload to be removed")
    assert _jobs() == 0
