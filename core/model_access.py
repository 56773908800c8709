"""Which model names tenants may use: only the ones the operator configured.

A batch's `models` run on the operator's provider key, become circuit and retirement keys in Redis and
label metrics, so a free-form name would let a tenant run any model the key can reach, create permanent
Redis keys and grow metric label sets without bound. The operator's configuration decides instead:
the primary model, the fallbacks and `VOXQ_ALLOWED_MODELS` (extra models a batch may ask for). This module
is the one place that says so (a providers file, issue #17, will be read here too).
"""

from __future__ import annotations

from collections.abc import Iterable

from core.names import LOCAL_MODEL
from core.settings import Settings, get_settings

# What a metric's model label says for a name the operator never configured.
OTHER_MODEL_LABEL = "other"


def allowed_models(settings: Settings) -> frozenset[str]:
    """Every model name a batch may name: primary, fallbacks and `VOXQ_ALLOWED_MODELS`."""
    return frozenset(
        name for name in (settings.primary_model, *settings.fallback_models, *settings.allowed_models) if name
    )


def unconfigured_models(models: Iterable[str], settings: Settings | None = None) -> list[str]:
    """The names in `models` the operator did not configure, in order (empty: all allowed)."""
    allowed = allowed_models(settings or get_settings())
    return [name for name in models if name not in allowed]


def metric_model_label(model: str) -> str:
    """`model` when it is configured (or the local engine), else `other`: bounded label values."""
    if model == LOCAL_MODEL or model in allowed_models(get_settings()):
        return model
    return OTHER_MODEL_LABEL
