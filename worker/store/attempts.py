"""Attempts: one row per provider (or local engine) call, and the cost record of each billed one.

An attempt row is written `pending` before its call starts (its id doubles as the provider request id;
the sweeper reads `started_at`) and closed after it. Closing a billed answer writes its cost record, adds
it to the job's and batch's totals and releases the call's budget reservation (worker.budget: committed
+= actual - reserved, the reservation taken off the ledger once, so a close retried after an ambiguous
commit moves nothing), all in one transaction together with keeping its answer (worker.store.answers).
A call whose bill nobody can know (`unsettled`: a read timeout after the request was sent, a 200 that
did not parse) is charged the list-price estimate like an abandoned one (core.billing), marked
`settlement = unsettled` for `voxq billing settle`. Closing is a compare-and-set against the sweeper: an
attempt it already abandoned (and charged an estimate) is closed by `_close_late`, which puts the truth
in place of the estimate.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from sqlalchemy import select, update

from core import metrics
from core.billing import add_batch_totals, release_reservations
from core.db import durable, session_scope
from core.ids import uuid7
from core.models import Attempt, Job
from core.names import LOCAL_MODEL
from core.statuses import AttemptOutcome, Settlement
from worker.store.answers import KeptAnswer, keep_answers_in
from worker.store.sql import now, run_sql, to_json


class PricedLike(Protocol):
    """What `core.pricing.price_attempt` returns (only the fields recorded here)."""

    usd: Decimal
    billed_audio_seconds: float
    input_tokens: int | None
    input_audio_tokens: int | None
    input_text_tokens: int | None
    output_tokens: int | None
    unit_prices: dict[str, Any]
    price_table_version: str
    estimated: bool


def open_attempt(
    *,
    tenant_id: uuid.UUID,
    job_id: uuid.UUID,
    chunk_index: int | None,
    model: str,
    provider: str,
    retry_number: int,
    audio_seconds: float,
    request_bytes: int,
    worker: str,
) -> uuid.UUID:
    """Insert a pending attempt before the call; its id doubles as the provider request id."""
    attempt_id = uuid7()
    open_attempts(
        [
            PendingAttempt(
                id=attempt_id,
                tenant_id=tenant_id,
                job_id=job_id,
                chunk_index=chunk_index,
                model=model,
                provider=provider,
                retry_number=retry_number,
                audio_seconds=audio_seconds,
                request_bytes=request_bytes,
                worker=worker,
            )
        ]
    )
    return attempt_id


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt row to write before its call (see `open_attempts`)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID
    chunk_index: int | None
    model: str
    provider: str
    retry_number: int
    audio_seconds: float
    request_bytes: int
    worker: str


def open_attempts(rows: list[PendingAttempt]) -> None:
    """Insert pending attempts (one statement, one transaction) before their calls start."""
    if not rows:
        return
    with session_scope() as session:
        run_sql(
            session,
            _OPEN_ATTEMPTS,
            {"started_at": now()} | {name: [getattr(r, name) for r in rows] for name in _PENDING_COLUMNS},
        )


_PENDING_COLUMNS = (
    "id",
    "tenant_id",
    "job_id",
    "chunk_index",
    "model",
    "provider",
    "retry_number",
    "audio_seconds",
    "request_bytes",
    "worker",
)
# Like the completion statements below: one fixed text for any number of rows (a multi-row VALUES was
# compiled anew for each row count).
_OPEN_ATTEMPTS = f"""
INSERT INTO attempts (id, tenant_id, job_id, chunk_index, model, provider, retry_number, audio_seconds,
    request_bytes, worker, outcome, started_at)
SELECT v.id, v.tenant_id, v.job_id, v.chunk_index, v.model, v.provider, v.retry_number, v.audio_seconds,
    v.request_bytes, v.worker, '{AttemptOutcome.PENDING.value}', %(started_at)s
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(job_id)s::uuid[], %(chunk_index)s::int[],
            %(model)s::text[], %(provider)s::text[], %(retry_number)s::int[], %(audio_seconds)s::float8[],
            %(request_bytes)s::int8[], %(worker)s::text[])
     AS v(id, tenant_id, job_id, chunk_index, model, provider, retry_number, audio_seconds, request_bytes,
          worker)
