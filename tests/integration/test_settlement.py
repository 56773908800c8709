"""Abandoned calls: estimate first, then the truth — a late answer, or the provider's usage export.

Real Postgres (and Redis for the sweeper's requeues); the sweeper, the store and settlement are real code.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Attempt, Batch, CostRecord, Job
from core.pricing import price_attempt
from core.statuses import AttemptOutcome, Settlement
from tests.pipeline_support import JobRows, pending_attempt_row, processing_job_rows
from tests.support import Stack
from worker import budget
from worker.store import attempts
from worker.sweeper import sweep

MODEL = "gpt-4o-mini-transcribe"
USAGE = {
    "type": "tokens",
    "input_tokens": 130,
    "input_token_details": {"audio_tokens": 120, "text_tokens": 10},
    "output_tokens": 7,
    "total_tokens": 137,
}
# What those calls cost at the 2026-11 list prices of gpt-4o-mini-transcribe, worked out by hand (not with
# voxq's pricing): the estimate is 12 s at $0.003/min; the exact cost is 120 audio tokens at $3.00/M, 10
# text tokens at $1.25/M and 7 output tokens at $5.00/M = $0.0004075.
ESTIMATE_USD = Decimal("0.00060000")
EXACT_USD = Decimal("0.00040750")


def _job(budget_usd: Decimal | None = None) -> JobRows:
    """A processing job whose lease is far ahead: not the sweeper's to requeue."""
    return processing_job_rows(
        budget_usd=budget_usd, lease_owner="alive:1", lease_expires_at=datetime.now(UTC) + timedelta(hours=1)
    )


def _attempt(
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    *,
    started: datetime,
    seconds: float = 12.0,
    provider: str = "openai",
) -> uuid.UUID:
    """A hosted call of `provider` whose worker went quiet at `started` (still pending)."""
    return pending_attempt_row(
        tenant_id,
        job_id,
        model=MODEL,
        provider=provider,
        audio_seconds=seconds,
        started_at=started,
        worker="gone:1",
    )


def _costs(attempt_id: uuid.UUID) -> list[CostRecord]:
    with session_scope() as s:
        rows = list(s.execute(select(CostRecord).where(CostRecord.attempt_id == attempt_id)).scalars())
        s.expunge_all()
        return rows


def _row(model: type[Any], row_id: uuid.UUID) -> Any:
    with session_scope() as s:
        row = s.execute(select(model).where(model.id == row_id)).scalar_one()
        s.expunge(row)
        return row


def _assert_totals_match_records(job_ids: list[uuid.UUID], batch_id: uuid.UUID) -> None:
    with session_scope() as s:
        costs = list(s.execute(select(CostRecord).where(CostRecord.batch_id == batch_id)).scalars())
        for job_id in job_ids:
            job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
            assert job.cost_usd == sum((c.usd for c in costs if c.job_id == job_id), Decimal(0))
        batch = s.execute(select(Batch).where(Batch.id == batch_id)).scalar_one()
        assert batch.cost_usd == sum((c.usd for c in costs), Decimal(0))
        assert batch.billed_seconds == pytest.approx(sum(c.billed_audio_seconds for c in costs))


def test_a_late_answer_replaces_the_sweepers_estimate_with_the_exact_cost(stack: Stack) -> None:
    tenant_id, batch_id, job_id = _job(budget_usd=Decimal("10"))
    # The worker reserved the most the call can cost against the budget, started the call, then went
    # quiet.
    assert price_attempt(MODEL, None, 12.0).usd == ESTIMATE_USD
    attempt_id = _attempt(tenant_id, job_id, started=datetime.now(UTC) - timedelta(hours=1))
    bound = budget.bound_usd(MODEL, 12.0)
    assert bound > ESTIMATE_USD and budget.reserve(batch_id, attempt_id, bound)
    assert _row(Batch, batch_id).committed_usd == bound
    assert sweep().abandoned_attempts == 1
    (charged,) = _costs(attempt_id)
    assert charged.estimated and charged.usd == ESTIMATE_USD
    assert _row(Attempt, attempt_id).settlement == Settlement.UNSETTLED.value
    assert _row(Batch, batch_id).committed_usd == ESTIMATE_USD  # the reservation became the estimate
    # A second sweep changes nothing (the abandon is a compare-and-set on `pending`).
    assert sweep().abandoned_attempts == 0

    # The answer arrives after all: exact usage wins, only the difference moves the totals.
    exact = price_attempt(MODEL, USAGE, 12.0)  # as the worker prices the answer it got
    attempts.close_attempt(
        attempt_id,
        outcome=AttemptOutcome.SUCCESS,
        latency_ms=70_000.0,
        tenant_id=tenant_id,
        batch_id=batch_id,
        job_id=job_id,
        model=MODEL,
        http_status=200,
        priced=exact,
        usage=USAGE,
    )
    (cost,) = _costs(attempt_id)
    assert not cost.estimated and cost.usd == EXACT_USD
    assert (cost.usage_type, cost.input_tokens, cost.output_tokens, cost.input_audio_tokens) == (
        "tokens",
        130,
        7,
        120,
    )
    attempt = _row(Attempt, attempt_id)
    assert (attempt.outcome, attempt.settlement) == (AttemptOutcome.SUCCESS.value, Settlement.BILLED.value)
    assert _row(Job, job_id).cost_usd == EXACT_USD
    assert _row(Batch, batch_id).committed_usd == EXACT_USD
    _assert_totals_match_records([job_id], batch_id)


