"""Identifiers: issuer systems from the maps, the Patient key, other patient identifiers."""

from __future__ import annotations

import dataclasses

from bridge.mapping.identifiers import issuer_system, other_patient_identifiers, patient_key
from bridge.mapping.patient import map_patient
from bridge.mapping.records import Issuer, OtherPatientId
from bridge.mapping.validate import validate
from tests.builders import context, study

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
