"""A presigned upload's audio, once submit verified it, is the job's for good: a late PUT to the same URL
changes nothing, and the sweep of abandoned uploads never removes it (issue #16, item 1)."""

from __future__ import annotations

import hashlib
import time
import uuid
from datetime import timedelta

import httpx
import pytest

from core.storage import Storage, content_key
from tests.api_helpers import ApiServer, make_key
from tests.pipeline_support import Pipeline, tones
from worker.upload_sweep import sweep_incoming

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _presigned_job(api: ApiServer, key: str, data: bytes, *, sha256: str | None = None) -> dict[str, str]:
    """A submitted presigned upload of `data`: the slot the API gave (job id, URL, headers)."""
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        body = {"filename": "big.wav", "bytes": len(data), **({"sha256": sha256} if sha256 else {})}
        slot = c.post(f"/v1/batches/{batch['id']}/uploads", json=body).json()
        put = httpx.put(slot["upload_url"], content=data, headers=slot["headers"], timeout=30)
        assert put.status_code == 200, put.text
        submitted = c.post(f"/v1/batches/{batch['id']}/submit")
        assert submitted.status_code == 202 and submitted.json()["job_ids"] == [slot["job_id"]]
    return slot


def _run(job_id: uuid.UUID) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    report = prepare_jobs([job_id], owner="test:1")
    assert report.claimed == 1 and len(report.groups) == 1, report
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"succeeded": 1}


def test_a_late_put_to_the_presigned_url_does_not_change_what_the_job_transcribes(
    api: ApiServer, pipeline: Pipeline
) -> None:
    first, other = tones(300), tones(700)
    slot = _presigned_job(api, make_key("acme"), first)
    # S3 cannot revoke a presigned URL: the PUT still succeeds, but it must not reach the job's audio.
    late = httpx.put(slot["upload_url"], content=other, headers=slot["headers"], timeout=30)
    assert late.status_code == 200
    job_id = uuid.UUID(slot["job_id"])
    row = pipeline.jobs([job_id])[job_id]
    sha = hashlib.sha256(first).hexdigest()
    assert row.sha256 == sha and row.object_key == content_key(str(row.tenant_id), sha)
    assert Storage().get_bytes(row.object_key) == first
    _run(job_id)
    transcript = pipeline.transcript(job_id)
    assert transcript is not None and transcript.text == "tone300"


def test_the_incoming_sweep_removes_no_job_audio_only_the_late_put(
    api: ApiServer, pipeline: Pipeline
) -> None:
    first = tones(440)
    slot = _presigned_job(api, make_key("acme"), first, sha256=hashlib.sha256(first).hexdigest())
    unsigned = _presigned_job(api, make_key("acme"), tones(550))  # no client sha256
    late = httpx.put(unsigned["upload_url"], content=b"late bytes", headers=unsigned["headers"], timeout=30)
    assert late.status_code == 200
    time.sleep(1.1)  # S3 times are whole seconds: everything above is now older than "0 seconds ago"
    storage = Storage()
    result = sweep_incoming(storage, timedelta(0))
    assert result.deleted_objects == 1  # the late PUT's object, which no job uses
    ids = [uuid.UUID(slot["job_id"]), uuid.UUID(unsigned["job_id"])]
    for job_id, row in pipeline.jobs(ids).items():
        assert row.object_key is not None and "/incoming/" not in row.object_key
        assert storage.head(row.object_key) is not None, job_id
    for job_id in ids:
        _run(job_id)
    texts = {job_id: pipeline.transcript(job_id).text for job_id in ids}  # type: ignore[union-attr]
    assert texts == {ids[0]: "tone440", ids[1]: "tone550"}


def test_the_incoming_sweep_spares_audio_that_jobs_of_earlier_versions_kept_there(pipeline: Pipeline) -> None:
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from core.models import Job

    # Before this fix a presigned upload without a client sha256 kept `{tenant}/incoming/{uuid}` as its
    # audio, in every status: such rows may still exist after an upgrade.
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(330))
    legacy = f"{tenant}/incoming/{uuid.uuid4().hex}"
    storage = Storage()
    storage.upload_bytes(tones(330), legacy)
    with Session(pipeline.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job).values(object_key=legacy, status="succeeded"))
    time.sleep(1.1)
    assert sweep_incoming(storage, timedelta(0)).deleted_objects == 0
    assert storage.head(legacy) is not None
