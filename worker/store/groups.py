"""Groups: the jobs one transcribe task runs together, and a long job's chunk plan.

`jobs.group_id` is the token of a job's current run: prepare gives a job a fresh group each run, and a
transcribe task touches only jobs whose `group_id` is its own (worker.store.claims), so a stale task left
over from an earlier run (requeued by the sweeper) does nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert

from core.db import session_scope
from core.ids import uuid7
from core.models import Group, JobChunk
from core.statuses import GroupStatus
from worker.store.sql import now


@dataclass(frozen=True)
class GroupPlan:
    """A group to create: its key, class and (job id, seconds) members."""

    tenant_id: uuid.UUID
    batch_id: uuid.UUID | None
    key: str
    duration_class: str
    members: list[tuple[uuid.UUID, float]]
    chain: list[str]
    priority: str
    # Per member, in `members` order: (the model its route tries first, why); empty: none to record.
    routes: list[tuple[str | None, str | None]] = field(default_factory=list)


@dataclass(frozen=True)
class GroupJob:
    """A job of a group as the transcribe stage sees it."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    batch_id: uuid.UUID
    duration_seconds: float
    speech_seconds: float
    time_map: dict[str, Any]
    chunks: list[dict[str, Any]]  # the chunk plan: [{index, object_key}]
    # Paid answers kept by earlier runs, by piece key: {start_seconds, end_seconds, text, segments,
    # language, model, attempt_id}
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    route_model: str | None = None  # the first model of the route recorded for it (worker.grouping.job_route)


_POINT_AT_GROUPS = text(
    "UPDATE jobs AS j SET group_id = v.group_id, updated_at = now(),"
    " lease_owner = COALESCE(CAST(:owner AS text), j.lease_owner),"
    " lease_expires_at = COALESCE(CAST(:expires AS timestamptz), j.lease_expires_at),"
    " route_model = COALESCE(v.route_model, j.route_model),"
    " route_reason = COALESCE(v.route_reason, j.route_reason)"
    " FROM unnest(CAST(:ids AS uuid[]), CAST(:groups AS uuid[]), CAST(:route_models AS text[]),"
    " CAST(:route_reasons AS text[])) AS v(id, group_id, route_model, route_reason)"
    " WHERE j.id = v.id AND j.status = 'processing'"
)


def assign_groups(
    plans: list[GroupPlan], *, owner: str | None = None, lease_seconds: float | None = None
) -> list[uuid.UUID]:
    """Create the groups and point their (still processing) jobs at them; returns the group ids.

    With `owner` and `lease_seconds`, the jobs' leases are renewed by the same UPDATE, which also records
    each job's route (`GroupPlan.routes`: the model tried first and why).
    """
    ids: list[uuid.UUID] = []
    if not plans:
        return ids
    rows = []
    job_ids: list[uuid.UUID] = []
    job_groups: list[uuid.UUID] = []
    route_models: list[str | None] = []
    route_reasons: list[str | None] = []
    for plan in plans:
        gid = uuid7()
        ids.append(gid)
        rows.append(
            {
                "id": gid,
                "tenant_id": plan.tenant_id,
                "batch_id": plan.batch_id,
                "key": plan.key[:200],
                "duration_class": plan.duration_class,
                "status": GroupStatus.PENDING.value,
                "job_count": len(plan.members),
                "total_seconds": sum(s for _, s in plan.members),
            }
        )
        routes = plan.routes or [(None, None)] * len(plan.members)
        for (job_id, _), (route_model, route_reason) in zip(plan.members, routes, strict=True):
            job_ids.append(job_id)
            job_groups.append(gid)
            route_models.append(stored_route_model(route_model))
            route_reasons.append(route_reason)
    expires = now() + timedelta(seconds=lease_seconds) if owner and lease_seconds is not None else None
    with session_scope() as session:
        session.execute(insert(Group).values(rows))
        session.execute(
            _POINT_AT_GROUPS,
            {
                "ids": job_ids,
                "groups": job_groups,
                "route_models": route_models,
                "route_reasons": route_reasons,
                "owner": owner if expires else None,
                "expires": expires,
            },
        )
    return ids


def stored_route_model(entry: str | None) -> str | None:
    """A route's first chain entry as `jobs.route_model` holds it (String(100))."""
    return entry[:100] if entry else None


_REROUTE = text(
    "UPDATE jobs SET route_model = :route_model, route_reason = :route_reason, updated_at = now()"
    " WHERE id = :id AND status = 'processing'"
)


def record_route(job_id: uuid.UUID, route_model: str | None, route_reason: str) -> None:
    """Record the route a job runs now when it differs from the one prepare recorded (the providers file,
    the chain or the prices changed in between: the job runs the configuration of its transcribe time)."""
    with session_scope() as session:
        session.execute(
            _REROUTE,
            {
                "id": job_id,
                "route_model": stored_route_model(route_model),
                "route_reason": route_reason,
            },
        )


def save_chunks(job_id: uuid.UUID, chunks: list[dict[str, Any]]) -> None:
    """Create (or re-plan, on a re-run) the chunk rows of a long job (its plan; answers: `job_answers`)."""
    if not chunks:
        return
    with session_scope() as session:
        for c in chunks:
            stmt = insert(JobChunk).values(
                id=uuid7(),
                job_id=job_id,
                index=c["index"],
                start_seconds=c["start_seconds"],
                end_seconds=c["end_seconds"],
                object_key=c["object_key"],
            )
            session.execute(
                stmt.on_conflict_do_update(
                    index_elements=[JobChunk.job_id, JobChunk.index],
                    set_={
                        "start_seconds": stmt.excluded.start_seconds,
                        "end_seconds": stmt.excluded.end_seconds,
                        "object_key": stmt.excluded.object_key,
                    },
                )
            )
        # A re-run may plan fewer chunks than a previous one did.
        session.execute(
            JobChunk.__table__.delete().where(  # type: ignore[attr-defined]
                JobChunk.job_id == job_id, JobChunk.index >= len(chunks)
            )
        )
