"""A batch's budget is never passed (issue #16, item 7): each call reserves the most it can cost, on a
ledger keyed by its attempt id, and the reservation is given back exactly once whatever closes it.

Real Postgres (and the fake provider, stages run in this process, for the concurrent run); the ledger's
property test drives the real store functions against a model of what committed and costs must be.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from core.db import session_scope
from core.models import Attempt, Batch, BudgetReservation, CostRecord
from core.pricing import PricedUsage, price_attempt
from core.statuses import AttemptOutcome, JobStatus
from tests.fakes.openai_server import FakeOpenAI
from tests.pipeline_support import (
    PRIMARY,
    Pipeline,
    pending_attempt_row,
    processing_job_rows,
    tones,
)
from tests.support import Stack
from worker import budget
from worker.store.attempts import close_attempt

MODEL = PRIMARY  # priced by tokens: the real cost can be far from the per-minute estimate
Q = Decimal("0.00000001")


def _ledger(batch_id: uuid.UUID) -> tuple[Decimal, Decimal, Decimal]:
    """(committed, sum of cost records, sum of open reservations) of the batch."""
    with session_scope() as s:
        committed = s.execute(select(Batch.committed_usd).where(Batch.id == batch_id)).scalar_one()
        costs = s.execute(
            select(func.coalesce(func.sum(CostRecord.usd), 0)).where(CostRecord.batch_id == batch_id)
        ).scalar_one()
        held = s.execute(
            select(func.coalesce(func.sum(BudgetReservation.usd), 0)).where(
                BudgetReservation.batch_id == batch_id
            )
        ).scalar_one()
        return Decimal(committed), Decimal(costs), Decimal(held)


def _priced(usd: Decimal, seconds: float) -> PricedUsage:
    return PricedUsage(
        usd=usd.quantize(Q), billed_audio_seconds=seconds, usage_type="tokens", price_table_version="t"
    )


def test_concurrent_calls_never_record_more_than_the_budget(
    pipeline: Pipeline, fake_openai: FakeOpenAI, hosted_settings: None
) -> None:
    """30 files of one batch at once, each call dearer than its per-minute estimate (a long prompt):
    the recorded cost stays within the budget (plus at most one call's cost, the promise)."""
    from worker.prepare import prepare_jobs
    from worker.runtime import get_runtime
    from worker.transcribe import transcribe_group

    prompt = "glossary " * 440  # ~1,000 text tokens per call: 18x the per-minute estimate of its audio
    bound = budget.bound_usd(MODEL, 1.4, prompt)
    limit = (bound * Decimal("1.15")).quantize(Q)  # room for one reservation and a few real costs
    tenant = pipeline.tenant()
    batch = pipeline.batch(tenant, budget_usd=limit, prompt=prompt)
    jobs = [pipeline.job(tenant, batch, tones(300 + 10 * i)) for i in range(30)]
    fake_openai.configure(MODEL, latency=0.3)
    report = prepare_jobs(jobs, owner="test:1")
    rt = get_runtime()
    for group in report.groups:
        rt.run(transcribe_group(rt, group))

    rows = pipeline.jobs(jobs)
    succeeded = [j for j in rows.values() if j.status == JobStatus.SUCCEEDED.value]
    skipped = [j for j in rows.values() if j.status == JobStatus.SKIPPED.value]
    assert succeeded and skipped and len(succeeded) + len(skipped) == len(jobs)
    assert all(j.error_code == "budget_exceeded" and not pipeline.attempts(j.id) for j in skipped)
    costs = pipeline.costs()
    assert len(costs) == len(fake_openai.billing_log()) == len(succeeded)
    largest = max(c.usd for c in costs)
    assert largest > 10 * price_attempt(MODEL, None, 1.4).usd  # far above what main reserved
    recorded = sum((c.usd for c in costs), Decimal(0))
    assert recorded <= limit + largest  # the promise
    assert recorded <= limit  # and with reservations that bound each call: the budget itself
    committed, total, held = _ledger(batch)
    assert (committed, held) == (recorded, 0) and total == recorded


def test_a_close_retried_after_an_ambiguous_commit_releases_the_reservation_once(stack: Stack) -> None:
    tenant_id, batch_id, job_id = processing_job_rows(budget_usd=Decimal("1"))
    attempt_id = uuid.uuid4()
    bound = budget.bound_usd(MODEL, 10.0)
    assert budget.reserve(batch_id, attempt_id, bound)
    assert budget.reserve(batch_id, attempt_id, bound)  # a retried reservation holds once
    assert _ledger(batch_id) == (bound, 0, bound)
    pending_attempt_row(tenant_id, job_id, model=MODEL, id=attempt_id, audio_seconds=10.0)
    actual = Decimal("0.00123400")
    close = {
        "outcome": AttemptOutcome.SUCCESS,
        "latency_ms": 900.0,
        "tenant_id": tenant_id,
        "batch_id": batch_id,
        "job_id": job_id,
        "model": MODEL,
        "http_status": 200,
        "priced": _priced(actual, 10.0),
    }
    close_attempt(attempt_id, **close)  # type: ignore[arg-type]
    # Its commit went through but the acknowledgement was lost: `durable` runs the same close again.
    close_attempt(attempt_id, **close)  # type: ignore[arg-type]
    assert _ledger(batch_id) == (actual, actual, 0)
    # A release after the close (a stray Halted path) finds nothing to give back either.
    assert budget.release(attempt_id) == 0
    assert _ledger(batch_id) == (actual, actual, 0)


def test_a_stale_reservation_of_a_dead_worker_is_released(stack: Stack) -> None:
    _, batch_id, _ = processing_job_rows(budget_usd=Decimal("1"))
    lost = uuid.uuid4()  # reserved, then the worker died before writing the attempt row
    assert budget.reserve(batch_id, lost, Decimal("0.5"))
    with session_scope() as s:
        assert budget.release_stale(s, datetime.now(UTC) - timedelta(hours=1)) == 0  # too young
    with session_scope() as s:
        assert budget.release_stale(s, datetime.now(UTC) + timedelta(seconds=1)) == Decimal("0.5")
    assert _ledger(batch_id) == (0, 0, 0)


# ---- the ledger as a state machine ------------------------------------------------------------------

LIMIT = Decimal("0.05000000")


class Ledger(RuleBasedStateMachine):
    """Calls of one batch reserve, close (possibly twice), are abandoned and estimated, answer late or
    never start; after every step committed equals open reservations plus cost records, and neither
    passes the budget."""

    reserved = Bundle("reserved")  # attempt ids holding a reservation, their call in flight
    abandoned = Bundle("abandoned")  # attempt ids the sweeper closed with an estimate

    @initialize()
    def batch(self) -> None:
        self.tenant_id, self.batch_id, self.job_id = processing_job_rows(budget_usd=LIMIT)
        self.held: dict[uuid.UUID, tuple[Decimal, float]] = {}
        self.costs = Decimal(0)

    @property
    def committed(self) -> Decimal:
        return self.costs + sum((bound for bound, _ in self.held.values()), Decimal(0))

    @rule(target=reserved, seconds=st.floats(min_value=0.2, max_value=120.0), prompt=st.integers(0, 3000))
    def reserve(self, seconds: float, prompt: int) -> uuid.UUID:
        attempt_id = uuid.uuid4()
        bound = budget.bound_usd(MODEL, seconds, "p" * prompt)
        fits = self.committed + bound <= LIMIT
        assert budget.reserve(self.batch_id, attempt_id, bound) is fits
        if fits:
            self.held[attempt_id] = (bound, seconds)
            pending_attempt_row(
                self.tenant_id, self.job_id, model=MODEL, id=attempt_id, audio_seconds=seconds
            )
        return attempt_id

    @rule(
        attempt_id=consumes(reserved),
        share=st.decimals(min_value=0, max_value=1, places=4),
        billed=st.booleans(),
        tries=st.integers(1, 3),
    )
    def close(self, attempt_id: uuid.UUID, share: Decimal, billed: bool, tries: int) -> None:
        if attempt_id not in self.held:
            return
        bound, seconds = self.held.pop(attempt_id)
        actual = (bound * share).quantize(Q, rounding="ROUND_FLOOR")
        for _ in range(tries):  # a retried close after an ambiguous commit
            close_attempt(
                attempt_id,
                outcome=AttemptOutcome.SUCCESS if billed else AttemptOutcome.RETRIED,
                latency_ms=1.0,
                tenant_id=self.tenant_id,
                batch_id=self.batch_id,
                job_id=self.job_id,
                model=MODEL,
                http_status=200 if billed else 503,
                priced=_priced(actual, seconds) if billed else None,
            )
        self.costs += actual if billed else 0

    @rule(attempt_id=consumes(reserved), tries=st.integers(1, 2))
    def never_started(self, attempt_id: uuid.UUID, tries: int) -> None:
        if attempt_id not in self.held:
            return
        self.held.pop(attempt_id)
        for _ in range(tries):
            budget.release(attempt_id)
        with session_scope() as s:  # its row was written; nothing else closes it in this model
            s.execute(
                Attempt.__table__.update()  # type: ignore[attr-defined]
                .where(Attempt.id == attempt_id)
                .values(outcome=AttemptOutcome.FAILED.value)
            )

    @rule(target=abandoned, attempt_id=consumes(reserved))
    def worker_dies(self, attempt_id: uuid.UUID) -> uuid.UUID:
        from core import billing

        if attempt_id not in self.held:
            return attempt_id
        _, seconds = self.held.pop(attempt_id)
        with session_scope() as s:
            s.execute(
                Attempt.__table__.update()  # type: ignore[attr-defined]
                .where(Attempt.id == attempt_id)
                .values(outcome=AttemptOutcome.ABANDONED.value)
            )
            self.costs += billing.charge_estimate(
                s, attempt_id=attempt_id, job_id=self.job_id, model=MODEL, audio_seconds=seconds
            )
        return attempt_id

    @rule(attempt_id=consumes(abandoned), tokens=st.integers(0, 400))
    def late_answer(self, attempt_id: uuid.UUID, tokens: int) -> None:
        with session_scope() as s:
            row = s.execute(
                select(CostRecord.usd, Attempt.audio_seconds)
                .join(Attempt, Attempt.id == CostRecord.attempt_id)
                .where(CostRecord.attempt_id == attempt_id)
            ).first()
        if row is None:
            return
        usage = {
            "type": "tokens",
            "input_tokens": tokens,
            "input_token_details": {"audio_tokens": tokens, "text_tokens": 0},
            "output_tokens": 1,
        }
        exact = price_attempt(MODEL, usage, row.audio_seconds)
        close_attempt(
            attempt_id,
            outcome=AttemptOutcome.SUCCESS,
            latency_ms=1.0,
            tenant_id=self.tenant_id,
            batch_id=self.batch_id,
            job_id=self.job_id,
            model=MODEL,
            http_status=200,
            priced=exact,
        )
        self.costs += exact.usd - Decimal(row.usd)

    @invariant()
    def books_agree(self) -> None:
        if not hasattr(self, "batch_id"):
            return
        committed, costs, held = _ledger(self.batch_id)
        assert costs == self.costs
        assert held == self.committed - self.costs
        assert committed == costs + held == self.committed
        assert committed <= LIMIT


def test_the_reservation_ledger_keeps_committed_exact_and_within_budget(stack: Stack) -> None:
    run_state_machine_as_test(
        Ledger,
        settings=settings(
            max_examples=20,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )


@pytest.mark.parametrize("model", ["gpt-4o-mini-transcribe", "gpt-4o-transcribe", "whisper-1", "x-new"])
def test_the_bound_is_above_every_cost_the_fake_can_bill(model: str) -> None:
    """What the fake bills (its own usage rules) for the longest answer a model gives stays below the
    reservation; for a per-minute model, the seconds it bills (rounded up) too."""
    from tests.fakes.openai_server import FakeOpenAI as Fake

    for seconds in (0.1, 0.99, 1.0, 1.4, 59.5, 600.0, 1400.0):
        prompt = "word " * 200
        usage = Fake()._usage(model, seconds, prompt, "x" * (4 * 1999 - 4))
        assert price_attempt(model, usage, seconds).usd <= budget.bound_usd(model, seconds, prompt)
        assert price_attempt(model, None, seconds).usd <= budget.bound_usd(model, seconds, prompt)
