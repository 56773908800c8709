"""An S3 outage delays jobs, it never fails them (issue #16, item 9).

A private SeaweedFS (the session's is shared by every test) is stopped while a job is queued: prepare runs
again and again as the sweeper requeues the job, more times than `VOXQ_JOB_MAX_ATTEMPTS` allows runs,
each wait longer than the one before; then the server comes back and the job succeeds, its outage runs
not counted.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.settings import reset_settings_cache
from core.statuses import JobStatus
from core.storage import Storage
from tests.conftest import TEST_S3_ACCESS_KEY, TEST_S3_SECRET_KEY
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, hosted_env, tones
from tests.support import Stack
from voxq.embedded import SeaweedS3

OUTAGE_RUNS = 4
MAX_ATTEMPTS = 2


@pytest.fixture
def own_s3(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[SeaweedS3]:
    """A SeaweedFS of this test's own, with hosted-chain settings, short outage waits and two runs at most."""
    work = Path(tempfile.mkdtemp(prefix="voxq-s3-outage-"))
    server = SeaweedS3(work / "seaweedfs", TEST_S3_ACCESS_KEY, TEST_S3_SECRET_KEY)
    server.start()
    env = hosted_env(
        VOXQ_S3_ENDPOINT_URL=server.endpoint_url,
        VOXQ_S3_ACCESS_KEY_ID=TEST_S3_ACCESS_KEY,
        VOXQ_S3_SECRET_ACCESS_KEY=TEST_S3_SECRET_KEY,
        VOXQ_JOB_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        VOXQ_OUTAGE_RETRY_BASE_SECONDS="0.5",
        VOXQ_OUTAGE_RETRY_MAX_SECONDS="3",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    stack.reset_process_state()  # the worker runtime's S3 client points at this server now
    try:
        Storage().ensure_bucket()
        yield server
    finally:
        server.stop()
        stack.reset_process_state()
        shutil.rmtree(work, ignore_errors=True)
    reset_settings_cache()


def test_an_s3_outage_delays_a_job_and_never_fails_it(
    pipeline: Pipeline, fake_openai: FakeOpenAI, own_s3: SeaweedS3
) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.sweeper import sweep
    from worker.transcribe import transcribe_group

    pipeline.storage = Storage()  # uploads go to this test's server
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(430))
    own_s3.stop()  # S3 goes away before the job is prepared
    waits: list[float] = []
    for run in range(OUTAGE_RUNS):
        report = prepare_jobs([job], owner=f"test:prep{run}")
        assert (report.claimed, report.errors) == (1, 1)
        row = pipeline.jobs([job])[job]
        assert row.status == JobStatus.PROCESSING.value and row.run_count == 0  # the run did not count
        assert row.lease_expires_at is not None
        wait = (row.lease_expires_at - datetime.now(UTC)).total_seconds()
        assert wait <= 3.0, "an outage's wait is bounded by VOXQ_OUTAGE_RETRY_MAX_SECONDS"
        waits.append(wait)
        time.sleep(max(wait, 0) + 0.1)
        swept = sweep()
        assert job in swept.requeued and job not in swept.failed, swept
    assert waits[-1] > waits[0], f"the waits did not grow: {waits}"
    own_s3.start()  # S3 is back
    report = prepare_jobs([job], owner="test:prep-after")
    assert (report.claimed, report.errors, report.grouped) == (1, 0, 1)
    rt = get_runtime()
    assert rt.run(transcribe_group(rt, report.groups[0])) == {"succeeded": 1}
    row = pipeline.jobs([job])[job]
    assert row.status == JobStatus.SUCCEEDED.value and row.run_count == 1
    assert len(fake_openai.billing_log()) == 1