def test_a_late_error_answer_removes_the_estimate(stack: Stack) -> None:
    tenant_id, batch_id, job_id = _job()
    attempt_id = _attempt(tenant_id, job_id, started=datetime.now(UTC) - timedelta(hours=1))
    assert sweep().abandoned_attempts == 1
    attempts.close_attempt(
        attempt_id,
        outcome=AttemptOutcome.RETRIED,
        latency_ms=65_000.0,
        tenant_id=tenant_id,
        batch_id=batch_id,
        job_id=job_id,
        model=MODEL,
        http_status=503,
        error_code="server_error",
        error_message="The server is overloaded",
    )
    assert _costs(attempt_id) == []  # the provider bills no error answer
    assert _row(Attempt, attempt_id).settlement == Settlement.NOT_BILLED.value
    assert _row(Job, job_id).cost_usd == 0 and _row(Batch, batch_id).committed_usd == 0
    _assert_totals_match_records([job_id], batch_id)


def _settle(export: list[dict[str, Any]], tmp_path: Path, *args: str) -> int:
    from voxq.cli import main

    path = tmp_path / f"export-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(export))
    return main(["billing", "settle", "--file", str(path), *args])


def _snapshot(batch_id: uuid.UUID) -> tuple[Any, ...]:
    with session_scope() as s:
        costs = sorted(
            (str(c.attempt_id), c.usd, c.estimated, c.input_tokens)
            for c in s.execute(select(CostRecord).where(CostRecord.batch_id == batch_id)).scalars()
        )
        attempts = sorted((str(a.id), a.outcome, a.settlement) for a in s.execute(select(Attempt)).scalars())
        batch = s.execute(select(Batch).where(Batch.id == batch_id)).scalar_one()
        jobs = sorted((str(j.id), j.cost_usd) for j in s.execute(select(Job)).scalars())
        return (costs, attempts, batch.cost_usd, batch.committed_usd, batch.billed_seconds, jobs)


