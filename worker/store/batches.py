"""Batch options as the pipeline reads them, and which batches jobs belong to."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select

from core.db import session_scope
from core.models import Batch, Job


@dataclass(frozen=True)
class BatchOptions:
    """The batch settings the pipeline needs for a job."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    profile: str
    language: str | None
    prompt: str | None
    models: list[str] | None
    priority: str
    budget_usd: Decimal | None
    prefer: str = "cost"  # or "speed": rate limits may move the job to the next model (worker.policy)
    timestamps: str | None = None  # none | segment | word; None: the profile's default
    routing: str = "chain"  # or "cheapest" (core.providers.routing, applied by worker.grouping.job_route)
    diarize: bool = False


def model_list(value: Any) -> list[str] | None:
    """A batch's `models` column as a list of names (None when it names none)."""
    return [str(m) for m in value] if isinstance(value, list) and value else None


def _batch_options(row: Any) -> BatchOptions:
    return BatchOptions(
        id=row.id,
        tenant_id=row.tenant_id,
        profile=row.profile,
        language=row.language,
        prompt=row.prompt,
        models=model_list(row.models),
        priority=row.priority,
        budget_usd=row.budget_usd,
        prefer=row.prefer,
        timestamps=row.timestamps,
        routing=row.routing,
        diarize=row.diarize,
    )


def load_batches(batch_ids: set[uuid.UUID]) -> dict[uuid.UUID, BatchOptions]:
    """Options of these batches, by id."""
    if not batch_ids:
        return {}
    with session_scope() as session:
        return load_batches_in(session, batch_ids)


def load_batches_in(session: Any, batch_ids: set[uuid.UUID]) -> dict[uuid.UUID, BatchOptions]:
    """`load_batches` in the caller's transaction."""
    rows = session.execute(
        select(
            Batch.id,
            Batch.tenant_id,
            Batch.profile,
            Batch.language,
            Batch.prompt,
            Batch.models,
            Batch.priority,
            Batch.budget_usd,
            Batch.prefer,
            Batch.timestamps,
            Batch.routing,
            Batch.diarize,
        ).where(Batch.id.in_(batch_ids))
    ).all()
    return {row.id: _batch_options(row) for row in rows}


def batches_of(job_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """The batches these jobs belong to."""
    if not job_ids:
        return set()
    with session_scope() as session:
        return set(session.execute(select(Job.batch_id).where(Job.id.in_(job_ids))).scalars())
