"""Provider troubles the whole fleet must hear about: a refused API key (401/403).

A worker whose call was refused for its key records it in Redis (`KEY_PROVIDER_AUTH` + provider, a small
JSON value that expires after `VOXQ_PROVIDER_AUTH_ALERT_SECONDS`, renewed by every refusal: the circuit's
probe is refused again each time the circuit half-opens), counts it in
`voxq_provider_auth_failures_total{provider}` and logs a warning. `/readyz` reads the records and answers
`degraded` with the reason; a probe that gets through again (the key was fixed) deletes the record. No
key, and no provider message (it may echo part of the key), is ever part of the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core import names


@dataclass(frozen=True)
class AuthFailure:
    """A provider refused the fleet's API key."""

    provider: str
    http_status: int | None
    code: str | None
    model: str
    at: str  # ISO 8601, UTC

    def encode(self) -> str:
        """The Redis value."""
        return json.dumps(self.__dict__)

    @classmethod
    def decode(cls, raw: bytes | str) -> AuthFailure | None:
        """The record from its Redis value (None when unreadable)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(**data)
        except (ValueError, TypeError):
            return None

    def reason(self) -> str:
        """What /readyz says (no secret)."""
        status = f"HTTP {self.http_status}" + (f" {self.code}" if self.code else "")
        return (
            f"degraded: {self.provider} refused the API key ({status}, model {self.model}, "
            f"last at {self.at}); jobs move on to the next model of their chain"
        )


def auth_failure(provider: str, model: str, http_status: int | None, code: str | None) -> AuthFailure:
    """A record of a refusal happening now."""
    at = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    return AuthFailure(provider=provider, http_status=http_status, code=code, model=model, at=at)


def auth_key(provider: str) -> str:
    """The Redis key of a provider's refused-key record."""
    return names.KEY_PROVIDER_AUTH + provider


def read_auth_failures(redis_client: Any) -> dict[str, AuthFailure]:
    """Every provider's refused-key record, by provider (a sync Redis client)."""
    found: dict[str, AuthFailure] = {}
    for key in redis_client.scan_iter(match=names.KEY_PROVIDER_AUTH + "*", count=100):
        raw = redis_client.get(key)
        record = AuthFailure.decode(raw) if raw is not None else None
        if record is not None:
            found[record.provider] = record
    return found
