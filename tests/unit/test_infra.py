"""infra/: the Prometheus config, the Grafana dashboard and the Kubernetes manifests parse and agree with
the code (metric names, settings names, queue names, CLI commands)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic import AliasChoices

from core import metrics, names
from core.settings import Settings
from core.statuses import JobStatus, WebhookStatus

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S = INFRA / "k8s"

# Variables that are not settings but that voxq or its libraries read.
NON_SETTINGS_ENV = {"PROMETHEUS_MULTIPROC_DIR"}


def settings_env_names() -> set[str]:
    """Every environment variable name Settings reads."""
    out: set[str] = set()
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            out.update(str(choice) for choice in alias.choices)
        else:
            out.add("VOXQ_" + name.upper())
    return out


def exposed_samples() -> dict[str, str]:
    """Sample name (as Prometheus sees it) -> family name, for every family voxq exports."""
    samples: dict[str, str] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (described,) = value.describe()
        family, kind = described.name, described.type
        if kind == "counter":
            samples[family + "_total"] = family
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                samples[family + suffix] = family
        else:
            samples[family] = family
    for family in metrics.FLEET_FAMILIES:
        samples[family] = family
    return samples


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def env_file(name: str) -> dict[str, str]:
    """A kustomize env file (KEY=VALUE lines, # comments) of infra/k8s."""
    lines = [line for line in (K8S / name).read_text().splitlines() if line.strip() and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


def generated_secrets() -> dict[str, list[str]]:
    """The Secrets kustomize generates: name -> the env files they are made from."""
    return {g["name"]: list(g["envs"]) for g in kustomization()["secretGenerator"]}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# --- Prometheus ------------------------------------------------------------------------------------


def test_prometheus_config_scrapes_api_and_workers() -> None:
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"voxq-api", "voxq-worker", "voxq-kubernetes-pods"} <= set(jobs)
    api_targets = [t for sc in jobs["voxq-api"]["static_configs"] for t in sc["targets"]]
    (worker_sd,) = jobs["voxq-worker"]["dns_sd_configs"]
    config_map = by_kind("ConfigMap")["voxq-config"]["data"]
    assert api_targets == [f"api:{config_map['VOXQ_API_PORT']}"]
    assert sorted(worker_sd["names"]) == ["local-worker", "worker"]
    assert str(worker_sd["port"]) == config_map["VOXQ_WORKER_METRICS_PORT"]
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert job["job_name"].startswith("voxq-")  # VoxqTargetDown watches `job=~"voxq-.*"`
    relabel = jobs["voxq-kubernetes-pods"]["relabel_configs"]
    assert relabel[0]["action"] == "keep" and "prometheus_io_scrape" in relabel[0]["source_labels"][0]
    # The API's /metrics needs VOXQ_METRICS_TOKEN: every job that can reach an API sends it from a file.
    for name in ("voxq-api", "voxq-kubernetes-pods"):
        auth = jobs[name]["authorization"]
        assert auth["type"] == "Bearer" and auth["credentials_file"].startswith("/")


def test_alert_rules_parse_and_query_existing_metrics() -> None:
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    samples = exposed_samples()
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({a["alert"] for a in alerts}) == len(alerts) >= 5
    for rule in alerts:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        expr = rule["expr"]
        names_used = re.findall(r"\bvoxq_[a-z0-9_]+", expr)
        assert all(n in samples for n in names_used), (rule["alert"], names_used)
        assert names_used or re.match(r"up\{", expr), rule["alert"]  # Prometheus' own `up` otherwise
        for opening, closing in ("()", "[]", "{}"):
            assert expr.count(opening) == expr.count(closing), expr
        for status in re.findall(r'status="([a-z_]+)"', expr):
            assert status in {s.value for s in JobStatus}
        for outcome in re.findall(r'outcome=~?"([a-z_|]+)"', expr):
            assert set(outcome.split("|")) <= {s.value for s in WebhookStatus}


def test_an_alert_fires_when_any_scrape_target_is_down() -> None:
    config = yaml.safe_load((INFRA / "prometheus" / "prometheus.yml").read_text())
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    down = [a for a in alerts.values() if re.fullmatch(r"up\{job=~\"(.+)\"\} == 0", a["expr"])]
    assert len(down) == 1, "one alert on `up == 0`"
    (rule,) = down
    pattern = re.fullmatch(r"up\{job=~\"(.+)\"\} == 0", rule["expr"]).group(1)  # type: ignore[union-attr]
    for job in config["scrape_configs"]:  # Prometheus anchors label regexes: the whole name must match
        assert re.fullmatch(pattern, job["job_name"]), job["job_name"]
    assert rule["labels"]["severity"] == "critical" and rule["for"]
    assert "{{ $labels.job }}" in rule["annotations"]["summary"]


def test_alerts_are_sent_to_an_alertmanager() -> None:
    text = (INFRA / "prometheus" / "prometheus.yml").read_text()
    config = yaml.safe_load(text)
    (manager,) = config["alerting"]["alertmanagers"]
    targets = [t for sc in manager["static_configs"] for t in sc["targets"]]
    assert targets and all(re.fullmatch(r"[a-z0-9.-]+:\d+", t) for t in targets), targets
    # Documented where an operator reads it: what the target is and what happens without one.
    before = text[: text.index("alerting:")].splitlines()[-4:]
    assert any("Alertmanager" in line and line.startswith("#") for line in before)


# --- Grafana ---------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((INFRA / "grafana" / "voxq-dashboard.json").read_text())
    return loaded


def test_dashboard_queries_only_existing_metrics_and_covers_every_family() -> None:
    samples = exposed_samples()
    used: set[str] = set()
    panels = dashboard()["panels"]
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\bvoxq_[a-z0-9_]+", target["expr"]):
                assert name in samples, f"panel {panel['title']!r} queries unknown metric {name}"
                used.add(samples[name])
    assert set(samples.values()) <= used, f"families without a panel: {set(samples.values()) - used}"


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        # Balanced brackets: a cheap check that each query is at least well formed.
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "[]", "{}"):
                assert expr.count(opening) == expr.count(closing), expr


