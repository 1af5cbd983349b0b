"""Deterministic ids and the mapping-context fingerprint that drives republishing."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.mapping.identity import replaced_by
from bridge.mapping.imaging_study import imaging_study_id, map_imaging_study
from tests.builders import context, series, study, uid


def test_the_same_study_always_gets_the_same_id() -> None:
    first = map_imaging_study(
        study(), [series()], context(), subject={"reference": "Patient/a"}, endpoint_reference="Endpoint/e"
    )
    again = map_imaging_study(
        study(), [series()], context(), subject={"reference": "Patient/a"}, endpoint_reference="Endpoint/e"
    )
    assert first["id"] == again["id"] == imaging_study_id(context(), uid(1))


def test_different_studies_get_different_ids() -> None:
    assert imaging_study_id(context(), uid(1)) != imaging_study_id(context(), uid(2))


def test_the_same_study_from_another_source_gets_another_id() -> None:
    assert imaging_study_id(context(source_name="a"), uid(1)) != imaging_study_id(
        context(source_name="b"), uid(1)
    )


def test_ids_are_valid_fhir_ids() -> None:
    rid = imaging_study_id(context(), uid(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13))
    assert len(rid) <= 64
    assert all(c.isalnum() or c in "-." for c in rid)


def test_fingerprint_is_stable_for_the_same_settings() -> None:
    # Two contexts built apart, their maps filled in another order: the same settings, one fingerprint.
    a = context(patient_issuer_systems={"HOSP-A": "urn:oid:1.1", "HOSP-B": "urn:oid:1.2"})
    b = context(patient_issuer_systems={"HOSP-B": "urn:oid:1.2", "HOSP-A": "urn:oid:1.1"})
    assert a is not b
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"source_name": "other"},
        {"public_base": "https://elsewhere.example.org/wado"},
        {"patient_system": "urn:oid:9.9.9"},
        {"patient_issuer_systems": {"HOSP": "urn:oid:1.2"}},
        {"accession_system": "urn:example:acc"},
        {"accession_issuer_systems": {"RIS": "urn:oid:1.3"}},
        {"endpoint_system": "urn:example:endpoints"},
        {"timezone": "Europe/Berlin"},
    ],
)
def test_fingerprint_changes_when_a_setting_changes(change: dict[str, object]) -> None:
    assert context(**change).fingerprint() != context().fingerprint()


@pytest.mark.parametrize(
    ("link", "survivor"),
    [
        ([{"type": "replaced-by", "other": {"reference": "Patient/p2"}}], "p2"),
        ([{"type": "replaced-by", "other": {"reference": "https://ehr/fhir/Patient/p2/_history/3"}}], "p2"),
        ([{"type": "seealso", "other": {"reference": "Patient/p2"}}], None),  # not a merge
        ([{"type": "replaced-by", "other": {"reference": "RelatedPerson/r1"}}], ""),  # replaced, no survivor
        ([{"type": "replaced-by", "other": {"identifier": {"value": "x"}}}], ""),
        ([], None),
    ],
)
def test_replaced_by_names_the_surviving_patient_of_a_merge(
    link: list[dict[str, Any]], survivor: str | None
) -> None:
    assert replaced_by({"resourceType": "Patient", "active": False, "link": link}) == survivor
