"""What a provider call cost: the provider's `usage` priced with a versioned price table kept as data.

Price tables are JSON files, one per version, bundled in `core/prices/` (package data) and optionally
overridden by files in `VOXQ_PRICE_TABLE_DIR`. Every cost record stores the table version and the unit
prices it used, so a cost can always be re-derived. Money is Decimal, quantized to 8 places (the
`cost_records.usd` column is NUMERIC(18, 8)).

How a call is priced:
- usage `{"type": "tokens"}`: audio-in, text-in and output tokens at the model's per-million prices.
- usage `{"type": "duration"}`: billed seconds at the model's per-minute price.
- no usage: the request's audio seconds at the per-minute list price, `estimated=True`.
- `local` / `local:*` models: free (the local engine's CPU time is recorded elsewhere).
- unknown model (or a price the table lacks): the table's default per-minute price, `estimated=True`.

`max_cost_usd` is the other direction: the most one call can cost before it is made (a budget
reservation, worker.budget): every billed second rounded up plus a margin at the per-minute price, and for
a model priced by tokens also its audio tokens (the table's `bounds.audio_tokens_per_second`), the prompt
(at most one token per UTF-8 byte) and the model's `max_output_tokens`, all at the dearest input price.
A model the providers file prices is bounded at its own price (at least its `min_billed_seconds`; zero for
a `price = "zero"` server), exactly as `price_attempt` will charge it.

A model the providers configuration (core/providers/config.py) gives its own price is priced with it by
the same rules: `price = "zero"` (a self-hosted server) costs nothing, not estimated; a `PriceSpec` prices
per minute (or per hour) or per token, and its `min_billed_seconds` raises the billed seconds of each
request to that minimum. `price = "table"` (the built-in catalogue's OpenAI models) is this table.
Prices belong to a provider's model: `provider=` (or a `provider:model` entry) looks the model up in that
provider, so one model name hosted by two providers is charged each host's price; without one, a bare
name is the provider `Catalogue.resolve` gives it (OpenAI's, else the first provider declaring it).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.names import LOCAL_MODEL, LOCAL_MODEL_PREFIX

QUANTUM = Decimal("0.00000001")
MILLION = Decimal(1_000_000)
SIXTY = Decimal(60)
ZERO = Decimal(0)
# A bound's slack: the provider measures the audio itself (a decoder may count a frame more than ours)
# and rounds billed seconds up; its request text may carry a few tokens besides the prompt.
BOUND_MARGIN_SECONDS = 1
BOUND_PROMPT_TOKENS = 16
DEFAULT_AUDIO_TOKENS_PER_SECOND = 10
# Output tokens per second of audio when a token-priced model's table entry has no `max_output_tokens`.
FALLBACK_OUTPUT_TOKENS_PER_SECOND = 30


@dataclass(frozen=True)
class ModelPrices:
    """One model's list prices (None where the table has no such price)."""

    per_minute: Decimal | None = None
    audio_input_per_million: Decimal | None = None
    text_input_per_million: Decimal | None = None
    output_per_million: Decimal | None = None
    max_output_tokens: int | None = None  # the model's cap on one answer (bounds only)

    @property
    def has_token_prices(self) -> bool:
        """True when the table prices this model by tokens."""
        return self.audio_input_per_million is not None and self.output_per_million is not None


@dataclass(frozen=True)
class PriceTable:
    """One version of the price list."""

    version: str
    default_per_minute: Decimal
    models: dict[str, ModelPrices]
    audio_tokens_per_second: int = DEFAULT_AUDIO_TOKENS_PER_SECOND

    def prices_for(self, model: str) -> ModelPrices | None:
        """The model's prices; a dated snapshot (`gpt-4o-transcribe-2025-03-20`) uses its base model's."""
        if model in self.models:
            return self.models[model]
        candidates = [name for name in self.models if model.startswith(name + "-")]
        return self.models[max(candidates, key=len)] if candidates else None


