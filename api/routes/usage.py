"""The tenant's cost report, from cost records (kept even after jobs are deleted)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import case, cast, func, select
from sqlalchemy.types import Date, String

from api.deps import SessionDep, SessionRoute, TenantDep
from api.problems import COMMON_PROBLEMS, Problem
from api.schemas import GroupBy, UsageOut, UsageRow
from core.models import CostRecord

router = APIRouter(prefix="/v1", tags=["usage"], responses=COMMON_PROBLEMS, route_class=SessionRoute)

DEFAULT_WINDOW = timedelta(days=30)


def _bound(value: str | None, default: datetime, *, end: bool, name: str) -> datetime:
    """A query bound: an ISO date (a `to` date includes that whole day) or an ISO datetime (UTC if naive)."""
    if value is None:
        return default
    try:
        if len(value) == 10:
            moment = datetime.combine(date.fromisoformat(value), time.min, tzinfo=UTC)
            return moment + timedelta(days=1) if end else moment
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Problem(400, "invalid_date", f"`{name}` must be an ISO date or datetime") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/usage", response_model=UsageOut)
def usage(
    tenant: TenantDep,
    session: SessionDep,
    from_: Annotated[
        str | None, Query(alias="from", max_length=40, description="ISO date or datetime")
    ] = None,
    to: Annotated[str | None, Query(max_length=40, description="ISO date or datetime")] = None,
    group_by: GroupBy = "day",
) -> UsageOut:
    """Cost by day, model or batch from `from` (inclusive) to `to` (exclusive; a date includes its day)."""
    now = datetime.now(UTC)
    end = _bound(to, now, end=True, name="to")
    start = _bound(from_, end - DEFAULT_WINDOW, end=False, name="from")
    if start >= end:
        raise Problem(400, "invalid_range", "`from` must be before `to`")
    key: Any
    if group_by == "day":
        key = cast(cast(func.timezone("UTC", CostRecord.created_at), Date), String)
    elif group_by == "model":
        key = CostRecord.model
    else:
        key = func.coalesce(cast(CostRecord.batch_id, String), "none")
    rows = session.execute(
        select(
            key.label("key"),
            func.coalesce(func.sum(CostRecord.usd), 0),
            func.coalesce(func.sum(CostRecord.billed_audio_seconds), 0.0),
            func.count(),
            func.coalesce(func.sum(case((CostRecord.estimated, CostRecord.usd), else_=0)), 0),
        )
        .where(
            CostRecord.tenant_id == tenant.tenant_id,
            CostRecord.created_at >= start,
            CostRecord.created_at < end,
        )
        .group_by(key)
        .order_by(key)
    ).all()
    items = [
        UsageRow(
            key=str(k), cost_usd=float(c), billed_seconds=float(s), records=int(n), estimated_usd=float(e)
        )
        for k, c, s, n, e in rows
    ]
    out = UsageOut(
        from_=start,
        to=end,
        group_by=group_by,
        total_usd=round(sum(i.cost_usd for i in items), 8),
        total_billed_seconds=sum(i.billed_seconds for i in items),
        rows=items,
    )
    return out
