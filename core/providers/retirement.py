"""Retirement by date and the chains it shapes: pure functions of (catalogue, settings, today).

A model whose `retires` date is today or earlier is retired: no chain contains it, so it is never sent a
request. Before the date it is "retiring" (a start-up warning within `WARN_DAYS`, `/readyz` details, the
`voxq_model_retirement_days_left` gauge). The default primary model is the first of the catalogue's
`default_primary` list not retired today: `openai:gpt-4o-mini-transcribe` before 2027-02-26,
`openai:gpt-transcribe` from that date. `today` is always passed in (callers use `utc_today()`), so the
rules are tested on both sides of a date without touching the clock.

The worker's chain spans providers: `runtime_chain` gives canonical `provider:model` entries (or `local`)
of every provider the worker can call (`usable`: it needs no key, or its key is set), so each call goes to
its entry's provider (worker/runtime.py: one client per provider on the process's shared HTTP client).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from core.errors import ConfigError
from core.names import LOCAL_MODEL
from core.providers.config import Catalogue, ModelConfig, ModelRef, ProviderConfig, usable
from core.settings import Settings

WARN_DAYS = 90


def utc_today() -> date:
    """Today's date in UTC: the day every retirement rule is evaluated on."""
    return datetime.now(UTC).date()


def is_retired(model: ModelConfig | None, today: date) -> bool:
    """True from the model's retirement date on (a model without a date never retires)."""
    return model is not None and model.retires is not None and today >= model.retires


def days_left(model: ModelConfig | None, today: date) -> int | None:
    """Days until the model's retirement date (0 or less: retired), None without a date."""
    if model is None or model.retires is None:
        return None
    return (model.retires - today).days


def default_primary(catalogue: Catalogue, today: date) -> ModelRef | None:
    """The first model of the catalogue's `default_primary` not retired today."""
    for entry in catalogue.default_primary:
        ref = catalogue.resolve(entry)
        if ref is not None and not is_retired(catalogue.model(ref), today):
            return ref
    return None


def default_chain(catalogue: Catalogue, settings: Settings, today: date) -> list[str]:
    """The configured chain as written (`VOXQ_PRIMARY_MODEL`, else the dated default, then
    `VOXQ_FALLBACK_MODELS`), retired models left out; entries are `provider:model`, bare names or `local`."""
    primary = settings.primary_model or (str(default_primary(catalogue, today) or "") or None)
    chain: list[str] = []
    for name in (primary, *settings.fallback_models):
        if not name or name in chain:
            continue
        ref = catalogue.resolve(name)
        if ref is not None and is_retired(catalogue.model(ref), today):
            continue
        chain.append(str(ref) if ref is not None else name)
    return chain


def runtime_provider(catalogue: Catalogue, settings: Settings, today: date) -> ProviderConfig | None:
    """The provider of the default chain's first hosted model (the one env-only setups call)."""
    for name in default_chain(catalogue, settings, today):
        ref = catalogue.resolve(name)
        if ref is not None:
            return catalogue.providers.get(ref.provider)
    return None


def runtime_chain(
    catalogue: Catalogue, settings: Settings, batch_models: list[str] | None, today: date
) -> list[str]:
    """The chain the worker runs, in order, without duplicates: the batch's own, else the default one, as
    canonical `provider:model` entries (a bare name resolved by `Catalogue.resolve`: OpenAI's, else the
    first provider declaring it) and `local` entries as written. Left out: retired models, and models of a
    provider that is not configured or cannot be called (its key is not set). `[local]` when no hosted
    model is left."""
    chain: list[str] = []
    hosted = False
    for name in batch_models or default_chain(catalogue, settings, today):
        if not name:
            continue
        ref = catalogue.resolve(name)
        if ref is None:
            entry = name
        else:
            provider = catalogue.providers.get(ref.provider)
            if provider is None or not usable(provider, settings):
                continue
            if is_retired(catalogue.model(ref), today):
                continue
            entry, hosted = str(ref), True
        if entry not in chain:
            chain.append(entry)
    return chain if hosted else [LOCAL_MODEL]


@dataclass(frozen=True)
class Retiring:
    """A configured model with a retirement date."""

    ref: str
    retires: date
    days_left: int


def configured_refs(catalogue: Catalogue, settings: Settings, today: date) -> list[ModelRef]:
    """Every model the operator configured: the chain (as written, retired ones too), `VOXQ_ALLOWED_MODELS`
    and the models the operator's providers file lists."""
    primary = settings.primary_model or (str(default_primary(catalogue, today) or "") or None)
    refs: list[ModelRef] = []
    for name in (primary, *settings.fallback_models, *settings.allowed_models):
        ref = catalogue.resolve(name) if name else None
        if ref is not None and ref not in refs:
            refs.append(ref)
    for name in sorted(catalogue.declared):
        ref = catalogue.resolve(name) if ":" in name else None
        if ref is not None and ref not in refs:
            refs.append(ref)
    return refs


def retirements(catalogue: Catalogue, refs: list[ModelRef], today: date) -> list[Retiring]:
    """The refs that have a retirement date, with the days left (negative: retired)."""
    found = []
    for ref in refs:
        model = catalogue.model(ref)
        left = days_left(model, today)
        if model is not None and model.retires is not None and left is not None:
            found.append(Retiring(str(ref), model.retires, left))
    return found


def retirement_warnings(catalogue: Catalogue, settings: Settings, today: date) -> list[str]:
    """One line per configured model retiring within `WARN_DAYS` days (or already retired)."""
    lines = []
    for item in retirements(catalogue, configured_refs(catalogue, settings, today), today):
        if item.days_left <= 0:
            lines.append(f"model {item.ref} retired on {item.retires.isoformat()}: it is sent no requests")
        elif item.days_left <= WARN_DAYS:
            lines.append(
                f"model {item.ref} retires on {item.retires.isoformat()} ({item.days_left} days left); "
                "from that date it is sent no requests"
            )
    return lines


def check_chain(catalogue: Catalogue, settings: Settings) -> None:
    """ConfigError when a configured chain or allowed model names a provider or provider model that does
    not exist (a bare name is accepted as before: the runtime's provider may serve it)."""
    for name in (settings.primary_model, *settings.fallback_models, *settings.allowed_models):
        ref = catalogue.resolve(name) if name else None
        if ref is None or ":" not in (name or ""):
            continue
        if ref.provider not in catalogue.providers:
            raise ConfigError(
                f"model {name!r}: no provider {ref.provider!r} is configured ({catalogue.origin})"
            )
        if catalogue.model(ref) is None:
            raise ConfigError(
                f"model {name!r}: provider {ref.provider!r} declares no model {ref.model!r} "
                f"({catalogue.origin})"
            )


def check_providers(settings: Settings, today: date) -> list[str]:
    """The start-up check: the catalogue loads and the configured chain names real providers and models
    (ConfigError otherwise); returns the retirement warnings to log."""
    from core.providers.config import load_catalogue

    catalogue = load_catalogue(settings)
    check_chain(catalogue, settings)
    return retirement_warnings(catalogue, settings, today)


def retirement_details(settings: Settings, today: date) -> list[dict[str, object]]:
    """Configured models with a retirement date, for `/readyz` and the days-left gauge."""
    from core.providers.config import load_catalogue

    catalogue = load_catalogue(settings)
    return [
        {"model": item.ref, "retires": item.retires.isoformat(), "days_left": item.days_left}
        for item in retirements(catalogue, configured_refs(catalogue, settings, today), today)
    ]
