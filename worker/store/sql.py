"""What the store's modules share: the clock, the live and terminal job statuses, and fixed SQL text.

The hot path's statements (opening and closing attempts, cost records, kept answers, a job's transcript
and compare-and-set, a group's claim) take whole columns as arrays (`unnest`): one statement for any
number of rows, a fixed text that Postgres prepares once per connection and SQLAlchemy neither compiles
nor builds a cache key for (the ORM-enabled form of each took ~1 ms of the worker's CPU per call at P2's
rate). Each mirrors core/models.py; `updated_at` is set as the models' `onupdate` would.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from core.statuses import JOB_TERMINAL, JobStatus

TERMINAL_VALUES = tuple(s.value for s in JOB_TERMINAL)
LIVE_VALUES = tuple(s.value for s in JobStatus if s not in JOB_TERMINAL)


def now() -> datetime:
    """The current UTC time."""
    return datetime.now(UTC)


def run_sql(session: Any, statement: str, params: dict[str, Any]) -> Any:
    """Run a fixed SQL text (pyformat parameters) on the session's connection (its transaction)."""
    return session.connection().exec_driver_sql(statement, params)


def to_json(value: Any) -> str | None:
    """A JSONB value as the ORM would send it (SQL NULL for None)."""
    return None if value is None else json.dumps(value)
