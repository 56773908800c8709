"""`voxq providers check` against the fake OpenAI server (issue #17, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.openai_server import FakeOpenAI
from tests.support import REPO_ROOT
from voxq.embedded import free_port

pytestmark = pytest.mark.integration

PRIMARY = "gpt-4o-mini-transcribe"


def run_check(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxq.cli", "providers", "check", "--timeout", "30"],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def row(output: str, provider: str, model: str) -> str:
    lines = [line for line in output.splitlines() if line.split()[:2] == [provider, model]]
    assert len(lines) == 1, output
    return lines[0]


def test_check_prints_a_row_per_model_and_passes(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    providers = tmp_path / "providers.toml"
    providers.write_text(
        f'[providers.cheap]\nbase_url = "{fake_openai.base_url}"\napi_key_env = "CHEAP_KEY"\n'
        '[providers.cheap.models.whisper-1]\nprice = { per_hour = "0.04", min_billed_seconds = 10 }\n'
        'capabilities = { timestamps = "word", response_formats = ["json", "verbose_json"] }\n'
        # a provider outside the default chain that is down: reported, not fatal
        f'[providers.down]\nbase_url = "http://127.0.0.1:{free_port()}/v1"\n'
        '[providers.down.models.whisper-base]\nprice = "zero"\n'
        # the operator retires whisper-1 on OpenAI early: listed, never called
        "[providers.openai.models.whisper-1]\nretires = 2026-01-01\n"
    )
    result = run_check(
        VOXQ_PROVIDERS_FILE=str(providers),
        VOXQ_PRIMARY_MODEL=PRIMARY,
        VOXQ_FALLBACK_MODELS="gpt-transcribe,local",
        VOXQ_ALLOWED_MODELS="openai:whisper-1",
        CHEAP_KEY="cheap-secret",
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    mini = row(out, "openai", PRIMARY)
    assert "yes" in mini and "'tone" in mini and "tokens" in mini and "$0.18" in mini
    gpt = row(out, "openai", "gpt-transcribe")
    assert "duration" in gpt and "$0.27" in gpt and " none " in gpt
    cheap = row(out, "cheap", "whisper-1")
    assert " word " in cheap and "duration" in cheap and "$0.04 (min 10 s)" in cheap
    assert "retired: not called" in row(out, "openai", "whisper-1")
    assert "no (ConnectError)" in row(out, "down", "*")
    assert "ok: every provider of the default chain answered" in out
    # one request per model called (whisper-1 by the `cheap` provider only), none for retired models
    calls = sorted(str(r["model"]) for r in fake_openai.request_log() if r.get("model"))
    assert calls == sorted([PRIMARY, "gpt-transcribe", "whisper-1"])
    assert "cheap-secret" not in out + result.stderr


def test_check_fails_when_a_default_chain_provider_fails(fake_openai: FakeOpenAI) -> None:
    fake_openai.exhaust_quota(PRIMARY)
    result = run_check(VOXQ_PRIMARY_MODEL=PRIMARY, VOXQ_FALLBACK_MODELS="local")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "ERROR insufficient_quota" in row(result.stdout, "openai", PRIMARY)
    assert "FAILED: provider(s) of the default chain: openai" in result.stdout


def test_check_fails_without_the_key_and_on_a_bad_file(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    result = run_check(OPENAI_API_KEY="")
    assert result.returncode == 1 and "no key ($OPENAI_API_KEY unset)" in result.stdout
    bad = tmp_path / "providers.toml"
    bad.write_text('[providers.x]\nbase_url = "x"\n')
    result = run_check(VOXQ_PROVIDERS_FILE=str(bad))
    assert result.returncode == 2 and "provider 'x': field base_url" in result.stderr
