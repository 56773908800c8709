"""The tenant's cost report, from cost records (kept even after jobs are deleted)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api import queries
from api.deps import SessionDep, SessionRoute, TenantDep
from api.problems import COMMON_PROBLEMS, Problem
from api.schemas import GroupBy, UsageOut

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
    items = queries.usage_rows(session, tenant, start, end, group_by)
    out = UsageOut(
        from_=start,
        to=end,
        group_by=group_by,
        total_usd=round(sum(i.cost_usd for i in items), 8),
        total_billed_usd=round(sum(i.billed_usd for i in items), 8),
        total_estimated_usd=round(sum(i.estimated_usd for i in items), 8),
        total_billed_seconds=sum(i.billed_seconds for i in items),
        rows=items,
    )
    return out
