"""Providers configuration at the API's start: validation, retirement warnings, /readyz details and the
days-left gauge (issue #17)."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from core.errors import ConfigError
from core.providers.retirement import utc_today
from core.settings import reset_settings_cache
from tests.api_helpers import METRICS_TOKEN
from tests.support import Stack

pytestmark = pytest.mark.integration

SHUTDOWN = date(2027, 2, 26)
PROVIDERS = """
[providers.gpu]
base_url = "http://127.0.0.1:9/v1"

[providers.gpu.models.whisper-base]
price = "zero"
retires = 2030-01-01
capabilities = { timestamps = "segment", response_formats = ["json", "verbose_json"] }
"""


def app_client(monkeypatch: pytest.MonkeyPatch, **env: str) -> TestClient:
    from api.main import create_app

    monkeypatch.setenv("VOXQ_METRICS_TOKEN", METRICS_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-key")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_settings_cache()
    return TestClient(create_app(), headers={"Authorization": f"Bearer {METRICS_TOKEN}"})


def test_readyz_and_metrics_show_days_left_per_configured_model(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(PROVIDERS)
    today = utc_today()
    client = app_client(
        monkeypatch,
        VOXQ_PROVIDERS_FILE=str(path),
        VOXQ_PRIMARY_MODEL="openai:gpt-4o-mini-transcribe",
        VOXQ_FALLBACK_MODELS="gpu:whisper-base,local",
    )
    with caplog.at_level(logging.WARNING, logger="api.main"), client:
        ready = client.get("/readyz")
        metrics_text = client.get("/metrics").text
    assert ready.status_code == 200, ready.text
    models = {m["model"]: m for m in ready.json()["models"]}
    assert models["openai:gpt-4o-mini-transcribe"] == {
        "model": "openai:gpt-4o-mini-transcribe",
        "retires": "2027-02-26",
        "days_left": (SHUTDOWN - today).days,
    }
    assert models["gpu:whisper-base"]["days_left"] == (date(2030, 1, 1) - today).days
    gauges = {
        s.labels["model"]: s.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "voxq_model_retirement_days_left"
        for s in family.samples
    }
    assert gauges == {m: float(v["days_left"]) for m, v in models.items()}
    # the start-up warning names the model retiring within 90 days (or already retired), and only it
    warned = [r.getMessage() for r in caplog.records if "model retirement" in r.getMessage()]
    if (SHUTDOWN - today).days <= 90:
        assert any("openai:gpt-4o-mini-transcribe" in line for line in warned), warned
    assert not any("gpu:whisper-base" in line for line in warned)


def test_the_api_refuses_to_start_with_a_malformed_providers_file(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(PROVIDERS.replace('price = "zero"', 'price = "free"'))
    client = app_client(monkeypatch, VOXQ_PROVIDERS_FILE=str(path))
    with pytest.raises(ConfigError, match=r"provider 'gpu': field models\.whisper-base\.price"), client:
        pass


def test_worker_start_logs_retirement_and_refuses_a_malformed_file(stack: Stack, tmp_path: Path) -> None:
    import subprocess
    from datetime import timedelta

    from tests.support import celery_worker, wait_until

    soon = utc_today() + timedelta(days=30)
    path = tmp_path / "providers.toml"
    path.write_text(PROVIDERS.replace("retires = 2030-01-01", f"retires = {soon.isoformat()}"))
    env = {"VOXQ_PROVIDERS_FILE": str(path), "VOXQ_PRIMARY_MODEL": "gpu:whisper-base", "OPENAI_API_KEY": ""}
    log = tmp_path / "worker.log"
    with celery_worker(stack, queues="maintenance", concurrency=1, env=env, log_path=log):
        wait_until(lambda: "model retirement" in log.read_text(errors="replace"), timeout=60, what="warning")
    text = log.read_text(errors="replace")
    assert f"model gpu:whisper-base retires on {soon.isoformat()} (30 days left)" in text

    path.write_text(PROVIDERS.replace('price = "zero"', 'price = "free"'))
    bad_log = tmp_path / "bad-worker.log"
    with celery_worker(stack, queues="maintenance", concurrency=1, env=env, log_path=bad_log) as proc:
        assert proc.wait(60) != 0
    bad = bad_log.read_text(errors="replace")
    assert "invalid providers configuration" in bad and "field models.whisper-base.price" in bad
    assert isinstance(proc, subprocess.Popen)
