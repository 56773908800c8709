"""The model allowlist: configured names only, and metric labels that never carry anything else."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from core.model_access import OTHER_MODEL_LABEL, allowed_models, metric_model_label, unconfigured_models
from core.settings import Settings, reset_settings_cache


def test_the_allowlist_is_the_chain_plus_allowed_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "gpt-transcribe")
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", "whisper-1,local")
    monkeypatch.setenv("VOXQ_ALLOWED_MODELS", " gpt-4o-transcribe , ")
    settings = Settings()
    configured = {"gpt-transcribe", "whisper-1", "gpt-4o-transcribe"}
    assert allowed_models(settings) == {"local", *configured, *(f"openai:{name}" for name in configured)}
    assert unconfigured_models(["whisper-1", "x", "local", "y"], settings) == ["x", "y"]


def test_metric_labels_carry_only_configured_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import metrics

    monkeypatch.setenv("VOXQ_PRIMARY_MODEL", "gpt-transcribe")
    monkeypatch.setenv("VOXQ_FALLBACK_MODELS", "whisper-1")
    reset_settings_cache()
    try:
        assert metric_model_label("whisper-1") == "whisper-1"
        assert metric_model_label("local") == "local"
        assert metric_model_label("tenant-made-up-123") == OTHER_MODEL_LABEL
        registry = CollectorRegistry()
        counter = metrics.ModelCounter("t_calls_total", "calls", ["model", "outcome"], registry=registry)
        for n in range(50):
            counter.labels(model=f"made-up-{n}", outcome="success").inc()
        counter.labels(model="whisper-1", outcome="success").inc()
        counter.labels("gpt-transcribe", "failed").inc()
        fallbacks = metrics.ModelCounter("t_fb_total", "fb", ["from_model", "to_model"], registry=registry)
        fallbacks.labels(from_model="nope", to_model="whisper-1").inc()
        samples = {
            (s.labels.get("model") or s.labels.get("from_model"), s.labels.get("to_model"))
            for family in registry.collect()
            for s in family.samples
            if s.name.endswith("_total")
        }
        assert samples == {
            (OTHER_MODEL_LABEL, None),
            ("whisper-1", None),
            ("gpt-transcribe", None),
            (OTHER_MODEL_LABEL, "whisper-1"),
        }
        # every family of core.metrics with a model label goes through the same mapping
        for family in (
            metrics.ATTEMPTS,
            metrics.PROVIDER_LATENCY,
            metrics.AUDIO_BILLED_SECONDS,
            metrics.COST_USD,
            metrics.FALLBACKS,
            metrics.CIRCUIT_STATE,
            metrics.RATE_LIMIT_WAIT_SECONDS,
            metrics.RATE_LIMIT_WAITS,
        ):
            assert isinstance(family, metrics.ModelLabels), family
    finally:
        reset_settings_cache()