def test_metric_labels_carry_no_ids() -> None:
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            assert not any(label.endswith("id") for label in value._labelnames), value._name


# --- Kubernetes ------------------------------------------------------------------------------------


def test_every_manifest_parses_with_kind_and_name() -> None:
    docs = k8s_docs()
    assert docs
    for filename, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), filename
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], filename
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "voxq", filename


def test_kustomization_lists_every_manifest() -> None:
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization()["resources"]) == files


def test_kustomization_applies_no_example_secret() -> None:
    # `kubectl apply -k` must not create Secrets with placeholder values: no Secret manifest is applied;
    # both are generated from env files the operator writes, which git ignores.
    for name in kustomization()["resources"]:
        text = (K8S / name).read_text()
        assert "change-me" not in text.lower(), name
        assert all(d["kind"] != "Secret" for d in yaml.safe_load_all(text) if d), name
    generated = generated_secrets()
    assert set(generated) == {"voxq-secrets", "voxq-keda-redis"}
    ignored = (INFRA.parent / ".gitignore").read_text().splitlines()
    for files in generated.values():
        for env in files:
            assert f"infra/k8s/{env}" in ignored, env
            assert not (K8S / env).exists() or f"infra/k8s/{env}" in ignored
            # The operator's starting point: the same keys, every value empty (so nothing weak slips by).
            example = env_file(f"{env}.example")
            assert example and all(value == "" for value in example.values()), env
    # KEDA's TriggerAuthentication names its Secret, and kustomize does not rename references in custom
    # resources: that one keeps its plain name.
    keda = next(g for g in kustomization()["secretGenerator"] if g["name"] == "voxq-keda-redis")
    assert keda["options"]["disableNameSuffixHash"] is True
    assert env_file("keda-redis.env.example").keys() == {"password"}


