"""What a chain entry (`provider:model`, worker.grouping.model_chain) means for one call.

`Target`: which provider's client the call goes to (`Runtime.provider(name)`), the bare model name that
is sent and recorded (`attempts.model`; `attempts.provider` is the provider), the model's configuration
(None for a model the providers configuration does not describe), and the most audio the model accepts
in one request: its `capabilities.max_duration_seconds` and its provider's `limits.max_upload_bytes`.

`response_format`: what the request asks for, from the model's configured `capabilities.response_formats`
(verbose_json when the model offers it and timestamps are wanted, else json), so the provider module keeps
no list of models.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.providers.config import OPENAI, ModelConfig, ModelRef, load_catalogue
from core.settings import Settings


@dataclass(frozen=True)
class Target:
    """A chain entry resolved for a call."""

    provider: str
    model: str
    config: ModelConfig | None = None
    max_seconds: float | None = None
    max_bytes: int | None = None

    def too_big(self, seconds: float, size: int) -> bool:
        """True when a piece of `seconds` of audio in `size` bytes is more than the model accepts."""
        return (self.max_seconds is not None and seconds > self.max_seconds) or (
            self.max_bytes is not None and size > self.max_bytes
        )


def target(entry: str, settings: Settings) -> Target:
    """The provider, model and limits of a hosted chain entry (a bare name resolves as the catalogue says)."""
    catalogue = load_catalogue(settings)
    ref = catalogue.resolve(entry) or ModelRef(OPENAI, entry)
    config = catalogue.model(ref)
    provider = catalogue.providers.get(ref.provider)
    return Target(
        provider=ref.provider,
        model=ref.model,
        config=config,
        max_seconds=config.capabilities.max_duration_seconds if config is not None else None,
        max_bytes=provider.limits.max_upload_bytes if provider is not None else None,
    )


def response_format(config: ModelConfig | None, want_timestamps: bool) -> str | None:
    """The response format to ask `config`'s model for; None when the model is not configured (the
    provider's own default: verbose_json when timestamps are wanted)."""
    if config is None:
        return None
    if want_timestamps and "verbose_json" in config.capabilities.response_formats:
        return "verbose_json"
    return "json"
