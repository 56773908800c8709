"""The pieces of `voxq dev` / `voxq demo` that need no server: secrets, child environment, report text."""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path

from pydantic import SecretStr

from voxq.cli.demo import SAMPLES_DIR, cost_table, load_samples, progress_line
from voxq.devstack import TELEMETRY_OFF, DevStack, _env_value, read_or_create_secret, write_secret


def test_secret_files_are_owner_only_from_the_start(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask
    try:
        write_secret(tmp_path / "s" / "token", "abc")
    finally:
        os.umask(old)
    path = tmp_path / "s" / "token"
    assert path.read_text() == "abc"
    assert path.stat().st_mode & 0o777 == 0o600


def test_secret_is_created_once_then_read_back(tmp_path: Path) -> None:
    made: list[int] = []

    def make() -> str:
        made.append(1)
        return f"value-{len(made)}"

    first = read_or_create_secret(tmp_path / "k", make)
    assert read_or_create_secret(tmp_path / "k", make) == first == "value-1"
    assert made == [1]
    (tmp_path / "k").write_text("")  # an empty file is no secret: replaced
    assert read_or_create_secret(tmp_path / "k", make) == "value-2"


def test_env_values_render_like_the_variables_that_set_them() -> None:
    assert _env_value(None) == ""
    assert _env_value(SecretStr("s3cret")) == "s3cret"
    assert _env_value(["gpt-4o-transcribe", "local"]) == "gpt-4o-transcribe,local"
    assert _env_value([]) == ""
    assert _env_value(2) == "2"


def _child_env(tmp_path: Path, **given: str) -> dict[str, str]:
    stack = DevStack(tmp_path / "data", api_port=18000, flower_port=15555, env={"PATH": "/bin", **given})
    stack.secrets_dir.mkdir(parents=True, exist_ok=True)
    return stack._base_child_env()


def test_child_env_without_openai_key_uses_the_local_model_only(tmp_path: Path) -> None:
    env = _child_env(tmp_path)
    assert env["VOXQ_PRIMARY_MODEL"] == "local" and env["VOXQ_FALLBACK_MODELS"] == ""
    assert env["VOXQ_ENVIRONMENT"] == "dev"
    assert env["VOXQ_API_HOST"] == "127.0.0.1" and env["VOXQ_API_PORT"] == "18000"
    assert env["VOXQ_DATA_DIR"] == str((tmp_path / "data").resolve())
    assert Path(env["VOXQ_LOCAL_MODEL_CACHE_DIR"]).is_absolute()
    for key, value in TELEMETRY_OFF.items():
        assert env[key] == value


def test_child_env_keeps_the_configured_chain_with_an_openai_key(tmp_path: Path) -> None:
    env = _child_env(tmp_path, OPENAI_API_KEY="sk-test")
    assert "VOXQ_PRIMARY_MODEL" not in env and "VOXQ_FALLBACK_MODELS" not in env
    env = _child_env(tmp_path, VOXQ_PRIMARY_MODEL="whisper-1")
    assert env["VOXQ_PRIMARY_MODEL"] == "whisper-1"


def test_flower_password_generated_once_and_never_unauthenticated(tmp_path: Path) -> None:
    first = _child_env(tmp_path, FLOWER_UNAUTHENTICATED_API="true")
    assert "FLOWER_UNAUTHENTICATED_API" not in first
    password = first["VOXQ_FLOWER_PASSWORD"]
    assert len(password) >= 16
    assert _child_env(tmp_path)["VOXQ_FLOWER_PASSWORD"] == password  # the next start prints the same
    assert (tmp_path / "data" / "secrets" / "flower_password").stat().st_mode & 0o077 == 0
    assert _child_env(tmp_path, VOXQ_FLOWER_PASSWORD="given-password")["VOXQ_FLOWER_PASSWORD"] == (
        "given-password"
    )


def test_samples_manifest_lists_existing_audio() -> None:
    samples = load_samples(SAMPLES_DIR)
    assert len(samples) >= 2
    for sample in samples:
        assert sample.path.is_file() and sample.text


def test_progress_line_counts_terminal_jobs() -> None:
    batch = {
        "counts": {"succeeded": 2, "failed": 1, "processing": 1, "queued": 1},
        "total_jobs": 5,
        "cost_usd": 0.0123,
    }
    line = progress_line(batch, started=0.0)
    assert "3/5 done, 1 processing, 1 queued" in line
    assert "$0.0123" in line
    assert line.startswith("[" + "#" * 18 + "." * 12 + "]")


def test_cost_table_sums_per_model_and_in_total() -> None:
    jobs = [
        {"model": "gpt-4o-mini-transcribe", "status": "succeeded", "duration_seconds": 60.0,
         "billed_seconds": 55.0, "cost_usd": 0.003},
        {"model": "gpt-4o-mini-transcribe", "status": "succeeded", "duration_seconds": 30.0,
         "billed_seconds": 28.0, "cost_usd": 0.0015},
        {"model": "local:whisper-base", "status": "succeeded", "duration_seconds": 10.0,
         "billed_seconds": 9.0, "cost_usd": 0},
        {"model": None, "status": "failed", "duration_seconds": None, "billed_seconds": 0, "cost_usd": 0},
    ]  # fmt: skip
    table = cost_table(jobs)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if re.match(r"^[\w(]", line)}
    assert rows["gpt-4o-mini-transcribe"] == ["2", "90.0", "83.0", "0.004500"]
    assert rows["local:whisper-base"] == ["1", "10.0", "9.0", "0.000000"]
    assert rows["(failed)"] == ["1", "0.0", "0.0", "0.000000"]
    assert rows["total"] == ["4", "100.0", "92.0", "0.004500"]
    assert Decimal(rows["total"][3]) == Decimal("0.0045")
