"""Settings parsing and secret handling."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_and_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOXQ_FALLBACK_MODELS", raising=False)
    monkeypatch.delenv("VOXQ_PRIMARY_MODEL", raising=False)
    s = Settings()
    assert s.primary_model is None  # the catalogue's dated default (tests/unit/test_retirement.py)
    assert s.fallback_models == ["gpt-4o-transcribe", "local"]


def test_csv_fallbacks_and_openai_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", " whisper-1 ,local,, ")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-very-secret")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    s = Settings()
    assert s.fallback_models == ["whisper-1", "local"]
    assert s.openai_base_url == "http://127.0.0.1:9/v1"
    assert s.openai_api_key is not None
    assert "sk-test-very-secret" not in repr(s) and "sk-test-very-secret" not in str(s.model_dump())


def test_production_rejects_placeholder_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQ_ENVIRONMENT", "production")
    monkeypatch.setenv("VOXQ_FLOWER_PASSWORD", "changeme")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("VOXQ_FLOWER_PASSWORD", "a-real-long-password-1")
    monkeypatch.setenv("VOXQ_S3_SECRET_ACCESS_KEY", "another-real-secret-2")
    monkeypatch.setenv("VOXQ_WEBHOOK_SECRET", "third-real-secret-3")
    # the key that encrypts tenants' webhook secrets must be real too
    with pytest.raises(ValidationError, match="VOXQ_SECRETS_KEY"):
        Settings()
    monkeypatch.setenv("VOXQ_SECRETS_KEY", "fourth-real-secret-4")
    assert Settings().environment == "production"
    # the legacy shared webhook secret is optional in production (no dev default there)
    monkeypatch.delenv("VOXQ_WEBHOOK_SECRET")
    assert Settings().webhook_secret is None
    monkeypatch.setenv("VOXQ_ENVIRONMENT", "dev")
    assert Settings().webhook_secret is not None
