"""Two providers, not two models (issue #17, "Tests that must exist"): two fake OpenAI-compatible hosts on
their own ports, with their own keys, prices and capabilities (tests/provider_support.py: A answers `json`
only, per minute; B answers `verbose_json` with segments and words and bills a 10 s minimum), named by a
providers file. Batches go in through a real API server that reads the same file; the prepare and
transcribe stages run in this process against the real Postgres, Redis and S3 (as in
test_chain_semantics.py). Each host's request and billing logs are the evidence:

- quota on A mid-batch moves every remaining job to B, and no request reaches A (any of its models) once
  voxq knew;
- a 401 on A is loud (voxq_provider_auth_failures_total{provider="a"}, `/readyz` degraded with
  `provider:a`, the job's `fallback_reason`) and the jobs move on to B;
- `routing: cheapest` picks B for a batch that needs word timestamps and A otherwise, and says so
  (`route_model`, `route_reason` in GET /v1/jobs/{id});
- every cost record matches the host's billing log to the 8th decimal place, B's minimum included, and
  a cost priced without the provider's usage is labelled estimated.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from core.models import Batch
from core.statuses import BatchStatus, JobStatus
from tests.api_helpers import ApiServer, make_key, start_api_server, stop_api_server
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import Pipeline, tones
from tests.provider_support import (
    A_TURBO,
    A_V3,
    B_MIN_SECONDS,
    B_TURBO,
    KEY_A,
    KEY_B,
    KEY_ENV_A,
    KEY_ENV_B,
    TURBO,
    V3,
    assert_costs_match_billing_logs,
    host_a,
    host_b,
    requests_after_failure,
    successful_provider,
    write_providers_file,
)
from tests.support import Stack

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process

CHAIN = {"VOXQ_PRIMARY_MODEL": A_TURBO, "VOXQ_FALLBACK_MODELS": f"{A_V3},{B_TURBO}"}
REFUSED = "the provider refused the API key (HTTP 401 invalid_api_key)"


@dataclass
class Hosts:
    a: FakeOpenAI
    b: FakeOpenAI
    api: ApiServer
    providers_file: Path


@pytest.fixture(scope="module")
def started_hosts() -> Iterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = host_a().start(), host_b().start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def module_providers_file(
    started_hosts: tuple[FakeOpenAI, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    a, b = started_hosts
    return write_providers_file(
        tmp_path_factory.mktemp("providers") / "providers.toml", a.base_url, b.base_url
    )


def provider_env(providers_file: Path) -> dict[str, str]:
    """What the API and the workers are started with: the file, each provider's key in its own variable."""
    return {
        "VOXQ_PROVIDERS_FILE": str(providers_file),
        KEY_ENV_A: KEY_A,
        KEY_ENV_B: KEY_B,
        "VOXQ_MAX_IN_FLIGHT": "2",
        "VOXQ_CIRCUIT_OPEN_SECONDS": "120",
        **CHAIN,
    }


@pytest.fixture(scope="module")
def provider_api(session_stack: Stack, module_providers_file: Path) -> Iterator[ApiServer]:
    """An API server of its own, started with the providers file (the session's has none)."""
    server = start_api_server(session_stack, **provider_env(module_providers_file))
    try:
        yield server
    finally:
        stop_api_server(server)


@pytest.fixture
def hosts(
    started_hosts: tuple[FakeOpenAI, FakeOpenAI],
    module_providers_file: Path,
    provider_api: ApiServer,
    pipeline: Pipeline,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Hosts]:
    """Both hosts reset, and this process's worker settings pointing at them through the providers file."""
    from core.settings import reset_settings_cache

    a, b = started_hosts
    a.reset()
    b.reset()
    for key, value in provider_env(module_providers_file).items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    yield Hosts(a, b, provider_api, module_providers_file)
    a.reset()
    b.reset()


