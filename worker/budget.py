"""Budget: a batch's committed cost never passes its `budget_usd`.

Before each hosted call the pipeline reserves the most that call can cost (`core.pricing.max_cost_usd`:
the model's prices for the audio's duration, the prompt and the model's longest answer) with one
conditional `UPDATE … SET committed_usd = committed_usd + :bound WHERE committed_usd + :bound <=
budget_usd`, and writes the reservation to the ledger (`budget_reservations`, keyed by the attempt id the
call will have) in the same transaction. The real cost can only be lower, so the recorded cost of a batch
never passes its budget while every call stays within its bound.

A reservation is given back exactly once, by whoever deletes its ledger row
(`core.billing.release_reservations`): the close of its attempt (`worker.store.attempts.close_attempt`,
same transaction as the cost record: committed += actual - reserved), the sweeper's estimate of an
abandoned call, `release` when the call never started, or `release_stale` for one whose worker died
before it opened the attempt. A close retried after an ambiguous commit finds no row and moves nothing.

When a reservation does not fit while other calls of the batch hold theirs, the call waits for them
(`reserve_or_wait`): their real costs are usually far below their bounds. With nothing else held, the
job is `skipped` with code `budget_exceeded`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from core.billing import add_batch_totals, release_reservations
from core.db import session_scope
from core.models import Attempt, Batch, BudgetReservation
from core.statuses import AttemptOutcome


def estimate_usd(model: str, audio_seconds: float, *, provider: str | None = None) -> Decimal:
    """What a call is expected to cost, from the price table (0 for a model it does not price)."""
    from core.pricing import price_attempt

    try:
        return Decimal(price_attempt(model, None, audio_seconds, provider=provider).usd)
    except (KeyError, ValueError, LookupError):
        return Decimal(0)


def bound_usd(
    model: str, audio_seconds: float, prompt: str | None = None, *, provider: str | None = None
) -> Decimal:
    """The most one call (of `model` at `provider`, or a `provider:model` entry) can cost: what is
    reserved for it."""
    from core.pricing import max_cost_usd

    return max_cost_usd(model, audio_seconds, prompt, provider=provider)


def reserve(batch_id: uuid.UUID, attempt_id: uuid.UUID, amount: Decimal) -> bool:
    """Reserve `amount` of the batch's budget for the call `attempt_id` unless that would pass the budget;
    True when reserved (also when this attempt already holds its reservation)."""
    with session_scope() as session:
        held = session.execute(
            pg_insert(BudgetReservation)
            .values(attempt_id=attempt_id, batch_id=batch_id, usd=amount)
            .on_conflict_do_nothing(index_elements=[BudgetReservation.attempt_id])
            .returning(BudgetReservation.attempt_id)
        ).first()
        if held is None:
            return True  # reserved by an earlier try whose commit looked lost
        row = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                or_(Batch.budget_usd.is_(None), Batch.committed_usd + amount <= Batch.budget_usd),
            )
            .values(committed_usd=Batch.committed_usd + amount)
            .returning(Batch.id)
        ).first()
        if row is None:
            release_reservations(session, [attempt_id])  # no room: no ledger row either
            return False
    return True


def others_hold(batch_id: uuid.UUID) -> bool:
    """True when calls of the batch hold reservations (a refused one may fit once they are closed)."""
    with session_scope() as session:
        return bool(session.execute(select(exists().where(BudgetReservation.batch_id == batch_id))).scalar())


def release(attempt_id: uuid.UUID) -> Decimal:
    """Give back the reservation of a call that never happened (at most once); what it held."""
    with session_scope() as session:
        return release_in(session, [attempt_id])


def release_in(session: Any, attempt_ids: list[uuid.UUID]) -> Decimal:
    """Give back these attempts' reservations in the caller's transaction; the total released."""
    released = Decimal(0)
    per_batch: dict[uuid.UUID, Decimal] = {}
    rows = session.execute(
        select(BudgetReservation.attempt_id, BudgetReservation.batch_id).where(
            BudgetReservation.attempt_id.in_(attempt_ids)
        )
    ).all()
    batch_of = {a: b for a, b in rows}
    for attempt_id, usd in release_reservations(session, attempt_ids).items():
        per_batch[batch_of[attempt_id]] = per_batch.get(batch_of[attempt_id], Decimal(0)) + usd
        released += usd
    for batch_id in sorted(per_batch):
        add_batch_totals(session, batch_id, committed=-per_batch[batch_id])
    return released


def release_stale(session: Any, before: datetime) -> Decimal:
    """Give back reservations made before `before` whose call is not in flight: their worker died
    between the reservation and the attempt's row, or closed it without the ledger (the sweeper calls
    this; a pending attempt's reservation is the abandon's to release)."""
    stale = list(
        session.execute(
            select(BudgetReservation.attempt_id)
            .where(
                BudgetReservation.created_at < before,
                ~exists().where(
                    Attempt.id == BudgetReservation.attempt_id,
                    Attempt.outcome == AttemptOutcome.PENDING.value,
                ),
            )
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    return release_in(session, stale) if stale else Decimal(0)
