"""The one backoff schedule of the project: exponential, with full jitter, never shorter than Retry-After.

`backoff_delay(n, base=b, cap=c)` is drawn uniformly from [0, min(c, b * 2**(n-1))]: full jitter spreads a
fleet's retries out instead of having every worker hit a recovering provider at the same instant (AWS
Architecture Blog, "Exponential Backoff And Jitter"). `jitter=False` gives the ceiling itself, for a
schedule people read (webhook retries: 1 s, 2 s, 4 s, ...). A server's Retry-After is a floor: it knows
when capacity returns.

Used by provider retries (worker/transcribe.py) and webhook deliveries (worker/webhook_delivery.py); S3
requests are retried by botocore's own standard mode (core/storage.py).
"""

from __future__ import annotations

import random


def backoff_delay(
    retry_number: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    jitter: bool = True,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number `retry_number` (1 = the first retry)."""
    exponent = min(max(retry_number - 1, 0), 62)  # past 2**62 the cap has long won; avoid float overflow
    ceiling = min(max(cap, 0.0), max(base, 0.0) * (2.0**exponent))
    delay = (rng or random).uniform(0.0, ceiling) if jitter else ceiling
    if retry_after is not None and retry_after > delay:
        delay = float(retry_after)
    return max(delay, 0.0)
