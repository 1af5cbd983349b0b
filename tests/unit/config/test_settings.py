"""Settings: every problem is a ConfigurationError that names the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import PatientPolicy, WriteStrategy, get_settings, load_settings
from bridge.errors import ConfigurationError

DICOMWEB = "http://pacs.test/dicom-web"
FHIR = "http://ehr.test/fhir/R4"


@pytest.fixture
def required(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", DICOMWEB)
    monkeypatch.setenv("BRIDGE_FHIR_URL", FHIR)
    return monkeypatch


def error(**overrides: object) -> str:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(**overrides)
    return str(caught.value)


def test_missing_required_settings_are_named() -> None:
    message = error()
    assert "BRIDGE_DICOMWEB_URL" in message
    assert "BRIDGE_FHIR_URL" in message
    assert "required" in message


def test_the_minimum_configuration_loads_with_defaults(required: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.dicomweb_base == DICOMWEB
    assert settings.fhir_base == FHIR
    assert settings.patient_policy is PatientPolicy.MATCH_OR_CREATE
    assert settings.write_strategy is WriteStrategy.CLIENT_ID


def test_public_url_defaults_to_the_dicomweb_url(required: pytest.MonkeyPatch) -> None:
    assert load_settings().public_base == DICOMWEB


def test_public_url_can_differ_from_the_polled_one(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_DICOMWEB_PUBLIC_URL", "https://pacs.example.org/wado/")
    settings = load_settings()
    assert settings.public_base == "https://pacs.example.org/wado"
    assert settings.dicomweb_base == DICOMWEB


@pytest.mark.parametrize("value", ["not a url", "ftp://pacs/dicom-web", "pacs.test/dicom-web"])
def test_a_malformed_url_is_named(required: pytest.MonkeyPatch, value: str) -> None:
    required.setenv("BRIDGE_DICOMWEB_URL", value)
    assert "BRIDGE_DICOMWEB_URL" in error()


def test_a_bad_patient_policy_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_PATIENT_POLICY", "create-everything")
    message = error()
    assert "BRIDGE_PATIENT_POLICY" in message
    assert "match-only" in message  # says what would be accepted


def test_patient_policy_values(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_PATIENT_POLICY", "logical")
    assert load_settings().patient_policy is PatientPolicy.LOGICAL


def test_issuer_maps_are_read_as_json(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_PATIENT_ISSUER_SYSTEMS", '{"HOSP-A": "urn:oid:1.2.3"}')
    assert load_settings().patient_issuer_systems == {"HOSP-A": "urn:oid:1.2.3"}


@pytest.mark.parametrize("variable", ["BRIDGE_PATIENT_ISSUER_SYSTEMS", "BRIDGE_ACCESSION_ISSUER_SYSTEMS"])
def test_an_issuer_map_with_a_system_that_is_not_a_uri_is_named(
    required: pytest.MonkeyPatch, variable: str
) -> None:
    required.setenv(variable, '{"HOSP-A": "hospital a"}')
    message = error()
    assert variable in message
    assert "absolute URI" in message


def test_an_issuer_map_that_is_not_json_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_PATIENT_ISSUER_SYSTEMS", "HOSP-A=urn:oid:1.2.3")
    assert "BRIDGE_PATIENT_ISSUER_SYSTEMS" in error()


def test_a_bad_default_patient_system_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_PATIENT_IDENTIFIER_SYSTEM", "MRN")
    assert "BRIDGE_PATIENT_IDENTIFIER_SYSTEM" in error()


def test_an_unknown_time_zone_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_DICOM_TIMEZONE", "Europe/Atlantis")
    assert "BRIDGE_DICOM_TIMEZONE" in error()


def test_a_bad_source_name_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_SOURCE_NAME", "has spaces/and slashes")
    assert "BRIDGE_SOURCE_NAME" in error()


@pytest.mark.parametrize(
    ("variable", "value"),
    [("BRIDGE_QIDO_PAGE_SIZE", "0"), ("BRIDGE_HTTP_RETRIES", "-1"), ("BRIDGE_SYNC_CONCURRENCY", "many")],
)
def test_out_of_range_numbers_are_named(required: pytest.MonkeyPatch, variable: str, value: str) -> None:
    required.setenv(variable, value)
    assert variable in error()


def test_a_bad_state_url_is_named(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_STATE_URL", "not a database")
    assert "BRIDGE_STATE_URL" in error()


def test_a_mistyped_variable_is_refused_by_name(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_FHIR_ULR", FHIR)
    message = error()
    assert "BRIDGE_FHIR_ULR" in message
    assert "not a known setting" in message


def test_a_yaml_config_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\nsource_name: ct-archive\n"
        "patient_issuer_systems:\n  HOSP-A: urn:oid:1.2.3\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    settings = load_settings()
    assert settings.source_name == "ct-archive"
    assert settings.patient_issuer_systems == {"HOSP-A": "urn:oid:1.2.3"}
    assert settings.fhir_base == FHIR


def test_the_environment_wins_over_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\nsource_name: from-file\n", encoding="utf-8"
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    monkeypatch.setenv("BRIDGE_SOURCE_NAME", "from-env")
    assert load_settings().source_name == "from-env"


def test_an_unknown_key_in_the_config_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\npatient_polcy: logical\n", encoding="utf-8"
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    assert "patient_polcy".upper() in error()


def test_a_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(tmp_path / "nowhere.yaml"))
    message = error()
    assert "BRIDGE_CONFIG_FILE" in message
    assert "nowhere.yaml" in message


@pytest.mark.parametrize("text", ["dicomweb_url: [unclosed\n", "- a\n- list\n"], ids=["bad-yaml", "a-list"])
def test_a_malformed_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(text, encoding="utf-8")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    assert "BRIDGE_CONFIG_FILE" in error()


def test_explicit_values_override_everything(required: pytest.MonkeyPatch) -> None:
    assert load_settings(source_name="explicit").source_name == "explicit"


def test_get_settings_is_cached_until_cleared(required: pytest.MonkeyPatch) -> None:
    first = get_settings()
    required.setenv("BRIDGE_SOURCE_NAME", "changed")
    assert get_settings() is first
    get_settings.cache_clear()
    assert get_settings().source_name == "changed"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BRIDGE_HTTP_DEADLINE", "0"),
        ("BRIDGE_HTTP_DEADLINE", "soon"),
        ("BRIDGE_DICOMWEB_MAX_PAGE_BYTES", "10"),
        ("BRIDGE_DICOMWEB_MAX_SERIES_BYTES", "-1"),
        ("BRIDGE_DICOMWEB_MAX_PAGES", "0"),
        ("BRIDGE_DICOMWEB_MAX_SERIES", "0"),
        ("BRIDGE_FHIR_MAX_RESPONSE_BYTES", "1k"),
        ("BRIDGE_API_LINKS_MAX_SERIES", "0"),
        ("BRIDGE_API_SYNC_RATE", "0"),
        ("BRIDGE_API_ALLOW_ANONYMOUS", "perhaps"),
    ],
)
def test_a_bad_limit_stops_start_up_naming_it(required: pytest.MonkeyPatch, name: str, value: str) -> None:
    required.setenv(name, value)
    with pytest.raises(ConfigurationError, match=name):
        load_settings()


def test_limits_default_far_above_real_archives(required: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.http_deadline == 300
    assert settings.dicomweb_max_series == 10_000
    assert settings.dicomweb_max_page_bytes == 16 * 1024 * 1024
    assert settings.api_allow_anonymous is False
