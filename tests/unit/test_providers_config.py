"""Providers as configuration: the built-in catalogue, the operator's file, and one error per bad field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.pricing import load_price_table, price_attempt
from core.providers.config import ModelRef, PriceSpec, build_catalogue, builtin_raw, load_catalogue
from core.settings import Settings, reset_settings_cache

pytestmark = pytest.mark.unit

GOOD = """
[providers.acme]
base_url = "https://acme.example/v1"
api_key_env = "ACME_API_KEY"
headers = { "X-Team" = "speech" }
limits = { rpm = 600, audio_seconds_per_hour = 360000, max_in_flight = 16, max_upload_bytes = 26214400 }

[providers.acme.models.whisper-large-v3-turbo]
price = { per_hour = "0.04", min_billed_seconds = 10 }
retires = 2027-06-30
capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"], max_duration_seconds = 72 }

[providers.gpu]
base_url = "http://10.0.0.5:8000/v1"

[providers.gpu.models.whisper-base]
price = "zero"
capabilities = { timestamps = "segment", response_formats = ["json", "verbose_json"] }
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return str(path)


def settings_for(path: str | None, **env: str) -> Settings:
    return Settings(providers_file=path, OPENAI_API_KEY="sk-test", **env)  # type: ignore[arg-type]


def test_builtin_catalogue_has_the_2027_02_26_dates_and_gpt_transcribe() -> None:
    catalogue = load_catalogue(settings_for(None))
    openai = catalogue.providers["openai"]
    for name in ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize"):
        assert openai.models[name].retires is not None
        assert openai.models[name].retires.isoformat() == "2027-02-26"
    gpt = openai.models["gpt-transcribe"]
    assert gpt.retires is None
    assert gpt.capabilities.timestamps == "none" and gpt.capabilities.response_formats == ("json",)
    assert gpt.price == "table"


def test_catalogue_and_price_table_agree() -> None:
    """The catalogue holds no prices of its own: every built-in model is priced by the table."""
    table = load_price_table("2026-11")
    for name, model in builtin_raw()["providers"]["openai"]["models"].items():
        assert model["price"] == "table"
        prices = table.prices_for(name)
        assert prices is not None and prices.per_minute is not None, name
    assert table.prices_for("gpt-transcribe").per_minute == Decimal("0.0045")  # type: ignore[union-attr]
    priced = price_attempt("gpt-transcribe", {"type": "duration", "seconds": 60}, 60.0, version="2026-11")
    assert priced.usd == Decimal("0.0045") and not priced.estimated


def test_env_only_setup_defines_openai_from_openai_base_url() -> None:
    catalogue = load_catalogue(settings_for(None, OPENAI_BASE_URL="http://127.0.0.1:9/v1/"))
    assert catalogue.providers["openai"].base_url == "http://127.0.0.1:9/v1"
    assert catalogue.providers["openai"].api_key_env == "OPENAI_API_KEY"
    assert catalogue.declared == frozenset()


def test_operator_file_extends_and_overrides_the_catalogue(tmp_path: Path) -> None:
    text = GOOD + '\n[providers.openai]\nbase_url = "https://proxy.example/v1"\n'
    text += "[providers.openai.models.whisper-1]\nretires = 2027-01-31\n"
    catalogue = load_catalogue(settings_for(write(tmp_path, text)))
    assert set(catalogue.providers) == {"openai", "acme", "gpu"}
    assert catalogue.providers["openai"].base_url == "https://proxy.example/v1"
    whisper = catalogue.providers["openai"].models["whisper-1"]
    assert whisper.retires is not None and whisper.retires.isoformat() == "2027-01-31"
    assert whisper.capabilities.timestamps == "word"  # the rest of the built-in entry stays
    assert "gpt-transcribe" in catalogue.providers["openai"].models
    turbo = catalogue.providers["acme"].models["whisper-large-v3-turbo"]
    assert isinstance(turbo.price, PriceSpec) and turbo.price.min_billed_seconds == 10
    assert catalogue.providers["acme"].limits.rpm == 600
    assert catalogue.providers["gpu"].api_key_env is None
    assert catalogue.resolve("whisper-base") == ModelRef("gpu", "whisper-base")
    assert catalogue.resolve("gpu:whisper-base") == ModelRef("gpu", "whisper-base")
    assert catalogue.resolve("local") is None
    assert "acme:whisper-large-v3-turbo" in catalogue.declared


