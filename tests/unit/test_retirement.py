"""Retirement by date: pure functions of (catalogue, today), tested on both sides of OpenAI's 2027-02-26."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.model_access import allowed_models
from core.providers.config import load_catalogue
from core.providers.retirement import (
    check_chain,
    configured_refs,
    days_left,
    default_chain,
    default_primary,
    retirement_warnings,
    retirements,
    runtime_chain,
)
from core.settings import Settings
from worker.grouping import model_chain

pytestmark = pytest.mark.unit

DAY_BEFORE = date(2027, 2, 25)
SHUTDOWN = date(2027, 2, 26)
TODAY = date(2026, 12, 4)


def env_only(**kw: object) -> Settings:
    return Settings(OPENAI_API_KEY="sk-test", **kw)  # type: ignore[arg-type]


def test_default_primary_is_chosen_by_date() -> None:
    catalogue = load_catalogue(env_only())
    assert str(default_primary(catalogue, DAY_BEFORE)) == "openai:gpt-4o-mini-transcribe"
    assert str(default_primary(catalogue, SHUTDOWN)) == "openai:gpt-transcribe"
    assert str(default_primary(catalogue, date(2030, 1, 1))) == "openai:gpt-transcribe"


def test_default_chain_on_both_sides_of_the_shutdown() -> None:
    settings = env_only()
    catalogue = load_catalogue(settings)
    assert default_chain(catalogue, settings, DAY_BEFORE) == [
        "openai:gpt-4o-mini-transcribe",
        "openai:gpt-4o-transcribe",
        "local",
    ]
    assert default_chain(catalogue, settings, SHUTDOWN) == ["openai:gpt-transcribe", "local"]
    # What the worker sends (worker/grouping.py:model_chain), with the date passed in.
    assert model_chain(None, settings, DAY_BEFORE) == [
        "openai:gpt-4o-mini-transcribe",
        "openai:gpt-4o-transcribe",
        "local",
    ]
    assert model_chain(None, settings, SHUTDOWN) == ["openai:gpt-transcribe", "local"]


def test_a_retired_model_is_never_in_a_chain_even_when_named() -> None:
    settings = env_only(primary_model="whisper-1", fallback_models=["gpt-transcribe", "local"])
    assert model_chain(None, settings, DAY_BEFORE) == ["openai:whisper-1", "openai:gpt-transcribe", "local"]
    assert model_chain(None, settings, SHUTDOWN) == ["openai:gpt-transcribe", "local"]
    # a batch's own chain too
    assert model_chain(["gpt-4o-transcribe", "openai:whisper-1"], settings, SHUTDOWN) == ["local"]
    assert model_chain(["openai:whisper-1", "gpt-transcribe"], settings, DAY_BEFORE) == [
        "openai:whisper-1",
        "openai:gpt-transcribe",
    ]


def test_retired_models_are_not_allowed_for_batches() -> None:
    settings = env_only(primary_model="whisper-1", fallback_models=["gpt-transcribe", "local"])
    assert {"whisper-1", "openai:whisper-1"} <= allowed_models(settings, DAY_BEFORE)
    after = allowed_models(settings, SHUTDOWN)
    assert "whisper-1" not in after and "openai:whisper-1" not in after
    assert {"gpt-transcribe", "openai:gpt-transcribe", "local"} <= after


def test_days_left_and_warnings_within_90_days() -> None:
    settings = env_only()
    catalogue = load_catalogue(settings)
    mini = catalogue.providers["openai"].models["gpt-4o-mini-transcribe"]
    assert days_left(mini, TODAY) == 84
    assert days_left(catalogue.providers["openai"].models["gpt-transcribe"], TODAY) is None
    found = {
        r.ref: r.days_left for r in retirements(catalogue, configured_refs(catalogue, settings, TODAY), TODAY)
    }
    assert found == {"openai:gpt-4o-mini-transcribe": 84, "openai:gpt-4o-transcribe": 84}
    lines = retirement_warnings(catalogue, settings, TODAY)
    assert len(lines) == 2 and all("2027-02-26" in line and "84 days left" in line for line in lines)
    assert retirement_warnings(catalogue, settings, date(2026, 11, 1)) == []  # 117 days: not yet
    # the default primary moved on; the default fallback gpt-4o-transcribe is retired: said loudly
    assert retirement_warnings(catalogue, settings, SHUTDOWN) == [
        "model openai:gpt-4o-transcribe retired on 2027-02-26: it is sent no requests"
    ]


def test_a_self_hosted_provider_from_the_file_is_the_runtime_chain(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[providers.gpu]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[providers.gpu.models.whisper-base]\nprice = "zero"\n'
    )
    # no OpenAI key at all: the self-hosted provider needs none
    settings = Settings(providers_file=str(path), primary_model="gpu:whisper-base", OPENAI_API_KEY="")
    catalogue = load_catalogue(settings)
    # the default fallback gpt-4o-transcribe is OpenAI's, whose key is not set: left out
    assert runtime_chain(catalogue, settings, None, TODAY) == ["gpu:whisper-base", "local"]
    assert model_chain(None, settings, TODAY)[0] == "gpu:whisper-base"
    # with OpenAI's key set, its models join the chain
    settings = Settings(
        providers_file=str(path),
        primary_model="gpu:whisper-base",
        fallback_models=["openai:whisper-1", "local"],
        OPENAI_API_KEY="sk-test",
    )
    assert model_chain(None, settings, TODAY) == ["gpu:whisper-base", "openai:whisper-1", "local"]


def test_a_chain_naming_an_unknown_provider_or_model_is_a_config_error() -> None:
    settings = env_only(primary_model="acme:turbo")
    with pytest.raises(ConfigError, match="no provider 'acme'"):
        check_chain(load_catalogue(settings), settings)
    settings = env_only(fallback_models=["openai:whisper-2", "local"])
    with pytest.raises(ConfigError, match="declares no model 'whisper-2'"):
        check_chain(load_catalogue(settings), settings)
    check_chain(load_catalogue(env_only(primary_model="some-new-model")), env_only())  # bare: as before


def test_batches_may_name_every_providers_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[providers.gpu]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[providers.gpu.models.whisper-base]\nprice = "zero"\n'
        '[providers.acme]\nbase_url = "https://acme.example/v1"\napi_key_env = "ACME_KEY"\n'
        '[providers.acme.models.turbo]\nprice = { per_minute = "0.001" }\n'
    )
    settings = Settings(
        providers_file=str(path),
        primary_model="gpu:whisper-base",
        fallback_models=["acme:turbo", "local"],
        OPENAI_API_KEY="",
    )
    allowed = allowed_models(settings, TODAY)
    assert {"gpu:whisper-base", "whisper-base", "local", "acme:turbo", "turbo"} <= allowed
    # acme's key is not set: its model is left out of chains until it is
    monkeypatch.delenv("ACME_KEY", raising=False)
    assert model_chain(["acme:turbo", "gpu:whisper-base"], settings, TODAY) == ["gpu:whisper-base"]
    monkeypatch.setenv("ACME_KEY", "acme-secret")
    assert model_chain(["acme:turbo", "gpu:whisper-base"], settings, TODAY) == [
        "acme:turbo",
        "gpu:whisper-base",
    ]
