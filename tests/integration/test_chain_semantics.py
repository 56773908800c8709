"""Retry, fallback and circuit semantics of the model chain (issue #16, items 10-12, 14, 15), measured from
outside: the fake provider's request log, the attempt rows, the jobs. The prepare and transcribe stages run
in this process against the real servers (as in test_pipeline_inprocess.py)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import httpx
import pytest

from core.statuses import AttemptOutcome, JobStatus
from tests.api_helpers import ApiServer, make_key
from tests.fakes.fixtures import FAKE_OPENAI_API_KEY
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import (
    PRIMARY,
    SECOND,
    Pipeline,
    assert_costs_match_billing,
    held_slots,
    tones,
)

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Worker settings for this test on top of `hosted_settings` (read when the runtime is first built)."""
    from core.settings import reset_settings_cache

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()


def run_jobs(
    pipeline: Pipeline, count: int, *, tenant_name: str | None = None, **batch: Any
) -> list[uuid.UUID]:
    """`count` jobs of distinct tones in one batch, prepared and transcribed in this process."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    tenant = pipeline.tenant(tenant_name)
    batch_id = pipeline.batch(tenant, **batch)
    jobs = [pipeline.job(tenant, batch_id, tones(300 + 20 * i)) for i in range(count)]
    report = prepare_jobs(jobs, owner="test:1")
    assert report.grouped == count
    rt = get_runtime()
    for group in report.groups:
        rt.run(transcribe_group(rt, group))
    return jobs


def requests_for(fake: FakeOpenAI, model: str) -> list[dict[str, Any]]:
    return sorted((r for r in fake.request_log() if r.get("model") == model), key=lambda r: r["received"])


def attempts_of(pipeline: Pipeline, job: uuid.UUID) -> list[tuple[str, str, int | None, str | None]]:
    return [(a.model, a.outcome, a.http_status, a.error_code) for a in pipeline.attempts(job)]


# ---- item 10, issue #17: after insufficient_quota no request reaches the provider's account ----


def test_no_request_reaches_the_provider_after_its_quota_answer(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 jobs, 4 calls in flight: the first quota answer opens the provider's circuit (quota is the
    account's, not the model's), and every call still waiting for a slot (or about to retry) skips every
    model of that provider — SECOND is never sent a request — and goes on to the next entry (`local`)."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    settings(monkeypatch, VOXQ_MAX_IN_FLIGHT="4", VOXQ_CIRCUIT_OPEN_SECONDS="120")
    fake_openai.configure(PRIMARY, latency=0.3)
    fake_openai.exhaust_quota(PRIMARY)
    tenant = pipeline.tenant()
    batch_id = pipeline.batch(tenant, models=[PRIMARY, SECOND, "local"])
    jobs = [pipeline.job(tenant, batch_id, tones(300 + 20 * i)) for i in range(30)]
    report = prepare_jobs(jobs, owner="test:1")
    rt = get_runtime()
    ended: dict[str, int] = {}
    for group in report.groups:
        for how, count in rt.run(transcribe_group(rt, group)).items():
            ended[how] = ended.get(how, 0) + count
    assert ended == {"handoff": 30}  # every job moved past the provider to the local engine
    assert requests_for(fake_openai, SECOND) == []  # the same account's other model: no request at all
    sent = requests_for(fake_openai, PRIMARY)
    attempts = {str(a.id): a for a in pipeline.attempts()}
    first = min((r for r in sent if r["code"] == "insufficient_quota"), key=lambda r: r["ts"])
    known = attempts[first["request_id"]].ended_at  # the worker knew (the circuit tripped before the close)
    assert known is not None
    late = [
        r["received"] - first["ts"]
        for r in sent
        if r["received"] >= first["ts"] and attempts[r["request_id"]].started_at > known
    ]
    assert late == [], f"{len(late)} requests reached {PRIMARY} after its quota answer: {late}"
    assert len(sent) <= 4  # only the calls already in flight
    assert {a.model for a in attempts.values()} == {PRIMARY}
    assert_costs_match_billing(pipeline, fake_openai)


# ---- item 11: bad audio means a 400 about the file; the second opinion is retried as usual ----


def test_a_400_on_language_is_not_bad_audio_and_the_next_model_is_retried(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    message = "Invalid language 'xx'. Language parameter must be specified in ISO-639-1 format."
    fake_openai.script(
        PRIMARY,
        [{"kind": "error", "status": 400, "code": "invalid_value", "param": "language", "message": message}],
    )
    fake_openai.script(SECOND, ["server_error"])
    (job,) = run_jobs(pipeline, 1)
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model, row.error_code) == (JobStatus.SUCCEEDED.value, SECOND, None)
    assert attempts_of(pipeline, job) == [
        (PRIMARY, AttemptOutcome.FALLBACK.value, 400, "invalid_value"),
        (SECOND, AttemptOutcome.RETRIED.value, 500, "http_500"),
        (SECOND, AttemptOutcome.SUCCESS.value, 200, None),
    ]
    assert pipeline.attempts(job)[0].error_message == message


def test_after_bad_audio_the_second_opinion_is_retried_on_429_5xx_and_timeouts(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings(monkeypatch, VOXQ_PROVIDER_TIMEOUT_SECONDS="1", VOXQ_MAX_RETRIES="3")
    fake_openai.script(PRIMARY, [{"kind": "invalid_file", "message": "Audio file might be corrupted"}])
    fake_openai.script(
        SECOND,
        [{"kind": "rate_limit", "retry_after_ms": 100}, "server_error", {"kind": "timeout", "seconds": 5}],
    )
    (job,) = run_jobs(pipeline, 1)
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model) == (JobStatus.SUCCEEDED.value, SECOND)
    assert [(m, o, s) for m, o, s, _ in attempts_of(pipeline, job)] == [
        (PRIMARY, AttemptOutcome.FALLBACK.value, 400),
        (SECOND, AttemptOutcome.RETRIED.value, 429),
        (SECOND, AttemptOutcome.RETRIED.value, 500),
        (SECOND, AttemptOutcome.RETRIED.value, None),
        (SECOND, AttemptOutcome.SUCCESS.value, 200),
    ]
    transcript = pipeline.transcript(job)
    assert transcript is not None and transcript.text == "tone300"


# ---- item 12: rate limits slow the fleet down instead of moving it to a pricier model ----


def sent_after_the_429(pipeline: Pipeline, fake: FakeOpenAI) -> list[float]:
    """Seconds from the 429 to each later request for PRIMARY, among those the worker started once it knew
    of the 429 (their attempt row, written after the pause check, is younger than the 429's close; a call
    that had passed the check when the 429 was answered, and reached the fake a little later on a busy
    machine, is not one)."""
    sent = requests_for(fake, PRIMARY)
    limited = next(r for r in sent if r["status"] == 429)
    attempts = {str(a.id): a for a in pipeline.attempts()}
    closed = attempts[limited["request_id"]]
    assert closed.ended_at is not None
    known = closed.ended_at
    later = [r for r in sent if attempts[r["request_id"]].started_at > known]
    return [r["received"] - limited["ts"] for r in later]


def test_a_429s_retry_after_pauses_the_fleet_without_any_limit_configured(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings(monkeypatch, VOXQ_MAX_IN_FLIGHT="2")
    from core.settings import get_settings

    assert get_settings().model_rpm_limit == 0 and get_settings().model_audio_seconds_per_minute == 0
    fake_openai.script(PRIMARY, [{"kind": "rate_limit", "retry_after_ms": 1200}])
    jobs = run_jobs(pipeline, 6)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in pipeline.jobs(jobs).values())
    after = sent_after_the_429(pipeline, fake_openai)
    assert after and min(after) >= 1.15, f"requests sent during the fleet's pause: {after}"
    assert requests_for(fake_openai, SECOND) == []


def test_openai_reset_headers_pause_the_fleet(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings(monkeypatch, VOXQ_MAX_IN_FLIGHT="2")
    reset = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    fake_openai.script(PRIMARY, [{"kind": "rate_limit", "headers": reset}])
    jobs = run_jobs(pipeline, 4)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in pipeline.jobs(jobs).values())
    after = sent_after_the_429(pipeline, fake_openai)
    assert after and min(after) >= 0.95, f"requests sent during the fleet's pause: {after}"


def test_bare_429s_are_waited_out_on_the_same_model_not_the_pricier_fallback(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    bare = {"kind": "rate_limit", "headers": {}}
    fake_openai.script(PRIMARY, [bare] * 6)  # max_retries is 2 here
    (job,) = run_jobs(pipeline, 1)
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model) == (JobStatus.SUCCEEDED.value, PRIMARY)
    assert [o for _, o, _, _ in attempts_of(pipeline, job)] == [AttemptOutcome.RETRIED.value] * 6 + [
        AttemptOutcome.SUCCESS.value
    ]
    assert requests_for(fake_openai, SECOND) == []


def test_a_batch_preferring_speed_moves_on_after_its_retries(
    pipeline: Pipeline, fake_openai: FakeOpenAI
) -> None:
    bare = {"kind": "rate_limit", "headers": {}}
    fake_openai.script(PRIMARY, [bare] * 6)
    (job,) = run_jobs(pipeline, 1, prefer="speed")
    row = pipeline.jobs([job])[job]
    assert (row.status, row.model) == (JobStatus.SUCCEEDED.value, SECOND)
    assert [(m, o) for m, o, _, _ in attempts_of(pipeline, job)] == [
        (PRIMARY, AttemptOutcome.RETRIED.value),
        (PRIMARY, AttemptOutcome.RETRIED.value),
        (PRIMARY, AttemptOutcome.FALLBACK.value),
        (SECOND, AttemptOutcome.SUCCESS.value),
    ]


# ---- item 14: a refused API key is loud ----


def auth_failures() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("voxq_provider_auth_failures_total", {"provider": "openai"}) or 0.0


def test_a_refused_api_key_is_loud_and_jobs_still_move_on(
    pipeline: Pipeline,
    fake_openai: FakeOpenAI,
    api: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue #16, item 14: a 401 moves the job on, and also counts in voxq_provider_auth_failures_total,
    logs a warning, makes /readyz say `degraded` with the reason, and gives the job a `fallback_reason`;
    none of it shows the key. Issue #17: the key is the provider's, so the job moves past every model of
    that provider (SECOND is sent nothing) to the next entry. A probe that gets through clears it."""
    settings(monkeypatch, VOXQ_CIRCUIT_OPEN_SECONDS="0.5")
    fake_openai.script(PRIMARY, ["auth"])
    before = auth_failures()
    with caplog.at_level(logging.WARNING):
        (job,) = run_jobs(pipeline, 1, tenant_name="auth-tenant", models=[PRIMARY, SECOND, "local"])
    row = pipeline.jobs([job])[job]
    assert attempts_of(pipeline, job) == [(PRIMARY, AttemptOutcome.FALLBACK.value, 401, "invalid_api_key")]
    assert requests_for(fake_openai, SECOND) == []  # the same key: not tried
    assert auth_failures() == before + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("openai refused the API key (HTTP 401 invalid_api_key)" in w for w in warnings), warnings

    ready = httpx.get(api.url + "/readyz", timeout=10)
    assert ready.status_code == 200  # the API still serves: uploads go on, jobs end on the next model
    assert ready.json()["status"] == "degraded"
    reason = ready.json()["checks"]["provider:openai"]
    assert reason.startswith("degraded: openai refused the API key (HTTP 401 invalid_api_key, model ")

    with api.client(make_key("auth-tenant")) as c:
        shown = c.get(f"/v1/jobs/{job}").json()
        listed = c.get(f"/v1/batches/{row.batch_id}/jobs").json()["items"]
    assert shown["fallback_reason"].startswith(
        f"{PRIMARY}: the provider refused the API key (HTTP 401 invalid_api_key): Incorrect API key provided"
    )
    assert listed[0]["fallback_reason"] == shown["fallback_reason"]
    for text in (caplog.text, ready.text, shown["fallback_reason"]):
        assert FAKE_OPENAI_API_KEY not in text and "sk-fak" not in text

    # The key works again: once the circuit half-opens, the probe gets through and clears the alarm.
    time.sleep(0.6)
    (again,) = run_jobs(pipeline, 1)
    assert pipeline.jobs([again])[again].model == PRIMARY
    ready = httpx.get(api.url + "/readyz", timeout=10).json()
    assert ready["status"] == "ok" and "provider:openai" not in ready["checks"]


