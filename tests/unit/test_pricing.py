"""Pricing: tokens, duration, missing usage, local and unknown models, exact Decimal money."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from core.errors import ConfigError
from core.pricing import load_price_table, price_attempt

V = "2026-11"


def _tokens(audio: int | None, text: int | None, out: int) -> dict[str, object]:
    usage: dict[str, object] = {
        "type": "tokens",
        "input_tokens": (audio or 0) + (text or 0),
        "output_tokens": out,
    }
    usage["total_tokens"] = int(usage["input_tokens"]) + out  # type: ignore[call-overload]
    if audio is not None:
        usage["input_token_details"] = {"audio_tokens": audio, "text_tokens": text}
    return usage


def test_token_usage_priced_by_kind() -> None:
    priced = price_attempt("gpt-4o-mini-transcribe", _tokens(600, 10, 50), 60.0, version=V)
    # 600 * $3/M + 10 * $1.25/M + 50 * $5/M
    assert priced.usd == Decimal("0.00206250")
    assert priced.usd.as_tuple().exponent == -8
    assert priced.usage_type == "tokens"
    assert (
        priced.input_tokens,
        priced.input_audio_tokens,
        priced.input_text_tokens,
        priced.output_tokens,
    ) == (
        610,
        600,
        10,
        50,
    )
    assert priced.billed_audio_seconds == 60.0
    assert priced.unit_prices == {
        "audio_input_per_million": "3.00",
        "text_input_per_million": "1.25",
        "output_per_million": "5.00",
    }
    assert priced.price_table_version == V
    assert priced.estimated is False


def test_gpt4o_transcribe_costs_twice_mini() -> None:
    usage = _tokens(1000, 20, 100)
    mini = price_attempt("gpt-4o-mini-transcribe", usage, 100.0, version=V)
    full = price_attempt("gpt-4o-transcribe", usage, 100.0, version=V)
    assert full.usd == mini.usd * 2
    assert full.usd == Decimal("0.00705000")  # (1000*6 + 20*2.5 + 100*10) / 1M


def test_token_usage_without_split_counts_all_input_as_audio_and_is_estimated() -> None:
    priced = price_attempt(
        "gpt-4o-mini-transcribe", _tokens(None, None, 0) | {"input_tokens": 1000}, 10.0, version=V
    )
    assert priced.usd == Decimal("0.00300000")
    assert priced.input_audio_tokens == 1000 and priced.input_text_tokens == 0
    assert priced.estimated is True


def test_duration_usage_priced_per_minute() -> None:
    priced = price_attempt("whisper-1", {"type": "duration", "seconds": 9}, 8.4, version=V)
    assert priced.usd == Decimal("0.00090000")
    assert priced.billed_audio_seconds == 9.0  # what the provider billed, not what we sent
    assert priced.usage_type == "duration"
    assert priced.unit_prices == {"per_minute": "0.006"}
    assert not priced.estimated
    gpt_transcribe = price_attempt("gpt-transcribe", {"type": "duration", "seconds": 60}, 60, version=V)
    assert gpt_transcribe.usd == Decimal("0.00450000")


def test_missing_usage_is_estimated_from_list_price() -> None:
    priced = price_attempt("gpt-4o-mini-transcribe", None, 120.0, version=V)
    assert priced.usd == Decimal("0.00600000")
    assert priced.estimated is True
    assert priced.usage_type == "none"
    assert priced.billed_audio_seconds == 120.0
    assert priced.unit_prices == {"per_minute": "0.003"}


def test_local_models_are_free() -> None:
    for model in ("local", "local:base", "local:tiny.en"):
        priced = price_attempt(model, None, 600.0, version=V)
        assert priced.usd == Decimal("0E-8") and priced.usd == 0
        assert not priced.estimated
        assert priced.billed_audio_seconds == 600.0


def test_unknown_model_uses_default_and_is_estimated() -> None:
    for usage in (None, {"type": "duration", "seconds": 30}, _tokens(300, 0, 10)):
        priced = price_attempt("acme-transcriber-9", usage, 30.0, version=V)
        assert priced.usd == Decimal("0.00300000")  # 30 s at the default $0.006/min
        assert priced.estimated is True
        assert priced.unit_prices["default"] == "true"


def test_dated_snapshot_uses_base_model_prices() -> None:
    snapshot = price_attempt("gpt-4o-mini-transcribe-2025-12-15", _tokens(600, 10, 50), 60.0, version=V)
    assert snapshot.usd == Decimal("0.00206250") and not snapshot.estimated


def test_garbage_usage_never_crashes() -> None:
    for usage in (
        {"type": "tokens", "input_tokens": "many"},
        {"type": "duration", "seconds": "x"},
        {"type": "?"},
        {},
    ):
        priced = price_attempt("gpt-4o-mini-transcribe", usage, 60.0, version=V)
        assert priced.usd >= 0


def test_decimal_sums_are_exact() -> None:
    one = price_attempt("whisper-1", {"type": "duration", "seconds": 1}, 1.0, version=V).usd
    assert one == Decimal("0.00010000")
    assert sum((one for _ in range(1000)), Decimal(0)) == Decimal("0.1")


def test_version_from_settings_and_unknown_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import reset_settings_cache

    monkeypatch.setenv("VOXQ_PRICE_TABLE_VERSION", V)
    reset_settings_cache()
    try:
        assert price_attempt("whisper-1", None, 60.0).price_table_version == V
        with pytest.raises(ConfigError):
            price_attempt("whisper-1", None, 60.0, version="1999-01")
        with pytest.raises(ConfigError):
            load_price_table("../etc/passwd")
    finally:
        reset_settings_cache()


def test_table_dir_overrides_bundled_table(tmp_path: Path) -> None:
    table = {
        "version": "2027-01",
        "currency": "USD",
        "source": "test",
        "default": {"per_minute": "0.01"},
        "models": {"whisper-1": {"per_minute": "0.012"}},
    }
    (tmp_path / "2027-01.json").write_text(json.dumps(table))
    priced = price_attempt(
        "whisper-1", {"type": "duration", "seconds": 60}, 60, version="2027-01", table_dir=str(tmp_path)
    )
    assert priced.usd == Decimal("0.01200000") and priced.price_table_version == "2027-01"
    # Versions the directory lacks still come from the bundled tables.
    bundled = price_attempt(
        "whisper-1", {"type": "duration", "seconds": 60}, 60, version=V, table_dir=str(tmp_path)
    )
    assert bundled.usd == Decimal("0.00600000")


def test_bundled_table_cites_its_sources() -> None:
    from importlib import resources

    raw = json.loads(resources.files("core").joinpath("prices", f"{V}.json").read_text())
    assert raw["version"] == V
    assert raw["source"]["audio_input_tokens"] and raw["source"]["list_prices"]
    for entry in raw["models"].values():
        for value in entry.values():
            assert isinstance(value, str)  # Decimal strings, never floats


@given(
    model=st.sampled_from(
        ["gpt-4o-mini-transcribe", "gpt-4o-transcribe", "whisper-1", "gpt-transcribe", "x"]
    ),
    seconds=st.floats(min_value=0.0, max_value=1400.0, allow_nan=False),
    prompt=st.text(max_size=300),
    out=st.integers(min_value=0, max_value=2000),
    split=st.booleans(),
)
@hypothesis_settings(max_examples=300, deadline=None)
def test_no_cost_passes_the_reservation_bound(
    model: str, seconds: float, prompt: str, out: int, split: bool
) -> None:
    """Whatever a call bills within the model's limits (10 audio tokens a second, a text token per prompt
    byte at most, up to 2,000 output tokens; or its seconds rounded up) stays within `max_cost_usd`."""
    from core.pricing import max_cost_usd

    bound = max_cost_usd(model, seconds, prompt, version=V, table_dir="")
    audio = math.ceil(seconds * 10)
    text = len(prompt.encode("utf-8"))
    usages: list[dict[str, object] | None] = [
        None,
        {"type": "duration", "seconds": math.ceil(seconds)},
        _tokens(audio, text, out) if split else _tokens(None, None, out) | {"input_tokens": audio + text},
    ]
    for usage in usages:
        assert price_attempt(model, usage, seconds, version=V, table_dir="").usd <= bound