@dataclass
class PricedUsage:
    """The priced cost of one attempt, shaped like a `cost_records` row."""

    usd: Decimal
    billed_audio_seconds: float
    usage_type: str  # tokens | duration | none
    input_tokens: int | None = None
    input_audio_tokens: int | None = None
    input_text_tokens: int | None = None
    output_tokens: int | None = None
    unit_prices: dict[str, str] = field(default_factory=dict)  # Decimal strings, JSON-safe
    price_table_version: str = ""
    estimated: bool = False


def _decimal(value: object) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def _parse_table(raw: dict[str, Any], origin: str) -> PriceTable:
    try:
        models = {
            name: ModelPrices(
                per_minute=_decimal(entry.get("per_minute")),
                audio_input_per_million=_decimal(entry.get("audio_input_per_million")),
                text_input_per_million=_decimal(entry.get("text_input_per_million")),
                output_per_million=_decimal(entry.get("output_per_million")),
                max_output_tokens=_int(entry.get("max_output_tokens")),
            )
            for name, entry in raw["models"].items()
        }
        return PriceTable(
            version=str(raw["version"]),
            default_per_minute=Decimal(str(raw["default"]["per_minute"])),
            models=models,
            audio_tokens_per_second=int(
                (raw.get("bounds") or {}).get("audio_tokens_per_second", DEFAULT_AUDIO_TOKENS_PER_SECOND)
            ),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        raise ConfigError(f"price table {origin} is malformed: {exc!r}") from exc


@lru_cache(maxsize=16)
def load_price_table(version: str, directory: str | None = None) -> PriceTable:
    """The price table of this version: from `directory` when it has it, else the bundled one."""
    if "/" in version or "\\" in version or version.startswith("."):
        raise ConfigError(f"bad price table version {version!r}")
    if directory:
        path = Path(directory) / f"{version}.json"
        if path.is_file():
            return _parse_table(json.loads(path.read_text()), str(path))
    bundled = resources.files("core").joinpath("prices", f"{version}.json")
    if not bundled.is_file():
        raise ConfigError(f"no price table for version {version!r}")
    return _parse_table(json.loads(bundled.read_text()), f"core/prices/{version}.json")


def is_local_model(model: str) -> bool:
    """True for the offline engine (`local` or `local:<name>`), which costs nothing per call."""
    return model == LOCAL_MODEL or model.startswith(LOCAL_MODEL_PREFIX)


def _int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _q(value: Decimal) -> Decimal:
    return value.quantize(QUANTUM)


def _per_minute_estimate(
    table: PriceTable, prices: ModelPrices | None, seconds: float, usage_type: str
) -> PricedUsage:
    per_minute = prices.per_minute if prices is not None and prices.per_minute is not None else None
    unit = per_minute if per_minute is not None else table.default_per_minute
    return PricedUsage(
        usd=_q(Decimal(str(seconds)) * unit / SIXTY),
        billed_audio_seconds=float(seconds),
        usage_type=usage_type,
        unit_prices={"per_minute": str(unit), **({} if per_minute is not None else {"default": "true"})},
        price_table_version=table.version,
        estimated=True,
    )


def _table(version: str | None, table_dir: str | None) -> PriceTable:
    """The price table named by `version` in `table_dir`, each defaulting to the settings'."""
    if version is None or table_dir is None:
        from core.settings import get_settings

        settings = get_settings()
        version = version or settings.price_table_version
        table_dir = table_dir if table_dir is not None else settings.price_table_dir
    return load_price_table(version, table_dir or None)


def price_attempt(
    model: str,
    usage: dict[str, Any] | None,
    audio_seconds: float,
    *,
    version: str | None = None,
    table_dir: str | None = None,
    provider: str | None = None,
) -> PricedUsage:
    """Price one billed attempt from the provider's `usage` (module docstring); never raises on data.
    `provider`: the provider that answered (its own price for `model`); None: `model` may be a
    `provider:model` entry, a bare name resolves as `Catalogue.resolve` says."""
    table = _table(version, table_dir)
    model, provider = _split_entry(model, provider)
    seconds = max(float(audio_seconds or 0.0), 0.0)

    if is_local_model(model):
        return PricedUsage(
            usd=_q(ZERO), billed_audio_seconds=seconds, usage_type="none", price_table_version=table.version
        )

    usage_type = str(usage.get("type")) if isinstance(usage, dict) else "none"
    configured = _configured_price(model, provider)
    if configured == "zero":
        return PricedUsage(
            usd=_q(ZERO),
            billed_audio_seconds=seconds,
            usage_type=usage_type if usage_type in ("tokens", "duration") else "none",
            unit_prices={"per_minute": "0", "source": "providers"},
            price_table_version=table.version,
        )
    if configured is not None and configured != "table":
        return _price_configured(table, configured, usage, seconds)
    prices = table.prices_for(model)
    if usage_type == "tokens" and isinstance(usage, dict):
        return _price_tokens(table, prices, usage, seconds)
    if usage_type == "duration" and isinstance(usage, dict):
        return _price_duration(table, prices, usage, seconds)
    return _per_minute_estimate(table, prices, seconds, "none")


def max_cost_usd(
    model: str,
    audio_seconds: float,
    prompt: str | None = None,
    *,
    version: str | None = None,
    table_dir: str | None = None,
    provider: str | None = None,
) -> Decimal:
    """The most one call of `model` (at `provider`, as `price_attempt` says) on `audio_seconds` of audio
    (with `prompt`) can cost (module doc)."""
    table = _table(version, table_dir)
    model, provider = _split_entry(model, provider)
    if is_local_model(model):
        return _q(ZERO)
    seconds = math.ceil(max(float(audio_seconds or 0.0), 0.0)) + BOUND_MARGIN_SECONDS
    configured = _configured_price(model, provider)  # the providers file's price, as price_attempt
    if configured == "zero":
        return _q(ZERO)
    if configured is not None and configured != "table":
        prices: ModelPrices | None = _spec_prices(configured)
        seconds = max(seconds, math.ceil(float(configured.min_billed_seconds)))
    else:
        prices = table.prices_for(model)
    per_minute = prices.per_minute if prices is not None and prices.per_minute is not None else None
    per_minute = per_minute if per_minute is not None else table.default_per_minute
    bound = Decimal(seconds) * per_minute / SIXTY
    if prices is not None and prices.has_token_prices:
        assert prices.audio_input_per_million is not None and prices.output_per_million is not None
        input_price = max(prices.audio_input_per_million, prices.text_input_per_million or ZERO)
        input_tokens = seconds * table.audio_tokens_per_second + BOUND_PROMPT_TOKENS
        input_tokens += len((prompt or "").encode("utf-8"))
        output_tokens = prices.max_output_tokens or seconds * FALLBACK_OUTPUT_TOKENS_PER_SECOND
        by_tokens = (
            Decimal(input_tokens) * input_price + Decimal(output_tokens) * prices.output_per_million
        ) / MILLION
        bound = max(bound, by_tokens)
    return bound.quantize(QUANTUM, rounding="ROUND_CEILING")


def _price_tokens(
    table: PriceTable, prices: ModelPrices | None, usage: dict[str, Any], seconds: float
) -> PricedUsage:
    """A `{"type": "tokens"}` usage at the model's per-million prices (per minute when it has none)."""
    input_tokens = _int(usage.get("input_tokens")) or 0
    output_tokens = _int(usage.get("output_tokens")) or 0
    details = usage.get("input_token_details")
    audio_tokens = _int(details.get("audio_tokens")) if isinstance(details, dict) else None
    text_tokens = _int(details.get("text_tokens")) if isinstance(details, dict) else None
    if prices is None or not prices.has_token_prices:
        priced = _per_minute_estimate(table, prices, seconds, "tokens")
    else:
        assert prices.audio_input_per_million is not None and prices.output_per_million is not None
        # Without the split, count every input token as audio (the dearer kind): never understate.
        split_known = audio_tokens is not None
        if audio_tokens is None:
            audio_tokens, text_tokens = input_tokens, 0
        text_tokens = text_tokens if text_tokens is not None else max(input_tokens - audio_tokens, 0)
        text_price = prices.text_input_per_million or prices.audio_input_per_million
        usd = (
            Decimal(audio_tokens) * prices.audio_input_per_million
            + Decimal(text_tokens) * text_price
            + Decimal(output_tokens) * prices.output_per_million
        ) / MILLION
        priced = PricedUsage(
            usd=_q(usd),
            billed_audio_seconds=seconds,
            usage_type="tokens",
            unit_prices={
                "audio_input_per_million": str(prices.audio_input_per_million),
                "text_input_per_million": str(text_price),
                "output_per_million": str(prices.output_per_million),
            },
            price_table_version=table.version,
            estimated=not split_known,
        )
    priced.input_tokens = input_tokens
    priced.input_audio_tokens = audio_tokens
    priced.input_text_tokens = text_tokens
    priced.output_tokens = output_tokens
    return priced


def _price_duration(
    table: PriceTable, prices: ModelPrices | None, usage: dict[str, Any], seconds: float
) -> PricedUsage:
    """A `{"type": "duration"}` usage: its billed seconds at the model's per-minute price."""
    try:
        billed = max(float(usage.get("seconds") or 0.0), 0.0)
    except (TypeError, ValueError):
        return _per_minute_estimate(table, prices, seconds, "none")
    if prices is None or prices.per_minute is None:
        return _per_minute_estimate(table, prices, billed, "duration")
    return PricedUsage(
        usd=_q(Decimal(str(billed)) * prices.per_minute / SIXTY),
        billed_audio_seconds=billed,
        usage_type="duration",
        unit_prices={"per_minute": str(prices.per_minute)},
        price_table_version=table.version,
        estimated=False,
    )


def _split_entry(model: str, provider: str | None) -> tuple[str, str | None]:
    """A `provider:model` chain entry as (model, provider); anything else as given."""
    if provider is None and ":" in model and not is_local_model(model):
        name, _, bare = model.partition(":")
        return bare, name
    return model, provider


def _configured_price(model: str, provider: str | None = None) -> Any:
    """The model's `price` in the providers configuration ("table", "zero" or a PriceSpec) at `provider`
    (None: the provider `Catalogue.resolve` gives a bare name), None when that provider does not declare
    the model (or the configuration cannot be read: start-up reports that)."""
    from core.providers.config import ModelRef, load_catalogue
    from core.settings import get_settings

    try:
        catalogue = load_catalogue(get_settings())
    except ConfigError:
        return None
    ref = ModelRef(provider, model) if provider else catalogue.resolve(model)
    config = catalogue.model(ref) if ref is not None else None
    return config.price if config is not None else None


def _spec_prices(spec: Any) -> ModelPrices:
    """A providers-file PriceSpec as the price table's ModelPrices."""
    return ModelPrices(
        per_minute=spec.minute_price,
        audio_input_per_million=spec.audio_input_per_million,
        text_input_per_million=spec.text_input_per_million,
        output_per_million=spec.output_per_million,
    )


def _price_configured(
    table: PriceTable, spec: Any, usage: dict[str, Any] | None, seconds: float
) -> PricedUsage:
    """A model with its own PriceSpec: the table's rules at its prices, each request billed at least
    `min_billed_seconds`."""
    prices = _spec_prices(spec)
    minimum = float(spec.min_billed_seconds)
    usage_type = str(usage.get("type")) if isinstance(usage, dict) else "none"
    if usage_type == "tokens" and isinstance(usage, dict):
        priced = _price_tokens(table, prices, usage, seconds)
    elif usage_type == "duration" and isinstance(usage, dict):
        try:
            billed = max(float(usage.get("seconds") or 0.0), minimum)
        except (TypeError, ValueError):
            billed = max(seconds, minimum)
        priced = _price_duration(table, prices, {**usage, "seconds": billed}, seconds)
    else:
        priced = _per_minute_estimate(table, prices, max(seconds, minimum), "none")
    priced.unit_prices["source"] = "providers"
    if minimum:
        priced.unit_prices["min_billed_seconds"] = str(spec.min_billed_seconds)
    return priced
