"""Providers as configuration: the built-in catalogue merged with the operator's providers file.

The built-in catalogue (`core/prices/catalogue.toml`, package data next to the price tables) says what voxq
knows about OpenAI: its models, their capabilities and retirement dates; prices stay in the price table
(`price = "table"`). The operator's `VOXQ_PROVIDERS_FILE` (TOML, same format) is merged over it key by key:
it adds providers and models or overrides any field. Without a file, `OPENAI_API_KEY`/`OPENAI_BASE_URL`
define the provider `openai`, as before.

The merged document is validated once at start-up (`load_catalogue`); every error names the file, the
provider and the field. A key never sits in the file: a provider names the environment variable holding
it (`api_key_env`).

What a date means for a model (retired or not, days left, the default chain) is pure functions of
(catalogue, today) in `core/providers/retirement.py`.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from core.errors import ConfigError
from core.names import LOCAL_MODEL, LOCAL_MODEL_PREFIX
from core.settings import Settings

CATALOGUE_ORIGIN = "core/prices/catalogue.toml"
OPENAI = "openai"
# Header names that carry credentials: a key goes in the environment (api_key_env), never in the file.
SECRET_HEADERS = frozenset({"authorization", "api-key", "x-api-key", "proxy-authorization"})
# Fields that would hold a key itself.
SECRET_FIELDS = frozenset({"api_key", "key", "token", "secret", "password"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")  # attempts.provider is 50 characters

Timestamps = Literal["none", "segment", "word"]
ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PriceSpec(_Strict):
    """A model's own list prices (a model whose prices are not in the price table)."""

    per_minute: Decimal | None = Field(default=None, ge=0)
    per_hour: Decimal | None = Field(default=None, ge=0)
    audio_input_per_million: Decimal | None = Field(default=None, ge=0)
    text_input_per_million: Decimal | None = Field(default=None, ge=0)
    output_per_million: Decimal | None = Field(default=None, ge=0)
    min_billed_seconds: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _one_price(self) -> PriceSpec:
        if self.per_minute is not None and self.per_hour is not None:
            raise ValueError("give per_minute or per_hour, not both")
        tokens = (self.audio_input_per_million, self.output_per_million)
        if any(p is not None for p in tokens) and not all(p is not None for p in tokens):
            raise ValueError("token prices need both audio_input_per_million and output_per_million")
        if self.per_minute is None and self.per_hour is None and tokens[0] is None:
            raise ValueError('a price needs per_minute, per_hour or token prices (or price = "zero")')
        return self

    @property
    def minute_price(self) -> Decimal | None:
        """USD per audio minute (from per_hour when that is what was given)."""
        if self.per_minute is not None:
            return self.per_minute
        return self.per_hour / 60 if self.per_hour is not None else None


class Capabilities(_Strict):
    """What a model can do."""

    timestamps: Timestamps = "none"
    diarization: StrictBool = False
    prompt: StrictBool = True
    response_formats: tuple[ResponseFormat, ...] = ("json",)
    max_duration_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _formats_fit(self) -> Capabilities:
        if not self.response_formats:
            raise ValueError("response_formats must name at least one format")
        if self.timestamps != "none" and not {"verbose_json", "diarized_json"} & set(self.response_formats):
            raise ValueError(f"timestamps = {self.timestamps!r} needs verbose_json in response_formats")
        return self


class ModelConfig(_Strict):
    """One model of a provider."""

    price: Literal["table", "zero"] | PriceSpec
    capabilities: Capabilities = Capabilities()
    retires: date | None = None


class Limits(_Strict):
    """A provider's limits (0 or unset: none)."""

    rpm: StrictInt = Field(default=0, ge=0)
    audio_seconds_per_hour: float = Field(default=0.0, ge=0)
    max_in_flight: StrictInt = Field(default=0, ge=0)
    max_upload_bytes: StrictInt | None = Field(default=None, gt=0)


