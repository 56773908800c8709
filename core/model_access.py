"""Which model names tenants may use: only the ones the operator configured.

A batch's `models` run on the operator's provider key, become circuit and retirement keys in Redis and
label metrics, so a free-form name would let a tenant run any model the key can reach, create permanent
Redis keys and grow metric label sets without bound. The operator's configuration decides instead:
the primary model, the fallbacks and `VOXQ_ALLOWED_MODELS` (extra models a batch may ask for). This module
is the one place that says so and the providers file, issue #17: a model retired
today is not allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

from core.names import LOCAL_MODEL
from core.providers.config import OPENAI, Catalogue, load_catalogue
from core.providers.retirement import configured_refs, is_retired, runtime_provider, utc_today
from core.settings import Settings, get_settings

# What a metric's model label says for a name the operator never configured.
OTHER_MODEL_LABEL = "other"
# The last answer of allowed_models, by (settings, catalogue, day): metric labels ask on every observation.
_memo: dict[tuple[int, int, date], frozenset[str]] = {}


def allowed_models(settings: Settings, today: date | None = None) -> frozenset[str]:
    """Every model name a batch may name: the primary (the dated default when unset), the fallbacks,
    `VOXQ_ALLOWED_MODELS` and the models the operator's providers file lists, as `provider:model` and as
    bare names; none retired on `today` (default: UTC today), none of a provider the runtime does not
    call (core/providers/retirement.py: runtime_provider)."""
    day = today or utc_today()
    catalogue = load_catalogue(settings)
    key = (id(settings), id(catalogue), day)
    cached = _memo.get(key)
    if cached is None:
        _memo.clear()
        cached = _memo[key] = _allowed(catalogue, settings, day)
    return cached


def _allowed(catalogue: Catalogue, settings: Settings, day: date) -> frozenset[str]:
    runtime = runtime_provider(catalogue, settings, day)
    names = {
        name for name in (settings.primary_model, *settings.fallback_models, *settings.allowed_models) if name
    }
    for ref in configured_refs(catalogue, settings, day):
        names.add(str(ref))
        if runtime is not None and ref.provider == runtime.name:
            names.add(ref.model)
    allowed = set()
    for name in names:
        resolved = catalogue.resolve(name, runtime.name if runtime is not None else OPENAI)
        if resolved is None:
            allowed.add(name)
        elif is_retired(catalogue.model(resolved), day):
            continue
        # Until the runtime has one client per provider (issue #17's next step) it calls one provider:
        # another provider's model would be dropped from the chain, so a batch may not name it.
        elif runtime is None or resolved.provider == runtime.name:
            allowed.add(name)
    return frozenset(allowed)


def unconfigured_models(models: Iterable[str], settings: Settings | None = None) -> list[str]:
    """The names in `models` the operator did not configure, in order (empty: all allowed)."""
    allowed = allowed_models(settings or get_settings())
    return [name for name in models if name not in allowed]


def metric_model_label(model: str) -> str:
    """`model` when it is configured (or the local engine), else `other`: bounded label values."""
    if model == LOCAL_MODEL or model in allowed_models(get_settings()):
        return model
    return OTHER_MODEL_LABEL
