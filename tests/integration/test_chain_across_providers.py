"""A chain across two providers (issue #17): two fake OpenAI-compatible servers on their own ports, each
accepting only its own key, configured through a providers file. The prepare and transcribe stages run in
this process against the real servers (as in test_chain_semantics.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, tones

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("hosted_settings")]

KEY_A = "sk-provider-a-0123456789"
KEY_B = "sk-provider-b-9876543210"
PRICE_A = Decimal("0.012")  # per minute
PRICE_B_HOUR = Decimal("0.04")  # per hour, at least 10 s billed per request
MIN_B = 10


@pytest.fixture
def two_fakes() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a = FakeOpenAI(api_keys={KEY_A}).start()
    b = FakeOpenAI(api_keys={KEY_B}).start()
    try:
        a.add_model("model-x")
        b.add_model("model-y")
        yield a, b
    finally:
        a.stop()
        b.stop()


def configure(
    fakes: tuple[FakeOpenAI, FakeOpenAI],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    x_capabilities: str = 'timestamps = "none", response_formats = ["json"]',
) -> None:
    """A providers file naming both fakes (a: model-x, b: model-y), their keys, and the chain a, b."""
    from core.settings import reset_settings_cache

    a, b = fakes
    path = tmp_path / "providers.toml"
    path.write_text(
        f'[providers.a]\nbase_url = "{a.base_url}"\napi_key_env = "VOXQ_TEST_KEY_A"\n'
        f'[providers.a.models.model-x]\nprice = {{ per_minute = "{PRICE_A}" }}\n'
        f"capabilities = {{ {x_capabilities} }}\n"
        f'[providers.b]\nbase_url = "{b.base_url}"\napi_key_env = "VOXQ_TEST_KEY_B"\n'
        "[providers.b.models.model-y]\n"
        f'price = {{ per_hour = "{PRICE_B_HOUR}", min_billed_seconds = {MIN_B} }}\n'
        'capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"] }\n'
    )
    for name, value in {
        "VOXQ_PROVIDERS_FILE": str(path),
        "VOXQ_TEST_KEY_A": KEY_A,
        "VOXQ_TEST_KEY_B": KEY_B,
        "VOXQ_PRIMARY_MODEL": "a:model-x",
        "VOXQ_FALLBACK_MODELS": "b:model-y",
    }.items():
        monkeypatch.setenv(name, value)
    reset_settings_cache()


@pytest.fixture
def providers(
    two_fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[FakeOpenAI, FakeOpenAI]:
    configure(two_fakes, tmp_path, monkeypatch)
    return two_fakes


def run_job(pipeline: Pipeline, *freqs: int) -> uuid.UUID:
    """One job of these tones, prepared and transcribed in this process."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant()
    job = pipeline.job(tenant, pipeline.batch(tenant), tones(*freqs))
    report = prepare_jobs([job], owner="test:1")
    assert report.grouped == 1
    rt = get_runtime()
    for group in report.groups:
        rt.run(transcribe_group(rt, group))
    return job


def test_a_failing_provider_hands_the_job_to_the_next_providers_model(
    pipeline: Pipeline, providers: tuple[FakeOpenAI, FakeOpenAI]
) -> None:
    a, b = providers
    a.script("model-x", ["server_error"] * 3)  # max_retries=2: three tries, then the next entry
    job = run_job(pipeline, 440)
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model) == (JobStatus.SUCCEEDED.value, "model-y")
    assert [(t.provider, t.model, t.outcome, t.http_status) for t in pipeline.attempts(job)] == [
        ("a", "model-x", AttemptOutcome.RETRIED.value, 500),
        ("a", "model-x", AttemptOutcome.RETRIED.value, 500),
        ("a", "model-x", AttemptOutcome.FALLBACK.value, 500),
        ("b", "model-y", AttemptOutcome.SUCCESS.value, 200),
    ]
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == "tone440"
    # Each server saw only its own key (any other is answered 401) and only its own model.
    assert [(r["model"], r["status"]) for r in a.request_log()] == [("model-x", 500)] * 3
    assert [(r["model"], r["status"]) for r in b.request_log()] == [("model-y", 200)]

    # One client per configured provider, each under its provider's name.
    from worker.runtime import get_runtime

    rt = get_runtime()
    assert {name: rt.provider(name).name for name in ("a", "b", "openai")} == {
        "a": "a",
        "b": "b",
        "openai": "openai",
    }

    # A job whose first provider answers is answered there.
    second = run_job(pipeline, 660)
    assert pipeline.jobs([second])[second].model == "model-x"
    assert [(t.provider, t.outcome) for t in pipeline.attempts(second)] == [
        ("a", AttemptOutcome.SUCCESS.value)
    ]
    assert [r["status"] for r in a.request_log()] == [500, 500, 500, 200]
    assert len(b.request_log()) == 1

    # Each answer is priced at its own provider's price: b's with its 10 s minimum per request.
    (billed_b,) = b.billing_log()
    (billed_a,) = a.billing_log()
    (cost_b,) = pipeline.costs(job)
    (cost_a,) = pipeline.costs(second)
    seconds_b = max(float(billed_b["usage"]["seconds"]), MIN_B)
    assert cost_b.billed_audio_seconds == seconds_b
    assert cost_b.usd == (Decimal(str(seconds_b)) * PRICE_B_HOUR / 3600).quantize(Decimal("0.00000001"))
    seconds_a = float(billed_a["usage"]["seconds"])
    assert cost_a.billed_audio_seconds == seconds_a < MIN_B
    assert cost_a.usd == (Decimal(str(seconds_a)) * PRICE_A / 60).quantize(Decimal("0.00000001"))
    assert str(billed_a["request_id"]) == str(cost_a.attempt_id)
    assert str(billed_b["request_id"]) == str(cost_b.attempt_id)