def test_prices_from_the_file_min_billed_seconds_and_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", write(tmp_path, GOOD))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "acme:whisper-large-v3-turbo")
    monkeypatch.setenv("ACME_API_KEY", "acme-secret")
    reset_settings_cache()
    try:
        # 3 s of audio billed as the 10 s minimum at $0.04/h
        short = price_attempt("whisper-large-v3-turbo", None, 3.0)
        assert short.billed_audio_seconds == 10.0
        assert short.usd == (Decimal("0.04") / 60 * 10 / 60).quantize(Decimal("0.00000001"))
        assert short.unit_prices["min_billed_seconds"] == "10.0"
        assert short.estimated  # no usage in the answer: our own duration
        billed = price_attempt("whisper-large-v3-turbo", {"type": "duration", "seconds": 4}, 4.0)
        assert billed.billed_audio_seconds == 10.0 and not billed.estimated
        long = price_attempt("whisper-large-v3-turbo", {"type": "duration", "seconds": 3600}, 3600.0)
        assert long.usd == Decimal("0.04")
        monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "gpu:whisper-base")
        reset_settings_cache()
        free = price_attempt("whisper-base", None, 42.0)
        assert free.usd == Decimal(0) and not free.estimated and free.billed_audio_seconds == 42.0
    finally:
        reset_settings_cache()


def test_a_key_in_the_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('api_key_env = "ACME_API_KEY"', 'api_key = "sk-live-123"'))
    with pytest.raises(ConfigError) as err:
        load_catalogue(settings_for(path))
    message = str(err.value)
    assert path in message and "'acme'" in message and "api_key_env" in message
    assert "sk-live-123" not in message


MODEL = "[providers.acme.models.whisper-large-v3-turbo]"

# (id, replace this, with that, the field the error must name)
MALFORMED = [
    ("base_url", 'base_url = "https://acme.example/v1"', 'base_url = "acme.example"', "base_url"),
    ("base_url_missing", 'base_url = "https://acme.example/v1"', "", "base_url"),
    ("api_key_env", 'api_key_env = "ACME_API_KEY"', 'api_key_env = "sk-live-123"', "api_key_env"),
    ("headers_secret", '"X-Team" = "speech"', 'Authorization = "Bearer x"', "headers"),
    ("headers_value", '"X-Team" = "speech"', '"X-Team" = 5', "headers.X-Team"),
    ("limits_rpm", "rpm = 600", "rpm = -1", "limits.rpm"),
    ("limits_rpm_type", "rpm = 600", 'rpm = "600"', "limits.rpm"),
    (
        "limits_audio",
        "audio_seconds_per_hour = 360000",
        "audio_seconds_per_hour = -5",
        "limits.audio_seconds",
    ),
    ("limits_in_flight", "max_in_flight = 16", "max_in_flight = 1.5", "limits.max_in_flight"),
    ("limits_upload", "max_upload_bytes = 26214400", "max_upload_bytes = 0", "limits.max_upload_bytes"),
    ("limits_unknown", "rpm = 600", "rpn = 600", "limits.rpn"),
    (
        "provider_unknown",
        'api_key_env = "ACME_API_KEY"',
        'api_key_env = "ACME_API_KEY"\nregion = "eu"',
        "region",
    ),
    ("price_missing", 'price = { per_hour = "0.04", min_billed_seconds = 10 }', "", "price"),
    ("price_negative", 'per_hour = "0.04"', 'per_hour = "-0.04"', "price"),
    ("price_both", 'per_hour = "0.04"', 'per_hour = "0.04", per_minute = "0.001"', "price"),
    ("price_tokens_half", 'per_hour = "0.04"', 'audio_input_per_million = "3"', "price"),
    ("price_empty", 'per_hour = "0.04", min_billed_seconds = 10', "", "price"),
    ("price_word", 'price = { per_hour = "0.04", min_billed_seconds = 10 }', 'price = "free"', "price"),
    (
        "price_not_in_table",
        'price = { per_hour = "0.04", min_billed_seconds = 10 }',
        'price = "table"',
        "price",
    ),
    ("min_billed_seconds", "min_billed_seconds = 10", "min_billed_seconds = -10", "min_billed_seconds"),
    ("timestamps", 'timestamps = "word"', 'timestamps = "char"', "capabilities.timestamps"),
    (
        "timestamps_format",
        'response_formats = ["json", "verbose_json"], max',
        'response_formats = ["json"], max',
        "capabilities",
    ),
    (
        "response_formats",
        '["json", "verbose_json"], max',
        '["json", "verbose_json", "mp3"], max',
        "response_formats",
    ),
    (
        "diarization",
        'timestamps = "word",',
        'timestamps = "word", diarization = "yes",',
        "capabilities.diarization",
    ),
    ("prompt", 'timestamps = "word",', 'timestamps = "word", prompt = 1,', "capabilities.prompt"),
    ("max_duration", "max_duration_seconds = 72", "max_duration_seconds = 0", "max_duration_seconds"),
    ("retires", "retires = 2027-06-30", 'retires = "soon"', "retires"),
    ("model_unknown", "retires = 2027-06-30", "retires = 2027-06-30\nretired = true", "retired"),
    ("model_name", MODEL, '[providers.acme.models."acme:turbo"]', "models"),
    ("provider_name", "[providers.acme]", '[providers."Ac me"]', "name"),
]