def run_batch(
    pipeline: Pipeline, hosts: Hosts, tenant: str, count: int, *, first_freq: int, **options: Any
) -> tuple[str, list[uuid.UUID]]:
    """A batch created through the API with `options`, `count` files of distinct tones, prepared and
    transcribed in this process. Returns (API key, job ids)."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    key = make_key(tenant)
    with hosts.api.client(key) as client:
        created = client.post("/v1/batches", json=options)
    assert created.status_code == 201, created.text
    batch_id = uuid.UUID(created.json()["id"])
    with Session(pipeline.engine) as s, s.begin():
        s.execute(update(Batch).where(Batch.id == batch_id).values(status=BatchStatus.PROCESSING.value))
    tenant_id = pipeline.batch_row(batch_id).tenant_id
    jobs = [pipeline.job(tenant_id, batch_id, tones(first_freq + 20 * i)) for i in range(count)]
    report = prepare_jobs(jobs, owner="test:1")
    assert report.grouped == count
    rt = get_runtime()
    for group in report.groups:
        rt.run(transcribe_group(rt, group))
    return key, jobs


def all_succeeded(pipeline: Pipeline, jobs: list[uuid.UUID]) -> None:
    """Every job succeeded; else a message with each job's status, error and attempts."""
    rows = pipeline.jobs(jobs)
    failed = {
        str(job): (
            rows[job].status,
            rows[job].error_code,
            rows[job].error_message,
            [(a.provider, a.model, a.outcome, a.http_status, a.error_code) for a in pipeline.attempts(job)],
        )
        for job in jobs
        if rows[job].status != JobStatus.SUCCEEDED.value
    }
    assert failed == {}, failed


