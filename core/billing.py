"""Billing of calls whose fate voxq cannot know, and their settlement against the provider's own export.

A hosted call is an attempt row written before the request (its id is sent as `X-Client-Request-Id`).
When the worker dies during the call, nobody can know whether the provider billed it: the provider may
have finished and billed the request after, or just before, the worker vanished (the two-generals window
between the provider's bill and our commit). So:

1. The sweeper closes such an attempt `abandoned` and, in the same transaction, charges a conservative
   estimate (list price x audio seconds, `estimated=True`) with the attempt marked `settlement =
   unsettled`: budgets and totals stay on the safe side meanwhile (`charge_estimate`). A live worker
   whose call's answer was lost after the request went out (a read timeout, a dropped connection, a 200
   that did not parse) closes its attempt the same way, estimate and `unsettled` included
   (`worker.store.attempts`): the provider bills a request it processed, listening client or not.
2. A late answer from the call (its worker was alive after all) replaces the estimate with the exact
   cost, or removes it for an HTTP error (the provider bills no error), adding only the difference to the
   job's and batch's totals (`rebill`, called by `worker.store.attempts.close_attempt`).
3. Settlement (`settle`, `voxq billing settle`) reads one provider's per-request usage export (JSON list,
   JSON lines, or `{"data": [...]}` of `{request_id, model, usage}`) for a time range, and considers only
   that provider's attempts (`attempts.provider`, the providers-file name): an export says nothing about
   another account's calls, so another provider's estimates are never judged by it, and a listed request
   that is another provider's attempt is reported, not settled. An unsettled attempt listed there gets
   the exact cost priced from the exported usage (`billed`); one absent from an export that covers its
   whole call (started at or after `since`, and `grace` before `until`) has its estimate removed and
   totals reduced (`not_billed`, the attempt's outcome unchanged). A listed request whose attempt has no
   cost record at all (one closed without an estimate before voxq charged lost answers) is charged
   exactly; a listed request voxq has no attempt for, or whose recorded usage differs
   from the export's, is reported and makes the CLI exit non-zero. Running it twice changes nothing.

Totals move by deltas (`x = x + :delta`) in the transaction that changes the cost record, under the
attempt's row lock, so a late answer and a settlement of the same attempt serialise.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from core.ids import uuid7
from core.models import Attempt, Batch, BudgetReservation, CostRecord, Job
from core.providers.config import OPENAI
from core.statuses import AttemptOutcome, Settlement

ZERO = Decimal(0)


def _now() -> datetime:
    return datetime.now(UTC)


def _add_totals(
    session: Session,
    *,
    job_id: uuid.UUID | None,
    batch_id: uuid.UUID | None,
    usd: Decimal,
    billed_seconds: float,
    committed: Decimal,
) -> None:
    if job_id is not None and (usd or billed_seconds):
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(cost_usd=Job.cost_usd + usd, billed_seconds=Job.billed_seconds + billed_seconds)
        )
    if batch_id is not None and (usd or billed_seconds or committed):
        add_batch_totals(session, batch_id, billed_seconds=billed_seconds, cost=usd, committed=committed)


# Built once: the batch row's UPDATE runs once per completion transaction (and per budget move), and an
# ORM-enabled `update(Batch)` was compiled and cache-keyed on each call.
_BATCH_TABLE = cast(Table, Batch.__table__)
_BATCHES = _BATCH_TABLE.c
_ADD_BATCH_TOTALS = (
    update(_BATCH_TABLE)
    .where(_BATCHES.id == bindparam("batch"))
    .values(
        audio_seconds=_BATCHES.audio_seconds + bindparam("audio"),
        billed_seconds=_BATCHES.billed_seconds + bindparam("billed"),
        cost_usd=_BATCHES.cost_usd + bindparam("cost"),
        committed_usd=_BATCHES.committed_usd + bindparam("committed"),
    )
)


def add_batch_totals(
    session: Session,
    batch_id: uuid.UUID,
    *,
    audio_seconds: float = 0.0,
    billed_seconds: float = 0.0,
    cost: Decimal = Decimal(0),
    committed: Decimal = Decimal(0),
) -> None:
    """Move a batch's totals by these deltas in one `SET x = x + :delta` UPDATE (never read-modify-write;
    the batch row is the hot one, so callers fold everything of one transaction into one call)."""
    session.execute(
        _ADD_BATCH_TOTALS,
        {
            "batch": batch_id,
            "audio": float(audio_seconds),
            "billed": float(billed_seconds),
            "cost": Decimal(cost),
            "committed": Decimal(committed),
        },
    )


def release_reservations(session: Session, attempt_ids: list[uuid.UUID]) -> dict[uuid.UUID, Decimal]:
    """Take these attempts' budget reservations off the ledger, in the caller's transaction; what each
    held (an attempt without one is absent). Whoever deletes a row releases it, so a reservation is
    given back exactly once however often a close is retried; the caller moves `committed_usd`."""
    if not attempt_ids:
        return {}
    rows = session.execute(
        delete(BudgetReservation)
        .where(BudgetReservation.attempt_id.in_(attempt_ids))
        .returning(BudgetReservation.attempt_id, BudgetReservation.usd)
    ).all()
    return {attempt_id: Decimal(usd) for attempt_id, usd in rows}


def charge_estimate(
    session: Session,
    *,
    attempt_id: uuid.UUID,
    job_id: uuid.UUID,
    model: str,
    audio_seconds: float,
    provider: str | None = None,
) -> Decimal:
    """Charge an abandoned hosted attempt its estimated cost, unsettled; returns the estimate.

    Call it in the transaction that marks the attempt `abandoned`. The dead worker's budget reservation
    (an upper bound of the call's cost, made only for a batch with a budget) is released and replaced by
    this estimate: committed moves by the estimate less what was reserved.
    """
    from core.pricing import price_attempt

    job = session.execute(select(Job.tenant_id, Job.batch_id).where(Job.id == job_id)).first()
    if job is None:
        return ZERO
    priced = price_attempt(model, None, audio_seconds, provider=provider)  # at the attempt's provider
    inserted = session.execute(
        pg_insert(CostRecord)
        .values(
            id=uuid7(),
            tenant_id=job.tenant_id,
            batch_id=job.batch_id,
            job_id=job_id,
            attempt_id=attempt_id,
            model=model,
            usage_type=priced.usage_type,
            billed_audio_seconds=priced.billed_audio_seconds,
            unit_prices=dict(priced.unit_prices),
            price_table_version=priced.price_table_version,
            usd=priced.usd,
            estimated=True,
        )
        .on_conflict_do_nothing(index_elements=[CostRecord.attempt_id])
        .returning(CostRecord.id)
    ).first()
    reserved = release_reservations(session, [attempt_id]).get(attempt_id, ZERO)
    if inserted is None:  # already charged: never twice
        if reserved:
            add_batch_totals(session, job.batch_id, committed=-reserved)
        return ZERO
    session.execute(
        update(Attempt)
        .where(Attempt.id == attempt_id)
        .values(settlement=Settlement.UNSETTLED.value, settled_at=None)
    )
    _add_totals(
        session,
        job_id=job_id,
        batch_id=job.batch_id,
        usd=priced.usd,
        billed_seconds=priced.billed_audio_seconds,
        committed=priced.usd - reserved,
    )
    return Decimal(priced.usd)


@dataclass(frozen=True)
class CostDelta:
    """What `rebill` changed on the job's totals (the batch's are added by the caller)."""

    usd: Decimal
    billed_seconds: float


def rebill(
    session: Session,
    *,
    attempt_id: uuid.UUID,
    tenant_id: uuid.UUID,
    batch_id: uuid.UUID | None,
    job_id: uuid.UUID | None,
    model: str,
    priced: Any | None,
    settlement: Settlement,
) -> CostDelta:
    """Make the attempt's cost record exact (`priced`, a `core.pricing.PricedUsage`-like) or remove it
    (`priced=None`), mark the attempt settled, and move the job's totals by the difference.

    The caller holds the attempt's row lock and adds the returned delta to the batch's totals.
    """
    old = session.execute(
        select(CostRecord.id, CostRecord.usd, CostRecord.billed_audio_seconds)
        .where(CostRecord.attempt_id == attempt_id)
        .with_for_update()
    ).first()
    old_usd = Decimal(old.usd) if old is not None else ZERO
    old_billed = float(old.billed_audio_seconds or 0.0) if old is not None else 0.0
    new_usd, new_billed = ZERO, 0.0
    if priced is None:
        if old is not None:
            session.execute(delete(CostRecord).where(CostRecord.id == old.id))
    else:
        new_usd, new_billed = Decimal(priced.usd), float(priced.billed_audio_seconds)
        values = {
            "model": model,
            "usage_type": priced.usage_type,
            "billed_audio_seconds": new_billed,
            "input_tokens": priced.input_tokens,
            "input_audio_tokens": priced.input_audio_tokens,
            "input_text_tokens": priced.input_text_tokens,
            "output_tokens": priced.output_tokens,
            "unit_prices": dict(priced.unit_prices),
            "price_table_version": priced.price_table_version,
            "usd": new_usd,
            "estimated": bool(priced.estimated),
        }
        if old is not None:
            session.execute(update(CostRecord).where(CostRecord.id == old.id).values(**values))
        else:
            session.execute(
                insert(CostRecord).values(
                    id=uuid7(),
                    tenant_id=tenant_id,
                    batch_id=batch_id,
                    job_id=job_id,
                    attempt_id=attempt_id,
                    **values,
                )
            )
    session.execute(
        update(Attempt).where(Attempt.id == attempt_id).values(settlement=settlement.value, settled_at=_now())
    )
    delta = CostDelta(new_usd - old_usd, new_billed - old_billed)
    _add_totals(
        session,
        job_id=job_id,
        batch_id=None,
        usd=delta.usd,
        billed_seconds=delta.billed_seconds,
        committed=ZERO,
    )
    return delta


# ---- settlement against the provider's export ------------------------------------------------------


@dataclass(frozen=True)
class BilledRequest:
    """One line of the provider's per-request usage export."""

    request_id: str
    model: str
    usage: dict[str, Any]


