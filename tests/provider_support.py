"""Two fake providers and their providers file, and the checks that tie voxq's records to what each
provider saw and invoiced (issue #17: "Tests that must exist", "Done when").

Provider A (`a`): a cheap host whose models answer `json` only (OpenAI's 400 `unsupported_value` for
`verbose_json`), priced per minute with no minimum: `whisper-large-v3-turbo` $0.0005/min and
`whisper-large-v3` $0.0012/min. Provider B (`b`): a host whose `whisper-large-v3-turbo` answers
`verbose_json` with segments and words, $0.0006/min with a 10 s billed minimum per request. Both serve a
model of the same name at different prices, so a cost priced by model name alone is caught.

For a short file (under 10 s) A's turbo is the cheapest model by any reading (per minute, or with B's
minimum applied), so `cheapest` picks `a:whisper-large-v3-turbo` unless the batch needs word timestamps,
which only `b:whisper-large-v3-turbo` gives.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from core.models import Attempt, CostRecord, Job
from tests.fakes.openai_server import FakeOpenAI, ModelSpec

TURBO = "whisper-large-v3-turbo"
V3 = "whisper-large-v3"
KEY_A = "sk-host-a-account-0123456789abcdef"
KEY_B = "sk-host-b-account-fedcba9876543210"
KEY_ENV_A = "HOST_A_API_KEY"
KEY_ENV_B = "HOST_B_API_KEY"
A_TURBO, A_V3, B_TURBO = f"a:{TURBO}", f"a:{V3}", f"b:{TURBO}"
PRICES = {A_TURBO: Decimal("0.0005"), A_V3: Decimal("0.0012"), B_TURBO: Decimal("0.0006")}
B_MIN_SECONDS = 10
# The failures that end an account's usefulness (its circuit opens for every model of it).
ACCOUNT_FAILURES = ("insufficient_quota", "invalid_api_key")


def host_a(**kwargs: Any) -> FakeOpenAI:
    """Provider A's fake (json-only models, no minimum)."""
    json_only = ("json", "text")
    return FakeOpenAI(
        models={},
        specs={
            TURBO: ModelSpec(per_minute=PRICES[A_TURBO], response_formats=json_only),
            V3: ModelSpec(per_minute=PRICES[A_V3], response_formats=json_only),
        },
        api_keys={KEY_A},
        **kwargs,
    )


def host_b(**kwargs: Any) -> FakeOpenAI:
    """Provider B's fake (verbose_json with words, a 10 s billed minimum)."""
    return FakeOpenAI(
        models={},
        specs={
            TURBO: ModelSpec(
                per_minute=PRICES[B_TURBO],
                min_billed_seconds=B_MIN_SECONDS,
                response_formats=("json", "text", "verbose_json", "srt", "vtt"),
            )
        },
        api_keys={KEY_B},
        **kwargs,
    )


def providers_toml(a_url: str, b_url: str, extra: str = "") -> str:
    """The operator's providers file naming A and B (keys in KEY_ENV_A / KEY_ENV_B), plus `extra`."""
    return f"""
[providers.a]
base_url = "{a_url}"
api_key_env = "{KEY_ENV_A}"
limits = {{ max_in_flight = 2 }}

[providers.a.models.{TURBO}]
price = {{ per_minute = "{PRICES[A_TURBO]}" }}
capabilities = {{ timestamps = "none", response_formats = ["json", "text"] }}

[providers.a.models.{V3}]
price = {{ per_minute = "{PRICES[A_V3]}" }}
capabilities = {{ timestamps = "none", response_formats = ["json", "text"] }}

[providers.b]
base_url = "{b_url}"
api_key_env = "{KEY_ENV_B}"
limits = {{ max_in_flight = 2 }}

[providers.b.models.{TURBO}]
price = {{ per_minute = "{PRICES[B_TURBO]}", min_billed_seconds = {B_MIN_SECONDS} }}
capabilities = {{ timestamps = "word", response_formats = ["json", "text", "verbose_json", "srt", "vtt"] }}
{extra}"""


def write_providers_file(path: Path, a_url: str, b_url: str, extra: str = "") -> Path:
    """`providers_toml` written to `path`."""
    path.write_text(providers_toml(a_url, b_url, extra))
    return path