@pytest.mark.parametrize(("old", "new", "field"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_each_malformed_field_is_an_error_naming_file_provider_and_field(
    tmp_path: Path, old: str, new: str, field: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load_catalogue(settings_for(path))
    message = str(err.value)
    assert path in message, message
    assert "provider 'acme'" in message or "provider 'Ac me'" in message, message
    assert field in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[providers.acme\nbase_url = 1", "not valid TOML"),
        ('routing = "cheapest"\n', "unknown top-level field 'routing'"),
        ('providers = "openai"\n', "[providers.<name>] tables expected"),
        ('default_primary = ["nowhere:model"]\n', "field default_primary"),
    ],
    ids=["not_toml", "top_level_unknown", "providers_not_tables", "default_primary"],
)
def test_malformed_documents(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_catalogue(settings_for(path))
    assert path in str(err.value) and expected in str(err.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_catalogue(settings_for(path))


def test_the_built_in_catalogue_alone_is_valid() -> None:
    catalogue = build_catalogue(None, origin="test")
    assert catalogue.default_primary == ("openai:gpt-4o-mini-transcribe", "openai:gpt-transcribe")


def test_the_readme_providers_example_is_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.support import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    catalogue = load_catalogue(settings_for(write(tmp_path, example)))
    assert {"openai", "turbo-host", "gpu"} <= set(catalogue.providers)
    turbo = catalogue.providers["turbo-host"].models["whisper-large-v3-turbo"]
    assert isinstance(turbo.price, PriceSpec) and turbo.price.minute_price is not None
    assert turbo.price.minute_price * 60 == Decimal("0.04") and turbo.price.min_billed_seconds == 10
    assert catalogue.providers["gpu"].models["whisper-base"].price == "zero"


def test_a_bare_name_prefers_the_given_provider(tmp_path: Path) -> None:
    text = GOOD.replace("whisper-large-v3-turbo]", "whisper-1]")
    catalogue = load_catalogue(settings_for(write(tmp_path, text)))
    assert catalogue.resolve("whisper-1") == ModelRef("openai", "whisper-1")
    assert catalogue.resolve("whisper-1", "acme") == ModelRef("acme", "whisper-1")
    assert catalogue.resolve("whisper-base", "acme") == ModelRef("gpu", "whisper-base")
    assert catalogue.resolve("brand-new", "acme") == ModelRef("acme", "brand-new")


def test_token_prices_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = GOOD.replace(
        'price = { per_hour = "0.04", min_billed_seconds = 10 }',
        'price = { audio_input_per_million = "2", text_input_per_million = "1", output_per_million = "4" }',
    )
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", write(tmp_path, text))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "acme:whisper-large-v3-turbo")
    reset_settings_cache()
    usage = {
        "type": "tokens",
        "input_tokens": 110,
        "output_tokens": 50,
        "input_token_details": {"audio_tokens": 100, "text_tokens": 10},
    }
    priced = price_attempt("whisper-large-v3-turbo", usage, 10.0)
    assert priced.usd == Decimal("0.00041")  # (100*2 + 10*1 + 50*4) / 1e6
    assert priced.usage_type == "tokens" and not priced.estimated
    assert priced.unit_prices["source"] == "providers"


def test_the_budget_bound_uses_the_files_price_and_minimum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model priced by the providers file (dearer than the table's default, with a minimum per request)
    is reserved at its own price: the bound is never below what a call of it can bill."""
    from core.pricing import max_cost_usd

    dear = GOOD.replace(
        'per_hour = "0.04", min_billed_seconds = 10', 'per_minute = "1.50", min_billed_seconds = 30'
    )
    monkeypatch.setenv("VOXQ_PROVIDERS_FILE", write(tmp_path, dear))
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "acme:whisper-large-v3-turbo")
    monkeypatch.setenv("ACME_API_KEY", "acme-secret")
    reset_settings_cache()
    try:
        for seconds in (1.0, 3.0, 29.5, 61.2):
            for usage in (None, {"type": "duration", "seconds": seconds}):
                billed = price_attempt("whisper-large-v3-turbo", usage, seconds).usd
                assert billed <= max_cost_usd("whisper-large-v3-turbo", seconds), (seconds, usage)
        monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "gpu:whisper-base")
        reset_settings_cache()
        assert max_cost_usd("whisper-base", 42.0) == 0  # a zero-priced server reserves nothing
    finally:
        reset_settings_cache()


def test_a_chain_entry_names_its_provider_or_the_local_engine() -> None:
    from core.providers.config import ModelRef

    assert ModelRef.of_entry("acme:whisper-large-v3-turbo") == ModelRef("acme", "whisper-large-v3-turbo")
    assert ModelRef.of_entry("whisper-1") == ModelRef("openai", "whisper-1")
    assert ModelRef.of_entry("whisper-1", "acme") == ModelRef("acme", "whisper-1")
    assert ModelRef.of_entry("local") is None
    assert ModelRef.of_entry("local:base.en") is None