def parse_export(raw: str) -> list[BilledRequest]:
    """A usage export: a JSON list, `{"data": [...]}`, or JSON lines, of `{request_id, model, usage}`."""
    text = raw.strip()
    if not text:
        return []
    rows: list[Any]
    try:
        doc = json.loads(text)
        rows = doc.get("data", []) if isinstance(doc, dict) else doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for row in rows:
        if not isinstance(row, dict) or not row.get("request_id"):
            raise ValueError(f"export line without a request_id: {str(row)[:200]}")
        usage = row.get("usage")
        out.append(
            BilledRequest(
                request_id=str(row["request_id"]),
                model=str(row.get("model") or ""),
                usage=usage if isinstance(usage, dict) else {},
            )
        )
    return out


@dataclass
class SettlementReport:
    """What one settlement found and did."""

    billed_requests: int = 0
    unsettled_before: int = 0
    settled_billed: int = 0  # an estimate became the exact cost
    settled_not_billed: int = 0  # an estimate was removed
    charged_missing: int = 0  # billed, with an attempt but no cost record: charged exactly now
    already_recorded: int = 0  # billed and already exactly recorded
    left_unsettled: int = 0  # not in the export, which does not cover the whole call
    in_flight: int = 0  # pending attempts (their worker closes them), left alone
    usd_delta: Decimal = ZERO
    provider: str = OPENAI  # whose export it is: only this provider's attempts were considered
    foreign: list[str] = field(default_factory=list)  # billed requests that are another provider's attempts
    unknown: list[str] = field(default_factory=list)  # billed requests voxq has no attempt for
    mismatched: list[str] = field(default_factory=list)  # recorded usage differs from the export's

    @property
    def ok(self) -> bool:
        """True when every billed request is accounted for and agrees with voxq's records."""
        return not self.unknown and not self.mismatched and not self.foreign

    def lines(self) -> list[str]:
        """A human summary."""
        out = [
            f"provider: {self.provider}",
            f"billed requests in the export: {self.billed_requests}",
            f"unsettled estimates before: {self.unsettled_before}",
            f"settled as billed (estimate -> exact): {self.settled_billed}",
            f"settled as not billed (estimate removed): {self.settled_not_billed}",
            f"billed without a cost record, charged now: {self.charged_missing}",
            f"already recorded exactly: {self.already_recorded}",
            f"left unsettled (export does not cover the call): {self.left_unsettled}",
            f"calls still in flight, left to their worker: {self.in_flight}",
            f"change in total cost: {self.usd_delta:+} USD",
        ]
        if self.unknown:
            out.append(f"!! billed requests with no voxq attempt: {len(self.unknown)}: {self.unknown[:20]}")
        if self.foreign:
            out.append(
                f"!! billed requests that are another provider's calls (not settled): {len(self.foreign)}: "
                f"{self.foreign[:20]}"
            )
        if self.mismatched:
            out.append(
                f"!! recorded usage differs from the export: {len(self.mismatched)}: {self.mismatched[:20]}"
            )
        return out


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _same_usage(cost: Any, priced: Any) -> bool:
    if cost.usage_type != priced.usage_type:
        return False
    if priced.usage_type == "tokens":
        return (cost.input_tokens, cost.output_tokens, cost.input_audio_tokens) == (
            priced.input_tokens,
            priced.output_tokens,
            priced.input_audio_tokens,
        )
    return abs(float(cost.billed_audio_seconds or 0.0) - float(priced.billed_audio_seconds)) < 1e-6