def test_a_piece_longer_than_the_model_takes_is_split_before_it_is_sent(
    pipeline: Pipeline,
    two_fakes: tuple[FakeOpenAI, FakeOpenAI],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = two_fakes
    limit = 3.0
    caps = f'timestamps = "none", response_formats = ["json"], max_duration_seconds = {limit}'
    configure(two_fakes, tmp_path, monkeypatch, x_capabilities=caps)
    job = run_job(pipeline, 440, 880, 660)
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model) == (JobStatus.SUCCEEDED.value, "model-x")
    assert row.duration_seconds is not None and row.duration_seconds > limit
    attempts = pipeline.attempts(job)
    assert len(attempts) >= 2 and all(t.provider == "a" for t in attempts)
    assert all(t.audio_seconds is not None and t.audio_seconds <= limit for t in attempts)
    assert all(t.outcome == AttemptOutcome.SUCCESS.value for t in attempts)
    assert len(a.request_log()) == len(attempts) and b.request_log() == []
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == "tone440 tone880 tone660"


def test_the_sweepers_estimate_is_priced_at_the_attempts_provider(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One model name on two hosts: an abandoned call is charged its own host's list price (b's 10 s
    minimum included), not the price of whichever host a bare name resolves to."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Attempt, CostRecord
    from core.settings import reset_settings_cache
    from tests.pipeline_support import processing_job_rows
    from worker.sweeper import sweep

    path = tmp_path / "providers.toml"
    path.write_text(
        '[providers.a]\nbase_url = "http://127.0.0.1:9/a/v1"\n'
        f'[providers.a.models.shared]\nprice = {{ per_minute = "{PRICE_A}" }}\n'
        '[providers.b]\nbase_url = "http://127.0.0.1:9/b/v1"\n'
        "[providers.b.models.shared]\n"
        f'price = {{ per_hour = "{PRICE_B_HOUR}", min_billed_seconds = {MIN_B} }}\n'
    )
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(path))
    reset_settings_cache()
    tenant_id, _, job_id = processing_job_rows(
        lease_owner="alive:1", lease_expires_at=datetime.now(UTC) + timedelta(hours=1)
    )
    ids = {}
    with session_scope() as s:
        for provider in ("a", "b"):
            attempt = Attempt(
                tenant_id=tenant_id,
                job_id=job_id,
                model="shared",
                provider=provider,
                audio_seconds=3.0,
                started_at=datetime.now(UTC) - timedelta(hours=1),
                worker="gone:1",
            )
            s.add(attempt)
            s.flush()
            ids[provider] = attempt.id
    assert sweep().abandoned_attempts == 2
    with session_scope() as s:
        costs = {
            c.attempt_id: (c.usd, c.billed_audio_seconds) for c in s.execute(select(CostRecord)).scalars()
        }
    quantum = Decimal("0.00000001")
    assert costs[ids["a"]] == ((Decimal(3) * PRICE_A / 60).quantize(quantum), 3.0)
    assert costs[ids["b"]] == ((Decimal(MIN_B) * PRICE_B_HOUR / 3600).quantize(quantum), float(MIN_B))
