"""A chain that spans providers (issue #17): canonical `provider:model` entries, pricing by provider,
batches naming any configured provider's model, and requests shaped by the model's capabilities."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from core.model_access import allowed_models, metric_model_label, unconfigured_models
from core.pricing import max_cost_usd, price_attempt
from core.providers.config import load_catalogue
from core.providers.retirement import runtime_chain
from core.settings import Settings, reset_settings_cache
from worker.grouping import model_chain

pytestmark = pytest.mark.unit

TODAY = date(2026, 12, 4)
SHUTDOWN = date(2027, 2, 26)

TWO = """
[providers.a]
base_url = "http://127.0.0.1:9/a/v1"
api_key_env = "VOXQ_TEST_A_KEY"

[providers.a.models.model-x]
price = { per_minute = "0.006" }
capabilities = { timestamps = "none", response_formats = ["json"], max_duration_seconds = 30 }

[providers.a.models.shared]
price = { per_minute = "0.010" }

[providers.b]
base_url = "http://127.0.0.1:9/b/v1"
api_key_env = "VOXQ_TEST_B_KEY"

[providers.b.models.model-y]
price = { per_hour = "0.04", min_billed_seconds = 10 }
capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"] }

[providers.b.models.shared]
price = { per_minute = "0.001", min_billed_seconds = 10 }

[providers.b.models.old]
price = "zero"
retires = 2027-01-01

[providers.gpu]
base_url = "http://127.0.0.1:9/gpu/v1"