def test_prefer_is_a_batch_option_of_the_api(api: ApiServer) -> None:
    """Issue #16, item 12: `prefer` (cost by default, or speed) is set when a batch is created and shown."""
    with api.client(make_key("prefer-tenant")) as c:
        default = c.post("/v1/batches", json={}).json()
        speedy = c.post("/v1/batches", json={"prefer": "speed"}).json()
        refused = c.post("/v1/batches", json={"prefer": "fast"})
        shown = c.get(f"/v1/batches/{speedy['id']}").json()
    assert (default["prefer"], speedy["prefer"], shown["prefer"]) == ("cost", "speed", "speed")
    assert refused.status_code == 422


# ---- issue #17: the provider's circuit; another provider is still called ----


def test_a_quota_answer_skips_the_providers_other_models_but_not_another_provider(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """insufficient_quota on PRIMARY opens openai's circuit: SECOND (same account) is refused without a
    request, `bravo:whisper-1` (another provider, its own fake server) is called; a model_not_found on a
    bravo model then closes only that model. The chain is the runner's own (`ChainRunner.run`), the calls
    real ones against the fakes."""
    from worker.chain import ChainRunner
    from worker.derived import derived_key, read
    from worker.pieces import pieces_of
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.store.claims import claim_group_run

    with FakeOpenAI() as bravo:
        providers = tmp_path / "providers.toml"
        providers.write_text(
            f'[providers.bravo]\nbase_url = "{bravo.base_url}"\napi_key_env = "BRAVO_KEY"\n'
            '[providers.bravo.models.whisper-1]\nprice = { per_hour = "0.04" }\n'
            '[providers.bravo.models.gone-model]\nprice = { per_hour = "0.04" }\n'
        )
        settings(
            monkeypatch,
            VOXQ_PROVIDERS_FILE=str(providers),
            BRAVO_KEY="bravo-secret",
            VOXQ_CIRCUIT_OPEN_SECONDS="120",
        )
        bravo.retire("gone-model")
        fake_openai.exhaust_quota(PRIMARY)
        tenant = pipeline.tenant()
        batch_id = pipeline.batch(tenant)
        jobs = [pipeline.job(tenant, batch_id, tones(300 + 40 * i)) for i in range(2)]
        report = prepare_jobs(jobs, owner="test:1")
        rt = get_runtime()
        (group,) = report.groups
        claimed, batches = claim_group_run(group, owner=rt.worker_name, lease_seconds=300)
        first, second = (pieces_of(job, batches[job.batch_id])[0] for job in claimed)

        async def run() -> tuple[str, str, str]:
            runner = ChainRunner(rt, deadline=time.monotonic() + 600)
            data = await read(rt, derived_key(tenant, first.job.id))
            chain = [f"openai:{PRIMARY}", f"openai:{SECOND}", "bravo:whisper-1"]
            one = await runner.run(first, data, first.seconds, None, chain)
            data = await read(rt, derived_key(tenant, second.job.id))
            # The account is still out: SECOND, asked first now, is refused without a request.
            two = await runner.run(second, data, second.seconds, None, chain[1:])
            # A retired bravo model closes only itself: bravo's other model still answers.
            three = await runner.run(
                second, data, second.seconds, None, ["bravo:gone-model", "bravo:whisper-1"]
            )
            return one.model, two.model, three.model

        assert rt.run(run()) == ("whisper-1",) * 3  # the bare model that answered: bravo's
        assert [(r["model"], r["code"]) for r in fake_openai.request_log()] == [
            (PRIMARY, "insufficient_quota")
        ]
        assert sorted((r["model"], r["code"]) for r in bravo.request_log()) == [
            ("gone-model", "model_not_found"),
            *[("whisper-1", None)] * 3,
        ]
        answered = [(a.provider, a.model) for a in pipeline.attempts() if a.outcome == "success"]
        assert answered == [("bravo", "whisper-1")] * 3
        breaker = rt.circuit()
        assert rt.run(breaker.state("provider:openai")) == "open"
        assert rt.run(breaker.state("provider:bravo")) == "closed"
        assert rt.run(breaker.state("bravo:gone-model")) == "retired"
        assert rt.run(breaker.state("bravo:whisper-1")) == "closed"
        assert rt.run(breaker.state(f"openai:{SECOND}")) == "closed"  # the model itself is fine


def test_a_providers_in_flight_cap_holds_for_the_chain(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """Issue #17: the providers file's `limits.max_in_flight` bounds the calls to that provider at once,
    below the process's own VOXQ_MAX_IN_FLIGHT; every slot is given back (none held after the run)."""
    from worker.runtime import get_runtime

    providers = tmp_path / "providers.toml"
    providers.write_text("[providers.openai.limits]\nmax_in_flight = 2\n")
    settings(monkeypatch, VOXQ_PROVIDERS_FILE=str(providers), VOXQ_MAX_IN_FLIGHT="8")
    fake_openai.configure(PRIMARY, latency=0.3)
    jobs = run_jobs(pipeline, 6)
    assert all(r.status == JobStatus.SUCCEEDED.value for r in pipeline.jobs(jobs).values())
    sent = requests_for(fake_openai, PRIMARY)
    assert len(sent) == 6
    overlapping = max(
        sum(1 for other in sent if other["received"] < r["received"] + 0.01 < other["ts"]) for r in sent
    )
    assert overlapping == 2, [(r["received"], r["ts"]) for r in sent]  # 2 at once, never 3
    rt = get_runtime()
    assert rt.inflight().cap("openai") == 2
    assert rt.run(held_slots(rt.redis, "openai")) == 0
