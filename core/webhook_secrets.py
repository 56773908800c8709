"""Each tenant's webhook signing secrets: generated, shown once, stored encrypted, rotated with an overlap.

A secret must be recoverable to sign a delivery (unlike an API key, which is only compared), so it is
stored encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a key derived from `VOXQ_SECRETS_KEY`. That
setting may list several keys, comma-separated: the first encrypts, every one decrypts, so the key can be
rotated (add the new one first, re-encrypt with `voxq webhooks reencrypt`, drop the old one).

Rotation: the new secret becomes current and every secret that was current gets an end, `overlap` from
now. Until then a delivery carries one signature per live secret, newest first
(`X-Voxq-Signature: t=…,v1=<new>,v1=<old>`), so a receiver that still knows only the old secret keeps
verifying while it is switched over; after the window, only the new secret signs.

A tenant gets its first secret when `core.auth.create_key` creates the tenant; a tenant created before
per-tenant secrets has none until it rotates, and its deliveries are signed with the legacy shared
`VOXQ_WEBHOOK_SECRET` while that is set (see worker/webhook_delivery.py).
"""

from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Select, delete, select, update
from sqlalchemy.orm import Session

from core.errors import ConfigError
from core.models import Tenant, WebhookSecret
from core.settings import Settings, get_settings

SECRET_PREFIX = "whsec_"  # noqa: S105 (a label, not a secret)
PREFIX_CHARS = len(SECRET_PREFIX) + 6
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_OVERLAP = timedelta(days=30)
_KDF_INFO = b"voxq webhook secrets v1"


def _fernet_key(material: str) -> bytes:
    """A Fernet key from one `VOXQ_SECRETS_KEY` entry (HKDF-SHA256: any long random string will do)."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO).derive(material.encode())
    return base64.urlsafe_b64encode(key)


def _cipher(settings: Settings | None = None) -> MultiFernet:
    keys = [k.strip() for k in (settings or get_settings()).secrets_key.get_secret_value().split(",")]
    keys = [k for k in keys if k]
    if not keys:
        raise ConfigError(
            "VOXQ_SECRETS_KEY is empty: webhook secrets cannot be stored", code="secrets_key_unset"
        )
    return MultiFernet([Fernet(_fernet_key(k)) for k in keys])


def encrypt(plaintext: str, settings: Settings | None = None) -> str:
    """`plaintext` encrypted with the first `VOXQ_SECRETS_KEY`."""
    return _cipher(settings).encrypt(plaintext.encode()).decode("ascii")


def decrypt(token: str, settings: Settings | None = None) -> str:
    """The plaintext of `token`; ConfigError when no `VOXQ_SECRETS_KEY` opens it."""
    try:
        return _cipher(settings).decrypt(token.encode("ascii")).decode()
    except InvalidToken:
        raise ConfigError(
            "no key in VOXQ_SECRETS_KEY decrypts this webhook secret", code="secrets_key_mismatch"
        ) from None


def generate_secret() -> str:
    """A new random secret: `whsec_` + 43 URL-safe characters (256 bits)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class IssuedSecret:
    """A secret just created: the only moment its plaintext is handed out."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    secret: str
    prefix: str
    created_at: datetime
    previous_expire_at: datetime | None  # when the secrets that were current stop signing (None: none)


@dataclass(frozen=True)
class SecretInfo:
    """A secret as operators and tenants may see it later: never its plaintext."""

    id: uuid.UUID
    prefix: str
    created_at: datetime
    expires_at: datetime | None


def rotate(
    session: Session,
    tenant_id: uuid.UUID,
    *,
    overlap: timedelta = DEFAULT_OVERLAP,
    now: datetime | None = None,
) -> IssuedSecret:
    """Make a new current secret for the tenant; the current ones keep signing for `overlap`.

    Concurrent rotations of one tenant take turns (its row is locked). Secrets whose window has ended are
    deleted. The caller commits.
    """
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise ValueError(f"the overlap must be between 0 and {MAX_OVERLAP.days} days")
    now = now or datetime.now(UTC)
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    session.execute(
        delete(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at <= now)
    )
    ended = session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id, WebhookSecret.expires_at.is_(None))
        .values(expires_at=now + overlap)
        .returning(WebhookSecret.id)
    ).all()
    plaintext = generate_secret()
    row = WebhookSecret(
        tenant_id=tenant_id, prefix=plaintext[:PREFIX_CHARS], ciphertext=encrypt(plaintext), created_at=now
    )
    session.add(row)
    session.flush()
    return IssuedSecret(row.id, tenant_id, plaintext, row.prefix, now, now + overlap if ended else None)


def _live(tenant_id: uuid.UUID, now: datetime | None) -> Select[WebhookSecret]:
    """The tenant's secrets that still sign at `now` (current, or inside their window), newest first."""
    now = now or datetime.now(UTC)
    return (
        select(WebhookSecret)
        .where(
            WebhookSecret.tenant_id == tenant_id,
            WebhookSecret.expires_at.is_(None) | (WebhookSecret.expires_at > now),
        )
        .order_by(WebhookSecret.created_at.desc(), WebhookSecret.id.desc())
    )


def signing_secrets(session: Session, tenant_id: uuid.UUID, *, now: datetime | None = None) -> list[str]:
    """The plaintexts of the tenant's live secrets, newest first (empty: the tenant has none)."""
    return [decrypt(row.ciphertext) for row in session.scalars(_live(tenant_id, now)).all()]


def list_secrets(session: Session, tenant_id: uuid.UUID, *, now: datetime | None = None) -> list[SecretInfo]:
    """The tenant's live secrets (prefix and dates only), newest first."""
    rows = session.scalars(_live(tenant_id, now)).all()
    return [SecretInfo(r.id, r.prefix, r.created_at, r.expires_at) for r in rows]


def reencrypt(session: Session) -> int:
    """Encrypt every stored secret again with the first `VOXQ_SECRETS_KEY` (after adding a new key);
    returns how many rows were rewritten. The caller commits."""
    cipher = _cipher()
    count = 0
    for row in session.scalars(select(WebhookSecret).with_for_update()).all():
        try:
            row.ciphertext = cipher.rotate(row.ciphertext.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise ConfigError(
                f"no key in VOXQ_SECRETS_KEY decrypts webhook secret {row.prefix}…",
                code="secrets_key_mismatch",
            ) from None
        count += 1
    return count