[providers.gpu.models.whisper-base]
price = "zero"
"""


def two(tmp_path: Path, **kw: object) -> Settings:
    path = tmp_path / "providers.toml"
    path.write_text(TWO)
    return Settings(providers_file=str(path), OPENAI_API_KEY="sk-test", **kw)  # type: ignore[arg-type]


def test_entries_are_canonical_and_span_every_usable_provider(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXQ_TEST_A_KEY", "key-a")
    monkeypatch.setenv("VOXQ_TEST_B_KEY", "key-b")
    settings = two(
        tmp_path, primary_model="a:model-x", fallback_models=["b:model-y", "gpu:whisper-base", "local"]
    )
    catalogue = load_catalogue(settings)
    assert runtime_chain(catalogue, settings, None, TODAY) == [
        "a:model-x",
        "b:model-y",
        "gpu:whisper-base",
        "local",
    ]
    # bare names resolve as before: openai's, else the first provider declaring them
    assert model_chain(
        ["gpt-transcribe", "model-y", "whisper-base", "openai:whisper-1"], settings, TODAY
    ) == [
        "openai:gpt-transcribe",
        "b:model-y",
        "gpu:whisper-base",
        "openai:whisper-1",
    ]
    # retired models are left out, duplicates (bare and canonical) too
    assert model_chain(["b:old", "model-x", "a:model-x"], settings, SHUTDOWN) == ["a:model-x"]


def test_an_unusable_provider_is_dropped_and_local_only_when_nothing_hosted_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VOXQ_TEST_A_KEY", raising=False)
    monkeypatch.setenv("VOXQ_TEST_B_KEY", "key-b")
    settings = two(tmp_path, primary_model="a:model-x", fallback_models=["b:model-y", "local"])
    assert model_chain(None, settings, TODAY) == ["b:model-y", "local"]
    assert model_chain(["a:model-x"], settings, TODAY) == ["local"]
    assert model_chain(["a:model-x", "gpu:whisper-base"], settings, TODAY) == ["gpu:whisper-base"]
    assert model_chain(["nope:model"], settings, TODAY) == ["local"]  # a provider no longer configured
    monkeypatch.delenv("VOXQ_TEST_B_KEY")
    assert model_chain(None, settings, TODAY) == ["local"]


def test_env_only_chains_are_openai_entries() -> None:
    settings = Settings(OPENAI_API_KEY="sk-test")  # type: ignore[call-arg]
    assert model_chain(None, settings, TODAY) == [
        "openai:gpt-4o-mini-transcribe",
        "openai:gpt-4o-transcribe",
        "local",
    ]
    assert model_chain(None, Settings(OPENAI_API_KEY=""), TODAY) == ["local"]  # type: ignore[call-arg]


def test_batches_may_name_any_configured_providers_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXQ_TEST_A_KEY", "key-a")
    settings = two(tmp_path, primary_model="a:model-x", fallback_models=["local"])
    allowed = allowed_models(settings, TODAY)
    assert {"a:model-x", "b:model-y", "b:shared", "a:shared", "gpu:whisper-base", "b:old", "local"} <= allowed
    assert {"model-x", "model-y", "whisper-base"} <= allowed  # bare names as before
    assert "b:old" not in allowed_models(settings, SHUTDOWN)  # retired
    assert "b:nope" not in allowed and "acme:model-x" not in allowed
    assert unconfigured_models(["b:model-y", "c:model-y", "a:model-y"], settings) == [
        "c:model-y",
        "a:model-y",
    ]


def test_metric_labels_stay_bounded_with_providers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(TWO)
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "a:model-x")
    reset_settings_cache()
    try:
        assert metric_model_label("b:model-y") == "b:model-y"
        assert metric_model_label("b:made-up") == "other"
        assert metric_model_label("zzz:model-y") == "other"
    finally:
        reset_settings_cache()


def test_the_same_model_name_is_priced_at_each_providers_price(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(TWO)
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "a:shared")
    reset_settings_cache()
    try:
        usage = {"type": "duration", "seconds": 60}
        at_a = price_attempt("shared", usage, 60.0, provider="a")
        at_b = price_attempt("shared", usage, 60.0, provider="b")
        assert at_a.usd == Decimal("0.01") and at_b.usd == Decimal("0.001")
        # b's 10 s minimum applies to b only
        assert price_attempt("shared", None, 3.0, provider="b").billed_audio_seconds == 10.0
        assert price_attempt("shared", None, 3.0, provider="a").billed_audio_seconds == 3.0
        # a canonical entry names its provider itself
        assert price_attempt("b:shared", usage, 60.0).usd == Decimal("0.001")
        # the budget bound follows the same provider's price
        assert max_cost_usd("shared", 3.0, provider="b") == (Decimal(10) * Decimal("0.001") / 60).quantize(
            Decimal("0.00000001"), rounding="ROUND_CEILING"
        )
        assert max_cost_usd("shared", 3.0, provider="a") > max_cost_usd("shared", 3.0, provider="b")
        # without a provider: today's resolution (the first provider declaring the name)
        assert price_attempt("shared", usage, 60.0).usd == Decimal("0.01")
        # a model its provider does not declare: the price table, as before
        assert price_attempt("whisper-1", usage, 60.0, provider="openai").usd == Decimal("0.006")
    finally:
        reset_settings_cache()


def test_the_response_format_follows_the_models_capabilities(tmp_path: Path) -> None:
    from worker.entries import response_format, target

    settings = two(tmp_path)
    mini = target("openai:gpt-4o-mini-transcribe", settings)
    whisper = target("openai:whisper-1", settings)
    y = target("b:model-y", settings)
    assert response_format(mini.config, True) == "json"  # json only: no timestamps asked of it
    assert response_format(whisper.config, True) == "verbose_json"
    assert response_format(whisper.config, False) == "json"
    assert response_format(y.config, True) == "verbose_json"
    assert response_format(target("gpt-transcribe", settings).config, True) == "json"
    # a model the configuration does not describe: the provider's own default
    unknown = target("openai:some-new-model", settings)
    assert unknown.config is None and response_format(unknown.config, True) is None


def test_a_target_knows_its_provider_and_the_most_a_request_may_carry(tmp_path: Path) -> None:
    from worker.entries import target

    settings = two(tmp_path)
    x = target("a:model-x", settings)
    assert (x.provider, x.model, x.max_seconds, x.max_bytes) == ("a", "model-x", 30, None)
    assert x.too_big(31.0, 10) and not x.too_big(30.0, 10)
    mini = target("gpt-4o-mini-transcribe", settings)  # a bare name from a chain stored before providers
    assert (mini.provider, mini.model, mini.max_seconds, mini.max_bytes) == (
        "openai",
        "gpt-4o-mini-transcribe",
        1500,
        26214400,
    )
    assert mini.too_big(10.0, 26214401) and not mini.too_big(1500.0, 1000)


def test_attempt_metrics_label_the_bare_model_of_a_configured_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempts record the bare model: a self-hosted whisper-1 (`gpu:whisper-1`) keeps its label, though a
    batch may not name bare `whisper-1` (that is OpenAI's, not configured here)."""
    path = tmp_path / "providers.toml"
    path.write_text(
        '[providers.gpu]\nbase_url = "http://127.0.0.1:9/v1"\n'
        '[providers.gpu.models.whisper-1]\nprice = "zero"\n'
    )
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", str(path))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "gpu:whisper-1")
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", "local")
    reset_settings_cache()
    try:
        from core.settings import get_settings

        assert unconfigured_models(["whisper-1", "gpu:whisper-1"], get_settings()) == ["whisper-1"]
        assert metric_model_label("whisper-1") == "whisper-1"
        assert metric_model_label("gpu:whisper-1") == "gpu:whisper-1"
        assert metric_model_label("whisper-2") == "other"
    finally:
        reset_settings_cache()


def test_transcript_models_compare_as_chain_entries(tmp_path: Path) -> None:
    from worker.grouping import chain_entries

    settings = two(tmp_path)
    assert chain_entries(
        ["gpt-4o-mini-transcribe", "none", "local:base", "b:model-y", "model-y"], settings
    ) == [
        "openai:gpt-4o-mini-transcribe",
        "none",
        "local:base",
        "b:model-y",
        "b:model-y",
    ]