def test_settlement_makes_estimates_exact_or_removes_them_and_reports_strangers(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant_id, batch_id, job_a = _job()
    _, _, job_b = _job()
    with session_scope() as s:  # both jobs in one batch
        s.execute(Job.__table__.update().where(Job.id == job_b).values(batch_id=batch_id))  # type: ignore[attr-defined]
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    billed = _attempt(tenant_id, job_a, started=hour_ago)  # the provider billed it
    unbilled = _attempt(tenant_id, job_b, started=hour_ago)  # it never reached the provider's bill
    before_range = _attempt(tenant_id, job_b, started=hour_ago - timedelta(hours=5))  # outside the export
    assert sweep().abandoned_attempts == 3
    # A call the client gave up on (timeout) that the provider still finished and billed.
    timed_out = _attempt(tenant_id, job_a, started=hour_ago)
    attempts.close_attempt(
        timed_out,
        outcome=AttemptOutcome.RETRIED,
        latency_ms=3000.0,
        tenant_id=tenant_id,
        batch_id=batch_id,
        job_id=job_a,
        model=MODEL,
        error_code="timeout",
    )
    stranger = str(uuid.uuid4())
    export = [
        {"request_id": str(billed), "model": MODEL, "usage": USAGE},
        {"request_id": str(timed_out), "model": MODEL, "usage": {**USAGE, "output_tokens": 9}},
        {"request_id": stranger, "model": MODEL, "usage": USAGE},
    ]
    since = (hour_ago - timedelta(minutes=10)).isoformat()
    until = datetime.now(UTC).isoformat()
    # A billed request voxq knows nothing about is reported and fails the command.
    assert _settle(export, tmp_path, "--since", since, "--until", until) == 1
    out = capsys.readouterr().out
    assert stranger in out and "settled as billed (estimate -> exact): 1" in out
    assert "settled as not billed (estimate removed): 1" in out
    assert "billed without a cost record, charged now: 1" in out

    (cost,) = _costs(billed)
    assert not cost.estimated and cost.usd == EXACT_USD and cost.output_tokens == 7
    assert _row(Attempt, billed).settlement == Settlement.BILLED.value
    assert _costs(unbilled) == []
    gone = _row(Attempt, unbilled)
    assert (gone.outcome, gone.settlement) == (AttemptOutcome.ABANDONED.value, Settlement.NOT_BILLED.value)
    # Started before the export's range: its fate is still unknown, the estimate stays.
    (kept,) = _costs(before_range)
    assert kept.estimated and kept.usd == ESTIMATE_USD
    assert _row(Attempt, before_range).settlement == Settlement.UNSETTLED.value
    (late,) = _costs(timed_out)
    assert not late.estimated and late.output_tokens == 9
    assert late.usd == EXACT_USD + Decimal("0.00001000")  # two more output tokens at $5.00/M
    _assert_totals_match_records([job_a, job_b], batch_id)

    # Idempotent: settling the same export again changes nothing.
    before = _snapshot(batch_id)
    assert _settle(export, tmp_path, "--since", since, "--until", until) == 1
    assert _snapshot(batch_id) == before
    # Without the stranger the books agree: exit 0.
    assert _settle(export[:2], tmp_path, "--since", since, "--until", until) == 0
    assert _snapshot(batch_id) == before


def _unsettled_estimate(attempt_id: uuid.UUID) -> None:
    """Still as the sweeper left it: unsettled, its estimate charged."""
    (cost,) = _costs(attempt_id)
    assert cost.estimated and cost.usd == ESTIMATE_USD
    attempt = _row(Attempt, attempt_id)
    assert (attempt.outcome, attempt.settlement, attempt.settled_at) == (
        AttemptOutcome.ABANDONED.value,
        Settlement.UNSETTLED.value,
        None,
    )


def test_settling_one_providers_export_leaves_another_providers_estimates_alone(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two accounts (issue #17), each with a billed and an unbilled lost call in the same window: A's
    export says nothing about B's calls, so settling it must not judge them; B's own export settles them."""
    tenant_id, batch_id, job_id = _job()
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    a_billed = _attempt(tenant_id, job_id, started=hour_ago)
    a_unbilled = _attempt(tenant_id, job_id, started=hour_ago)
    b_billed = _attempt(tenant_id, job_id, started=hour_ago, provider="backup")
    b_unbilled = _attempt(tenant_id, job_id, started=hour_ago, provider="backup")
    assert sweep().abandoned_attempts == 4
    window = (
        "--since",
        (hour_ago - timedelta(minutes=10)).isoformat(),
        "--until",
        datetime.now(UTC).isoformat(),
    )
    export_a = [{"request_id": str(a_billed), "model": MODEL, "usage": USAGE}]
    export_b = [{"request_id": str(b_billed), "model": MODEL, "usage": USAGE}]
    capsys.readouterr()

    # Whose export is it? Two providers have unsettled estimates in the window: refused, nothing touched.
    before = _snapshot(batch_id)
    assert _settle(export_a, tmp_path, *window) == 2
    err = capsys.readouterr().err
    assert "--provider" in err and "backup" in err and "openai" in err, err
    assert _snapshot(batch_id) == before
    # A provider nobody configured nor called (a typo) is refused too.
    assert _settle(export_a, tmp_path, *window, "--provider", "opanai") == 2
    assert "opanai" in capsys.readouterr().err
    assert _snapshot(batch_id) == before

    # A's export, said to be A's: only A's estimates are judged; B's stay unsettled, untouched.
    assert _settle(export_a, tmp_path, *window, "--provider", "openai") == 0
    out = capsys.readouterr().out
    assert "unsettled estimates before: 2" in out, out
    assert "settled as not billed (estimate removed): 1" in out, out
    (cost,) = _costs(a_billed)
    assert not cost.estimated and cost.usd == EXACT_USD
    assert _row(Attempt, a_billed).settlement == Settlement.BILLED.value
    assert _costs(a_unbilled) == [] and _row(Attempt, a_unbilled).settlement == Settlement.NOT_BILLED.value
    _unsettled_estimate(b_billed)
    _unsettled_estimate(b_unbilled)
    _assert_totals_match_records([job_id], batch_id)

    # A's export listing one of B's requests does not settle it: reported, exit 1, untouched.
    after_a = _snapshot(batch_id)
    assert _settle(export_a + export_b, tmp_path, *window, "--provider", "openai") == 1
    assert str(b_billed) in capsys.readouterr().out
    assert _snapshot(batch_id) == after_a
    _unsettled_estimate(b_billed)

    # B's export, said to be B's, settles B's.
    assert _settle(export_b, tmp_path, *window, "--provider", "backup") == 0
    out = capsys.readouterr().out
    assert "unsettled estimates before: 2" in out and "settled as billed (estimate -> exact): 1" in out, out
    (cost,) = _costs(b_billed)
    assert not cost.estimated and cost.usd == EXACT_USD
    assert _row(Attempt, b_billed).settlement == Settlement.BILLED.value
    assert _costs(b_unbilled) == [] and _row(Attempt, b_unbilled).settlement == Settlement.NOT_BILLED.value
    # A's settled calls are left as they were.
    assert _row(Attempt, a_billed).settlement == Settlement.BILLED.value
    assert _row(Attempt, a_unbilled).settlement == Settlement.NOT_BILLED.value
    _assert_totals_match_records([job_id], batch_id)
