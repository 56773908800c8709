"""API keys: generated once, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import webhook_secrets
from core.models import ApiKey, Tenant

KEY_PREFIX = "vq_"


def hash_key(plaintext: str) -> str:
    """The stored form of a key (keys are 256-bit random, so a plain SHA-256 is enough)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def generate_key() -> str:
    """A new random key: `vq_` + 43 URL-safe characters."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedKey:
    """A key just created: the only moment its plaintext exists."""

    id: str
    tenant_id: str
    tenant_name: str
    prefix: str
    plaintext: str
    # The new tenant's webhook signing secret (core/webhook_secrets.py), when this call created the
    # tenant: shown once, with the key.
    webhook_secret: str | None = None


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    """The tenant called `name`, created if missing."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, key_name: str | None = None) -> IssuedKey:
    """Create a key for the tenant (creating the tenant, with its webhook secret, if needed); the caller
    commits."""
    new_tenant = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name)) is None
    tenant = get_or_create_tenant(session, tenant_name)
    webhook_secret = webhook_secrets.rotate(session, tenant.id).secret if new_tenant else None
    plaintext = generate_key()
    key = ApiKey(tenant_id=tenant.id, name=key_name, prefix=plaintext[:10], key_hash=hash_key(plaintext))
    session.add(key)
    session.flush()
    return IssuedKey(str(key.id), str(tenant.id), tenant.name, key.prefix, plaintext, webhook_secret)


def authenticate(session: Session, plaintext: str) -> ApiKey | None:
    """The live key matching `plaintext` (not revoked, tenant enabled), or None."""
    if not plaintext.startswith(KEY_PREFIX):
        return None
    row = session.execute(
        select(ApiKey, Tenant)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(
            ApiKey.key_hash == hash_key(plaintext), ApiKey.revoked_at.is_(None), Tenant.disabled.is_(False)
        )
    ).first()
    return row[0] if row else None


def revoke_key(session: Session, key_id_or_prefix: str) -> bool:
    """Revoke a key by id or prefix; True when one was revoked."""
    cond = ApiKey.prefix == key_id_or_prefix
    try:
        import uuid

        cond = cond | (ApiKey.id == uuid.UUID(key_id_or_prefix))
    except ValueError:
        pass
    result = session.execute(
        update(ApiKey).where(cond, ApiKey.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class KeyInfo:
    """A key as operators see it: never its plaintext or hash."""

    id: str
    tenant_name: str
    name: str | None
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def list_keys(session: Session, tenant_name: str | None = None) -> list[KeyInfo]:
    """Every key (of one tenant, if given), oldest first."""
    query = (
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    )
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [
        KeyInfo(str(k.id), tname, k.name, k.prefix, k.created_at, k.last_used_at, k.revoked_at)
        for k, tname in session.execute(query).all()
    ]
