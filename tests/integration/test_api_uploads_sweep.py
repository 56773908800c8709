"""Leftovers of uploads killed mid-way are swept; presigned uploads waiting for submit are kept."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import httpx
from sqlalchemy import select

from core.db import session_scope
from core.models import Job, Tenant
from core.storage import Storage
from tests.api_helpers import ApiServer, make_key, sine_wav
from voxq.cli import main as voxq_main
from worker.upload_sweep import sweep_incoming


def test_sweep_removes_abandoned_incoming_data_only(api: ApiServer) -> None:
    key = make_key("acme")
    data = sine_wav(1.0)
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        kept_job = c.post(f"/v1/batches/{batch['id']}/files", files=[("file", ("a.wav", data, "audio/wav"))])
        slot = c.post(
            f"/v1/batches/{batch['id']}/uploads", json={"filename": "big.wav", "bytes": len(data)}
        ).json()
        assert httpx.put(slot["upload_url"], content=data, timeout=30).status_code == 200
    with session_scope() as session:
        tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == "acme"))
        content_key = session.get(Job, uuid.UUID(kept_job.json()["jobs"][0]["id"])).object_key  # type: ignore[union-attr]
        presigned_key = session.get(Job, uuid.UUID(slot["job_id"])).object_key  # type: ignore[union-attr]
    storage = Storage()
    # what a killed API process leaves: a temporary object and an unfinished multipart upload
    orphan = f"{tenant_id}/incoming/{uuid.uuid4().hex}"
    storage.upload_bytes(b"partial", orphan)
    unfinished = f"{tenant_id}/incoming/{uuid.uuid4().hex}"
    upload_id = storage.client.create_multipart_upload(Bucket=storage.bucket, Key=unfinished)["UploadId"]
    storage.client.upload_part(
        Bucket=storage.bucket, Key=unfinished, UploadId=upload_id, PartNumber=1, Body=b"x" * 1024
    )

    assert sweep_incoming(storage, timedelta(hours=1)).deleted_objects == 0  # too young to be abandoned
    time.sleep(1.1)
    result = sweep_incoming(storage, timedelta(0))
    assert result.deleted_objects == 1 and result.aborted_multipart_uploads >= 1
    assert storage.head(orphan) is None
    uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=f"{tenant_id}/")
    assert uploads.get("Uploads", []) == []
    assert storage.head(content_key or "") is not None  # finished audio is never touched
    assert storage.head(presigned_key or "") is not None  # waiting for submit: kept
    assert voxq_main(["sweep-uploads", "--older-than-hours", "0"]) == 0
    assert storage.head(presigned_key or "") is not None
