"""The local engine through the whole pipeline: real Celery workers (one consuming only the `local` queue,
as deployed), real Postgres/Valkey/SeaweedFS, jobs written to Postgres with their audio in S3.

- Accuracy: the committed espeak-ng fixtures come out with WER <= 15% (normalised), with word and segment
  timestamps in the original file's time.
- Fallback: the primary's account is out of quota on the fake OpenAI server (insufficient_quota; the
  second hosted model, same account, would refuse the key too) -> the provider's circuit opens, the
  second model is skipped without a request, the job succeeds on `local:whisper-base` with the failed
  attempt recorded, and the only cost record is the local one: USD 0 with the compute seconds spent.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from core.statuses import AttemptOutcome, BatchStatus, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import PRIMARY, SECOND, Pipeline, hosted_env
from tests.speech import load_fixtures, normalise, word_error_rate
from tests.support import Stack, celery_worker

LOCAL_MODEL = "local:whisper-base"
HOSTED_QUEUES = "ingest.high,transcribe.high,ingest,transcribe,transcribe.low,maintenance,webhooks"
MAX_WER = 0.15


@pytest.fixture
def pipeline(stack: Stack) -> Iterator[Pipeline]:
    p = Pipeline(stack)
    yield p
    p.close()


def _workers(stack: Stack, env: dict[str, str], tag: str) -> ExitStack:
    """An I/O worker for every queue but `local`, and a local worker consuming only `local`."""
    stack_ctx = ExitStack()
    logs = Path(stack.work_dir)
    stack_ctx.enter_context(
        celery_worker(stack, queues=HOSTED_QUEUES, concurrency=2, name=f"io-{tag}", env=env,
                      log_path=logs / f"local-pipeline-{tag}-io.log")
    )  # fmt: skip
    stack_ctx.enter_context(
        celery_worker(stack, queues="local", concurrency=1, name=f"local-{tag}",
                      env={**env, "VOXQ_LOCAL_CONCURRENCY": "1"},
                      log_path=logs / f"local-pipeline-{tag}-local.log")
    )  # fmt: skip
    return stack_ctx


def _assert_timestamps(segments: list[dict[str, object]], duration: float, lead: float, name: str) -> None:
    assert segments, name
    words: list[dict[str, float]] = []
    previous = 0.0
    for seg in segments:
        start, end = float(seg["start"]), float(seg["end"])  # type: ignore[arg-type]
        assert previous - 0.01 <= start <= end <= duration + 0.01, (name, seg)
        previous = end
        seg_words = seg.get("words")
        assert isinstance(seg_words, list) and seg_words, (name, seg)
        words.extend(seg_words)
    assert all(a["start"] <= a["end"] <= b["start"] + 0.01 for a, b in itertools.pairwise(words)), name
    # Timestamps refer to the original file: trimmed leading silence is added back.
    assert words[0]["start"] >= lead - 0.5, (name, words[0])


def test_fixtures_through_the_pipeline_within_wer(stack: Stack, pipeline: Pipeline) -> None:
    fixtures = load_fixtures()
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    jobs = {pipeline.job(tenant, batch, f.path.read_bytes(), filename=f.path.name): f for f in fixtures}
    env = {"OPENAI_API_KEY": ""}  # no key: the chain is `local` only, as in `make demo`
    with _workers(stack, env, "wer"):
        pipeline.submit(list(jobs))
        rows = pipeline.wait_terminal(list(jobs), timeout=600)

    references, hypotheses = [], []
    for job_id, fixture in jobs.items():
        row = rows[job_id]
        assert row.status == JobStatus.SUCCEEDED.value, (fixture.path.name, row.error_code, row.error_message)
        assert row.model == LOCAL_MODEL
        transcript = pipeline.transcript(job_id)
        assert transcript is not None and transcript.model == LOCAL_MODEL
        references.append(fixture.text)
        hypotheses.append(transcript.text)
        assert row.duration_seconds == pytest.approx(fixture.seconds, abs=0.05)
        _assert_timestamps(transcript.segments, fixture.seconds, fixture.leading_silence_s, fixture.path.name)
        attempts = pipeline.attempts(job_id)
        assert [(a.model, a.outcome) for a in attempts] == [(LOCAL_MODEL, AttemptOutcome.SUCCESS.value)]
        costs = pipeline.costs(job_id)
        assert len(costs) == 1 and costs[0].attempt_id == attempts[0].id
        assert costs[0].model == LOCAL_MODEL and costs[0].usd == 0
        assert costs[0].compute_seconds is not None and costs[0].compute_seconds > 0

    wer = word_error_rate(references, hypotheses)
    report = "\n".join(
        f"{normalise(r)!r}\n  vs {normalise(h)!r}" for r, h in zip(references, hypotheses, strict=True)
    )
    assert wer <= MAX_WER, f"pipeline WER {wer:.1%} > {MAX_WER:.0%}:\n{report}"
    assert pipeline.batch_row(batch).status == BatchStatus.COMPLETED.value


def test_hosted_models_failing_permanently_fall_back_to_local(
    stack: Stack, pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    fake_openai.exhaust_quota(PRIMARY)  # 429 insufficient_quota
    fake_openai.configure(SECOND, faults={"auth": 1.0})  # 401 invalid_api_key on every request
    fixture = next(f for f in load_fixtures() if f.path.name == "vm06_insurance.flac")
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, fixture.path.read_bytes(), filename=fixture.path.name)
    env = hosted_env(VOXQ_FALLBACK_MODELS=f"{SECOND},local")
    with _workers(stack, env, "fallback"):
        pipeline.submit([job])
        rows = pipeline.wait_terminal([job], timeout=300)

    row = rows[job]
    assert row.status == JobStatus.SUCCEEDED.value, (row.error_code, row.error_message)
    assert row.model == LOCAL_MODEL
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.model == LOCAL_MODEL
    assert word_error_rate([fixture.text], [transcript.text]) <= MAX_WER, transcript.text
    _assert_timestamps(transcript.segments, fixture.seconds, fixture.leading_silence_s, fixture.path.name)

    # Quota is the account's (issue #17): the provider's circuit opens and SECOND, on the same account,
    # is skipped without a request; the chain goes on to `local` at once.
    attempts = pipeline.attempts(job)
    assert [(a.model, a.outcome) for a in attempts] == [
        (PRIMARY, AttemptOutcome.FALLBACK.value),
        (LOCAL_MODEL, AttemptOutcome.SUCCESS.value),
    ]
    assert (attempts[0].http_status, attempts[0].error_code) == (429, "insufficient_quota")
    assert attempts[1].provider == "local"

    # No hosted model billed anything; the local attempt is the job's one cost record.
    assert fake_openai.billing_log() == []
    assert {r.get("model") for r in fake_openai.request_log()} == {PRIMARY}
    costs = pipeline.costs(job)
    assert len(costs) == 1
    local_cost = costs[0]
    assert local_cost.attempt_id == attempts[1].id
    assert local_cost.model == LOCAL_MODEL
    assert local_cost.usd == 0
    assert local_cost.compute_seconds is not None and local_cost.compute_seconds > 0
    assert row.cost_usd == 0
