"""The tenant's webhook signing secrets: rotate (the new secret is shown once) and list (prefixes only).

Operators do the same with `voxq webhooks rotate-secret|secrets --tenant NAME`. A rotation answer is
marked `Cache-Control: no-store`, so neither caches nor the `Idempotency-Key` store keep the secret.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Response

from api.deps import SessionDep, SessionRoute, TenantDep
from api.problems import COMMON_PROBLEMS
from api.schemas import WebhookSecretCreate, WebhookSecretList, WebhookSecretOut, WebhookSecretRow
from core import webhook_secrets

router = APIRouter(
    prefix="/v1/webhook-secrets", tags=["webhooks"], responses=COMMON_PROBLEMS, route_class=SessionRoute
)


@router.post("", status_code=201, response_model=WebhookSecretOut)
def rotate_webhook_secret(
    body: WebhookSecretCreate, tenant: TenantDep, session: SessionDep, response: Response
) -> WebhookSecretOut:
    """A new signing secret, shown only in this answer; the previous ones sign for `overlap_seconds` more."""
    issued = webhook_secrets.rotate(
        session, tenant.tenant_id, overlap=timedelta(seconds=body.overlap_seconds)
    )
    session.commit()
    response.headers["Cache-Control"] = "no-store"
    return WebhookSecretOut(
        id=issued.id,
        secret=issued.secret,
        prefix=issued.prefix,
        created_at=issued.created_at,
        previous_expire_at=issued.previous_expire_at,
    )


@router.get("", response_model=WebhookSecretList)
def list_webhook_secrets(tenant: TenantDep, session: SessionDep) -> WebhookSecretList:
    """The secrets that sign the tenant's webhooks now, newest first (prefixes and dates, never secrets)."""
    rows = webhook_secrets.list_secrets(session, tenant.tenant_id)
    return WebhookSecretList(
        items=[
            WebhookSecretRow(id=r.id, prefix=r.prefix, created_at=r.created_at, expires_at=r.expires_at)
            for r in rows
        ]
    )
