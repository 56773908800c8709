"""The checks of tests/provider_support.py catch what they claim to: a request sent after an account
failed, a cost that differs from the invoice, a missing or mislabelled cost record, a job total off."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from core.models import Attempt, CostRecord, Job
from tests.provider_support import assert_costs_match_billing_logs, requests_after_failure

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def attempt(
    provider: str, *, started: float, ended: float, outcome: str = "success", job: Job | None = None
) -> Attempt:
    return Attempt(
        id=uuid.uuid4(),
        job_id=job.id if job is not None else None,
        provider=provider,
        model="m",
        outcome=outcome,
        started_at=T0 + timedelta(seconds=started),
        ended_at=T0 + timedelta(seconds=ended),
    )


def request(a: Attempt, *, received: float, answered: float, code: str | None = None) -> dict[str, Any]:
    return {
        "request_id": str(a.id),
        "model": "m",
        "code": code,
        "received": T0.timestamp() + received,
        "ts": T0.timestamp() + answered,
    }


def test_a_request_voxq_started_after_it_knew_is_late_and_one_in_flight_is_not() -> None:
    failed = attempt("a", started=0.0, ended=1.1)  # the quota answer came at 1.0, voxq closed it at 1.1
    in_flight = attempt("a", started=0.5, ended=1.3)  # sent before, answered after
    late = attempt("a", started=1.2, ended=1.4)
    log = [
        request(failed, received=0.1, answered=1.0, code="insufficient_quota"),
        request(in_flight, received=1.05, answered=1.3, code="insufficient_quota"),
    ]
    attempts = {str(a.id): a for a in (failed, in_flight, late)}
    assert requests_after_failure(log, attempts) == []
    sent_late = request(late, received=1.25, answered=1.4, code="insufficient_quota")
    assert requests_after_failure([*log, sent_late], attempts) == [sent_late]
    stranger = {
        "request_id": "not-voxqs",
        "model": "m",
        "code": None,
        "received": T0.timestamp() + 2,
        "ts": 0,
    }
    assert requests_after_failure([*log, stranger], attempts) == [stranger]
    assert requests_after_failure([request(late, received=0, answered=1)], attempts) == []  # no failure


def job(cost: str) -> Job:
    return Job(id=uuid.uuid4(), cost_usd=Decimal(cost))


def cost(a: Attempt, usd: str, *, seconds: float = 10.0, estimated: bool = False) -> CostRecord:
    return CostRecord(
        attempt_id=a.id, model="m", usd=Decimal(usd), billed_audio_seconds=seconds, estimated=estimated
    )


def invoice(a: Attempt, usd: str, *, seconds: int = 10, answered_usage: bool = True) -> dict[str, Any]:
    return {
        "request_id": str(a.id),
        "model": "m",
        "usd": usd,
        "billed_seconds": seconds,
        "usage_answered": answered_usage,
    }


def test_costs_that_match_the_invoices_pass_and_each_kind_of_mismatch_fails() -> None:
    on_b, on_gpu, silent = job("0.00010000"), job("0"), job("0.00002000")
    b1 = attempt("b", started=0, ended=1, job=on_b)
    g1 = attempt("gpu", started=0, ended=1, job=on_gpu)
    s1 = attempt("a", started=0, ended=1, job=silent)
    attempts = [b1, g1, s1]
    billing = {"b": [invoice(b1, "0.00010000")], "a": [invoice(s1, "0.00001667", answered_usage=False)]}
    good = [cost(b1, "0.00010000"), cost(g1, "0"), cost(s1, "0.00002000", estimated=True)]
    totals = assert_costs_match_billing_logs(
        billing, attempts, good, [on_b, on_gpu, silent], zero_priced=["gpu"]
    )
    assert totals == {"b": Decimal("0.00010000"), "a": Decimal("0.00001667"), "gpu": Decimal(0)}

    wrong_cent = [cost(b1, "0.00010001"), *good[1:]]
    wrong_seconds = [cost(b1, "0.00010000", seconds=2), *good[1:]]
    unlabelled = [good[0], good[1], cost(s1, "0.00002000")]
    gpu_charged = [good[0], cost(g1, "0.0001"), good[2]]
    missing = good[1:]
    extra = [*good, cost(attempt("b", started=0, ended=1), "0.0001")]
    for costs in (wrong_cent, wrong_seconds, unlabelled, gpu_charged, missing, extra):
        with pytest.raises(AssertionError):
            assert_costs_match_billing_logs(
                billing, attempts, costs, [on_b, on_gpu, silent], zero_priced=["gpu"]
            )
    with pytest.raises(AssertionError):  # a job total that is not the sum of its records
        assert_costs_match_billing_logs(billing, attempts, good, [job("0.5")], zero_priced=["gpu"])
    with pytest.raises(AssertionError):  # an invoice on an attempt of another provider
        assert_costs_match_billing_logs({"a": billing["b"]}, attempts, good, [], zero_priced=["gpu"])
