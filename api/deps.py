"""Request dependencies as `Annotated` aliases: a DB session, the caller's tenant, the storage client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from api.problems import Problem
from core import auth
from core.db import get_sessionmaker, session_scope
from core.models import ApiKey
from core.storage import Storage

# Writing last_used_at on every request would make each GET a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_bearer = HTTPBearer(auto_error=False, description="An API key from `voxq keys create`")


@dataclass(frozen=True)
class TenantContext:
    """Who is calling: the tenant and the key they used."""

    tenant_id: uuid.UUID
    key_id: uuid.UUID


async def get_session() -> AsyncIterator[Session]:
    """A session for one request; routes commit what they change.

    Async on purpose: a sync generator's teardown needs a threadpool thread to give the connection
    back, and under load every thread can be a route waiting for a connection held by a finished
    request whose teardown waits for a thread (a deadlock until the pool timeout). Creating a Session
    does not connect, and closing one only returns its connection to the pool, so both run on the loop.
    """
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="voxq"'})


def resolve_tenant(plaintext: str) -> TenantContext | None:
    """The tenant a plaintext key belongs to, or None for an unknown/revoked key (short transaction)."""
    with session_scope() as session:
        key = auth.authenticate(session, plaintext)
        if key is None:
            return None
        now = datetime.now(UTC)
        session.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key.id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - LAST_USED_RESOLUTION),
            )
            .values(last_used_at=now)
        )
        return TenantContext(tenant_id=key.tenant_id, key_id=key.id)


def get_tenant(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> TenantContext:
    """The caller's tenant from `Authorization: Bearer <key>`; 401 when missing, unknown or revoked."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing API key: send `Authorization: Bearer <key>`")
    tenant = resolve_tenant(credentials.credentials)
    if tenant is None:
        raise _unauthorized("invalid or revoked API key")
    return tenant


def get_storage(request: Request) -> Storage:
    """The process's storage client (built once, on first use)."""
    storage: Storage | None = getattr(request.app.state, "storage", None)
    if storage is None:
        storage = Storage()
        request.app.state.storage = storage
    return storage


SessionDep = Annotated[Session, Depends(get_session)]
TenantDep = Annotated[TenantContext, Depends(get_tenant)]
StorageDep = Annotated[Storage, Depends(get_storage)]
