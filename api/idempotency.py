"""`Idempotency-Key` on POSTs: the same key and body replay the first answer for 24 h.

The row's primary key (tenant, key) is the lock: the first request inserts it "in progress", so a
concurrent duplicate finds it and gets 409 instead of running twice. Only successful (2xx) answers are
stored; an error releases the key so the client can retry with it. Storing the answer and releasing the
key retry through a short Postgres outage (`core.db.durable`): a request that failed *because* Postgres
restarted must not leave its key "in progress" (every retry of the client would get 409 for an hour).

JSON POSTs are handled by `IdempotencyMiddleware` (it hashes the body). Multipart uploads hash their
parts while streaming and call `IdempotencyStore` from the route, so a replay never stores audio twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.bodies import read_capped
from api.problems import PROBLEM_MEDIA_TYPE, problem_body
from core.db import durable, session_scope
from core.models import IdempotencyRecord
from core.settings import get_settings

HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255
MAX_JSON_BODY = 1024 * 1024
# A request still "in progress" after this long died with its process; its key may be taken over.
STALE_IN_PROGRESS = timedelta(hours=1)


class Outcome(StrEnum):
    """What `begin` found."""

    NEW = "new"
    REPLAY = "replay"
    MISMATCH = "mismatch"
    IN_PROGRESS = "in_progress"


@dataclass(frozen=True)
class Begin:
    """The result of claiming a key; for a replay, the stored answer."""

    outcome: Outcome
    status: int | None = None
    body: Any = None
    request_hash: str | None = None


def request_hash(method: str, path: str, query: str, payload: bytes) -> str:
    """A fingerprint of what was asked: method, path, query and (canonical) body."""
    digest = hashlib.sha256()
    for part in (method.upper(), path, query):
        digest.update(part.encode() + b"\0")
    digest.update(payload)
    return digest.hexdigest()


def canonical_json(body: bytes) -> bytes:
    """JSON with sorted keys (so key order does not make a different request); raw bytes otherwise."""
    if not body.strip():
        return b""
    try:
        return json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        return body


class IdempotencyStore:
    """Claims, completes and releases idempotency keys in Postgres."""

    def begin(self, tenant_id: uuid.UUID, key: str, method: str, path: str, req_hash: str | None) -> Begin:
        """Claim `key` for this request, or report the stored answer / a conflict.

        With `req_hash=None` (multipart: the hash is known only after streaming) the stored hash is
        returned for the caller to compare, and `complete` records it.
        """
        now = datetime.now(UTC)
        ttl = timedelta(seconds=get_settings().idempotency_ttl_seconds)
        with session_scope() as session:
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id,
                    IdempotencyRecord.key == key,
                    (IdempotencyRecord.expires_at <= now)
                    | (
                        IdempotencyRecord.response_status.is_(None)
                        & (IdempotencyRecord.created_at < now - STALE_IN_PROGRESS)
                    ),
                )
            )
            inserted = session.execute(
                insert(IdempotencyRecord)
                .values(
                    tenant_id=tenant_id,
                    key=key,
                    method=method,
                    path=path,
                    request_hash=req_hash or "",
                    created_at=now,
                    expires_at=now + ttl,
                )
                .on_conflict_do_nothing()
                .returning(IdempotencyRecord.key)
            ).first()
            if inserted is not None:
                return Begin(Outcome.NEW)
            row = session.scalar(
                select(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key
                )
            )
        if row is None:  # released between our insert and select: treat as a conflict, client retries
            return Begin(Outcome.IN_PROGRESS)
        if row.method != method or row.path != path:
            return Begin(Outcome.MISMATCH)
        if req_hash is not None and row.request_hash != req_hash:
            return Begin(Outcome.MISMATCH)
        if row.response_status is None:
            return Begin(Outcome.IN_PROGRESS)
        return Begin(Outcome.REPLAY, row.response_status, row.response_body, row.request_hash)

    @durable
    def complete(
        self, tenant_id: uuid.UUID, key: str, status: int, body: Any, req_hash: str | None = None
    ) -> None:
        """Store the answer to replay (and the request's hash when it was not known at `begin`)."""
        values: dict[str, Any] = {"response_status": status, "response_body": body}
        if req_hash is not None:
            values["request_hash"] = req_hash
        with session_scope() as session:
            session.execute(
                update(IdempotencyRecord)
                .where(IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key)
                .values(**values)
            )

    @durable
    def release(self, tenant_id: uuid.UUID, key: str) -> None:
        """Forget an in-progress claim (the request failed; the key may be used again)."""
        with session_scope() as session:
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == tenant_id,
                    IdempotencyRecord.key == key,
                    IdempotencyRecord.response_status.is_(None),
                )
            )


