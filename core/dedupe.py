"""Dedupe rules the API and the workers share: the advisory lock of identical audio in a tenant, and which
transcript of identical audio a batch may take instead of transcribing it.

Who follows whom is decided under transaction-scoped advisory locks, one per (tenant, PCM fingerprint):
the worker's dedupe decision (worker.store.dedupe), a leader's completion reading its followers
(worker.completion) and the API ending a leader (cancel, delete: api.service) all take them, so a
follower attached at the last moment is never missed. Every one of them takes its keys with
`lock_dedupe_keys`: one statement, in one order (the lock ids' order), so two transactions wanting
overlapping sets queue behind each other instead of deadlocking.

Reuse only what is at least as good as the batch asked for. A batch's model chain lists the models it
accepts, best first; "at least as good as its first choice" is kept simple and checkable:
- a finished twin's transcript (`may_reuse`) is taken when every model that wrote it is the batch's first
  choice, or when the chain starts with `local` (any hosted model is at least as good as the local one);
  a fallback's transcript is not, since the batch ranks its fallbacks below its first choice;
- a twin still in flight is followed (`may_follow`) when its batch's first choice is the same (it runs
  the same request in the same circumstances), or when the chain starts with `local`;
- when that leader ends, its follower takes the transcript (`takes_leader_outcome`) when every model
  that wrote it is in the follower's own chain (a fallback the follower would have used at that moment
  itself), `local` only for a chain that starts with `local`; otherwise the follower is transcribed on
  its own.
Transcripts written by no model (`none`: audio with no speech) are always reusable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import text

from core.names import LOCAL_MODEL, LOCAL_MODEL_PREFIX

NO_MODEL = "none"  # the model of a transcript no model wrote (no speech found)

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


def is_local(model: str) -> bool:
    """Whether a transcript's model is the local engine (`local` or `local:<weights>`)."""
    return model == LOCAL_MODEL or model.startswith(LOCAL_MODEL_PREFIX)


def may_reuse(models: Sequence[str], chain: Sequence[str]) -> bool:
    """Whether a batch with this chain may take a finished twin's transcript written by `models`."""
    if not chain or chain[0] == LOCAL_MODEL:
        return True
    return all(m == chain[0] or m == NO_MODEL for m in models)


def may_follow(leader_chain: Sequence[str], chain: Sequence[str]) -> bool:
    """Whether a job with this chain may wait for a twin in flight whose batch has `leader_chain`."""
    if not chain or chain[0] == LOCAL_MODEL:
        return True
    return bool(leader_chain) and leader_chain[0] == chain[0]


def takes_leader_outcome(models: Sequence[str], chain: Sequence[str]) -> bool:
    """Whether a follower with this chain takes its leader's transcript, written by `models`."""
    if not chain or chain[0] == LOCAL_MODEL:
        return True
    return all(m == NO_MODEL or (not is_local(m) and m in chain) for m in models)


def transcript_models(model: str, provenance: dict[str, Any] | None) -> list[str]:
    """Every model that wrote a transcript: its pieces' models when recorded, else its own `model`."""
    pieces = (provenance or {}).get("models")
    if isinstance(pieces, list) and pieces and all(isinstance(m, str) for m in pieces):
        return list(pieces)
    return [model]