def test_required_workloads_exist() -> None:
    deployments = by_kind("Deployment")
    assert {"voxq-api", "voxq-worker", "voxq-local-worker", "voxq-flower", "voxq-beat"} <= set(deployments)
    assert deployments["voxq-beat"]["spec"]["replicas"] == 1
    assert deployments["voxq-beat"]["spec"]["strategy"]["type"] == "Recreate"
    services = by_kind("Service")
    assert {"voxq-api", "voxq-flower"} <= set(services)


def test_deployment_selectors_and_services_match() -> None:
    deployments = by_kind("Deployment")
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        matched = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, name
        port_names = {p["name"] for c in containers(matched[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, name


def test_env_names_are_settings() -> None:
    known = settings_env_names() | NON_SETTINGS_ENV
    config = by_kind("ConfigMap")["voxq-config"]["data"]
    (secret_env,) = generated_secrets()["voxq-secrets"]
    secret = env_file(f"{secret_env}.example")
    assert set(config) <= known, set(config) - known
    assert set(secret) <= known, set(secret) - known
    # Secrets are not in the ConfigMap.
    for name in (
        "OPENAI_API_KEY",
        "VOXQ_S3_SECRET_ACCESS_KEY",
        "VOXQ_SECRETS_KEY",
        "VOXQ_WEBHOOK_SECRET",
        "VOXQ_FLOWER_PASSWORD",
    ):
        assert name in secret and name not in config
    for name, dep in by_kind("Deployment").items():
        for container in containers(dep):
            for env in container.get("env", []):
                assert env["name"] in known, (name, env["name"])
            refs = {next(iter(ref.values()))["name"] for ref in container.get("envFrom", [])}
            assert refs == {"voxq-config", "voxq-secrets"}, name
    # The example settings themselves are valid (apart from the placeholders production refuses).
    values = {**config, **secret, "VOXQ_ENVIRONMENT": "dev"}
    settings = Settings.model_validate(
        {k.removeprefix("VOXQ_").lower(): v for k, v in values.items() if k.startswith("VOXQ_")}
    )
    assert settings.worker_metrics_port == 9808 and settings.worker_metrics_host == "0.0.0.0"


def test_production_refuses_the_example_secrets() -> None:
    secret = env_file("secrets.env.example")
    with pytest.raises(ValueError, match="real secret"):
        Settings.model_validate(
            {
                "environment": "production",
                "s3_secret_access_key": secret["VOXQ_S3_SECRET_ACCESS_KEY"],
                "webhook_secret": "x" * 32,
                "flower_password": "y" * 32,
            }
        )


def _command(container: dict[str, Any]) -> list[str]:
    return [str(part) for part in container.get("command", []) + container.get("args", [])]


def _queues(deployment: dict[str, Any]) -> list[str]:
    command = _command(deployment["spec"]["template"]["spec"]["containers"][0])
    return command[command.index("-Q") + 1].split(",")


def test_workers_consume_every_queue_and_are_probed_by_worker_health() -> None:
    deployments = by_kind("Deployment")
    worker, local = deployments["voxq-worker"], deployments["voxq-local-worker"]
    assert set(_queues(worker)) | set(_queues(local)) == set(names.ALL_QUEUES)
    assert _queues(local) == [names.QUEUE_LOCAL, names.QUEUE_ALIGN]
    for dep, node in ((worker, "worker@%h"), (local, "local@%h")):
        container = dep["spec"]["template"]["spec"]["containers"][0]
        command = _command(container)
        assert command[:5] == ["celery", "--quiet", "-A", "worker.app", "worker"]
        assert "-E" in command  # task events, for Flower
        # `voxq worker-health` pings exactly these node names on its own host.
        assert command[command.index("-n") + 1] == node
        probe = container["livenessProbe"]["exec"]["command"]
        assert probe[:2] == ["voxq", "worker-health"]
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == "9808"
        assert {p["containerPort"] for p in container["ports"]} == {9808}


def test_voxq_commands_in_manifests_exist() -> None:
    from voxq.cli import build_parser

    parser = build_parser()
    invocations: list[list[str]] = []
    for _, dep in by_kind("Deployment").items():
        for container in containers(dep):
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                exec_ = container.get(probe, {}).get("exec")
                if exec_ and exec_["command"][0] == "voxq":
                    invocations.append([str(part) for part in exec_["command"]])
            command = _command(container)
            if command and command[0] == "voxq":
                invocations.append(command)
    assert {"worker-health", "flower", "migrate"} <= {args[1] for args in invocations}
    # Each invocation parses with the real parser: the subcommand and flags like --timeout exist (an
    # unknown one exits with argparse's usage error).
    for args in invocations:
        parser.parse_args(args[1:])


def test_keda_scales_workers_on_transcribe_queue_lengths() -> None:
    deployments = by_kind("Deployment")
    scaled = by_kind("ScaledObject")
    worker = scaled["voxq-worker"]
    assert worker["apiVersion"].startswith("keda.sh/")
    assert worker["spec"]["scaleTargetRef"]["name"] in deployments
    lists = {t["metadata"]["listName"] for t in worker["spec"]["triggers"] if t["type"] == "redis"}
    assert {names.QUEUE_TRANSCRIBE_HIGH, names.QUEUE_TRANSCRIBE, names.QUEUE_TRANSCRIBE_LOW} <= lists
    assert lists <= set(_queues(deployments["voxq-worker"]))
    auth = by_kind("TriggerAuthentication")
    for obj in scaled.values():
        assert obj["spec"]["scaleTargetRef"]["name"] in deployments
        assert obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"]
        for trigger in obj["spec"]["triggers"]:
            assert int(trigger["metadata"]["listLength"]) > 0
            assert trigger["metadata"]["listName"] in names.ALL_QUEUES
            assert trigger["authenticationRef"]["name"] in auth
    refs = {(ref["name"], ref["key"]) for a in auth.values() for ref in a["spec"]["secretTargetRef"]}
    for name, key in refs:
        (env,) = generated_secrets()[name]
        assert key in env_file(f"{env}.example"), (name, key)


def test_keda_wakes_a_worker_scaled_to_zero_for_every_queue_it_consumes() -> None:
    deployments = by_kind("Deployment")
    for obj in by_kind("ScaledObject").values():
        if obj["spec"]["minReplicaCount"] > 0:
            continue
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"] if t["type"] == "redis"}
        queues = set(_queues(deployments[obj["spec"]["scaleTargetRef"]["name"]]))
        assert queues <= lists, f"{obj['metadata']['name']}: nothing wakes it for {sorted(queues - lists)}"


def test_keda_managed_deployments_leave_the_replica_count_to_keda() -> None:
    deployments = by_kind("Deployment")
    scaled = {obj["spec"]["scaleTargetRef"]["name"] for obj in by_kind("ScaledObject").values()}
    assert scaled == {"voxq-worker", "voxq-local-worker"}
    for name in scaled:
        # A `replicas:` here would reset KEDA's count on every `kubectl apply`.
        assert "replicas" not in deployments[name]["spec"], name


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True}


@pytest.mark.parametrize("name", ["voxq-api", "voxq-worker", "voxq-local-worker", "voxq-beat", "voxq-flower"])
def test_every_pod_runs_with_the_same_security_settings(name: str) -> None:
    deployment = by_kind("Deployment")[name]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"] == POD_SECURITY
    for container in spec["containers"]:
        assert container["securityContext"] == CONTAINER_SECURITY, container["name"]
        # A read-only root needs somewhere to write: the data directory (VOXQ_DATA_DIR) is a volume.
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert mounts["/var/lib/voxq"] in {v["name"] for v in spec["volumes"]}, container["name"]
