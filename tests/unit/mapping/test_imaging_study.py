"""ImagingStudy mapping: one test per row of the table in design.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest

from bridge.errors import MappingError
from bridge.mapping.context import MappingContext
from bridge.mapping.imaging_study import codeable_concepts, map_imaging_study
from bridge.mapping.records import Code, InstanceRecord, SeriesRecord, StudyRecord
from bridge.mapping.validate import validate
from tests.builders import context, series, study, uid

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
SUBJECT = {"reference": "Patient/p1"}
ENDPOINT = "Endpoint/e1"


def mapped(
    record: StudyRecord | None = None,
    series_records: Sequence[SeriesRecord] | None = None,
    ctx: MappingContext | None = None,
) -> dict[str, Any]:
    resource = map_imaging_study(
        record or study(),
        [series()] if series_records is None else series_records,
        ctx or context(),
        subject=SUBJECT,
        endpoint_reference=ENDPOINT,
    )
    validate(resource)  # every produced resource is valid R4(B)
    return resource


def accession(resource: dict[str, Any]) -> dict[str, Any]:
    [identifier] = [i for i in resource["identifier"] if i.get("type") == ACSN]
    return identifier


# identifier
def test_study_instance_uid_is_a_urn_oid_identifier_in_the_dicom_uid_system() -> None:
    resource = mapped(study(study_uid=uid(7)))
    assert resource["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{uid(7)}"}


def test_accession_number_is_an_acsn_identifier() -> None:
    identifier = accession(mapped(study(accession="A-77")))
    assert identifier["value"] == "A-77"
    assert identifier["type"] == ACSN


def test_accession_system_from_the_issuer_local_id() -> None:
    ctx = context(accession_issuer_systems={"RIS": "https://ris.example.org/accession"})
    record = study(accession_issuer={"local": "RIS"})
    assert accession(mapped(record, ctx=ctx))["system"] == "https://ris.example.org/accession"


def test_accession_system_from_the_issuer_universal_id() -> None:
    ctx = context(accession_issuer_systems={"2.16.840.1.9": "https://ris.example.org/acc"})
    record = study(
        accession_issuer={"local": "UNMAPPED", "universal": "2.16.840.1.9", "universal_type": "ISO"}
    )
    assert accession(mapped(record, ctx=ctx))["system"] == "https://ris.example.org/acc"


def test_unmapped_iso_universal_issuer_becomes_a_urn_oid_system() -> None:
    record = study(accession_issuer={"universal": "2.16.840.1.113883.3.7", "universal_type": "ISO"})
    ctx = context(accession_system="urn:example:default-accession")
    assert accession(mapped(record, ctx=ctx))["system"] == "urn:oid:2.16.840.1.113883.3.7"


def test_unmapped_issuer_falls_back_to_the_default_accession_system() -> None:
    record = study(accession_issuer={"local": "OTHER-RIS"})
    ctx = context(accession_system="urn:example:default-accession")
    assert accession(mapped(record, ctx=ctx))["system"] == "urn:example:default-accession"


def test_accession_without_issuer_or_default_system_has_no_system() -> None:
    assert "system" not in accession(mapped(study(accession="A-1")))


def test_study_without_accession_number_has_only_the_uid_identifier() -> None:
    assert len(mapped(study(accession=None))["identifier"]) == 1


# status, subject
def test_status_is_available() -> None:
    assert mapped()["status"] == "available"


def test_subject_is_the_reference_passed_in() -> None:
    assert mapped()["subject"] == SUBJECT


# started
def test_started_is_the_date_alone_without_study_time() -> None:
    assert mapped(study(date="20240115", time=None))["started"] == "2024-01-15"


def test_started_uses_the_timezone_offset_from_utc() -> None:
    record = study(date="20240115", time="101530", tz_offset="-0500")
    assert mapped(record)["started"] == "2024-01-15T10:15:30-05:00"


def test_started_without_offset_uses_the_configured_zone_in_winter() -> None:
    ctx = context(timezone="Europe/Amsterdam")
    assert mapped(study(date="20240115", time="101530"), ctx=ctx)["started"] == "2024-01-15T10:15:30+01:00"


def test_started_without_offset_uses_the_configured_zone_with_summer_time() -> None:
    ctx = context(timezone="Europe/Amsterdam")
    assert mapped(study(date="20240701", time="101530"), ctx=ctx)["started"] == "2024-07-01T10:15:30+02:00"


def test_the_offset_wins_over_the_configured_zone() -> None:
    ctx = context(timezone="Europe/Amsterdam")
    record = study(date="20240701", time="101530", tz_offset="+0900")
    assert mapped(record, ctx=ctx)["started"] == "2024-07-01T10:15:30+09:00"


@pytest.mark.parametrize(
    ("time", "expected"),
    [
        ("101530.25", "2024-01-15T10:15:30.25+00:00"),
        ("101530.123456", "2024-01-15T10:15:30.123456+00:00"),
        ("101530.1", "2024-01-15T10:15:30.1+00:00"),
    ],
)
def test_started_keeps_the_fractional_seconds_the_archive_gave(time: str, expected: str) -> None:
    assert mapped(study(date="20240115", time=time))["started"] == expected


def test_started_with_hours_only_gets_full_seconds() -> None:
    assert mapped(study(date="20240115", time="10"))["started"] == "2024-01-15T10:00:00+00:00"


def test_no_started_without_study_date() -> None:
    assert "started" not in mapped(study(date=None, time=None))


# modality
def test_study_modality_lists_the_acquisition_modalities_only_with_dcm_displays() -> None:
    records = [
        series(series_uid=uid(1, 1), number=1, modality="CT"),
        series(series_uid=uid(1, 2), number=2, modality="SR", body_part=None),
        series(series_uid=uid(1, 3), number=3, modality="SEG", body_part=None),
        series(series_uid=uid(1, 4), number=4, modality="PT"),
        series(series_uid=uid(1, 5), number=5, modality="CT"),
    ]
    resource = mapped(study(modalities=("CT", "PT", "SEG", "SR")), records)
    assert resource["modality"] == [
        {"system": DCM, "code": "CT", "display": "Computed Tomography"},
        {"system": DCM, "code": "PT", "display": "Positron emission tomography"},
    ]


def test_every_series_keeps_its_own_modality_acquisition_or_not() -> None:
    records = [
        series(series_uid=uid(1, 1), number=1, modality="CT"),
        series(series_uid=uid(1, 2), number=2, modality="SR", body_part=None),
        series(series_uid=uid(1, 3), number=3, modality="RTSTRUCT", body_part=None),
    ]
    assert [s["modality"] for s in mapped(study(), records)["series"]] == [
        {"system": DCM, "code": "CT", "display": "Computed Tomography"},
        {"system": DCM, "code": "SR", "display": "Structured Report Document"},
        {"system": DCM, "code": "RTSTRUCT", "display": "RT Structure Set"},
    ]


def test_a_study_of_reports_only_has_no_study_modality() -> None:
    records = [series(modality="SR", body_part=None), series(series_uid=uid(1, 2), number=2, modality="OT")]
    resource = mapped(study(modalities=("SR", "OT")), records)
    assert "modality" not in resource
    assert [s["modality"]["code"] for s in resource["series"]] == ["SR", "OT"]


def test_unknown_modality_keeps_its_code_on_the_series_but_is_no_acquisition_modality() -> None:
    resource = mapped(study(modalities=("XYZ",)), [series(modality="XYZ")])
    assert "modality" not in resource
    assert resource["series"][0]["modality"] == {"system": DCM, "code": "XYZ"}


def test_study_modalities_are_used_when_no_series_is_known() -> None:
    resource = mapped(study(modalities=("MR", "PR", "PT")), [])
    assert [c["code"] for c in resource["modality"]] == ["MR", "PT"]


# numberOfSeries / numberOfInstances / description / endpoint
def test_counts_come_from_the_study_row() -> None:
    resource = mapped(study(series_count=3, instance_count=412))
    assert (resource["numberOfSeries"], resource["numberOfInstances"]) == (3, 412)


def test_counts_are_left_out_when_the_archive_does_not_send_them() -> None:
    resource = mapped(study(series_count=None, instance_count=None))
    assert "numberOfSeries" not in resource
    assert "numberOfInstances" not in resource


def test_description_is_the_study_description() -> None:
    assert mapped(study(description="MR Knee left"))["description"] == "MR Knee left"


def test_endpoint_is_the_reference_passed_in() -> None:
    assert mapped()["endpoint"] == [{"reference": ENDPOINT}]


# series[]
def test_series_fields() -> None:
    record = series(
        series_uid=uid(1, 4),
        number=4,
        modality="MR",
        description="T2 sag",
        instance_count=25,
        body_part="KNEE",
        laterality="L",
        date="20240115",
        time="103000",
    )
    [out] = mapped(study(tz_offset="+0100"), [record])["series"]
    assert out == {
        "uid": uid(1, 4),
        "number": 4,
        "modality": {"system": DCM, "code": "MR", "display": "Magnetic Resonance"},
        "description": "T2 sag",
        "numberOfInstances": 25,
        "bodySite": {"system": SNOMED, "code": "72696002", "display": "Knee"},
        "laterality": {"system": SNOMED, "code": "7771000", "display": "Left"},
        "started": "2024-01-15T10:30:00+01:00",
    }


def test_series_uid_is_the_plain_uid_not_a_urn() -> None:
    [out] = mapped(series_records=[series(series_uid=uid(1, 9))])["series"]
    assert out["uid"] == uid(1, 9)


def test_body_part_maps_to_snomed_from_the_annex_l_table() -> None:
    [out] = mapped(series_records=[series(body_part="CHEST")])["series"]
    assert out["bodySite"] == {"system": SNOMED, "code": "816094009", "display": "Chest"}


def test_body_part_is_matched_case_insensitively() -> None:
    # Lower case is not valid CS, so the record is built directly rather than parsed.
    [out] = mapped(series_records=[replace(series(), body_part="abdomen")])["series"]
    assert out["bodySite"]["code"] == "818981001"


def test_unknown_body_part_gets_no_body_site() -> None:
    [out] = mapped(series_records=[series(body_part="CHEST_TO_PELVIS")])["series"]
    assert "bodySite" not in out


@pytest.mark.parametrize(("value", "code"), [("R", "24028007"), ("L", "7771000"), ("B", "51440002")])
def test_laterality_maps_to_snomed(value: str, code: str) -> None:
    [out] = mapped(series_records=[series(laterality=value)])["series"]
    assert out["laterality"]["code"] == code


def test_unpaired_laterality_gets_no_coding() -> None:
    [out] = mapped(series_records=[series(laterality="U")])["series"]
    assert "laterality" not in out


def test_series_without_date_has_no_started() -> None:
    [out] = mapped(series_records=[series(date=None, time=None)])["series"]
    assert "started" not in out


def test_series_are_sorted_by_number_then_uid_with_unnumbered_last() -> None:
    records = [
        series(series_uid=uid(1, 30), number=None),
        series(series_uid=uid(1, 20), number=10),
        series(series_uid=uid(1, 12), number=2),
        series(series_uid=uid(1, 11), number=2),
    ]
    resource = mapped(series_records=records)
    assert [s["uid"] for s in resource["series"]] == [uid(1, 11), uid(1, 12), uid(1, 20), uid(1, 30)]


def test_study_without_series_has_no_series_element() -> None:
    assert "series" not in mapped(series_records=[])


def test_codes_get_systems_from_the_designator_table_or_none() -> None:
    concepts = codeable_concepts([Code("24627-2", "LN", "CT Chest"), Code("L1", "99LOCAL", None)], context())
    assert concepts[0] == {
        "coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}],
        "text": "CT Chest",
    }
    assert concepts[1] == {"coding": [{"code": "L1"}]}


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
