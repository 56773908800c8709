"""A model past its retirement date is never sent a request, through real workers and the fake OpenAI
server (issue #17, retirement by date). Dates are relative to today: yesterday's is past, tomorrow's not."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from core.providers.retirement import utc_today
from core.statuses import JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, WorkerFactory, tones

pytestmark = pytest.mark.integration


def test_a_model_past_its_date_is_never_sent_a_request(
    pipeline: Pipeline, worker: WorkerFactory, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(
        f"[providers.openai.models.{SECOND}]\nretires = {(utc_today() - timedelta(days=1)).isoformat()}\n"
        f"[providers.openai.models.{PRIMARY}]\nretires = {(utc_today() + timedelta(days=1)).isoformat()}\n"
    )
    tenant = pipeline.tenant()
    # a batch that names the retired model first, and one on the default chain (PRIMARY, then SECOND)
    named = pipeline.batch(tenant, models=[SECOND, PRIMARY])
    default = pipeline.batch(tenant)
    jobs = [pipeline.job(tenant, named, tones(440, 880)), pipeline.job(tenant, default, tones(500))]
    with worker(VOXQ_PROVIDERS_FILE=str(path)):
        pipeline.submit(jobs)
        rows = pipeline.wait_terminal(jobs, timeout=90)
    assert all(row.status == JobStatus.SUCCEEDED.value for row in rows.values()), rows
    assert {a.model for a in pipeline.attempts()} == {PRIMARY}
    assert {str(r.get("model")) for r in fake_openai.request_log()} == {PRIMARY}
