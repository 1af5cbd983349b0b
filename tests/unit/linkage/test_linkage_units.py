"""Issue 5's pure pieces: issuer systems, codes, instances, names, headers, diffs, several sources."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bridge.config import load_settings
from bridge.dicomweb.records import Code, InstanceRecord, Issuer, OtherPatientId, parse_series, with_header
from bridge.errors import ConfigurationError, MappingError
from bridge.mapping.identifiers import issuer_system, other_patient_identifiers, patient_key
from bridge.mapping.imaging_study import codeable_concepts, map_imaging_study
from bridge.mapping.patient import display_name, map_patient
from bridge.mapping.validate import validate
from bridge.sync.diff import changed_paths
from tests.builders import context, element, issuer_sequence, person_name, series, series_row, study, uid

SUBJECT = {"reference": "Patient/p"}
SYSTEMS = {"HOSP-A": "urn:oid:1.1", "1.2.3": "urn:oid:9.9"}


def test_issuer_system_prefers_the_map_then_an_iso_qualifier_then_the_default() -> None:
    iso = Issuer(universal="1.2.3", universal_type="ISO")
    other_iso = Issuer(universal="4.5.6", universal_type="ISO")
    dns = Issuer(universal="hosp.example", universal_type="DNS")
    assert issuer_system("HOSP-A", other_iso, SYSTEMS, "urn:default") == "urn:oid:1.1"
    assert issuer_system(None, iso, SYSTEMS, "urn:default") == "urn:oid:9.9"
    assert issuer_system(None, other_iso, SYSTEMS, "urn:default") == "urn:oid:4.5.6"
    assert issuer_system("NOPE", dns, SYSTEMS, "urn:default") == "urn:default"


def test_patient_key_and_other_ids_use_the_maps() -> None:
    ctx = context(patient_issuer_systems=SYSTEMS)
    record = dataclasses.replace(
        study(),
        patient_issuer=None,
        patient_issuer_qualifier=Issuer(universal="1.2.3", universal_type="ISO"),
        other_patient_ids=(OtherPatientId("X9", "HOSP-A", None), OtherPatientId("Z", "UNMAPPED", None)),
    )
    assert patient_key(record, ctx).system == "urn:oid:9.9"
    assert other_patient_identifiers(record, ctx) == [{"system": "urn:oid:1.1", "value": "X9"}]
    patient = map_patient(record, patient_key(record, ctx), ctx)
    assert [i["value"] for i in patient["identifier"]] == [record.patient_id, "X9"]
    validate(patient)


def test_codes_get_systems_from_the_designator_table_or_none() -> None:
    concepts = codeable_concepts([Code("24627-2", "LN", "CT Chest"), Code("L1", "99LOCAL", None)], context())
    assert concepts[0] == {
        "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
        "text": "CT Chest",
    }
    assert concepts[1] == {"coding": [{"code": "L1"}]}


def test_display_names_read_like_names() -> None:
    assert display_name("Smith^Anna^B^Dr^PhD") == "Dr Anna B Smith PhD"
    assert display_name("Yamada^Tarou=山田^太郎") == "Tarou Yamada"


def _instances(series_uid: str, count: int) -> list[InstanceRecord]:
    return [
        InstanceRecord(uid(9, i), series_uid, "1.2.840.10008.5.1.4.1.1.2", i) for i in range(count, 0, -1)
    ]


def test_instances_are_listed_in_order_only_when_asked_and_under_the_guard() -> None:
    one = series(series_uid=uid(2, 1))
    instances = _instances(one.uid, 3)
    on = map_imaging_study(
        study(),
        [one],
        context(include_instances=True),
        subject=SUBJECT,
        endpoint_reference="Endpoint/e",
        instances=instances,
    )
    assert [i["number"] for i in on["series"][0]["instance"]] == [1, 2, 3]
    validate(on)
    off = map_imaging_study(
        study(), [one], context(), subject=SUBJECT, endpoint_reference="Endpoint/e", instances=instances
    )
    assert "instance" not in off["series"][0]
    guarded = map_imaging_study(
        study(),
        [one],
        context(include_instances=True, max_instances=2),
        subject=SUBJECT,
        endpoint_reference="Endpoint/e",
        instances=instances,
    )
    assert "instance" not in guarded["series"][0]


def test_an_instance_without_sop_class_parks_the_study_naming_it() -> None:
    one = series(series_uid=uid(2, 1))
    bad = [InstanceRecord(uid(9, 1), one.uid, None, 1)]
    with pytest.raises(MappingError) as caught:
        map_imaging_study(
            study(),
            [one],
            context(include_instances=True),
            subject=SUBJECT,
            endpoint_reference="Endpoint/e",
            instances=bad,
        )
    assert caught.value.attribute == "SOPClassUID"


def test_performers_fall_back_to_operators() -> None:
    row = series_row(series_uid=uid(2, 1))
    row["00081070"] = person_name("Op^Olga")
    assert parse_series(row).performers == ("Op^Olga",)
    row["00081050"] = person_name("Doc^Dan")
    assert parse_series(row).performers == ("Doc^Dan",)


def test_a_header_fills_what_qido_left_out_and_ignores_bulk_data() -> None:
    header = {
        "00080051": issuer_sequence(local="RIS-A"),
        "00081032": {
            "vr": "SQ",
            "Value": [
                {
                    "00080100": element("SH", "X1"),
                    "00080102": element("SH", "DCM"),
                    "00080104": element("LO", "Thing"),
                }
            ],
        },
        "7FE00010": {"vr": "OW", "BulkDataURI": "http://archive/bulk/1"},
    }
    completed = with_header(study(), header)
    assert completed.accession_issuer == Issuer(local="RIS-A")
    assert completed.procedure_codes == (Code("X1", "DCM", "Thing"),)


def test_changed_paths_name_elements_never_values() -> None:
    old = {
        "resourceType": "ImagingStudy",
        "meta": {"versionId": "3"},
        "description": "A",
        "series": [{"uid": "1"}],
    }
    new = {
        "resourceType": "ImagingStudy",
        "description": "B",
        "series": [{"uid": "1"}, {"uid": "2"}],
        "basedOn": [{}],
    }
    assert changed_paths(old, new) == ["+basedOn", "~description", "+series[1]"]
    assert changed_paths(new, new) == []


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
