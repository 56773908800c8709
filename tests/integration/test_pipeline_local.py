"""The pipeline with the `local` chain only (no OpenAI key): what `make demo` runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import reset_settings_cache
from core.statuses import AttemptOutcome, BatchStatus, JobStatus
from tests.pipeline_support import PRIMARY, Pipeline
from tests.support import REPO_ROOT, Stack, celery_worker


@pytest.fixture
def pipeline(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pipeline]:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    p = Pipeline(stack)
    yield p
    p.close()


def test_local_only_chain_transcribes_a_voicemail_end_to_end(stack: Stack, pipeline: Pipeline) -> None:
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    data = (REPO_ROOT / "samples" / "voicemail-dentist.flac").read_bytes()
    job = pipeline.job(tenant, batch, data, filename="voicemail-dentist.flac")
    env = {"OPENAI_API_KEY": "", "VOXQ_LOCAL_CPU_THREADS": "2"}
    with celery_worker(stack, concurrency=1, env=env, log_path=Path(stack.work_dir) / "local-e2e.log"):
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job], timeout=300)
    assert rows[job].status == JobStatus.SUCCEEDED.value, (rows[job].error_code, rows[job].error_message)
    transcript = pipeline.transcript(job)
    assert transcript is not None
    assert transcript.model.startswith("local:")
    assert "rachel" in transcript.text.lower() and "thursday" in transcript.text.lower()
    assert transcript.segments and transcript.segments[0]["start"] >= 0
    assert transcript.segments[-1]["end"] <= rows[job].duration_seconds + 0.01
    attempts = pipeline.attempts(job)
    assert [a.outcome for a in attempts] == [AttemptOutcome.SUCCESS.value]
    costs = pipeline.costs(job)
    assert len(costs) == 1 and costs[0].usd == 0 and (costs[0].compute_seconds or 0) > 0
    assert costs[0].attempt_id == attempts[0].id
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_local_stage_in_process(stack: Stack, pipeline: Pipeline) -> None:
    from worker.local import transcribe_local
    from worker.prepare import prepare_jobs

    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, language="en")
    data = (REPO_ROOT / "samples" / "voicemail-school.mp3").read_bytes()
    job = pipeline.job(tenant, batch, data, filename="voicemail-school.mp3")
    report = prepare_jobs([job], owner="test:1")
    assert report.grouped == 1 and len(report.groups) == 1
    assert transcribe_local(job, report.groups[0], worker="test:1") == JobStatus.SUCCEEDED.value
    # A second delivery of the same local task finds the job finished and does nothing.
    assert transcribe_local(job, report.groups[0], worker="test:1") == "not_claimed"
    row = pipeline.jobs([job])[job]
    assert row.status == JobStatus.SUCCEEDED.value and row.model and row.model.startswith("local:")
    assert len(pipeline.attempts(job)) == 1
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.language == "en" and len(transcript.text) > 20


def test_local_stage_reuses_kept_chunk_answers_and_keeps_its_own(
    stack: Stack, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.local import transcribe_local
    from worker.prepare import prepare_jobs
    from worker.store.answers import piece_key

    monkeypatch.setenv("VOXQ_MAX_CHUNK_SECONDS", "4")
    monkeypatch.setenv("VOXQ_SHORT_FILE_SECONDS", "2")
    reset_settings_cache()
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, language="en")
    data = (REPO_ROOT / "samples" / "voicemail-dentist.flac").read_bytes()
    job = pipeline.job(tenant, batch, data, filename="voicemail-dentist.flac")
    report = prepare_jobs([job], owner="test:1")
    chunks = pipeline.chunks(job)
    assert len(chunks) >= 2
    # A hosted run paid for chunk 0 before the job was handed to the local engine.
    stored = "storedwords from a hosted run"
    pipeline.keep_chunk_answer(job, 0, stored)
    assert transcribe_local(job, report.groups[0], worker="test:1") == JobStatus.SUCCEEDED.value
    attempts = pipeline.attempts(job)
    assert sorted(a.chunk_index or 0 for a in attempts) == [c.index for c in chunks[1:]]  # chunk 0 not sent
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text.startswith(f"{stored} ")
    # Each local answer is kept with its attempt, like a hosted one; the reused one is left as it was.
    answers = pipeline.answers(job)
    assert sorted(answers) == sorted(piece_key(c.index) for c in chunks)
    assert (answers[piece_key(0)].text, answers[piece_key(0)].model) == (stored, PRIMARY)
    for attempt in attempts:
        kept = answers[piece_key(attempt.chunk_index)]
        assert (
            kept.attempt_id == attempt.id and kept.model.startswith("local:") and kept.text in transcript.text
        )
