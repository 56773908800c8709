"""Dedupe rules the API and the workers share: the advisory lock of identical audio in a tenant.

Who follows whom is decided under transaction-scoped advisory locks, one per (tenant, PCM fingerprint):
the worker's dedupe decision (worker.store.dedupe), a leader's completion reading its followers
(worker.completion) and the API ending a leader (cancel, delete: api.service) all take them, so a
follower attached at the last moment is never missed. Every one of them takes its keys with
`lock_dedupe_keys`: one statement, in one order (the lock ids' order), so two transactions wanting
overlapping sets queue behind each other instead of deadlocking.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text

# Every key in one statement, in the order of the lock ids (a subquery with ORDER BY is not flattened,
# so the outer call runs in its order). Sorting the key texts instead is not the same order.
LOCK_DEDUPE_KEYS = text(
    "SELECT pg_advisory_xact_lock(h) FROM (SELECT DISTINCT hashtextextended(k, 0) AS h"
    " FROM unnest(CAST(:keys AS text[])) AS k ORDER BY 1) AS locks"
)


def dedupe_lock_key(tenant_id: uuid.UUID, fingerprint: str) -> str:
    """The text whose hash is the advisory lock serialising dedupe of this audio in this tenant."""
    return f"{tenant_id}:{fingerprint}"


def lock_dedupe_keys(session: Any, keys: Iterable[str]) -> None:
    """Take the dedupe locks of these keys in the session's transaction (held until it ends)."""
    wanted = sorted(set(keys))
    if wanted:
        session.execute(LOCK_DEDUPE_KEYS, {"keys": wanted})