def first_account_failure(requests: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The provider's first answer that ended the account (quota or a refused key), by answer time."""
    failed = [r for r in requests if r.get("code") in ACCOUNT_FAILURES]
    return min(failed, key=lambda r: r["ts"]) if failed else None


def requests_after_failure(
    requests: list[dict[str, Any]], attempts: Mapping[str, Attempt]
) -> list[dict[str, Any]]:
    """The provider's requests that voxq started once it knew its account had failed: their attempt row
    (written right before the send) is younger than the close of the attempt that got the first account
    failure. A call already past its checks when the failure was answered is not one (it was in flight).
    A request without an attempt row of voxq's counts as late too (nothing of voxq's should send it)."""
    first = first_account_failure(requests)
    if first is None:
        return []
    failed = attempts.get(str(first["request_id"]))
    assert failed is not None and failed.ended_at is not None, first
    late = []
    for request in requests:
        if request is first or request["received"] < first["ts"]:
            continue
        attempt = attempts.get(str(request["request_id"]))
        if attempt is None or attempt.started_at > failed.ended_at:
            late.append(request)
    return late


def assert_costs_match_billing_logs(
    billing: Mapping[str, list[dict[str, Any]]],
    attempts: Iterable[Attempt],
    costs: Iterable[CostRecord],
    jobs: Iterable[Job],
    *,
    zero_priced: Iterable[str] = (),
) -> dict[str, Decimal]:
    """Each provider's billing log (`billing`: provider name -> the fake's log) against voxq's records:

    - every request a provider invoiced (its X-Client-Request-Id is voxq's attempt id) has exactly one
      cost record, on an attempt of that provider;
    - an answered call whose answer said its usage is `billed`: not estimated, the same billed seconds
      (the provider's minimum applied) and the same USD to the 8th decimal place;
    - a call priced without the provider's usage (no usage in the answer, or no answer: the client gave
      up) is labelled `estimated`, and within a cent of the invoice;
    - a `zero_priced` provider (self-hosted, no billing log) has a $0 record, not estimated, for every
      successful attempt, and no record that costs anything;
    - no cost record costs anything that no provider invoiced (the local engine's are $0);
    - per provider and per job (`cost_usd`), voxq's totals equal the sums of those records.

    Returns each provider's invoiced total."""
    attempt_rows = list(attempts)
    by_id = {str(a.id): a for a in attempt_rows}
    cost_rows = list(costs)
    costs_by_attempt = {str(c.attempt_id): c for c in cost_rows}
    assert len(costs_by_attempt) == len(cost_rows), "two cost records for one attempt"
    per_job: dict[uuid.UUID, Decimal] = defaultdict(Decimal)
    for rid, cost in costs_by_attempt.items():
        attempt = by_id.get(rid)
        if attempt is not None and attempt.job_id is not None:
            per_job[attempt.job_id] += cost.usd
    totals: dict[str, Decimal] = {}
    invoiced_ids: set[str] = set()
    for provider, entries in billing.items():
        total = Decimal(0)
        for entry in entries:
            rid = str(entry["request_id"])
            attempt = by_id.get(rid)
            assert attempt is not None, f"{provider} invoiced a request voxq has no attempt for: {entry}"
            assert attempt.provider == provider, (provider, attempt.provider, rid)
            cost = costs_by_attempt.get(rid)
            assert cost is not None, f"{provider} invoiced attempt {rid} ({attempt.outcome}); no cost record"
            assert cost.model in (entry["model"], f"{provider}:{entry['model']}"), (
                cost.model,
                entry["model"],
            )
            invoiced = Decimal(entry["usd"])
            if entry["usage_answered"] and attempt.outcome == "success":
                assert not cost.estimated, f"{provider} {rid}: priced from the usage, labelled estimated"
                assert (cost.usd, cost.billed_audio_seconds) == (invoiced, entry["billed_seconds"]), (
                    provider,
                    rid,
                    entry,
                )
            else:
                assert cost.estimated, f"{provider} {rid}: priced without the provider's usage, not labelled"
                assert abs(cost.usd - invoiced) < Decimal("0.005"), (provider, rid, cost.usd, invoiced)
            total += invoiced
            invoiced_ids.add(rid)
        recorded = sum(
            (
                c.usd
                for rid, c in costs_by_attempt.items()
                if rid in by_id and by_id[rid].provider == provider
            ),
            Decimal(0),
        )
        exact = all(not costs_by_attempt[str(e["request_id"])].estimated for e in entries)
        if exact:
            assert recorded == total, (provider, recorded, total)
        totals[provider] = total
    for provider in zero_priced:
        served = [a for a in attempt_rows if a.provider == provider and a.outcome == "success"]
        for attempt in served:
            cost = costs_by_attempt.get(str(attempt.id))
            assert cost is not None and cost.usd == Decimal(0) and not cost.estimated, (provider, attempt.id)
        totals[provider] = Decimal(0)
    unmatched = [(c.model, c.usd) for rid, c in costs_by_attempt.items() if rid not in invoiced_ids and c.usd]
    assert unmatched == [], f"cost records no provider invoiced: {unmatched}"
    for job in jobs:
        assert job.cost_usd == per_job.get(job.id, Decimal(0)), (job.id, job.cost_usd, per_job.get(job.id))
    return totals


def successful_provider(attempts: Iterable[Attempt], job_id: uuid.UUID) -> tuple[str, str] | None:
    """(provider, model) of the job's successful attempt, None when it has none."""
    done = [(a.provider, a.model) for a in attempts if a.job_id == job_id and a.outcome == "success"]
    assert len(done) <= 1, done
    return done[0] if done else None
