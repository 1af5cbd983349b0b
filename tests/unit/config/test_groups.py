"""Settings by group: each flat BRIDGE_* name and config key lands in its group, and errors name it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import AuditMode, load_settings, setting_paths
from bridge.errors import ConfigurationError


@pytest.fixture
def required(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", "http://pacs.test/dicom-web")
    monkeypatch.setenv("BRIDGE_FHIR_URL", "http://ehr.test/fhir/R4")
    return monkeypatch


def error(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    return str(caught.value)


def test_flat_variables_fill_their_groups(required: pytest.MonkeyPatch) -> None:
    for name, value in {
        "BRIDGE_HTTP_RETRY_MAX_WAIT": "7",
        "BRIDGE_HTTP2": "false",
        "BRIDGE_GATEWAY": "false",
        "BRIDGE_AUDIT": "off",
        "BRIDGE_AUDIT_WINDOW": "5",
        "BRIDGE_SYNC_CONCURRENCY": "9",
        "BRIDGE_SYNC_CRON": "*/5 * * * *",
        "BRIDGE_SMART_LAUNCH_ISSUERS": "https://ehr-a.example/fhir, https://ehr-b.example/fhir",
        "BRIDGE_SMART_LAUNCH_CLIENT_ID": "launcher",
        "BRIDGE_PUBLIC_URL": "https://bridge.example",
        "BRIDGE_API_KEYS": "one,two",
        "BRIDGE_JWT_ALGORITHMS": "ES256",
    }.items():
        required.setenv(name, value)
    settings = load_settings()
    assert settings.http.retry_max_wait == 7 and settings.http.http2 is False
    assert settings.gateway.enabled is False
    assert settings.audit.mode is AuditMode.OFF and settings.audit.window == 5
    assert settings.sync.concurrency == 9 and settings.sync.cron == "*/5 * * * *"
    assert settings.smart_launch.issuers == ["https://ehr-a.example/fhir", "https://ehr-b.example/fhir"]
    assert [key.get_secret_value() for key in settings.api.keys] == ["one", "two"]
    assert settings.jwt.algorithms == ["ES256"]
    assert settings.http.timeout == 30.0  # the rest of the group keeps its defaults


def test_config_file_keys_flat_or_nested_fill_their_groups_and_the_environment_wins(
    required: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text("http_timeout: 5\nhttp:\n  retries: 2\ngateway: false\nsession_max_age: 600\n")
    required.setenv("BRIDGE_CONFIG_FILE", str(config))
    required.setenv("BRIDGE_HTTP_RETRIES", "1")
    settings = load_settings()
    assert (settings.http.timeout, settings.http.retries) == (5, 1)
    assert settings.gateway.enabled is False and settings.session.max_age == 600


def test_keyword_values_by_flat_name_fill_their_groups(required: pytest.MonkeyPatch) -> None:
    settings = load_settings(operator_role="ops", push_poll=2.5, audit="fhir", gateway=False)
    assert settings.operator.role == "ops" and settings.push.poll == 2.5
    assert settings.audit.mode is AuditMode.FHIR and settings.gateway.enabled is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BRIDGE_HTTP_TIMEOUT", "-1"),
        ("BRIDGE_GATEWAY", "perhaps"),
        ("BRIDGE_AUDIT", "sometimes"),
        ("BRIDGE_SESSION_CACHE_TTL", "600"),
        ("BRIDGE_RECONCILE_CRON", "every night"),
        ("BRIDGE_SMART_LAUNCH_ISSUERS", "ftp://ehr"),
    ],
)
def test_a_bad_grouped_value_is_named_by_its_flat_variable(
    required: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    message = error(required, **{variable: value})
    assert f"{variable}:" in message
    assert "BRIDGE_GATEWAY_ENABLED" not in message and "BRIDGE_AUDIT_MODE" not in message


def test_a_bad_grouped_value_in_the_config_file_names_its_key_and_line(
    required: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text("log_level: INFO\ngateway: perhaps\n")
    required.setenv("BRIDGE_CONFIG_FILE", str(config))
    assert f"{config}, line 2: key gateway:" in error(required)


def test_a_check_within_a_group_names_its_settings(required: pytest.MonkeyPatch) -> None:
    message = error(required, BRIDGE_JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----")
    assert "BRIDGE_JWT_AUDIENCE is required" in message


def test_each_flat_name_is_one_setting() -> None:
    paths = setting_paths()
    assert len(set(paths.values())) == len(paths)
    assert paths["http2"] == ("http", "http2") and paths["gateway"] == ("gateway", "enabled")
    assert paths["fhir_client_id"] == ("fhir", "client_id") and paths["state_url"] == ("state_url",)


def test_the_settings_import_nothing_above_them() -> None:
    """Config is the bottom layer: loading it pulls in no client, API, sync or mapping module."""
    code = "import sys, bridge.config; print(' '.join(m for m in sys.modules if m.startswith('bridge')))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert {name.split(".")[1] for name in loaded.split() if "." in name} <= {"config", "errors"}
