"""A deleted job leaves none of its bytes in S3 or Redis, and an ended job's derived FLACs (intermediate
products) are removed by the storage sweep, while a rerun is still prepared from its upload (issue #16,
item 2)."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
import redis

from core.statuses import JobStatus
from tests.api_helpers import ApiServer, make_key, tenant_objects
from tests.audio_fixtures import sequence, wav_bytes
from tests.pipeline_support import Pipeline, tones
from tests.support import Stack

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


@pytest.fixture
def chunked(hosted_settings: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker settings that cut files over 3 s into chunks and keep no FLAC in Redis (all in S3)."""
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_MAX_CHUNK_SECONDS", "3")
    monkeypatch.setenv("VOXQ_SHORT_FILE_SECONDS", "2")
    monkeypatch.setenv("VOXQ_DERIVED_INLINE_MAX_BYTES", "0")
    reset_settings_cache()


def long_audio(*freqs: int) -> bytes:
    return wav_bytes(sequence([(f, 1.0) for f in freqs], gap=1.5, lead=0.5))


def upload(api: ApiServer, key: str, *files: tuple[str, bytes]) -> list[uuid.UUID]:
    """Upload files into a new batch and submit it; their job ids."""
    with api.client(key) as c:
        batch = c.post("/v1/batches", json={}).json()
        resp = c.post(f"/v1/batches/{batch['id']}/files", files=[("file", f) for f in files])
        assert resp.status_code == 201, resp.text
        assert c.post(f"/v1/batches/{batch['id']}/submit").status_code == 202
    return [uuid.UUID(j["id"]) for j in resp.json()["jobs"]]


def prepare(job_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    from worker.prepare import prepare_jobs

    report = prepare_jobs(job_ids, owner="test:1")
    assert report.claimed == len(job_ids) and report.errors == 0, report
    return report.groups


def run(job_ids: list[uuid.UUID]) -> None:
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    rt = get_runtime()
    for group in prepare(job_ids):
        rt.run(transcribe_group(rt, group))


def derived(objects: list[str], job_id: uuid.UUID) -> list[str]:
    return [k for k in objects if f"/derived/{job_id}" in k]


def test_deleting_finished_jobs_leaves_only_the_other_jobs_objects(
    api: ApiServer, pipeline: Pipeline, chunked: None
) -> None:
    key = make_key("acme")
    long_job, short_job, other = upload(
        api,
        key,
        ("long.wav", long_audio(300, 500, 700, 900)),
        ("short.wav", tones(350)),
        ("o.wav", tones(650)),
    )
    run([long_job, short_job, other])
    rows = pipeline.jobs([long_job, short_job, other])
    assert {r.status for r in rows.values()} == {JobStatus.SUCCEEDED.value}
    before = tenant_objects("acme")
    assert len(derived(before, long_job)) >= 3  # chunk FLACs
    assert derived(before, short_job) == [f"{rows[short_job].tenant_id}/derived/{short_job}.flac"]
    with api.client(key) as c:
        for job_id in (long_job, short_job):
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
    after = tenant_objects("acme")
    gone = {rows[long_job].object_key, rows[short_job].object_key}
    gone |= set(derived(before, long_job) + derived(before, short_job))
    assert sorted(after) == sorted(set(before) - gone)
    assert rows[other].object_key in after and derived(after, other)  # the other job's, untouched


def test_deleting_a_prepared_job_drops_its_flac_kept_in_redis(
    api: ApiServer, pipeline: Pipeline, stack: Stack
) -> None:
    key = make_key("acme")
    (job_id,) = upload(api, key, ("v.wav", tones(420)))
    prepare([job_id])  # its FLAC waits for the transcribe task in Redis (worker.derived)
    tenant = pipeline.jobs([job_id])[job_id].tenant_id
    client = redis.Redis.from_url(stack.redis_url)
    inline = f"voxq:derived:{tenant}/derived/{job_id}.flac"
    try:
        assert client.exists(inline)
        with api.client(key) as c:
            assert c.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert not client.exists(inline)
    finally:
        client.close()
    assert tenant_objects("acme") == []


def test_the_storage_sweep_removes_ended_jobs_derived_audio_and_a_rerun_prepares_again(
    api: ApiServer, pipeline: Pipeline, chunked: None
) -> None:
    from sqlalchemy import delete, update
    from sqlalchemy.orm import Session

    from core.models import Job, Transcript
    from core.storage import Storage
    from worker.upload_sweep import sweep_derived

    key = make_key("acme")
    done, waiting = upload(
        api, key, ("done.wav", long_audio(300, 500, 700)), ("wait.wav", long_audio(800, 1000))
    )
    run([done])
    prepare([waiting])  # prepared, its chunks in S3 waiting for the transcribe task: still needed
    objects = tenant_objects("acme")
    assert derived(objects, done) and derived(objects, waiting)
    time.sleep(1.1)  # S3 times are whole seconds
    assert sweep_derived(Storage(), timedelta(0)) == len(derived(objects, done))
    left = tenant_objects("acme")
    assert derived(left, done) == [] and derived(left, waiting) == derived(objects, waiting)
    assert pipeline.jobs([done])[done].object_key in left  # the upload stays until the job is deleted
    # A failed job with every chunk answered (its completion was lost) is retried: it is prepared again
    # from its upload and its kept chunk answers are reused, with no FLAC of its first run left.
    calls = len(pipeline.attempts(done))
    with Session(pipeline.engine) as s, s.begin():
        s.execute(delete(Transcript).where(Transcript.job_id == done))
        s.execute(update(Job).where(Job.id == done).values(status="failed", error_code="lost"))
    with api.client(key) as c:
        batch_id = pipeline.jobs([done])[done].batch_id
        assert c.post(f"/v1/batches/{batch_id}/retry-failed").json()["job_ids"] == [str(done)]
    run([done])
    assert pipeline.jobs([done])[done].status == JobStatus.SUCCEEDED.value
    assert len(pipeline.attempts(done)) == calls  # nothing sent (or paid) twice
    assert pipeline.transcript(done).text == "tone300 tone500 tone700"  # type: ignore[union-attr]
