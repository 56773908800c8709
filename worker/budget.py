"""Budget: a batch's committed cost never passes its `budget_usd`.

Before each hosted call the pipeline reserves an estimate (the model's list price for the audio's
duration) with one conditional `UPDATE … SET committed_usd = committed_usd + :estimate WHERE
committed_usd + :estimate <= budget_usd`. When the reservation fails, no call is started and the job is
`skipped` with code `budget_exceeded`. `worker.store.attempts.close_attempt` settles the reservation in the
same transaction that writes the cost record (committed += actual - estimate), so concurrent workers on
many hosts share one exact running total without locks.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from sqlalchemy import or_, update

from core.db import session_scope
from core.models import Batch


def estimate_usd(model: str, audio_seconds: float) -> Decimal:
    """What a call is expected to cost, from the price table (0 for a model it does not price)."""
    from core.pricing import price_attempt

    try:
        return Decimal(price_attempt(model, None, audio_seconds).usd)
    except (KeyError, ValueError, LookupError):
        return Decimal(0)


def reserve(batch_id: uuid.UUID, amount: Decimal) -> bool:
    """Add `amount` to the batch's committed cost unless that would pass its budget; True when reserved."""
    with session_scope() as session:
        row = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                or_(Batch.budget_usd.is_(None), Batch.committed_usd + amount <= Batch.budget_usd),
            )
            .values(committed_usd=Batch.committed_usd + amount)
            .returning(Batch.id)
        ).first()
    return row is not None


def release(batch_id: uuid.UUID, amount: Decimal) -> None:
    """Give back a reservation whose call never happened."""
    if not amount:
        return
    with session_scope() as session:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(committed_usd=Batch.committed_usd - amount)
        )
