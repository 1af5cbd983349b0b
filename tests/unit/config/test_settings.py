"""Settings: every problem is a ConfigurationError that names the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import get_settings, load_settings
from bridge.errors import ConfigurationError
from bridge.sync.policy import PatientPolicy, WriteStrategy

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
    assert settings.dicomweb.base == DICOMWEB
    assert settings.fhir.base == FHIR
    assert settings.patient_policy is PatientPolicy.MATCH_OR_CREATE
    assert settings.write_strategy is WriteStrategy.CLIENT_ID


def test_public_url_defaults_to_the_dicomweb_url(required: pytest.MonkeyPatch) -> None:
    assert load_settings().dicomweb.public_base == DICOMWEB


def test_public_url_can_differ_from_the_polled_one(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_DICOMWEB_PUBLIC_URL", "https://pacs.example.org/wado/")
    settings = load_settings()
    assert settings.dicomweb.public_base == "https://pacs.example.org/wado"
    assert settings.dicomweb.base == DICOMWEB


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
    assert settings.fhir.base == FHIR


def test_the_environment_wins_over_the_config_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\nsource_name: from-file\n", encoding="utf-8"
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    monkeypatch.setenv("BRIDGE_SOURCE_NAME", "from-env")
    assert load_settings().source_name == "from-env"


def test_an_unknown_key_in_the_config_file_is_named_with_its_file_line_and_the_likely_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\npatient_polcy: logical\n", encoding="utf-8"
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    message = error()
    assert f"{config}, line 3: key patient_polcy: is not a known setting" in message
    assert "did you mean patient_policy?" in message
    assert "BRIDGE_PATIENT_POLCY" not in message  # it is no environment variable


def test_a_bad_value_in_the_config_file_names_its_line_and_nested_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(f"dicomweb_url: {DICOMWEB}\nfhir:\n  url: {FHIR}\n  auth: kerberos\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    assert f"{config}, line 4: key fhir.auth:" in error()


def test_a_bad_value_from_the_environment_is_named_as_the_variable_even_with_a_config_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(f"dicomweb_url: {DICOMWEB}\nfhir_url: {FHIR}\nhttp_timeout: 5\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    monkeypatch.setenv("BRIDGE_HTTP_TIMEOUT", "-1")  # the environment wins, so its value is at fault
    message = error()
    assert "BRIDGE_HTTP_TIMEOUT:" in message and "line" not in message


def test_a_mistyped_variable_is_answered_with_the_likely_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URLL", DICOMWEB)
    monkeypatch.setenv("BRIDGE_FHIR_URL", FHIR)
    assert "BRIDGE_DICOMWEB_URLL: is not a known setting (did you mean BRIDGE_DICOMWEB_URL?)" in error()


def test_a_url_without_a_scheme_is_answered_with_a_scheme_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", "pacs.example.org/dicom-web")
    monkeypatch.setenv("BRIDGE_FHIR_URL", FHIR)
    message = error()
    assert "BRIDGE_DICOMWEB_URL: is not an absolute URL: write it with its scheme, e.g. https://" in message
    assert "relative URL without a base" not in message


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


# Nested upstream settings: the flat names are the nested model's fields --------------------------


def test_flat_upstream_variables_fill_the_nested_settings(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_FHIR_CLIENT_ID", "bridge")
    required.setenv("BRIDGE_DICOMWEB_VERIFY_TLS", "false")
    settings = load_settings()
    assert settings.fhir.client_id == "bridge"
    assert settings.dicomweb.verify_tls is False
    assert settings.fhir.verify_tls is True


def test_flat_and_nested_config_file_keys_both_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(
        f"dicomweb_url: {DICOMWEB}\nfhir_client_id: flat\nfhir:\n  url: {FHIR}\n  scopes: system/x.read\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    settings = load_settings()
    assert (settings.fhir.base, settings.fhir.client_id, settings.fhir.scopes) == (
        FHIR,
        "flat",
        "system/x.read",
    )


def test_the_environment_wins_over_a_flat_config_file_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(f"dicomweb_url: {DICOMWEB}\nfhir_url: http://from-file/fhir\n", encoding="utf-8")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))
    monkeypatch.setenv("BRIDGE_FHIR_URL", FHIR)
    assert load_settings().fhir.base == FHIR


def test_a_missing_upstream_url_is_named_by_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRIDGE_DICOMWEB_URL", DICOMWEB)
    monkeypatch.setenv("BRIDGE_FHIR_CLIENT_ID", "bridge")
    assert "BRIDGE_FHIR_URL: is required but not set" in error()


def test_a_bad_nested_value_is_named_by_its_variable(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_FHIR_AUTH", "kerberos")
    assert "BRIDGE_FHIR_AUTH" in error()


# Several sources with secrets from files ---------------------------------------------------------


def _sources_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(text, encoding="utf-8")
    monkeypatch.setenv("BRIDGE_CONFIG_FILE", str(config))


def test_sources_with_password_files_load_and_inherit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # This configuration once failed with "set BRIDGE_FHIR_PASSWORD or BRIDGE_FHIR_PASSWORD_FILE, not both".
    (tmp_path / "fhir").write_text("fhir-pass\n")
    (tmp_path / "pacs").write_text("pacs-pass\n")
    (tmp_path / "pacs-b").write_text("pacs-b-pass\n")
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\nfhir_auth: basic\nfhir_username: bridge\n"
        f"fhir_password_file: {tmp_path / 'fhir'}\n"
        f"dicomweb_auth: basic\ndicomweb_username: pacs\ndicomweb_password_file: {tmp_path / 'pacs'}\n"
        "sources:\n"
        "  - name: a\n    dicomweb_url: http://a.test/dw\n"
        "  - name: b\n    dicomweb_url: http://b.test/dw\n    dicomweb_public_url: https://b.example/dw\n"
        f"    dicomweb_password_file: {tmp_path / 'pacs-b'}\n",
    )
    settings = load_settings()
    a, b = settings.each_source()
    secret = settings.fhir.secret("password")
    assert secret is not None and secret.get_secret_value() == "fhir-pass"
    assert [(s.name, s.dicomweb.username) for s in (a, b)] == [("a", "pacs"), ("b", "pacs")]
    secrets = [s.dicomweb.secret("password") for s in (a, b)]
    assert [s.get_secret_value() for s in secrets if s] == ["pacs-pass", "pacs-b-pass"]
    assert a.dicomweb.public_base == "http://a.test/dw"  # a public URL is never inherited
    assert b.dicomweb.public_base == "https://b.example/dw"


def test_a_source_giving_a_password_does_not_also_inherit_the_password_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "pacs").write_text("pacs-pass\n")
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\ndicomweb_auth: basic\ndicomweb_username: pacs\n"
        f"dicomweb_password_file: {tmp_path / 'pacs'}\n"
        "sources:\n  - name: a\n    dicomweb_url: http://a.test/dw\n    dicomweb_password: own\n",
    )
    (a,) = load_settings().each_source()
    secret = a.dicomweb.secret("password")
    assert secret is not None and secret.get_secret_value() == "own"


def test_a_source_missing_what_its_auth_needs_names_the_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\nsources:\n  - name: a\n    dicomweb_url: http://a.test/dw\n"
        "    dicomweb_auth: basic\n",
    )
    message = error()
    assert "BRIDGE_SOURCES entry 'a'" in message and "BRIDGE_DICOMWEB_USERNAME" in message


@pytest.mark.parametrize(
    ("entry", "line", "key", "meant"),
    [
        ("    dicomweb_urll: http://b.test/dw\n", 6, "dicomweb_urll", "dicomweb_url"),  # flat
        ("    dicomweb:\n      urll: http://b.test/dw\n", 7, "dicomweb.urll", "dicomweb_url"),  # nested
        (
            "    dicomweb_url: http://b.test/dw\n    patient_polcy: create\n",
            7,
            "patient_polcy",
            "patient_policy",
        ),
    ],
)
def test_a_typo_inside_a_sources_entry_names_the_file_its_line_and_the_likely_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, entry: str, line: int, key: str, meant: str
) -> None:
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\nsources:\n  - name: a\n    dicomweb_url: http://a.test/dw\n  - name: b\n{entry}",
    )
    message = error()
    assert (
        f"BRIDGE_CONFIG_FILE {tmp_path / 'bridge.yaml'}, line {line}: BRIDGE_SOURCES entry 'b', key {key}: "
        f"is not a known setting (did you mean {meant}?)"
    ) in message
    assert "Extra inputs" not in message


def test_a_bad_value_inside_a_sources_entry_names_its_line_and_a_scheme_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\nsources:\n  - name: a\n    dicomweb_url: pacs.example.org/dicom-web\n",
    )
    message = error()
    assert "line 4: BRIDGE_SOURCES entry 'a', key dicomweb_url: is not an absolute URL: write it" in message


def test_a_top_level_setting_inside_a_sources_entry_is_named_with_its_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _sources_file(
        tmp_path,
        monkeypatch,
        f"sources:\n  - name: a\n    dicomweb_url: http://a.test/dw\n    fhir_url: {FHIR}\n",
    )
    message = error()
    assert "line 4: BRIDGE_SOURCES entry 'a', key fhir_url: is not a per-source setting" in message
    assert "did you mean" not in message  # it is a known setting, in the wrong place


def test_a_sources_entry_without_a_name_is_pointed_at_by_its_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _sources_file(
        tmp_path,
        monkeypatch,
        f"fhir_url: {FHIR}\nsources:\n  - name: a\n    dicomweb_url: http://a.test/dw\n"
        "  - dicomweb_url: http://b.test/dw\n",
    )
    assert "line 5: BRIDGE_SOURCES: entry 1: has no name" in error()


def test_a_typo_inside_a_sources_entry_from_the_environment_gets_the_likely_key_and_no_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The environment's BRIDGE_SOURCES wins over the file's: no line of the file is at fault.
    _sources_file(
        tmp_path, monkeypatch, f"fhir_url: {FHIR}\nsources:\n  - name: a\n    dicomweb_url: {DICOMWEB}\n"
    )
    monkeypatch.setenv("BRIDGE_SOURCES", '[{"name": "x", "dicomweb_urll": "http://x.test/dw"}]')
    message = error()
    assert (
        "BRIDGE_SOURCES entry 'x', key dicomweb_urll: is not a known setting (did you mean dicomweb_url?)"
        in (message)
    )
    assert "line" not in message


def test_without_sources_the_top_level_is_the_one_source(required: pytest.MonkeyPatch) -> None:
    required.setenv("BRIDGE_SOURCE_NAME", "ct")
    required.setenv("BRIDGE_QIDO_PAGE_SIZE", "7")
    (only,) = load_settings().each_source()
    assert (only.name, only.qido_page_size, only.dicomweb.base) == ("ct", 7, DICOMWEB)


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
    assert settings.http.deadline == 300
    assert settings.dicomweb.max_series == 10_000
    assert settings.dicomweb.max_page_bytes == 16 * 1024 * 1024
    assert settings.api.allow_anonymous is False


def test_trusted_proxies_are_addresses_or_networks_and_none_by_default(required: pytest.MonkeyPatch) -> None:
    assert load_settings().trusted_proxies == []  # nobody's X-Forwarded-For is believed
    required.setenv("BRIDGE_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8,::1")
    assert load_settings().trusted_proxies == ["127.0.0.1", "10.0.0.0/8", "::1"]
    required.setenv("BRIDGE_TRUSTED_PROXIES", "127.0.0.1,front.example")
    message = error()
    assert "BRIDGE_TRUSTED_PROXIES" in message and "front.example" in message
