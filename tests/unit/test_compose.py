"""docker-compose.yml and infra/Dockerfile agree with the code (Docker cannot run here, so we read them)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from core import names
from core.settings import Settings
from voxq.devstack import LOCAL_WORKER_QUEUES, SHARED_ENV, WORKER_QUEUES

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
APP_SERVICES = ("migrate", "api", "worker", "local-worker", "beat", "flower")
LONG_RUNNING = ("postgres", "redis", "minio", "api", "worker", "local-worker", "flower")
INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?+])?([^}]*)\}")


def _env_names() -> set[str]:
    """Every environment variable name Settings reads (prefix + field, or the field's aliases)."""
    found: set[str] = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is not None and hasattr(alias, "choices"):
            found.update(str(choice) for choice in alias.choices)
        else:
            found.add(f"VOXQ_{name.upper()}")
    return found


SETTINGS_ENV = _env_names()
SECRET_ENV = {
    f"VOXQ_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if field.annotation is SecretStr  # required secrets; the optional OpenAI key is `SecretStr | None`
}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def test_every_voxq_variable_is_a_settings_field() -> None:
    used: set[str] = set()
    for name, service in SERVICES.items():
        for key in _environment(service):
            if key.startswith("VOXQ_") or key.startswith("OPENAI_"):
                assert key in SETTINGS_ENV, f"{name}: {key} is not read by core.settings.Settings"
                used.add(key)
    for match in INTERPOLATION.finditer(COMPOSE_TEXT):
        if match.group(1).startswith("VOXQ_"):
            assert match.group(1) in SETTINGS_ENV, f"${{{match.group(1)}}} is not a Settings field"
    # The core connection settings reach every voxq process.
    for service in APP_SERVICES:
        env = _environment(SERVICES[service])
        for key in ("VOXQ_DATABASE_URL", "VOXQ_REDIS_URL", "VOXQ_S3_ENDPOINT_URL", "VOXQ_S3_BUCKET"):
            assert key in env, f"{service} lacks {key}"
        assert env["VOXQ_ENVIRONMENT"] == "production"


def test_required_secrets_use_fail_fast_interpolation() -> None:
    assert {"VOXQ_S3_SECRET_ACCESS_KEY", "VOXQ_SECRETS_KEY", "VOXQ_FLOWER_PASSWORD"} <= SECRET_ENV
    required = SECRET_ENV | {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "VOXQ_S3_ACCESS_KEY_ID"}
    for match in INTERPOLATION.finditer(COMPOSE_TEXT):
        if match.group(1) in required:
            assert match.group(2) == ":?", f"${{{match.group(1)}}} must be ${{{match.group(1)}:?...}}"
    for service in APP_SERVICES:
        env = _environment(SERVICES[service])
        for key in SECRET_ENV:
            assert INTERPOLATION.fullmatch(env[key]) and ":?" in env[key], f"{service}: {key} not required"
        # Passwords come from the operator's .env, never a literal in the file.
        assert "${POSTGRES_PASSWORD:?" in env["VOXQ_DATABASE_URL"]
        assert "${REDIS_PASSWORD:?" in env["VOXQ_REDIS_URL"]


def test_env_example_lists_every_required_variable() -> None:
    example = (ROOT / "infra" / ".env.example").read_text()
    defined = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and line[0] != "#"}
    required = {m.group(1) for m in INTERPOLATION.finditer(COMPOSE_TEXT) if m.group(2) == ":?"}
    assert required and required <= defined, required - defined
    for line in example.splitlines():
        key, _, value = line.partition("=")
        if key in required:
            assert value == "", f"{key} must be empty in the example so compose refuses to start unset"


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_wait_for_dependencies(service: str) -> None:
    deps = SERVICES[service]["depends_on"]
    assert deps["postgres"]["condition"] == "service_healthy"
    if service != "migrate":
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["bucket-init"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["minio"]["condition"] == "service_healthy"


def test_one_shot_services() -> None:
    assert _command(SERVICES["migrate"])[:2] == ["voxq", "migrate"]
    assert SERVICES["migrate"]["restart"] == "no"
    assert SERVICES["bucket-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(SERVICES["bucket-init"]["entrypoint"])


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_long_running_services_have_healthchecks(service: str) -> None:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test and test[0] in {"CMD", "CMD-SHELL"}


def test_workers_consume_the_queues_in_priority_order() -> None:
    worker = _command(SERVICES["worker"])
    assert worker[:4] == ["celery", "-A", "worker.app", "worker"] and "-E" in worker
    assert worker[worker.index("-Q") + 1].split(",") == list(WORKER_QUEUES)
    assert names.QUEUE_LOCAL not in WORKER_QUEUES and names.QUEUE_ALIGN not in WORKER_QUEUES
    assert set(WORKER_QUEUES) | {names.QUEUE_LOCAL, names.QUEUE_ALIGN} == set(names.ALL_QUEUES)
    local = _command(SERVICES["local-worker"])
    # The align stage's CPU work runs beside the local engine, never on the provider lanes' worker.
    assert "-E" in local and local[local.index("-Q") + 1] == LOCAL_WORKER_QUEUES == "local,align"
    assert local[local.index("-c") + 1] == "${VOXQ_LOCAL_CONCURRENCY:-1}"
    for service in ("worker", "local-worker"):
        assert SERVICES[service]["healthcheck"]["test"] == ["CMD", "voxq", "worker-health"]


def test_worker_is_scalable() -> None:
    # `--scale worker=N` fails with a fixed container name or a fixed host port.
    for service in ("worker", "local-worker"):
        assert "container_name" not in SERVICES[service]
        assert "ports" not in SERVICES[service]


def test_published_ports_bind_loopback_only() -> None:
    published = {name: s["ports"] for name, s in SERVICES.items() if "ports" in s}
    assert set(published) == {"api", "flower"}
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def _redis_config() -> dict[str, str]:
    """The redis.conf compose mounts into the redis service: directive -> value."""
    redis = SERVICES["redis"]
    (mount,) = redis["configs"]
    assert _command(redis) == ["redis-server", mount["target"]]
    content = COMPOSE["configs"][mount["source"]]["content"]
    lines = [
        line.strip() for line in content.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    return dict(line.split(None, 1) for line in lines)


def test_redis_never_evicts() -> None:
    config = _redis_config()
    assert config["maxmemory-policy"] == "noeviction"
    assert config["appendonly"] == "yes"


def test_redis_password_is_in_its_config_not_on_a_command_line() -> None:
    # Any process on the host can read a command line (ps); the config file is the container's.
    config = _redis_config()
    assert config["requirepass"].startswith("${REDIS_PASSWORD:?")
    redis = SERVICES["redis"]
    assert not any("REDIS_PASSWORD" in part or "requirepass" in part for part in _command(redis))
    # redis-cli (the healthcheck) reads the password from REDISCLI_AUTH, not from `-a` in its argv.
    assert _environment(redis)["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name, service in SERVICES.items():
        for part in _command(service) + [str(p) for p in service.get("healthcheck", {}).get("test", [])]:
            assert "REDIS_PASSWORD" not in part and "requirepass" not in part, name


@pytest.mark.parametrize("service", ["minio", "bucket-init"])
def test_minio_images_are_pinned_to_a_release(service: str) -> None:
    image = SERVICES[service]["image"]
    repository, _, tag = image.rpartition(":")
    assert repository.rsplit("/", 2)[-2:] == ["minio", "minio" if service == "minio" else "mc"]
    assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), image


def test_every_image_names_a_version() -> None:
    for name, service in SERVICES.items():
        image = service.get("image")
        if image is None or image.startswith("${IMAGE"):  # voxq's own image, built from this commit
            continue
        tag = image.rpartition(":")[2] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: {image} is not pinned"


def test_flower_requires_basic_auth() -> None:
    flower = SERVICES["flower"]
    assert _command(flower)[:2] == ["voxq", "flower"]  # refuses to start without a real password
    env = _environment(flower)
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert env["VOXQ_FLOWER_PASSWORD"].startswith("${VOXQ_FLOWER_PASSWORD:?")


def test_single_beat_with_persistent_schedule() -> None:
    beat = SERVICES["beat"]
    command = _command(beat)
    assert command[:4] == ["celery", "-A", "worker.app", "beat"]
    schedule = command[command.index("-s") + 1]
    assert any(schedule.startswith(v.split(":")[1]) for v in beat["volumes"])
    assert "deploy" not in beat  # never replicated


def test_dockerfile_is_multistage_and_runs_as_non_root() -> None:
    lines = [line.strip() for line in (ROOT / "infra" / "Dockerfile").read_text().splitlines()]
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage build expected"
    runtime = lines[froms[-1] :]
    assert any(line.startswith("COPY --from=") for line in runtime)
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert any("pip install" in line and ".[local]" in line for line in lines)


def test_prometheus_scrapes_the_worker_metrics_port() -> None:
    prometheus = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    workers = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "voxq-worker")
    sd = workers["dns_sd_configs"][0]
    for service in ("worker", "local-worker"):
        assert service in sd["names"]
        env = _environment(SERVICES[service])
        assert int(env["VOXQ_WORKER_METRICS_PORT"]) == sd["port"]
        assert env["VOXQ_WORKER_METRICS_HOST"] == "0.0.0.0"


def test_voxq_dev_passes_children_the_variables_compose_passes() -> None:
    assert set(COMPOSE["x-voxq-env"]) == set(SHARED_ENV)
    for service in APP_SERVICES:
        assert set(SHARED_ENV) <= set(_environment(SERVICES[service]))
