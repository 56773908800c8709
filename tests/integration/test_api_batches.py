"""Ingest API over real HTTP (uvicorn subprocess) against real Postgres, Valkey and SeaweedFS."""

from __future__ import annotations

import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select

from core.db import session_scope
from core.models import Batch, CostRecord, Job, Transcript
from core.storage import Storage, content_key
from tests.api_helpers import (
    ApiServer,
    finish_job,
    grant_import,
    import_bucket,
    make_key,
    redis_queue_length,
    scrape,
    sine_wav,
)
from tests.support import Stack


def _files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (name, data, "audio/wav")) for name, data in items]


def test_create_get_and_list_batches_with_cursor_pagination(api: ApiServer) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        created = c.post(
            "/v1/batches",
            json={
                "name": "calls",
                "profile": "voicemail",
                "language": "en",
                "priority": "high",
                "metadata": {"a": 1},
            },
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["status"] == "open" and body["profile"] == "voicemail" and body["priority"] == "high"
        assert body["counts"]["uploaded"] == 0 and body["total_jobs"] == 0 and body["metadata"] == {"a": 1}
        got = c.get(f"/v1/batches/{body['id']}").json()
        assert got["id"] == body["id"] and got["name"] == "calls"

        ids = [body["id"]] + [c.post("/v1/batches", json={"name": f"b{i}"}).json()["id"] for i in range(6)]
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = c.get("/v1/batches", params=params).json()
            pages += 1
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == list(reversed(ids))  # newest first, each exactly once
        c.post(f"/v1/batches/{ids[2]}/cancel")
        cancelled = c.get("/v1/batches", params={"status": "cancelled"}).json()["items"]
        assert [b["id"] for b in cancelled] == [ids[2]]
        assert len(c.get("/v1/batches", params={"status": "open"}).json()["items"]) == 6
        bad = c.get("/v1/batches", params={"cursor": "not-a-cursor!"})
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_cursor"


def _uploaded_bytes_metric(api: ApiServer) -> float:
    text = scrape(api.url + "/metrics")
    match = re.search(r"^voxq_uploaded_bytes_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_upload_files_streams_to_content_addressed_keys(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    one, two = sine_wav(1.0), sine_wav(2.0, freq=300)
    metric_before = _uploaded_bytes_metric(api)
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={"profile": "podcast"}).json()
        resp = c.post(
            f"/v1/batches/{batch['id']}/files", files=_files(("héllo wörld.wav", one), ("b.wav", two))
        )
        assert resp.status_code == 201, resp.text
        jobs = resp.json()["jobs"]
        assert [j["filename"] for j in jobs] == ["héllo wörld.wav", "b.wav"]
        assert [j["sha256"] for j in jobs] == [
            hashlib.sha256(one).hexdigest(),
            hashlib.sha256(two).hexdigest(),
        ]
        assert [j["bytes"] for j in jobs] == [len(one), len(two)]
        assert all(j["status"] == "uploaded" for j in jobs)
        job = c.get(f"/v1/jobs/{jobs[1]['id']}").json()
        assert job["duration_seconds"] == 2.0 and job["codec"] == "pcm_s16le"
        assert job["sample_rate"] == 16000 and job["channels"] == 1 and job["attempts"] == 0
        stats = c.get(f"/v1/batches/{batch['id']}").json()
        assert stats["counts"]["uploaded"] == 2 and stats["total_jobs"] == 2 and stats["progress"] == 0.0
    assert _uploaded_bytes_metric(api) - metric_before == len(one) + len(two)

    storage = Storage()
    with session_scope() as session:
        rows = session.scalars(select(Job).where(Job.batch_id == uuid.UUID(batch["id"]))).all()
        tenant_id = str(rows[0].tenant_id)
        for row in rows:
            assert row.object_key == content_key(tenant_id, row.sha256 or "")
            assert "wav" not in (row.object_key or "")
    for row in rows:
        assert b"".join(storage.iter_chunks(row.object_key or "")) in (one, two)
    listed = storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{tenant_id}/incoming/")
    assert listed.get("KeyCount", 0) == 0  # temporary upload keys are gone


def test_submit_marks_jobs_queued_and_sends_tasks_to_redis(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        c.post(
            f"/v1/batches/{batch['id']}/files",
            files=_files(("a.wav", sine_wav(1.0)), ("b.wav", sine_wav(0.5))),
        )
        before = redis_queue_length(stack, "ingest")
        resp = c.post(f"/v1/batches/{batch['id']}/submit")
        assert resp.status_code == 202, resp.text
        assert resp.json()["queued"] == 2 and resp.json()["status"] == "processing"
        assert redis_queue_length(stack, "ingest") == before + 1  # one prepare task carries both jobs
        listed = c.get(f"/v1/batches/{batch['id']}/jobs", params={"status": "queued"}).json()
        assert len(listed["items"]) == 2 and all(j["queued_at"] for j in listed["items"])
        again = c.post(f"/v1/batches/{batch['id']}/submit").json()
        assert again["queued"] == 0  # compare-and-set: nothing is queued twice
        empty = c.post("/v1/batches", json={}).json()
        refused = c.post(f"/v1/batches/{empty['id']}/submit")
        assert refused.status_code == 409 and refused.json()["code"] == "batch_empty"


def test_auto_submit_batch_and_single_job_endpoint_queue_at_once(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={"auto_submit": True, "profile": "voicemail"}).json()
        up = c.post(f"/v1/batches/{batch['id']}/files", files=_files(("vm.wav", sine_wav(1.0))))
        assert up.json()["jobs"][0]["status"] == "queued"
        assert redis_queue_length(stack, "ingest") == 1

        one = c.post(
            "/v1/jobs",
            files=_files(("single.wav", sine_wav(1.5))),
            data={
                "profile": "voicemail",
                "language": "de",
                "models": "gpt-4o-transcribe,local",
                "metadata": '{"x": 2}',
            },
        )
        assert one.status_code == 202, one.text
        job = one.json()
        assert (
            job["status"] == "queued" and job["filename"] == "single.wav" and job["duration_seconds"] == 1.5
        )
        assert redis_queue_length(stack, "ingest") == 2
        single_batch = c.get(f"/v1/batches/{job['batch_id']}").json()
        assert single_batch["language"] == "de" and single_batch["models"] == ["gpt-4o-transcribe", "local"]
        assert single_batch["metadata"] == {"x": 2} and single_batch["counts"]["queued"] == 1

        bad = c.post("/v1/jobs", files=_files(("s.wav", sine_wav(0.5))), data={"colour": "red"})
        assert bad.status_code == 422 and bad.json()["code"] == "unknown_field"
        two = c.post("/v1/jobs", files=_files(("a.wav", sine_wav(0.5)), ("b.wav", sine_wav(0.6))))
        assert two.status_code == 422 and two.json()["code"] == "one_file_only"


def test_presigned_upload_is_verified_at_submit(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    good, bad = sine_wav(3.0), b"%PDF-1.7 definitely not audio" * 100
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={"profile": "podcast"}).json()
        slots = []
        for name, data, sha in (
            ("pod.wav", good, hashlib.sha256(good).hexdigest()),
            ("bad.mp3", bad, None),
            ("late.wav", good, None),
        ):
            resp = c.post(
                f"/v1/batches/{batch['id']}/uploads",
                json={"filename": name, "bytes": len(data), **({"sha256": sha} if sha else {})},
            )
            assert resp.status_code == 201, resp.text
            slots.append((resp.json(), data))
        assert datetime.fromisoformat(slots[0][0]["expires_at"]) > datetime.now(UTC) + timedelta(minutes=5)
        for slot, data in slots[:2]:
            put = httpx.put(slot["upload_url"], content=data, headers=slot["headers"], timeout=30)
            assert put.status_code == 200, put.text
        assert c.get(f"/v1/jobs/{slots[0][0]['job_id']}").json()["status"] == "pending_upload"
        resp = c.post(f"/v1/batches/{batch['id']}/submit")
        assert resp.status_code == 202, resp.text
        out = resp.json()
        assert out["job_ids"] == [slots[0][0]["job_id"]]
        assert [r["code"] for r in out["rejected"]] == ["unsupported_media"]
        assert out["waiting_for_upload"] == [slots[2][0]["job_id"]]
        job = c.get(f"/v1/jobs/{slots[0][0]['job_id']}").json()
        assert job["status"] == "queued" and job["duration_seconds"] == 3.0
        failed = c.get(f"/v1/jobs/{slots[1][0]['job_id']}").json()
        assert failed["status"] == "failed" and failed["error"]["code"] == "unsupported_media"
    with session_scope() as session:
        row = session.get(Job, uuid.UUID(slots[0][0]["job_id"]))
        assert row is not None and row.object_key == content_key(str(row.tenant_id), row.sha256 or "")
    assert b"".join(Storage().iter_chunks(row.object_key or "")) == good


def test_import_from_allowed_bucket_by_reference(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    grant_import("acme", import_bucket(stack), "calls/")
    storage = Storage(bucket=import_bucket(stack))
    storage.ensure_bucket()
    storage.upload_bytes(sine_wav(2.0), "calls/2026/a.wav")
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        uri = f"s3://{import_bucket(stack)}/calls/2026/a.wav"
        resp = c.post(f"/v1/batches/{batch['id']}/imports", json={"s3_uris": [uri]})
        assert resp.status_code == 201, resp.text
        job = c.get(f"/v1/jobs/{resp.json()['jobs'][0]['id']}").json()
        assert job["source_uri"] == uri and job["duration_seconds"] == 2.0 and job["status"] == "uploaded"
        refused = c.post(
            f"/v1/batches/{batch['id']}/imports", json={"s3_uris": [f"s3://{stack.s3_bucket}/x.wav"]}
        )
        assert refused.status_code == 403 and refused.json()["code"] == "bucket_not_allowed"
        missing = c.post(f"/v1/batches/{batch['id']}/imports", json={"s3_uris": [uri + ".nope"]})
        assert missing.status_code == 422 and missing.json()["code"] == "object_not_found"
        storage.upload_bytes(b"%PDF-1.4 not audio" * 100, "calls/2026/report.mp3")
        mixed = [uri, f"s3://{import_bucket(stack)}/calls/2026/report.mp3"]
        refused_pdf = c.post(f"/v1/batches/{batch['id']}/imports", json={"s3_uris": mixed})
        assert refused_pdf.status_code == 415 and refused_pdf.json()["code"] == "unsupported_media"
        assert c.get(f"/v1/batches/{batch['id']}").json()["total_jobs"] == 1  # all or nothing

        auto = c.post("/v1/batches", json={"auto_submit": True}).json()
        queued = c.post(f"/v1/batches/{auto['id']}/imports", json={"s3_uris": [uri]})
        assert queued.status_code == 201 and queued.json()["jobs"][0]["status"] == "queued"
        assert redis_queue_length(stack, "ingest") == 1


def test_transcript_formats_attempts_and_usage(api: ApiServer) -> None:
    key = make_key("acme")
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        jobs = c.post(
            f"/v1/batches/{batch['id']}/files",
            files=_files(("a.wav", sine_wav(1.0)), ("b.wav", sine_wav(1.2))),
        ).json()["jobs"]
        not_ready = c.get(f"/v1/jobs/{jobs[0]['id']}/transcript")
        assert not_ready.status_code == 409 and not_ready.json()["code"] == "transcript_not_ready"
        finish_job(
            jobs[0]["id"],
            segments=[
                {"start": 0.0, "end": 1.5, "text": " hello"},
                {"start": 61.25, "end": 3662.5, "text": "there"},
            ],
        )
        finish_job(jobs[1]["id"], segments=None, text="no stamps")
        txt = c.get(f"/v1/jobs/{jobs[0]['id']}/transcript")
        assert (
            txt.status_code == 200
            and txt.text == "hello there"
            and txt.headers["content-type"].startswith("text/plain")
        )
        js = c.get(f"/v1/jobs/{jobs[0]['id']}/transcript", params={"format": "json"}).json()
        assert js["text"] == "hello there" and js["model"] == "whisper-1" and len(js["segments"]) == 2
        srt = c.get(f"/v1/jobs/{jobs[0]['id']}/transcript", params={"format": "srt"}).text
        assert srt == "1\n00:00:00,000 --> 00:00:01,500\nhello\n\n2\n00:01:01,250 --> 01:01:02,500\nthere\n"
        vtt = c.get(f"/v1/jobs/{jobs[0]['id']}/transcript", params={"format": "vtt"}).text
        assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nhello\n")
        no_ts = c.get(f"/v1/jobs/{jobs[1]['id']}/transcript", params={"format": "srt"})
        assert no_ts.status_code == 409 and no_ts.json()["code"] == "timestamps_unavailable"
        assert no_ts.headers["content-type"] == "application/problem+json"
        assert c.get(f"/v1/jobs/{jobs[1]['id']}/transcript").text == "no stamps"

        job = c.get(f"/v1/jobs/{jobs[0]['id']}").json()
        assert job["model"] == "whisper-1" and job["attempts"] == 1 and job["cost_usd"] == 0.0002
        attempts = c.get(f"/v1/jobs/{jobs[0]['id']}/attempts").json()["items"]
        assert (
            len(attempts) == 1 and attempts[0]["cost_usd"] == 0.0002 and attempts[0]["outcome"] == "success"
        )

        by_model = c.get("/v1/usage", params={"group_by": "model"}).json()
        assert by_model["rows"] == [
            {
                "key": "whisper-1",
                "cost_usd": 0.0004,
                "billed_seconds": 4.0,
                "records": 2,
                "billed_usd": 0.0004,
                "estimated_usd": 0.0,
            }
        ]
        assert by_model["total_usd"] == 0.0004
        by_batch = c.get("/v1/usage", params={"group_by": "batch"}).json()
        assert [r["key"] for r in by_batch["rows"]] == [batch["id"]]
        today = datetime.now(UTC).date()
        by_day = c.get("/v1/usage", params={"from": str(today), "to": str(today)}).json()
        assert by_day["rows"][0]["key"] == str(today) and by_day["rows"][0]["records"] == 2
        old = c.get("/v1/usage", params={"from": "2020-01-01", "to": "2020-01-31"}).json()
        assert old["rows"] == [] and old["total_usd"] == 0


def test_cancel_retry_and_delete(api: ApiServer, stack: Stack) -> None:
    key = make_key("acme")
    data = sine_wav(1.0)
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        jobs = c.post(
            f"/v1/batches/{batch['id']}/files",
            files=_files(("a.wav", data), ("dup.wav", data), ("c.wav", sine_wav(2.0))),
        ).json()["jobs"]
        cancelled = c.post(f"/v1/jobs/{jobs[2]['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        again = c.post(f"/v1/jobs/{jobs[2]['id']}/cancel")
        assert again.status_code == 409 and again.json()["code"] == "job_not_cancellable"

        # a failed job is queued again by retry-failed
        with session_scope() as session:
            row = session.get(Job, uuid.UUID(jobs[1]["id"]))
            assert row is not None
            row.status, row.error_code, row.error_message = "failed", "provider_error", "boom"
        retry = c.post(f"/v1/batches/{batch['id']}/retry-failed")
        assert retry.status_code == 202 and retry.json()["job_ids"] == [jobs[1]["id"]]
        retried = c.get(f"/v1/jobs/{jobs[1]['id']}").json()
        assert retried["status"] == "queued" and retried["error"] is None
        assert redis_queue_length(stack, "ingest") == 1

        finish_job(jobs[0]["id"], segments=None)
        storage = Storage()
        with session_scope() as session:
            shared_key = session.get(Job, uuid.UUID(jobs[0]["id"])).object_key  # type: ignore[union-attr]
        assert shared_key and storage.head(shared_key) is not None
        assert c.delete(f"/v1/jobs/{jobs[0]['id']}").status_code == 204
        assert c.get(f"/v1/jobs/{jobs[0]['id']}").status_code == 404
        assert storage.head(shared_key) is not None  # the duplicate job still needs the audio
        assert c.delete(f"/v1/jobs/{jobs[1]['id']}").status_code == 204
        assert storage.head(shared_key) is None
        with session_scope() as session:
            assert (
                session.scalar(select(Transcript).where(Transcript.job_id == uuid.UUID(jobs[0]["id"])))
                is None
            )
            costs = session.scalars(
                select(CostRecord).where(CostRecord.job_id == uuid.UUID(jobs[0]["id"]))
            ).all()
            assert len(costs) == 1  # cost records are kept
            deleted = session.get(Job, uuid.UUID(jobs[0]["id"]))
            assert deleted is not None and deleted.deleted_at is not None and deleted.filename is None
        listed = c.get(f"/v1/batches/{batch['id']}/jobs").json()["items"]
        assert [j["id"] for j in listed] == [jobs[2]["id"]]
        assert c.get("/v1/usage", params={"group_by": "model"}).json()["total_usd"] == 0.0002

        stopped = c.post(f"/v1/batches/{batch['id']}/cancel").json()
        assert stopped["status"] == "cancelled"
        late = c.post(f"/v1/batches/{batch['id']}/files", files=_files(("z.wav", data)))
        assert late.status_code == 409 and late.json()["code"] == "batch_cancelled"
    with session_scope() as session:
        assert session.get(Batch, uuid.UUID(batch["id"])).status == "cancelled"  # type: ignore[union-attr]


def test_health_and_openapi(api: ApiServer) -> None:
    health = httpx.get(api.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "s3": "ok"}}
    ready = httpx.get(api.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["checks"]["s3"] == "ok"
    spec = httpx.get(api.url + "/openapi.json", timeout=10).json()
    for path in (
        "/v1/batches",
        "/v1/batches/{batch_id}/files",
        "/v1/batches/{batch_id}/uploads",
        "/v1/batches/{batch_id}/imports",
        "/v1/batches/{batch_id}/submit",
        "/v1/jobs",
        "/v1/jobs/{job_id}/transcript",
        "/v1/usage",
    ):
        assert path in spec["paths"], path
    assert httpx.get(api.url + "/docs", timeout=10).status_code == 200


def test_presigned_upload_with_wrong_size_or_hash_is_rejected_at_submit(api: ApiServer) -> None:
    data = sine_wav(1.0)
    with api.client(make_key("acme")) as c:
        batch = c.post("/v1/batches", json={}).json()
        short = c.post(
            f"/v1/batches/{batch['id']}/uploads", json={"filename": "s.wav", "bytes": len(data) + 10}
        ).json()
        wrong_hash = c.post(
            f"/v1/batches/{batch['id']}/uploads",
            json={"filename": "h.wav", "bytes": len(data), "sha256": "0" * 64, "content_type": "audio/wav"},
        ).json()
        assert wrong_hash["headers"] == {"Content-Type": "audio/wav"}
        for slot in (short, wrong_hash):
            assert (
                httpx.put(slot["upload_url"], content=data, headers=slot["headers"], timeout=30).status_code
                == 200
            )
        out = c.post(f"/v1/batches/{batch['id']}/submit").json()
        assert sorted(r["code"] for r in out["rejected"]) == ["sha256_mismatch", "size_mismatch"]
        assert out["queued"] == 0
        for slot in (short, wrong_hash):
            assert c.get(f"/v1/jobs/{slot['job_id']}").json()["status"] == "failed"
    storage = Storage()
    with session_scope() as session:
        tenant_id = session.scalars(select(Job.tenant_id)).first()
    assert (
        storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{tenant_id}/").get("KeyCount", 0) == 0
    )


def test_jobs_list_pages_with_cursor_in_upload_order(api: ApiServer) -> None:
    with api.client(make_key("acme")) as c:
        batch = c.post("/v1/batches", json={}).json()
        files = [("file", (f"{i}.wav", sine_wav(0.2 + i / 10), "audio/wav")) for i in range(5)]
        uploaded = [j["id"] for j in c.post(f"/v1/batches/{batch['id']}/files", files=files).json()["jobs"]]
        seen: list[str] = []
        cursor = None
        while True:
            page = c.get(
                f"/v1/batches/{batch['id']}/jobs",
                params={"limit": 2, **({"cursor": cursor} if cursor else {})},
            ).json()
            assert len(page["items"]) <= 2
            seen += [j["id"] for j in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert seen == uploaded


def test_readyz_is_503_and_submit_is_503_when_redis_is_down(api: ApiServer, stack: Stack) -> None:
    from tests.api_helpers import start_api_server, stop_api_server
    from voxq.embedded import free_port

    key = make_key("acme")
    with api.client(key) as c:  # uploaded while Redis was up
        batch = c.post("/v1/batches", json={}).json()
        files = _files(("a.wav", sine_wav(0.5)))
        job = c.post(f"/v1/batches/{batch['id']}/files", files=files).json()["jobs"][0]
    server = start_api_server(stack, VOXQ_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    try:
        health = httpx.get(server.url + "/healthz", timeout=15)
        assert health.status_code == 200
        checks = health.json()["checks"]
        assert checks["database"] == "ok" and checks["s3"] == "ok" and checks["redis"].startswith("error")
        ready = httpx.get(server.url + "/readyz", timeout=15)
        assert ready.status_code == 503 and ready.headers["content-type"] == "application/problem+json"
        assert ready.json()["code"] == "not_ready" and "redis" in ready.json()["detail"]
        with server.client(key) as c:
            no_lock = c.post(f"/v1/batches/{batch['id']}/files", files=_files(("b.wav", sine_wav(0.7))))
            assert no_lock.status_code == 503 and no_lock.json()["code"] == "service_unavailable"
            assert no_lock.headers["retry-after"] == "5"
            refused = c.post(f"/v1/batches/{batch['id']}/submit")
            assert refused.status_code == 503 and refused.json()["code"] == "queue_unavailable"
            assert refused.headers["retry-after"] == "5"
            # put back, so it can be submitted again
            assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "uploaded"
            assert c.get(f"/v1/batches/{batch['id']}").json()["total_jobs"] == 1
    finally:
        stop_api_server(server)


def test_delete_and_upload_of_the_same_audio_take_the_objects_lock(api: ApiServer, stack: Stack) -> None:
    import redis as redis_lib

    from core import names

    key = make_key("acme")
    data = sine_wav(1.0)
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        job = c.post(f"/v1/batches/{batch['id']}/files", files=_files(("a.wav", data))).json()["jobs"][0]
    with session_scope() as session:
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None and row.object_key
        object_key = row.object_key
    client = redis_lib.Redis.from_url(stack.redis_url)
    lock = client.lock(names.KEY_OBJECT_LOCK + hashlib.sha256(object_key.encode()).hexdigest(), timeout=60)
    assert lock.acquire(blocking=False)
    results: dict[str, int] = {}

    def run(name: str, call: Callable[[httpx.Client], httpx.Response]) -> None:
        with api.client(key) as c:
            results[name] = call(c).status_code

    def upload(c: httpx.Client) -> httpx.Response:
        return c.post(f"/v1/batches/{batch['id']}/files", files=_files(("same.wav", data)))

    threads = [
        threading.Thread(target=run, args=("delete", lambda c: c.delete(f"/v1/jobs/{job['id']}"))),
        threading.Thread(target=run, args=("upload", upload)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    assert results == {}  # both wait for the object's lock
    lock.release()
    for thread in threads:
        thread.join(30)
    client.close()
    assert results == {"delete": 204, "upload": 201}
    with api.client(key) as c:  # whichever went first, the new job's audio is there
        jobs = c.get(f"/v1/batches/{batch['id']}/jobs").json()["items"]
    assert [j["filename"] for j in jobs] == ["same.wav"]
    assert Storage().head(object_key) is not None
