"""`Idempotency-Key` on POSTs: replay, different body, expiry, concurrency, multipart uploads."""

from __future__ import annotations

import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import func, select, update

from core.db import session_scope
from core.models import Batch, IdempotencyRecord, Job
from core.storage import Storage
from tests.api_helpers import (
    ApiServer,
    make_key,
    redis_queue_length,
    sine_wav,
)
from tests.support import Stack, wait_until


def _count(model: type[Batch] | type[Job]) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_same_key_same_body_replays_first_answer(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        headers = {"Idempotency-Key": "create-1"}
        first = c.post("/v1/batches", json={"name": "x", "profile": "podcast"}, headers=headers)
        # same JSON with keys in another order is the same request
        second = c.post(
            "/v1/batches",
            content=b'{"profile": "podcast", "name": "x"}',
            headers={**headers, "Content-Type": "application/json"},
        )
        assert first.status_code == second.status_code == 201
        assert second.json()["id"] == first.json()["id"]
        assert second.headers.get("idempotent-replayed") == "true"
        assert "idempotent-replayed" not in first.headers
        assert _count(Batch) == 1


def test_same_key_different_body_is_422(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        headers = {"Idempotency-Key": "k"}
        assert c.post("/v1/batches", json={"name": "one"}, headers=headers).status_code == 201
        other = c.post("/v1/batches", json={"name": "two"}, headers=headers)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
        other_path = c.post(f"/v1/batches/{uuid.uuid4()}/submit", headers=headers)
        assert other_path.status_code == 422 and other_path.json()["code"] == "idempotency_key_reused"
        assert _count(Batch) == 1


def test_keys_expire_after_ttl_and_are_per_tenant(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c, api.client(make_key("other")) as d:
        headers = {"Idempotency-Key": "daily"}
        first = c.post("/v1/batches", json={}, headers=headers).json()
        with session_scope() as session:
            row = session.scalars(select(IdempotencyRecord)).one()
            ttl = row.expires_at - row.created_at
            assert timedelta(hours=23, minutes=59) < ttl <= timedelta(hours=24, seconds=1)
        theirs = d.post("/v1/batches", json={}, headers=headers)
        assert theirs.status_code == 201 and theirs.json()["id"] != first["id"]
        with session_scope() as session:
            session.execute(
                update(IdempotencyRecord).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        later = c.post("/v1/batches", json={}, headers=headers)
        assert later.status_code == 201 and later.json()["id"] != first["id"]
        assert "idempotent-replayed" not in later.headers
        assert _count(Batch) == 3


def test_failed_request_releases_the_key(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        headers = {"Idempotency-Key": "retry-me"}
        bad = c.post("/v1/batches", json={"profile": "opera"}, headers=headers)
        assert bad.status_code == 422
        good = c.post("/v1/batches", json={"profile": "podcast"}, headers=headers)
        assert good.status_code == 201
        bad_key = c.post("/v1/batches", json={}, headers={"Idempotency-Key": "x" * 300})
        assert bad_key.status_code == 400 and bad_key.json()["code"] == "invalid_idempotency_key"


def test_concurrent_duplicates_run_once(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        c.post(f"/v1/batches/{batch_id}/files", files=[("file", ("a.wav", sine_wav(1.0), "audio/wav"))])

    def submit(_: int) -> httpx.Response:
        with api.client(key) as client:
            return client.post(f"/v1/batches/{batch_id}/submit", headers={"Idempotency-Key": "sub"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(submit, range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert set(statuses) <= {202, 409}, statuses
    winners = [a for a in answers if a.status_code == 202 and "idempotent-replayed" not in a.headers]
    assert len(winners) == 1
    assert all(a.json()["code"] == "idempotency_request_in_progress" for a in answers if a.status_code == 409)
    assert all(a.json() == winners[0].json() for a in answers if a.status_code == 202)
    assert redis_queue_length(stack, "ingest") == 1  # the work ran exactly once


def test_multipart_upload_with_key_replays_without_storing_twice(api: ApiServer, stack: Stack) -> None:
    data = sine_wav(1.0)
    with api.client(make_key("acme")) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        headers = {"Idempotency-Key": "upload-1"}
        files = [("file", ("a.wav", data, "audio/wav"))]
        first = c.post(f"/v1/batches/{batch_id}/files", files=files, headers=headers)
        second = c.post(f"/v1/batches/{batch_id}/files", files=files, headers=headers)
        assert first.status_code == second.status_code == 201
        assert first.json() == second.json() and second.headers.get("idempotent-replayed") == "true"
        assert _count(Job) == 1
        other = c.post(
            f"/v1/batches/{batch_id}/files",
            files=[("file", ("a.wav", sine_wav(2.0), "audio/wav"))],
            headers=headers,
        )
        assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
        assert _count(Job) == 1
        single = c.post("/v1/jobs", files=files, data={"language": "en"}, headers={"Idempotency-Key": "one"})
        again = c.post("/v1/jobs", files=files, data={"language": "en"}, headers={"Idempotency-Key": "one"})
        assert single.status_code == again.status_code == 202 and single.json()["id"] == again.json()["id"]
        assert _count(Job) == 2 and redis_queue_length(stack, "ingest") == 1
    storage = Storage()
    with session_scope() as session:
        tenant_id = session.scalars(select(Job.tenant_id)).first()
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{tenant_id}/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    assert len(keys) == 1 and "/incoming/" not in keys[0]  # one content-addressed object, no leftovers


def test_duplicate_upload_while_the_first_is_streaming_gets_409(api: ApiServer) -> None:
    key = make_key("acme")
    wav = sine_wav(1.0)
    with api.client(key) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
    head = b'--q\r\nContent-Disposition: form-data; name="file"; filename="slow.wav"\r\n\r\n'
    tail = b"\r\n--q--\r\n"
    port = int(api.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST /v1/batches/{batch_id}/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Idempotency-Key: same\r\nContent-Type: multipart/form-data; boundary=q\r\n"
                f"Content-Length: {len(head) + len(wav) + len(tail)}\r\n\r\n"
            ).encode()
            + head
            + wav[:1000]
        )
        wait_until(lambda: _count_keys() == 1, timeout=10, what="the first upload to claim its key")
        with api.client(key) as c:
            second = c.post(
                f"/v1/batches/{batch_id}/files",
                files=[("file", ("slow.wav", wav, "audio/wav"))],
                headers={"Idempotency-Key": "same"},
            )
        assert second.status_code == 409 and second.json()["code"] == "idempotency_request_in_progress"
        sock.sendall(wav[1000:] + tail)
        answer = b""
        while b'"jobs"' not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    with api.client(key) as c:
        third = c.post(
            f"/v1/batches/{batch_id}/files",
            files=[("file", ("slow.wav", wav, "audio/wav"))],
            headers={"Idempotency-Key": "same"},
        )
    assert third.status_code == 201 and third.headers.get("idempotent-replayed") == "true"
    assert _count(Job) == 1


def _count_keys() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0)