class ProviderConfig(_Strict):
    """One OpenAI-compatible endpoint and account."""

    name: str
    base_url: str
    api_key_env: str | None = None  # None: the endpoint needs no key (a self-hosted server)
    headers: dict[str, str] = Field(default_factory=dict)
    limits: Limits = Limits()
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_file(cls, data: Any) -> Any:
        if isinstance(data, dict):
            found = sorted(SECRET_FIELDS & set(data))
            if found:
                raise ValueError(
                    f"field {found[0]!r} would hold a secret: put the key in an environment variable "
                    "and name that variable with api_key_env"
                )
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _PROVIDER_NAME.match(value) or value == LOCAL_MODEL:
            raise ValueError("a provider name is lower-case letters, digits, - and _ (and not 'local')")
        return value

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("base_url must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("api_key_env is the NAME of an environment variable (e.g. ACME_API_KEY)")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in SECRET_HEADERS:
                raise ValueError(f"header {name!r} carries a credential: use api_key_env instead")
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for name in value:
            if not name or name == LOCAL_MODEL or name.startswith(LOCAL_MODEL_PREFIX) or ":" in name:
                raise ValueError(f"model name {name!r} is not allowed (no ':', not 'local')")
        return value


@dataclass(frozen=True)
class ModelRef:
    """`provider:model`, a chain entry."""

    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"

    @classmethod
    def of_entry(cls, entry: str, default_provider: str = OPENAI) -> ModelRef | None:
        """A chain entry as a ref: `provider:model`, or a bare model name of `default_provider` (chains
        written before providers existed); None for the local engine (`local`, `local:<weights>`)."""
        if entry == LOCAL_MODEL or entry.startswith(LOCAL_MODEL_PREFIX):
            return None
        provider, sep, model = entry.partition(":")
        return cls(provider, model) if sep else cls(default_provider, entry)


class Catalogue(_Strict):
    """Every provider voxq may call, validated."""

    providers: dict[str, ProviderConfig]
    default_primary: tuple[str, ...] = ()
    origin: str = CATALOGUE_ORIGIN
    # The providers and `provider:model` names the operator's file lists (not the built-in ones).
    declared: frozenset[str] = frozenset()

    def model(self, ref: ModelRef) -> ModelConfig | None:
        """The model's configuration, None when its provider does not declare it."""
        provider = self.providers.get(ref.provider)
        return provider.models.get(ref.model) if provider is not None else None

    def resolve(self, name: str, default_provider: str = OPENAI) -> ModelRef | None:
        """`provider:model` or a bare model name as a ref; None for the local engine. A bare name is
        `default_provider`'s when it declares it, else the first provider's (in file order) that does,
        else `default_provider`'s."""
        if name == LOCAL_MODEL or name.startswith(LOCAL_MODEL_PREFIX):
            return None
        provider, sep, model = name.partition(":")
        if sep:
            return ModelRef(provider, model)
        default = self.providers.get(default_provider)
        if default is not None and name in default.models:
            return ModelRef(default_provider, name)
        for pname, config in self.providers.items():
            if name in config.models:
                return ModelRef(pname, name)
        return ModelRef(default_provider, name)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(origin: str, exc: ValidationError) -> str:
    """One line per error: the file, the provider and the field."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        where = origin
        if len(loc) >= 2 and loc[0] == "providers":
            where += f": provider {loc[1]!r}"
            loc = loc[2:]
        field = ".".join(loc) or "(provider)"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{where}: field {field}: {message}")
    return "; ".join(lines)


def builtin_raw() -> dict[str, Any]:
    """The built-in catalogue as parsed TOML."""
    return tomllib.loads(resources.files("core").joinpath("prices", "catalogue.toml").read_text())


def read_providers_file(path: str) -> dict[str, Any]:
    """The operator's providers file as parsed TOML, or ConfigError naming it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"providers file {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"providers file {path}: not valid TOML ({exc})") from exc
    unknown = sorted(set(raw) - {"providers", "default_primary"})
    if unknown:
        raise ConfigError(f"providers file {path}: unknown top-level field {unknown[0]!r}")
    providers = raw.get("providers", {})
    if not isinstance(providers, dict) or not all(isinstance(v, dict) for v in providers.values()):
        raise ConfigError(f"providers file {path}: [providers.<name>] tables expected")
    return raw


def build_catalogue(
    file_raw: dict[str, Any] | None,
    *,
    origin: str,
    openai_base_url: str | None = None,
    price_table_version: str = "2026-11",
    price_table_dir: str | None = None,
) -> Catalogue:
    """The built-in catalogue, with env-only OpenAI settings applied, merged with the operator's file."""
    raw = builtin_raw()
    if openai_base_url:
        raw["providers"][OPENAI]["base_url"] = openai_base_url
    declared = set()
    for pname, provider in (file_raw or {}).get("providers", {}).items():
        declared.add(pname)
        models = provider.get("models") if isinstance(provider, dict) else None
        declared |= {f"{pname}:{mname}" for mname in (models if isinstance(models, dict) else {})}
    merged = _deep_merge(raw, file_raw or {})
    for name, provider in merged.get("providers", {}).items():
        if isinstance(provider, dict):
            provider.setdefault("name", name)
    merged["origin"] = origin
    merged["declared"] = frozenset(declared)
    try:
        catalogue = Catalogue.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(origin, exc)) from None
    _check_table_prices(catalogue, price_table_version, price_table_dir)
    _check_default_primary(catalogue)
    return catalogue