"""


@durable
def close_attempt(
    attempt_id: uuid.UUID,
    *,
    outcome: AttemptOutcome,
    latency_ms: float | None,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID,
    job_id: uuid.UUID,
    model: str,
    http_status: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    priced: PricedLike | None = None,
    usage: dict[str, Any] | None = None,
    compute_seconds: float | None = None,
    answer: KeptAnswer | None = None,
    unsettled: bool = False,
) -> None:
    """Close an attempt; for a billed answer write its cost record and add it to job and batch totals.

    All in one transaction, together with releasing the budget reservation (committed += actual - reserved)
    and keeping `answer` (the paid transcript of the piece) for any later run of the job, whatever became
    of this run (a deleted job's answer is not kept).
    """
    close = AttemptClose(
        attempt_id=attempt_id,
        outcome=outcome,
        latency_ms=latency_ms,
        tenant_id=tenant_id,
        batch_id=batch_id,
        job_id=job_id,
        model=model,
        http_status=http_status,
        error_code=error_code,
        error_message=error_message,
        priced=priced,
        usage=usage,
        compute_seconds=compute_seconds,
        answer=answer,
        unsettled=unsettled,
    )
    with session_scope() as session:
        (totals,) = close_attempts_in(session, [close])
        if totals.touches_batch:
            add_batch_totals(
                session, batch_id, billed_seconds=totals.billed, cost=totals.usd, committed=totals.committed
            )
    count_close(close, totals)


@dataclass(frozen=True)
class AttemptClose:
    """Everything `close_attempt` writes for one attempt (also passed to `succeed_job` to do it there)."""

    attempt_id: uuid.UUID
    outcome: AttemptOutcome
    latency_ms: float | None
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    job_id: uuid.UUID
    model: str
    http_status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    priced: PricedLike | None = None
    usage: dict[str, Any] | None = None
    compute_seconds: float | None = None
    answer: KeptAnswer | None = None  # the paid answer, kept in the same transaction
    # The provider may have billed the call though no answer arrived (`priced` is then the list-price
    # estimate): marked `settlement = unsettled` for `voxq billing settle`.
    unsettled: bool = False

    @property
    def billed(self) -> bool:
        """A priced answer or a local engine's run: it gets a cost record."""
        return self.priced is not None or self.compute_seconds is not None


@dataclass(frozen=True)
class CloseTotals:
    """What closing an attempt adds to its batch's totals."""

    usd: Decimal
    billed: float
    committed: Decimal
    touches_batch: bool
    late: bool = False  # a late answer: the totals moved by a difference, the metrics count the answer


_CLOSE_ATTEMPTS = f"""
UPDATE attempts AS a
SET outcome = v.outcome, http_status = v.http_status, error_code = v.error_code,
    error_message = v.error_message, ended_at = %(ended_at)s, latency_ms = v.latency_ms,
    settlement = CASE WHEN v.unsettled THEN '{Settlement.UNSETTLED.value}' ELSE a.settlement END
FROM unnest(%(id)s::uuid[], %(outcome)s::text[], %(http_status)s::int[], %(error_code)s::text[],
            %(error_message)s::text[], %(latency_ms)s::float8[], %(unsettled)s::bool[])
     AS v(id, outcome, http_status, error_code, error_message, latency_ms, unsettled)
WHERE a.id = v.id AND a.outcome <> '{AttemptOutcome.ABANDONED.value}'
RETURNING a.id
"""
_INSERT_COST_RECORDS = """
INSERT INTO cost_records (id, tenant_id, batch_id, job_id, attempt_id, model, usage_type,
    billed_audio_seconds, input_tokens, input_audio_tokens, input_text_tokens, output_tokens,
    compute_seconds, unit_prices, price_table_version, usd, estimated)
SELECT v.id, v.tenant_id, v.batch_id, v.job_id, v.attempt_id, v.model, v.usage_type, v.billed,
    v.input_tokens, v.input_audio_tokens, v.input_text_tokens, v.output_tokens, v.compute_seconds,
    v.unit_prices::jsonb, v.price_table_version, v.usd, v.estimated
FROM unnest(%(id)s::uuid[], %(tenant_id)s::uuid[], %(batch_id)s::uuid[], %(job_id)s::uuid[],
            %(attempt_id)s::uuid[], %(model)s::text[], %(usage_type)s::text[], %(billed)s::float8[],
            %(input_tokens)s::int[], %(input_audio_tokens)s::int[], %(input_text_tokens)s::int[],
            %(output_tokens)s::int[], %(compute_seconds)s::float8[], %(unit_prices)s::text[],
            %(price_table_version)s::text[], %(usd)s::numeric[], %(estimated)s::bool[])
     AS v(id, tenant_id, batch_id, job_id, attempt_id, model, usage_type, billed, input_tokens,
          input_audio_tokens, input_text_tokens, output_tokens, compute_seconds, unit_prices,
          price_table_version, usd, estimated)
ON CONFLICT (attempt_id) DO NOTHING
RETURNING attempt_id
"""
_ADD_JOB_COSTS = """
UPDATE jobs AS j
SET cost_usd = j.cost_usd + v.usd, billed_seconds = j.billed_seconds + v.billed, updated_at = now()
FROM unnest(%(id)s::uuid[], %(usd)s::numeric[], %(billed)s::float8[]) AS v(id, usd, billed)
WHERE j.id = v.id
RETURNING j.id, j.deleted_at
"""


def _close_values(c: AttemptClose, ended_at: datetime) -> dict[str, Any]:
    return {
        "outcome": c.outcome.value,
        "http_status": c.http_status,
        "error_code": c.error_code,
        "error_message": (c.error_message or "")[:2000] or None,
        "ended_at": ended_at,
        "latency_ms": c.latency_ms,
        "unsettled": c.unsettled,
    }


def close_attempts_in(session: Any, closes: list[AttemptClose]) -> list[CloseTotals]:
    """Close attempts (one per call, distinct) in the caller's transaction: their UPDATE, cost records, the
    jobs' totals and kept answers, a statement each for all of them; the batches' totals are the caller's
    to add.

    Returns what each adds to its batch, in order.
    """
    if not closes:
        return []
    ended_at = now()
    rows = [_close_values(c, ended_at) for c in closes]
    # Each call's budget reservation leaves the ledger here, once (a retried close finds none).
    released = release_reservations(session, [c.attempt_id for c in closes if c.compute_seconds is None])
    # Compare-and-set against the sweeper: an attempt it already abandoned (and charged an estimate) is
    # closed by `_close_late`, which puts the truth in place of the estimate.
    closed = {
        r[0]
        for r in run_sql(
            session,
            _CLOSE_ATTEMPTS,
            {"ended_at": ended_at, "id": [c.attempt_id for c in closes]}
            | {k: [r[k] for r in rows] for k in _CLOSE_COLUMNS},
        )
    }
    results: dict[int, CloseTotals] = {}
    for i, c in enumerate(closes):
        if c.attempt_id not in closed:
            late = _close_late(session, c, rows[i], released.get(c.attempt_id, Decimal(0)))
            if late is not None:
                results[i] = late
    billed = [i for i, c in enumerate(closes) if i not in results and c.billed]
    charged = _insert_cost_records(session, [closes[i] for i in billed]) if billed else set()
    usd: dict[int, Decimal] = {}
    seconds: dict[int, float] = {}
    for i in billed:
        c = closes[i]
        if c.attempt_id in charged:
            usd[i] = c.priced.usd if c.priced is not None else Decimal(0)
            seconds[i] = c.priced.billed_audio_seconds if c.priced is not None else 0.0
        # else: already charged (an abandoned call's estimate): counted once, nothing added now.
    if billed:
        _add_to_jobs(
            session,
            [closes[i] for i in billed],
            [usd.get(i, Decimal(0)) for i in billed],
            [seconds.get(i, 0.0) for i in billed],
        )
    for i, c in enumerate(closes):
        if i not in results:
            spent = usd.get(i, Decimal(0))
            reserved = released.get(c.attempt_id, Decimal(0))
            results[i] = CloseTotals(
                usd=spent,
                billed=seconds.get(i, 0.0),
                committed=spent - reserved,
                touches_batch=c.priced is not None or bool(reserved),
            )
    return [results[i] for i in range(len(closes))]


def _add_to_jobs(session: Any, billed: list[AttemptClose], usd: list[Decimal], seconds: list[float]) -> None:
    """Add billed closes' cost and seconds to their jobs (one UPDATE, rows locked in id order) and keep
    the answers of the jobs not deleted."""
    per_job: dict[uuid.UUID, tuple[Decimal, float]] = {}
    for c, c_usd, c_seconds in zip(billed, usd, seconds, strict=True):
        job_usd, job_seconds = per_job.get(c.job_id, (Decimal(0), 0.0))
        per_job[c.job_id] = (job_usd + c_usd, job_seconds + c_seconds)
    jobs = sorted(per_job)  # rows locked in id order
    live = {
        r.id
        for r in run_sql(
            session,
            _ADD_JOB_COSTS,
            {
                "id": jobs,
                "usd": [per_job[j][0] for j in jobs],
                "billed": [per_job[j][1] for j in jobs],
            },
        )
        if r.deleted_at is None
    }
    keep_answers_in(session, [a for c in billed if (a := c.answer) is not None and c.job_id in live])


_CLOSE_COLUMNS = ("outcome", "http_status", "error_code", "error_message", "latency_ms", "unsettled")


def _insert_cost_records(session: Any, closes: list[AttemptClose]) -> set[uuid.UUID]:
    """Cost records of billed closes (none twice: `ON CONFLICT (attempt_id)`); the attempts charged now."""

    def usage_type(c: AttemptClose) -> str:
        return getattr(c.priced, "usage_type", None) or (
            str(c.usage.get("type")) if c.usage and c.usage.get("type") else "none"
        )

    def of_price(name: str) -> list[Any]:
        return [getattr(c.priced, name, None) for c in closes]

    inserted = run_sql(
        session,
        _INSERT_COST_RECORDS,
        {
            "id": [uuid7() for _ in closes],
            "tenant_id": [c.tenant_id for c in closes],
            "batch_id": [c.batch_id for c in closes],
            "job_id": [c.job_id for c in closes],
            "attempt_id": [c.attempt_id for c in closes],
            "model": [c.model for c in closes],
            "usage_type": [usage_type(c) for c in closes],
            "billed": [c.priced.billed_audio_seconds if c.priced is not None else 0.0 for c in closes],
            "input_tokens": of_price("input_tokens"),
            "input_audio_tokens": of_price("input_audio_tokens"),
            "input_text_tokens": of_price("input_text_tokens"),
            "output_tokens": of_price("output_tokens"),
            "compute_seconds": [c.compute_seconds for c in closes],
            "unit_prices": [
                to_json(dict(c.priced.unit_prices) if c.priced is not None else {}) for c in closes
            ],
            "price_table_version": [
                c.priced.price_table_version if c.priced is not None else LOCAL_MODEL for c in closes
            ],
            "usd": [c.priced.usd if c.priced is not None else Decimal(0) for c in closes],
            "estimated": [bool(c.priced.estimated) if c.priced is not None else False for c in closes],
        },
    )
    return {r[0] for r in inserted}


def _close_late(
    session: Any, c: AttemptClose, values: dict[str, Any], reserved: Decimal
) -> CloseTotals | None:
    """Close an attempt the sweeper abandoned (its worker looked dead) with the answer that came after all.

    A priced answer replaces the estimate with the exact cost, an HTTP error answer (never billed) removes
    it, and only the difference moves the job's and batch's totals; the dead worker's budget reservation
    was already turned into the estimate by the sweeper (`core.billing.charge_estimate`), so committed
    moves by the same difference (less a reservation still on the ledger, `reserved`). A transport
    error or an unparseable answer (`unsettled`) tells nothing about the bill: the estimate stays,
    unsettled, for `voxq billing settle`. None: not such a case (no row, or a local attempt).
    """
    from core import billing

    values = {k: v for k, v in values.items() if k != "unsettled"}  # the abandon's settlement stands
    row = session.execute(
        update(Attempt).where(Attempt.id == c.attempt_id).values(**values).returning(Attempt.id)
    ).first()
    if row is None or c.compute_seconds is not None:
        return None
    if c.unsettled or (c.priced is None and c.http_status is None):
        return CloseTotals(usd=Decimal(0), billed=0.0, committed=-reserved, touches_batch=bool(reserved))
    delta = billing.rebill(
        session,
        attempt_id=c.attempt_id,
        tenant_id=c.tenant_id,
        batch_id=c.batch_id,
        job_id=c.job_id,
        model=c.model,
        priced=c.priced,
        settlement=Settlement.BILLED if c.priced is not None else Settlement.NOT_BILLED,
    )
    if (
        c.answer is not None
        and session.execute(select(Job.id).where(Job.id == c.job_id, Job.deleted_at.is_(None))).first()
    ):
        keep_answers_in(session, [c.answer])
    return CloseTotals(
        usd=delta.usd,
        billed=delta.billed_seconds,
        committed=delta.usd - reserved,
        touches_batch=True,
        late=True,
    )


def count_close(c: AttemptClose, totals: CloseTotals) -> None:
    """Metrics of a closed attempt (after its commit)."""
    metrics.ATTEMPTS.labels(model=c.model, outcome=c.outcome.value).inc()
    if c.latency_ms is not None:
        metrics.PROVIDER_LATENCY.labels(model=c.model).observe(c.latency_ms / 1000.0)
    if c.priced is not None:
        # Counters only go up: a late answer counts what it billed (the sweeper's estimate never was).
        billed = c.priced.billed_audio_seconds if totals.late else totals.billed
        usd = c.priced.usd if totals.late else totals.usd
        metrics.AUDIO_BILLED_SECONDS.labels(model=c.model).inc(max(billed, 0.0))
        metrics.COST_USD.labels(model=c.model).inc(max(float(usd), 0.0))
