"""A small job's derived FLAC waits in Redis instead of S3 (worker.derived), and no file is lost by it:
a redelivered group task still reads it, it is dropped once the job ended, and if Redis lost it the job
goes back to `prepare` (via the sweeper) and is transcribed from its original upload."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import Job
from core.statuses import JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, tones
from tests.support import Stack

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _stored(stack: Stack, key: str) -> tuple[bool, bool]:
    """(in Redis, in S3) for a derived object key."""
    from core.storage import Storage
    from worker.derived import inline_key

    client = redis.Redis.from_url(stack.redis_url)
    try:
        in_redis = bool(client.exists(inline_key(key)))
    finally:
        client.close()
    return in_redis, Storage().head(key) is not None


def test_a_small_files_flac_waits_in_redis_is_read_again_on_redelivery_and_dropped_when_done(
    pipeline: Pipeline, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    from worker import derived
    from worker.derived import derived_key
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(410))
    report = prepare_jobs([job], owner="test:1")
    key = derived_key(tenant, job)
    assert _stored(stack, key) == (True, False)  # no S3 PUT
    rt = get_runtime()
    first = rt.run(derived.read(rt, key))
    assert first[:4] == b"fLaC"
    assert rt.run(derived.read(rt, key)) == first  # reading does not consume: a redelivery finds it
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"succeeded": 1}
    assert pipeline.jobs([job])[job].status == JobStatus.SUCCEEDED.value
    assert _stored(stack, key) == (False, False)  # dropped once the job ended
    assert len(fake_openai.billing_log()) == 1


def test_a_flac_lost_from_redis_sends_the_job_back_to_prepare_not_to_failure(
    pipeline: Pipeline, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    from worker.derived import derived_key
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.sweeper import sweep
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(420))
    report = prepare_jobs([job], owner="test:1")
    stack.flush_redis()  # Redis restarted without persistence while the job waited
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"error": 1}
    row = pipeline.jobs([job])[job]
    assert row.status == JobStatus.PROCESSING.value  # not failed: handed back soon
    assert row.lease_expires_at is not None
    assert row.lease_expires_at - datetime.now(UTC) < timedelta(seconds=61)
    assert pipeline.attempts(job) == [] and fake_openai.billing_log() == []  # nothing sent without audio
    with Session(pipeline.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job).values(lease_expires_at=datetime.now(UTC)))
    assert sweep().requeued == [job]
    again = prepare_jobs([job], owner="test:2")  # what the sweeper's prepare message does
    assert _stored(stack, derived_key(tenant, job))[0]
    assert rt.run(transcribe_group(rt, again.groups[0])) == {"succeeded": 1}
    assert pipeline.jobs([job])[job].status == JobStatus.SUCCEEDED.value
    assert len(fake_openai.billing_log()) == 1


def test_with_inline_off_the_flac_goes_to_s3(
    pipeline: Pipeline, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import reset_settings_cache
    from worker.derived import derived_key
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    monkeypatch.setenv("VOXQ_DERIVED_INLINE_MAX_BYTES", "0")
    reset_settings_cache()
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(430))
    report = prepare_jobs([job], owner="test:1")
    assert _stored(stack, derived_key(tenant, job)) == (False, True)
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"succeeded": 1}


def test_a_group_reads_its_redis_kept_flacs_in_one_round_trip(
    pipeline: Pipeline, stack: Stack, fake_openai: FakeOpenAI
) -> None:
    from worker import derived
    from worker.derived import derived_key
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, batch, tones(430 + 10 * i)) for i in range(3)]
    report = prepare_jobs(jobs, owner="test:1")
    keys = [derived_key(tenant, job) for job in jobs]
    rt = get_runtime()
    found = rt.run(derived.read_many(rt, [*keys, f"{tenant}/derived/missing.flac"]))
    assert sorted(found) == sorted(keys)  # what Redis does not hold is left to `read` (S3)
    assert all(found[k] == rt.run(derived.read(rt, k)) for k in keys)

    # Every command Redis runs meanwhile (MONITOR), so the FLACs' reads are told apart from the circuit's
    # and limiter's own GETs of other keys.
    client = redis.Redis.from_url(stack.redis_url)
    seen: list[str] = []
    stop = "voxq-test-monitor-stop"

    def watch() -> None:
        with client.monitor() as monitor:
            started.set()
            for entry in monitor.listen():
                seen.append(entry["command"])
                if stop in entry["command"]:
                    return

    started = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert started.wait(10)
    other = redis.Redis.from_url(stack.redis_url)
    try:
        (group,) = set(report.groups)
        assert rt.run(transcribe_group(rt, group)) == {"succeeded": 3}
    finally:
        other.echo(stop)
        watcher.join(10)
        other.close()
        client.close()
    derived_reads = [c for c in seen if "/derived/" in c and c.split(" ", 1)[0].upper() in {"GET", "MGET"}]
    assert [c.split(" ", 1)[0].upper() for c in derived_reads] == ["MGET"], derived_reads  # one round trip
    assert all(k in derived_reads[0] for k in keys)
    assert len(fake_openai.billing_log()) == 3