def providers_involved(
    export: Iterable[BilledRequest], *, since: datetime | None = None, until: datetime | None = None
) -> list[str]:
    """The providers an export could be settling, sorted: those with unsettled estimates of calls started
    in `[since, until]` (all of them without a range: nothing unlisted is judged then, so only listed
    requests count) and those whose attempts the export lists. More than one (or another than the one the
    operator meant) and the export's provider must be said (`voxq billing settle --provider`)."""
    from core.db import session_scope

    ids = [key for key in (_as_uuid(line.request_id) for line in export) if key is not None]
    with session_scope() as session:
        found = (
            set(session.execute(select(Attempt.provider).where(Attempt.id.in_(ids))).scalars())
            if ids
            else set()
        )
        if since is not None and until is not None:
            found |= set(
                session.execute(
                    select(Attempt.provider)
                    .where(
                        Attempt.settlement == Settlement.UNSETTLED.value,
                        Attempt.started_at >= since,
                        Attempt.started_at <= until,
                    )
                    .distinct()
                ).scalars()
            )
    return sorted(found)


def settle(
    export: Iterable[BilledRequest],
    *,
    provider: str = OPENAI,
    since: datetime | None = None,
    until: datetime | None = None,
    grace_seconds: float | None = None,
) -> SettlementReport:
    """Settle `provider`'s unsettled estimates against its export covering `[since, until]` (module doc);
    other providers' attempts are left alone (a listed one is reported in `foreign`).

    Without both `since` and `until` the export's coverage is unknown: only requests it lists are settled.
    `grace_seconds` (default twice the provider timeout + 10 s, the sweeper's bound on a live call) is how
    long after its start a call can still be billed.
    """
    from core.db import session_scope
    from core.settings import get_settings

    if grace_seconds is None:
        grace_seconds = 2 * get_settings().provider_timeout_seconds + 10
    report = SettlementReport(provider=provider)
    billed = _index_export(export, report)
    with session_scope() as session:
        unsettled = set(
            session.execute(
                select(Attempt.id).where(
                    Attempt.settlement == Settlement.UNSETTLED.value, Attempt.provider == provider
                )
            ).scalars()
        )
        listed = (
            {
                row.id: row.provider
                for row in session.execute(
                    select(Attempt.id, Attempt.provider).where(Attempt.id.in_(list(billed)))
                )
            }
            if billed
            else {}
        )
    known = {k for k, owner in listed.items() if owner == provider}
    report.unsettled_before = len(unsettled)
    report.unknown += [str(k) for k in billed if k not in listed]
    report.foreign += [f"{k} ({owner})" for k, owner in listed.items() if owner != provider]
    covered_until = until - timedelta(seconds=grace_seconds) if until is not None else None
    for attempt_id in sorted(known | unsettled):
        with session_scope() as session:  # one short transaction per attempt
            _settle_attempt(session, attempt_id, billed.get(attempt_id), report, since, covered_until)
    return report


