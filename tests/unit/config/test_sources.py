"""Several sources (BRIDGE_SOURCES): each entry typed, named, and checked."""

from __future__ import annotations

import json

import pytest

from bridge.config import load_settings
from bridge.errors import ConfigurationError


def _env(monkeypatch: pytest.MonkeyPatch, sources: object) -> None:
    monkeypatch.setenv("BRIDGE_FHIR_URL", "http://fhir.example/R4")
    monkeypatch.setenv("BRIDGE_SOURCES", json.dumps(sources))


def test_several_sources_each_get_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        [
            {"name": "a", "dicomweb_url": "http://a.example/dw"},
            {"name": "b", "dicomweb_url": "http://b.example/dw", "patient_identifier_system": "urn:oid:2.2"},
        ],
    )
    settings = load_settings()
    a, b = settings.each_source()
    assert (a.name, a.dicomweb.base, a.dicomweb.public_base) == (
        "a",
        "http://a.example/dw",
        "http://a.example/dw",
    )
    assert (b.name, b.patient_identifier_system) == ("b", "urn:oid:2.2")
    assert settings.fhir.base == "http://fhir.example/R4"


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (
            [{"name": "a", "dicomweb_url": "http://a/dw"}, {"name": "a", "dicomweb_url": "http://b/dw"}],
            "unique",
        ),
        ([{"dicomweb_url": "http://a/dw"}], "no name"),
        ([{"name": "a", "dicomweb_url": "http://a/dw", "fhir_url": "http://x"}], "not a per-source setting"),
    ],
)
def test_bad_source_lists_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, sources: object, message: str
) -> None:
    _env(monkeypatch, sources)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "BRIDGE_SOURCES" in str(caught.value) and message in str(caught.value)


def test_a_bad_value_inside_one_source_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _env(
        monkeypatch,
        [{"name": "a", "dicomweb_url": "http://a/dw"}, {"name": "b", "dicomweb_url": "not a url"}],
    )
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "'b'" in str(caught.value) and "dicomweb_url" in str(caught.value)
