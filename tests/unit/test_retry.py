"""Backoff: exponential growth, full jitter inside the cap, Retry-After as a floor."""

from __future__ import annotations

import random
import statistics

import pytest

from core.backoff import backoff_delay


def _samples(retry_number: int, n: int = 2000, **kwargs: float | None) -> list[float]:
    rng = random.Random(7)
    params: dict[str, float | None] = {"base": 0.5, "cap": 30.0, "retry_after": None, **kwargs}
    return [
        backoff_delay(
            retry_number,
            base=float(params["base"] or 0),
            cap=float(params["cap"] or 0),
            retry_after=params["retry_after"],
            rng=rng,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(("retry_number", "ceiling"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0)])
def test_full_jitter_within_exponential_ceiling(retry_number: int, ceiling: float) -> None:
    delays = _samples(retry_number)
    assert min(delays) >= 0.0
    assert max(delays) <= ceiling
    # Full jitter: spread over the whole range, not clustered near the ceiling.
    assert min(delays) < 0.1 * ceiling
    assert max(delays) > 0.9 * ceiling
    assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.1)


def test_cap_bounds_late_retries() -> None:
    delays = _samples(40, cap=3.0)
    assert max(delays) <= 3.0
    assert statistics.mean(delays) == pytest.approx(1.5, rel=0.1)
    assert backoff_delay(10_000, base=1.0, cap=5.0, retry_after=None) <= 5.0


def test_retry_after_is_a_floor() -> None:
    delays = _samples(1, retry_after=2.5)
    assert min(delays) == 2.5
    assert max(delays) == 2.5  # the jittered delay (<= 0.5) never exceeds it
    later = _samples(8, retry_after=2.5)  # ceiling 30: jitter often beats the floor
    assert min(later) == 2.5
    assert max(later) > 20.0


def test_retry_after_above_cap_still_honoured() -> None:
    assert backoff_delay(1, base=0.5, cap=1.0, retry_after=45.0) == 45.0


def test_zero_base_means_no_wait_unless_told() -> None:
    assert backoff_delay(3, base=0.0, cap=10.0, retry_after=None) == 0.0
    assert backoff_delay(3, base=0.0, cap=10.0, retry_after=0.2) == 0.2
    assert backoff_delay(0, base=1.0, cap=10.0, retry_after=None) <= 1.0


def test_without_jitter_the_schedule_is_the_ceiling_itself() -> None:
    assert [backoff_delay(n, base=1.0, cap=600.0, jitter=False) for n in (1, 2, 3, 4, 10, 11, 40)] == [
        1.0,
        2.0,
        4.0,
        8.0,
        512.0,
        600.0,
        600.0,
    ]
    assert backoff_delay(1, base=1.0, cap=600.0, retry_after=30.0, jitter=False) == 30.0


def test_webhook_retries_keep_their_schedule() -> None:
    from worker.webhook_delivery import retry_delay

    assert [retry_delay(n) for n in (1, 2, 3, 9, 10, 11, 20)] == [1.0, 2.0, 4.0, 256.0, 512.0, 600.0, 600.0]
