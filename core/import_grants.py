"""Which S3 objects a tenant may import by reference: its grants, `(bucket, key prefix)` pairs.

`POST /v1/batches/{id}/imports` reads objects with the service's own S3 credentials, so without a
per-tenant scope any tenant could import (and transcribe, and read back) any other tenant's objects in a
shared bucket. An operator grants each tenant what it may import: `voxq imports grant --tenant T
--bucket B --prefix P` (a key matches when it starts with P: end P with `/`; an empty P grants the whole
bucket), `voxq imports revoke …`, `voxq imports list`.

`VOXQ_IMPORT_BUCKETS` (the old global allowlist) grants every tenant the whole of the listed buckets, in
the `dev` environment only (one person's machine). Anywhere else it would cross tenants, so the API
refuses to start with it set (`check_env_grants`), naming the commands to use instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core.errors import ConfigError
from core.models import ImportGrant, Tenant
from core.settings import Settings, get_settings


@dataclass(frozen=True)
class Grant:
    """One grant as operators see it."""

    tenant_name: str
    bucket: str
    prefix: str
    created_at: datetime


def check_env_grants(settings: Settings | None = None) -> None:
    """Raise ConfigError when `VOXQ_IMPORT_BUCKETS` is set outside dev (it would cross tenants)."""
    settings = settings or get_settings()
    if settings.import_buckets and settings.environment != "dev":
        raise ConfigError(
            "VOXQ_IMPORT_BUCKETS lets every tenant import every object of a bucket and is honoured in "
            "the dev environment only: unset it and grant each tenant its own bucket/prefix with "
            "`voxq imports grant --tenant NAME --bucket BUCKET --prefix PREFIX/`",
            code="import_buckets_not_allowed",
        )


def _granted(grants: list[tuple[str, str]], bucket: str, key: str) -> bool:
    return any(bucket == b and key.startswith(p) for b, p in grants)


def refused(session: Session, tenant_id: uuid.UUID, objects: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The `(bucket, key)` pairs among `objects` that no grant of the tenant covers, in order."""
    settings = get_settings()
    grants = [
        (g.bucket, g.prefix)
        for g in session.execute(
            select(ImportGrant.bucket, ImportGrant.prefix).where(ImportGrant.tenant_id == tenant_id)
        ).all()
    ]
    if settings.environment == "dev":
        grants += [(bucket, "") for bucket in settings.import_buckets]
    return [(bucket, key) for bucket, key in objects if not _granted(grants, bucket, key)]


def _tenant_id(session: Session, tenant_name: str) -> uuid.UUID:
    tenant_id = session.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
    if tenant_id is None:
        raise ConfigError(f"no tenant {tenant_name!r}", code="tenant_not_found")
    return tenant_id


def grant(session: Session, tenant_name: str, bucket: str, prefix: str = "") -> bool:
    """Let the tenant import objects of `bucket` under `prefix`; False when it already could."""
    tenant_id = _tenant_id(session, tenant_name)
    inserted = session.execute(
        insert(ImportGrant)
        .values(tenant_id=tenant_id, bucket=bucket, prefix=prefix)
        .on_conflict_do_nothing()
        .returning(ImportGrant.id)
    ).first()
    return inserted is not None


def revoke(session: Session, tenant_name: str, bucket: str, prefix: str = "") -> bool:
    """Remove exactly this grant; False when there was none."""
    tenant_id = _tenant_id(session, tenant_name)
    result = session.execute(
        delete(ImportGrant).where(
            ImportGrant.tenant_id == tenant_id, ImportGrant.bucket == bucket, ImportGrant.prefix == prefix
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def list_grants(session: Session, tenant_name: str | None = None) -> list[Grant]:
    """Every grant (of one tenant, if given), by tenant, bucket and prefix."""
    query = (
        select(Tenant.name, ImportGrant.bucket, ImportGrant.prefix, ImportGrant.created_at)
        .join(Tenant, Tenant.id == ImportGrant.tenant_id)
        .order_by(Tenant.name, ImportGrant.bucket, ImportGrant.prefix)
    )
    if tenant_name is not None:
        query = query.where(Tenant.name == tenant_name)
    return [Grant(*row) for row in session.execute(query).all()]