def _check_table_prices(catalogue: Catalogue, version: str, table_dir: str | None) -> None:
    """A `price = "table"` model the price table cannot price is an error: one source of truth."""
    from core.pricing import load_price_table

    table = load_price_table(version, table_dir)
    for pname, provider in catalogue.providers.items():
        for mname, model in provider.models.items():
            if model.price == "table":
                prices = table.prices_for(mname)
                if prices is None or prices.per_minute is None:
                    raise ConfigError(
                        f"{catalogue.origin}: provider {pname!r}: field models.{mname}.price: price table "
                        f"{version} has no price for {mname!r}; give the model its own price"
                    )


def _check_default_primary(catalogue: Catalogue) -> None:
    for entry in catalogue.default_primary:
        ref = catalogue.resolve(entry)
        if ref is None or catalogue.model(ref) is None:
            raise ConfigError(
                f"{catalogue.origin}: field default_primary: {entry!r} is not a configured model"
            )


@lru_cache(maxsize=8)
def _load(path: str | None, base_url: str, version: str, table_dir: str | None) -> Catalogue:
    file_raw = read_providers_file(path) if path else None
    # OPENAI_BASE_URL still moves the built-in provider unless the operator's file gives its own.
    return build_catalogue(
        file_raw,
        origin=f"providers file {path}" if path else CATALOGUE_ORIGIN,
        openai_base_url=base_url,
        price_table_version=version,
        price_table_dir=table_dir,
    )


def load_catalogue(settings: Settings) -> Catalogue:
    """The validated catalogue for these settings; ConfigError when invalid. The file is read once per
    process (the start-up check reads it first): a change takes effect at the next restart, so a file
    edited into an invalid state cannot break running workers."""
    return _load(
        settings.providers_file or None,
        settings.openai_base_url,
        settings.price_table_version,
        settings.price_table_dir,
    )


def api_key(provider: ProviderConfig, settings: Settings) -> str | None:
    """The provider's key from its environment variable (OpenAI's own via settings), None when unset."""
    if provider.api_key_env is None:
        return None
    if provider.api_key_env == "OPENAI_API_KEY" and settings.openai_api_key is not None:
        return settings.openai_api_key.get_secret_value() or None
    return os.environ.get(provider.api_key_env) or None


def usable(provider: ProviderConfig, settings: Settings) -> bool:
    """True when the provider can be called: it needs no key, or its key is set."""
    return provider.api_key_env is None or api_key(provider, settings) is not None
