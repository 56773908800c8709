"""Which model names tenants may use: only the ones the operator configured.

A batch's `models` run on the operator's provider key, become circuit and retirement keys in Redis and
label metrics, so a free-form name would let a tenant run any model the key can reach, create permanent
Redis keys and grow metric label sets without bound. The operator's configuration decides instead:
the primary model, the fallbacks, `VOXQ_ALLOWED_MODELS` (extra models a batch may ask for) and the models
the operator's providers file lists, of any provider, as `provider:model` (and as bare names, which resolve
as `core.providers.config.Catalogue.resolve` says). A model retired today is not allowed. This module is
the one place that says so; the label sets stay bounded by the operator's configuration.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date

from core.names import LOCAL_MODEL
from core.providers.config import Catalogue, load_catalogue
from core.providers.retirement import configured_refs, is_retired, utc_today
from core.settings import Settings, get_settings

# What a metric's model label says for a name the operator never configured.
OTHER_MODEL_LABEL = "other"
# A provider account's circuit key prefix (worker.circuit.provider_key): `provider:<name>`.
PROVIDER_CIRCUIT_PREFIX = "provider:"
# The last answer of allowed_models (and the label set), by (settings, catalogue, day): metric labels ask
# on every observation.
_memo: dict[tuple[int, int, date], tuple[frozenset[str], frozenset[str]]] = {}


def allowed_models(settings: Settings, today: date | None = None) -> frozenset[str]:
    """Every model name a batch may name: the primary (the dated default when unset), the fallbacks,
    `VOXQ_ALLOWED_MODELS` and the models the operator's providers file lists, as `provider:model` and as
    bare names; none retired on `today` (default: UTC today)."""
    return _sets(settings, today)[0]


def _sets(settings: Settings, today: date | None) -> tuple[frozenset[str], frozenset[str]]:
    """(the names a batch may use, the model label values): the labels add the bare model names of every
    configured `provider:model` (attempts and costs record the bare model that answered)."""
    day = today or utc_today()
    catalogue = load_catalogue(settings)
    key = (id(settings), id(catalogue), day)
    cached = _memo.get(key)
    if cached is None:
        _memo.clear()
        allowed = _allowed(catalogue, settings, day)
        bare = {ref.model for ref in configured_refs(catalogue, settings, day)}
        cached = _memo[key] = (allowed, allowed | bare)
    return cached


def _allowed(catalogue: Catalogue, settings: Settings, day: date) -> frozenset[str]:
    names = {
        name for name in (settings.primary_model, *settings.fallback_models, *settings.allowed_models) if name
    }
    for ref in configured_refs(catalogue, settings, day):
        names.add(str(ref))
        if catalogue.resolve(ref.model) == ref:  # the bare name stands for this very model
            names.add(ref.model)
    allowed = set()
    for name in names:
        found = catalogue.resolve(name)  # None: the local engine
        known = found is None or found.provider in catalogue.providers
        if known and (found is None or not is_retired(catalogue.model(found), day)):
            allowed.add(name)
    return frozenset(allowed)


def unconfigured_models(models: Iterable[str], settings: Settings | None = None) -> list[str]:
    """The names in `models` the operator did not configure, in order (empty: all allowed)."""
    allowed = allowed_models(settings or get_settings())
    return [name for name in models if name not in allowed]


def metric_model_label(model: str) -> str:
    """`model` when it is configured (or the local engine), else `other`: bounded label values."""
    if model == LOCAL_MODEL or model in _sets(get_settings(), None)[1]:
        return model
    return OTHER_MODEL_LABEL


def circuit_label(key: str) -> str:
    """The label of a circuit key read from Redis: a provider account's circuit (`provider:<name>`) keeps
    its key when the provider is configured (the catalogue's, built in or from the providers file), a
    model's goes through `metric_model_label`; anything else is `other`."""
    if key.startswith(PROVIDER_CIRCUIT_PREFIX):
        provider = key[len(PROVIDER_CIRCUIT_PREFIX) :]
        return key if provider in load_catalogue(get_settings()).providers else OTHER_MODEL_LABEL
    return metric_model_label(key)