def conflict_problem(outcome: Outcome) -> tuple[int, dict[str, Any]]:
    """The problem for a key that cannot run now."""
    if outcome is Outcome.MISMATCH:
        return 422, problem_body(
            422, "idempotency_key_reused", "this Idempotency-Key was used with a different request"
        )
    return 409, problem_body(
        409, "idempotency_request_in_progress", "a request with this Idempotency-Key is still running"
    )


def valid_key(key: str) -> bool:
    """Keys are 1..255 printable ASCII characters."""
    return 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable()


async def _send_json(send: Send, status: int, body: Any, media_type: str, replayed: bool = False) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", media_type.encode()), (b"content-length", str(len(payload)).encode())]
    if replayed:
        headers.append((b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class IdempotencyMiddleware:
    """Replays the first answer to a JSON POST carrying an `Idempotency-Key` (multipart: see routes)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.store = IdempotencyStore()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = headers.get(HEADER)
        if key is None or headers.get("content-type", "").startswith("multipart/"):
            await self.app(scope, receive, send)
            return
        if not valid_key(key):
            body = problem_body(
                400, "invalid_idempotency_key", "Idempotency-Key must be 1-255 ASCII characters"
            )
            await _send_json(send, 400, body, PROBLEM_MEDIA_TYPE)
            return
        tenant_id = await _tenant_of(headers.get("authorization", ""))
        if tenant_id is None:
            await self.app(scope, receive, send)  # the route answers 401
            return
        raw = await read_capped(receive, MAX_JSON_BODY)
        if raw is None:
            body = problem_body(413, "body_too_large", f"JSON bodies are limited to {MAX_JSON_BODY} bytes")
            await _send_json(send, 413, body, PROBLEM_MEDIA_TYPE)
            return
        req_hash = request_hash(
            "POST", scope["path"], scope.get("query_string", b"").decode("latin-1"), canonical_json(raw)
        )
        begun = await run_in_threadpool(self.store.begin, tenant_id, key, "POST", scope["path"], req_hash)
        if begun.outcome is Outcome.REPLAY:
            assert begun.status is not None
            await _send_json(send, begun.status, begun.body, "application/json", replayed=True)
            return
        if begun.outcome is not Outcome.NEW:
            status, body = conflict_problem(begun.outcome)
            await _send_json(send, status, body, PROBLEM_MEDIA_TYPE)
            return
        await self._run_and_record(scope, raw, send, tenant_id, key)

    async def _run_and_record(
        self, scope: Scope, raw: bytes, send: Send, tenant_id: uuid.UUID, key: str
    ) -> None:
        delivered = False

        async def replay_receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            return {"type": "http.disconnect"}

        status = 0
        no_store = False
        chunks: list[bytes] = []
        held: list[Message] = []

        # The answer is held back until it is stored: a client that retries the moment it has the
        # first answer must find it replayable, not "in progress".
        async def capture_send(message: Message) -> None:
            nonlocal status, no_store
            if message["type"] == "http.response.start":
                status = int(message["status"])
                # An answer marked no-store (a secret shown once) is never kept for replays.
                no_store = any(
                    k.lower() == b"cache-control" and b"no-store" in v.lower()
                    for k, v in message.get("headers", [])
                )
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            held.append(message)

        stored = False
        try:
            await self.app(scope, replay_receive, capture_send)
            if 200 <= status < 300 and not no_store:
                payload = b"".join(chunks)
                try:
                    body = json.loads(payload) if payload else None
                except ValueError:
                    body = None
                if body is not None:
                    await run_in_threadpool(self.store.complete, tenant_id, key, status, body)
                    stored = True
        finally:
            if not stored:
                await run_in_threadpool(self.store.release, tenant_id, key)
        for message in held:
            await send(message)


async def _tenant_of(authorization: str) -> uuid.UUID | None:
    from api.deps import tenant_for_key

    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    tenant = await tenant_for_key(token.strip())
    return tenant.tenant_id if tenant else None