def _index_export(
    export: Iterable[BilledRequest], report: SettlementReport
) -> dict[uuid.UUID, BilledRequest]:
    """The export's lines by attempt id; ids that are not ours and lines listed twice go to the report."""
    billed: dict[uuid.UUID, BilledRequest] = {}
    for line in export:
        report.billed_requests += 1
        key = _as_uuid(line.request_id)
        if key is None:
            report.unknown.append(line.request_id)
        elif key in billed:
            report.mismatched.append(f"{line.request_id} (listed twice)")
        else:
            billed[key] = line
    return billed


def _settle_attempt(
    session: Session,
    attempt_id: uuid.UUID,
    entry: BilledRequest | None,
    report: SettlementReport,
    since: datetime | None,
    covered_until: datetime | None,
) -> None:
    """Settle one attempt (locked) from its export line, or by its absence from a covering export."""
    from core.pricing import price_attempt

    a = session.execute(
        select(
            Attempt.id,
            Attempt.tenant_id,
            Attempt.job_id,
            Attempt.model,
            Attempt.provider,
            Attempt.audio_seconds,
            Attempt.started_at,
            Attempt.settlement,
            Attempt.outcome,
        )
        .where(Attempt.id == attempt_id)
        .with_for_update()
    ).first()
    if a is None:
        return
    cost = session.execute(select(CostRecord).where(CostRecord.attempt_id == attempt_id)).scalar()
    batch_id = (
        session.execute(select(Job.batch_id).where(Job.id == a.job_id)).scalar()
        if a.job_id is not None
        else None
    )
    if a.outcome == AttemptOutcome.PENDING.value:
        report.in_flight += 1  # its worker is still waiting: its own close records it
        return
    if entry is not None:
        priced = price_attempt(
            entry.model or a.model, entry.usage, a.audio_seconds or 0.0, provider=a.provider or None
        )
        if a.settlement == Settlement.UNSETTLED.value or cost is None:
            if cost is None:
                report.charged_missing += 1
            else:
                report.settled_billed += 1
            report.usd_delta += _settle_one(
                session, a, batch_id, entry.model or a.model, priced, Settlement.BILLED
            )
        elif _same_usage(cost, priced):
            report.already_recorded += 1
        else:
            report.mismatched.append(str(attempt_id))
        return
    if a.settlement != Settlement.UNSETTLED.value:
        return  # settled meanwhile (a late answer)
    started = a.started_at
    if since is not None and covered_until is not None and since <= started <= covered_until:
        report.usd_delta += _settle_one(session, a, batch_id, a.model, None, Settlement.NOT_BILLED)
        report.settled_not_billed += 1
    else:
        report.left_unsettled += 1


def _settle_one(
    session: Session,
    a: Any,
    batch_id: uuid.UUID | None,
    model: str,
    priced: Any | None,
    settlement: Settlement,
) -> Decimal:
    """`rebill` one attempt and move its batch's totals (cost, billed seconds, committed budget) by the
    difference; returns the change in USD."""
    delta = rebill(
        session,
        attempt_id=a.id,
        tenant_id=a.tenant_id,
        batch_id=batch_id,
        job_id=a.job_id,
        model=model,
        priced=priced,
        settlement=settlement,
    )
    _add_totals(
        session,
        job_id=None,
        batch_id=batch_id,
        usd=delta.usd,
        billed_seconds=delta.billed_seconds,
        committed=delta.usd,
    )
    return delta.usd
