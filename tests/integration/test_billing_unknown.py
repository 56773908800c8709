"""Calls whose bill voxq cannot know (issue #16, item 6): a read timeout after the request was sent, a 200
that does not parse. The provider may have billed them, so each is charged an estimate, unsettled, like a
call whose worker died, and `voxq billing settle` against the provider's export puts its own figure in
place (or removes the estimate of a call it never billed). Stages run in this process against the real
servers and the fake provider, which bills a request it finished after the client gave up, as OpenAI does.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from core.pricing import price_attempt
from core.statuses import AttemptOutcome, JobStatus, Settlement
from tests.fakes.openai_server import FakeOpenAI, Fault
from tests.pipeline_support import PRIMARY, Pipeline, assert_costs_match_billing, tones
from tests.support import wait_until

pytestmark = pytest.mark.usefixtures("hosted_settings")  # worker stages run in this process


def _transcribe(pipeline: Pipeline, job: uuid.UUID) -> None:
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    report = prepare_jobs([job], owner="test:1")
    rt = get_runtime()
    for group in report.groups:
        rt.run(transcribe_group(rt, group))


def _settle(fake: FakeOpenAI, tmp_path: Path, since: datetime) -> int:
    """`voxq billing settle` over the fake's usage export for [since, now], as an operator runs it."""
    from voxq.cli import main

    until = datetime.now(UTC)
    export = httpx.get(
        f"{fake.root_url}/_fake/billing",
        params={"since": since.timestamp(), "until": until.timestamp()},
        timeout=30,
    ).json()
    path = tmp_path / f"export-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(export))
    args = ["--since", since.isoformat(), "--until", until.isoformat(), "--grace-seconds", "0"]
    return main(["billing", "settle", "--file", str(path), *args])


def test_a_timed_out_call_the_provider_finished_is_estimated_then_settled_exactly(
    pipeline: Pipeline, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_PROVIDER_TIMEOUT_SECONDS", "1")
    reset_settings_cache()
    since = datetime.now(UTC) - timedelta(seconds=1)
    # The first call is answered 2.5 s after it arrived, 1.5 s after voxq gave up on it: billed all the
    # same. The second is a 200 whose body is no transcription (never billed by the fake). The third answers.
    fake_openai.script(PRIMARY, [Fault("slow", seconds=2.5), Fault("error", status=200), "ok"])
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant)
    job = pipeline.job(tenant, batch, tones(440))
    _transcribe(pipeline, job)

    assert pipeline.jobs([job])[job].status == JobStatus.SUCCEEDED.value
    timed_out, garbled, answered = pipeline.attempts(job)
    assert (timed_out.outcome, timed_out.error_code) == (AttemptOutcome.RETRIED.value, "timeout")
    assert (garbled.outcome, garbled.http_status, garbled.error_code) == (
        AttemptOutcome.RETRIED.value,
        200,
        "bad_response",
    )
    assert answered.outcome == AttemptOutcome.SUCCESS.value
    # Both unknown calls carry an estimate (list price x audio seconds), unsettled: never $0.
    costs = {c.attempt_id: c for c in pipeline.costs(job)}
    for a in (timed_out, garbled):
        assert a.settlement == Settlement.UNSETTLED.value
        estimate = price_attempt(PRIMARY, None, a.audio_seconds or 0.0).usd
        assert costs[a.id].estimated and costs[a.id].usd == estimate > 0
    assert not costs[answered.id].estimated

    billed = wait_until(
        lambda: len(fake_openai.billing_log()) == 2 and fake_openai.billing_log(),
        timeout=10,
        what="the slow answer billed after the client left",
    )
    assert {b["request_id"] for b in billed} == {str(timed_out.id), str(answered.id)}
    assert _settle(fake_openai, tmp_path, since) == 0

    # The timed-out call now costs what the provider charged; the garbled one, absent from an export
    # covering it, costs nothing. One cost record per billed attempt, none for anything else.
    settled = {a.id: a for a in pipeline.attempts(job)}
    assert settled[timed_out.id].settlement == Settlement.BILLED.value
    assert settled[garbled.id].settlement == Settlement.NOT_BILLED.value
    assert_costs_match_billing(pipeline, fake_openai)
    total = sum((Decimal(b["usd"]) for b in billed), Decimal(0))
    assert pipeline.jobs([job])[job].cost_usd == total
    b = pipeline.batch_row(batch)
    assert b.cost_usd == b.committed_usd == total
    # Settling again changes nothing.
    assert _settle(fake_openai, tmp_path, since) == 0
    assert sorted((c.attempt_id, c.usd) for c in pipeline.costs(job)) == sorted(
        (uuid.UUID(x["request_id"]), Decimal(x["usd"])) for x in billed
    )