def shown(hosts: Hosts, key: str, job: uuid.UUID) -> dict[str, Any]:
    with hosts.api.client(key) as client:
        answer = client.get(f"/v1/jobs/{job}")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def auth_failures(provider: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("voxq_provider_auth_failures_total", {"provider": provider}) or 0.0


def served_by(pipeline: Pipeline, jobs: list[uuid.UUID]) -> Counter[tuple[str, str] | None]:
    attempts = pipeline.attempts()
    return Counter(successful_provider(attempts, job) for job in jobs)


def assert_no_request_after_the_account_failed(pipeline: Pipeline, host: FakeOpenAI, code: str) -> None:
    """The host's log has the account failure, and no request voxq started after it knew; none at all for
    the provider's other model (it is after the failing one in the chain: only the provider's circuit
    keeps it from being tried)."""
    log = host.request_log()
    assert any(r["code"] == code for r in log), [r["code"] for r in log]
    attempts = {str(a.id): a for a in pipeline.attempts()}
    late = requests_after_failure(log, attempts)
    assert late == [], f"{len(late)} requests reached the provider after its account failed: {late}"
    assert [r for r in log if r["model"] == V3] == []


def test_quota_on_a_moves_every_remaining_job_to_b_and_no_request_reaches_a_after_it(
    pipeline: Pipeline, hosts: Hosts, fake_openai: FakeOpenAI
) -> None:
    hosts.a.exhaust_quota(None, after=3)  # the account runs dry after 3 billed requests, for every model
    _, jobs = run_batch(pipeline, hosts, "quota-tenant", 12, first_freq=300)
    rows = pipeline.jobs(jobs)
    all_succeeded(pipeline, jobs)
    assert served_by(pipeline, jobs) == {("a", TURBO): 3, ("b", TURBO): 9}
    assert_no_request_after_the_account_failed(pipeline, hosts.a, "insufficient_quota")
    quota = [r for r in hosts.a.request_log() if r["code"] == "insufficient_quota"]
    assert 1 <= len(quota) <= 2  # only the calls in flight when the account ran dry (2 at most)
    assert fake_openai.request_log() == []  # the built-in openai provider is not in this chain
    attempts = pipeline.attempts()
    assert not [a for a in attempts if a.provider == "a" and a.model == V3 and a.http_status is not None]
    assert_costs_match_billing_logs(
        {"a": hosts.a.billing_log(), "b": hosts.b.billing_log()}, attempts, pipeline.costs(), rows.values()
    )


def test_a_refused_key_on_a_is_loud_and_the_jobs_move_on_to_b(pipeline: Pipeline, hosts: Hosts) -> None:
    hosts.a.revoke_key(KEY_A, after=2)  # revoked mid-batch, after 2 billed requests
    before = auth_failures("a")
    key, jobs = run_batch(pipeline, hosts, "revoked-tenant", 8, first_freq=700)
    rows = pipeline.jobs(jobs)
    all_succeeded(pipeline, jobs)
    assert served_by(pipeline, jobs) == {("a", TURBO): 2, ("b", TURBO): 6}
    assert_no_request_after_the_account_failed(pipeline, hosts.a, "invalid_api_key")

    # loud: the metric, /readyz, the job's reason; never the key
    assert auth_failures("a") >= before + 1
    assert auth_failures("b") == 0
    ready = httpx.get(hosts.api.url + "/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    reason = ready.json()["checks"]["provider:a"]
    assert reason.startswith("degraded: a refused the API key (HTTP 401 invalid_api_key"), reason
    assert "provider:b" not in ready.json()["checks"]
    refused = [
        job for job in jobs if any(a.http_status == 401 and a.provider == "a" for a in pipeline.attempts(job))
    ]
    assert refused
    for job in refused:
        fallback = shown(hosts, key, job)["fallback_reason"]
        assert fallback is not None and REFUSED in fallback and TURBO in fallback, fallback
    for text in (ready.text, *(str(shown(hosts, key, j)) for j in jobs)):
        assert KEY_A not in text and KEY_A[:8] not in text
    assert_costs_match_billing_logs(
        {"a": hosts.a.billing_log(), "b": hosts.b.billing_log()},
        pipeline.attempts(),
        pipeline.costs(),
        rows.values(),
    )


def test_cheapest_picks_b_for_word_timestamps_and_a_otherwise(pipeline: Pipeline, hosts: Hosts) -> None:
    words_key, words = run_batch(
        pipeline, hosts, "cheap-tenant", 3, first_freq=300, routing="cheapest", timestamps="word"
    )
    plain_key, plain = run_batch(pipeline, hosts, "cheap-tenant-2", 3, first_freq=600, routing="cheapest")
    rows = pipeline.jobs(words + plain)
    all_succeeded(pipeline, words + plain)
    assert served_by(pipeline, words) == {("b", TURBO): 3}
    assert served_by(pipeline, plain) == {("a", TURBO): 3}
    for key, jobs, model in ((words_key, words, B_TURBO), (plain_key, plain, A_TURBO)):
        for job in jobs:
            body = shown(hosts, key, job)
            assert body["route_model"] == model, body
            assert isinstance(body["route_reason"], str) and "cheapest" in body["route_reason"], body
    assert "word" in shown(hosts, words_key, words[0])["route_reason"]
    # B was asked for words and gave them; A was asked for json only (it refuses anything else)
    assert [(r["response_format"], "word" in r["granularities"]) for r in hosts.b.request_log()] == [
        ("verbose_json", True)
    ] * 3
    assert [(r["response_format"], r["status"]) for r in hosts.a.request_log()] == [("json", 200)] * 3
    for job in words:
        transcript = pipeline.transcript(job)
        assert transcript is not None and transcript.segments
        assert all(segment.get("words") for segment in transcript.segments), transcript.segments
    assert_costs_match_billing_logs(
        {"a": hosts.a.billing_log(), "b": hosts.b.billing_log()},
        pipeline.attempts(),
        pipeline.costs(),
        rows.values(),
    )


def test_costs_match_each_hosts_billing_log_to_the_cent(pipeline: Pipeline, hosts: Hosts) -> None:
    """Jobs on A (per minute), on B (each short file billed B's 10 s minimum) and on a model of A whose
    answers carry no usage (priced by voxq's estimate, labelled so): per request, per job, per provider."""
    hosts.a.set_spec(V3, usage=False)
    on_a_key, on_a = run_batch(pipeline, hosts, "costs-a", 3, first_freq=300)
    on_b_key, on_b = run_batch(
        pipeline, hosts, "costs-b", 3, first_freq=600, routing="cheapest", timestamps="word"
    )
    silent_key, silent = run_batch(pipeline, hosts, "costs-silent", 2, first_freq=900, models=[A_V3])
    rows = pipeline.jobs(on_a + on_b + silent)
    all_succeeded(pipeline, on_a + on_b + silent)
    assert served_by(pipeline, on_a) == {("a", TURBO): 3}
    assert served_by(pipeline, on_b) == {("b", TURBO): 3}
    assert served_by(pipeline, silent) == {("a", V3): 2}
    billing = {"a": hosts.a.billing_log(), "b": hosts.b.billing_log()}
    assert [b["billed_seconds"] for b in billing["b"]] == [B_MIN_SECONDS] * 3  # short files, B's minimum
    assert all(b["billed_seconds"] < B_MIN_SECONDS for b in billing["a"])
    totals = assert_costs_match_billing_logs(billing, pipeline.attempts(), pipeline.costs(), rows.values())
    assert totals["b"] == Decimal("0.00030000")  # 3 x 10 s at $0.0006/min
    assert totals["a"] > 0
    # the API says which part is billed and which estimated
    for key, jobs, estimated in (
        (on_a_key, on_a, False),
        (on_b_key, on_b, False),
        (silent_key, silent, True),
    ):
        for job in jobs:
            body = shown(hosts, key, job)
            cost = Decimal(str(body["cost_usd"]))
            assert cost > 0
            if estimated:
                assert (body["billed_usd"], Decimal(str(body["estimated_usd"]))) == (0.0, cost), body
            else:
                assert (Decimal(str(body["billed_usd"])), body["estimated_usd"]) == (cost, 0.0), body
