"""Tenant isolation and authentication on every endpoint, over real HTTP."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import func, select

from core import auth
from core.db import session_scope
from core.models import Job
from core.settings import get_settings
from core.storage import Storage
from tests.api_helpers import ApiServer, finish_job, make_key, sine_wav
from tests.support import Stack

PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _seed_tenant_a(c: httpx.Client) -> tuple[str, str]:
    batch = c.post("/v1/batches", json={"name": "a-private"}).json()
    jobs = c.post(
        f"/v1/batches/{batch['id']}/files",
        files=[
            ("file", ("secret.wav", sine_wav(1.0), "audio/wav")),
            ("file", ("f.wav", sine_wav(0.7), "audio/wav")),
        ],
    ).json()["jobs"]
    # Attempt, cost and transcript rows on a job left `uploaded`: only tenant A may see any of them.
    finish_job(
        jobs[0]["id"], text="top secret", model="m", usd=Decimal("1.5"), billed_seconds=1.0, succeed=False
    )
    with session_scope() as session:
        failed = session.get(Job, uuid.UUID(jobs[1]["id"]))
        assert failed is not None
        failed.status = "failed"
    return batch["id"], jobs[0]["id"]


def _id_requests(batch_id: str, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    wav = [("file", ("x.wav", sine_wav(0.5), "audio/wav"))]
    return [
        ("GET", f"/v1/batches/{batch_id}", {}),
        ("GET", f"/v1/batches/{batch_id}/jobs", {}),
        ("POST", f"/v1/batches/{batch_id}/files", {"files": wav}),
        ("POST", f"/v1/batches/{batch_id}/uploads", {"json": {"filename": "p.wav", "bytes": 10}}),
        ("POST", f"/v1/batches/{batch_id}/imports", {"json": {"s3_uris": ["s3://nowhere/x.wav"]}}),
        ("POST", f"/v1/batches/{batch_id}/submit", {}),
        ("POST", f"/v1/batches/{batch_id}/cancel", {}),
        ("POST", f"/v1/batches/{batch_id}/retry-failed", {}),
        ("GET", f"/v1/jobs/{job_id}", {}),
        ("GET", f"/v1/jobs/{job_id}/transcript", {}),
        ("GET", f"/v1/jobs/{job_id}/attempts", {}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
        ("POST", f"/v1/jobs/{job_id}/align", {"json": {"timestamps": "word"}}),
        ("DELETE", f"/v1/jobs/{job_id}", {}),
    ]


def test_other_tenants_ids_answer_404_on_every_id_taking_endpoint(api: ApiServer, stack: Stack) -> None:
    key_a, key_b = make_key("tenant-a"), make_key("tenant-b")
    with api.client(key_a) as a, api.client(key_b) as b:
        batch_id, job_id = _seed_tenant_a(a)
        spec_paths = {p for p in a.get("/openapi.json").json()["paths"] if "{" in p}
        requests = _id_requests(batch_id, job_id)
        covered = {
            path.replace(batch_id, "{batch_id}").replace(job_id, "{job_id}") for _, path, _ in requests
        }
        assert spec_paths == covered  # the matrix covers every id-taking path the API serves

        for method, path, kwargs in requests:
            theirs = b.request(method, path, **kwargs)
            assert theirs.status_code == 404, (method, path, theirs.text)
            assert theirs.json()["code"] == "not_found"
            assert "secret" not in theirs.text and "a-private" not in theirs.text
            # indistinguishable from an id that does not exist at all
            random_path = path.replace(batch_id, str(uuid.uuid4())).replace(job_id, str(uuid.uuid4()))
            nowhere = b.request(method, random_path, **kwargs)
            assert (nowhere.status_code, nowhere.json()["detail"]) == (404, theirs.json()["detail"])

        # B's lists and usage never show A's rows
        assert b.get("/v1/batches").json()["items"] == []
        usage_b = b.get("/v1/usage", params={"group_by": "batch"}).json()
        assert usage_b["rows"] == [] and usage_b["total_usd"] == 0
        # ...and A's data is untouched by B's attempts
        assert a.get(f"/v1/batches/{batch_id}").json()["status"] == "open"
        assert a.get(f"/v1/jobs/{job_id}").json()["status"] == "uploaded"
        assert a.get(f"/v1/jobs/{job_id}/transcript").text == "top secret"
        assert [x["id"] for x in a.get("/v1/batches").json()["items"]] == [batch_id]
        assert a.get("/v1/usage", params={"group_by": "model"}).json()["total_usd"] == 1.5
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2  # B's upload did not land anywhere
        tenant_ids = set(session.scalars(select(Job.tenant_id)).all())
    storage = Storage()
    for tenant_id in tenant_ids:
        assert (
            storage.client.list_objects_v2(Bucket=storage.bucket, Prefix=f"{tenant_id}/").get("KeyCount") == 2
        )


def test_missing_invalid_and_revoked_keys_get_401_everywhere(api: ApiServer, stack: Stack) -> None:
    with session_scope() as session:
        issued = auth.create_key(session, "tenant-r")
    with api.client(issued.plaintext) as c:
        batch_id = c.post("/v1/batches", json={}).json()["id"]
        spec = c.get("/openapi.json").json()["paths"]
    with session_scope() as session:
        assert auth.revoke_key(session, issued.id)
    # The server remembers a valid key for VOXQ_AUTH_CACHE_SECONDS: revocation is effective after that.
    time.sleep(get_settings().auth_cache_seconds + 0.2)
    job_id = str(uuid.uuid4())
    checked = 0
    for path, ops in spec.items():
        if path in PUBLIC:
            continue
        for method in ops:
            url = api.url + path.replace("{batch_id}", batch_id).replace("{job_id}", job_id)
            for headers in (
                {},
                {"Authorization": f"Bearer {issued.plaintext}"},  # revoked
                {"Authorization": "Bearer vq_not-a-real-key"},
                {"Authorization": "Basic dXNlcjpwYXNz"},
            ):
                resp = httpx.request(method.upper(), url, headers=headers, timeout=10)
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.headers["content-type"] == "application/problem+json"
                assert resp.json()["code"] == "unauthorized"
                assert resp.headers["www-authenticate"].startswith("Bearer")
                checked += 1
    assert checked >= 4 * 15


def test_health_endpoints_need_no_key(api: ApiServer) -> None:
    assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(api.url + "/readyz", timeout=10).status_code == 200
