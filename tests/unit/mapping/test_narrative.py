"""The generated narrative of every written resource: what it shows, and that it is safe XHTML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

from bridge.mapping.endpoint import map_endpoint
from bridge.mapping.identifiers import PatientKey
from bridge.mapping.imaging_study import map_imaging_study
from bridge.mapping.narrative import escape, imaging_study_narrative
from bridge.mapping.patient import map_patient
from bridge.mapping.records import digest
from bridge.mapping.validate import validate
from tests.builders import context, person_name, series, study, uid

XHTML = "{http://www.w3.org/1999/xhtml}"
# R4 txt-1: the basic formatting elements the bridge uses (a subset of what the rule allows).
ALLOWED = {"div", "p", "b", "ul", "li"}


def div(resource: dict[str, Any]) -> ET.Element:
    """The narrative's div, parsed as XML (fails on anything that is not well-formed)."""
    text = resource["text"]
    assert text["status"] == "generated"
    root = ET.fromstring(text["div"])
    assert root.tag == f"{XHTML}div"
    for element in root.iter():
        assert element.tag.startswith(XHTML), element.tag
        assert element.tag.removeprefix(XHTML) in ALLOWED, element.tag
        assert element.attrib == {}, "no attributes (xmlns is the namespace, not an attribute here)"
    assert "".join(root.itertext()).strip(), "txt-2: the narrative has text"
    return root


def shown(resource: dict[str, Any]) -> str:
    return " ".join(t.strip() for t in div(resource).itertext() if t.strip())


def imaging_study(**changes: Any) -> dict[str, Any]:
    records = [
        series(series_uid=uid(1, 1), number=1, modality="CT", instance_count=120),
        series(series_uid=uid(1, 2), number=2, modality="SR", body_part=None, instance_count=1),
    ]
    fields = {
        "description": "CT Thorax",
        "date": "20240115",
        "time": "101530",
        "tz_offset": "+0100",
        "series_count": 2,
        "instance_count": 121,
    } | changes
    resource = map_imaging_study(
        study(**fields),
        records,
        context(),
        subject={"reference": "Patient/p1"},
        endpoint_reference="Endpoint/e",
    )
    validate(resource)
    return resource


def test_imaging_study_narrative_shows_date_description_modalities_and_counts() -> None:
    text = shown(imaging_study())
    assert "2024-01-15 10:15 +01:00" in text
    assert "CT Thorax" in text
    assert "Modalities: CT" in text and "SR" not in text, "acquisition modalities, as ImagingStudy.modality"
    assert "2 series, 121 instances" in text


def test_imaging_study_narrative_is_one_series_one_instance_in_the_singular() -> None:
    assert "1 series, 1 instance" in shown(imaging_study(series_count=1, instance_count=1))


def test_imaging_study_narrative_leaves_patient_and_referrer_names_out() -> None:
    resource = imaging_study(extra={"00080090": person_name("Smith^Anna^^Dr")}, patient_name="Doe^Jane")
    assert resource["referrer"] == {"display": "Dr Anna Smith"}, "the referrer is in the resource"
    text = resource["text"]["div"]
    for name in ("Smith", "Anna", "Doe", "Jane"):
        assert name not in text


def test_markup_in_a_description_is_escaped_not_interpreted() -> None:
    resource = imaging_study(description='<script>alert("x")</script> & <b onclick="y">')
    root = div(resource)
    assert [e.tag.removeprefix(XHTML) for e in root.iter()].count("script") == 0
    assert '<script>alert("x")</script> & <b onclick="y">' in "".join(root.itertext())
    assert "&lt;script&gt;" in resource["text"]["div"]


def test_control_characters_that_xml_cannot_hold_are_dropped() -> None:
    assert escape("Knee\x00\x1b L\tR") == "Knee L\tR"
    assert "Knee L" in shown(imaging_study(description="Knee\x00\x1b L"))


def test_the_narrative_is_the_same_on_every_run_and_changes_only_with_what_it_shows() -> None:
    first, again = imaging_study(), imaging_study()
    assert first["text"] == again["text"] and digest(first) == digest(again)
    assert imaging_study(accession="A-2")["text"] == first["text"], "the accession is not shown"
    assert imaging_study(instance_count=122)["text"] != first["text"]
    assert imaging_study(description="CT Abdomen")["text"] != first["text"]


def test_a_study_without_date_description_or_counts_still_has_a_narrative() -> None:
    resource = imaging_study(date=None, time=None, description=None, series_count=None, instance_count=None)
    assert shown(resource).startswith("Imaging study")


def test_a_withdrawn_study_says_so() -> None:
    resource = imaging_study() | {"status": "entered-in-error"}
    assert "Status: entered-in-error" in shown(resource | {"text": imaging_study_narrative(resource)})


def test_the_narrative_sits_after_meta() -> None:
    assert list(imaging_study())[:4] == ["resourceType", "id", "meta", "text"]


def test_endpoint_narrative_names_the_wado_rs_address() -> None:
    resource = map_endpoint(context())
    validate(resource)
    assert context().public_base in shown(resource)


def test_patient_narrative_shows_the_fhir_demographics_in_every_script() -> None:
    record = study(patient_name="Yamada^Tarou=山田^太郎=やまだ^たろう", sex="M", birth_date="19800102")
    key = PatientKey("urn:example:mrn", "12345")
    resource = map_patient(record, key, context())
    validate(resource)
    text = shown(resource)
    assert "Tarou Yamada = 太郎 山田 = たろう やまだ" in text
    assert "male, born 1980-01-02" in text
    assert "12345 (urn:example:mrn)" in text
