"""Parsing QIDO-RS DICOM JSON rows into StudyRecord / SeriesRecord."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.errors import MappingError
from bridge.mapping.records import Code, Issuer, parse_series, parse_study, raw_uid, with_header
from tests.builders import element, issuer_sequence, load_json, person_name, series_row, study, study_row, uid


def test_parse_study_from_a_recorded_answer() -> None:
    record = parse_study(load_json("qido-studies.json")[0])
    assert record.uid == "1.2.826.0.1.3680043.8.498.10"
    assert (record.date, record.time, record.tz_offset) == ("20240115", "101530.250", "+0100")
    assert record.accession == "ACC20240115001"
    assert record.accession_issuer == Issuer("RIS", "2.16.840.1.113883.3.9999.2", "ISO")
    assert record.description == "CT THORAX MIT KM"
    assert record.modalities == ("CT", "SR")
    assert (record.series_count, record.instance_count) == (2, 245)
    assert (record.patient_id, record.patient_issuer) == ("MRN-884201", "HOSP-A")
    assert record.patient_name == "Muster^Erika^^Dr."
    assert (record.birth_date, record.sex) == ("19640812", "F")


def test_empty_attributes_parse_as_none() -> None:
    record = parse_study(load_json("qido-studies.json")[1])
    assert record.time is None
    assert record.accession is None
    assert record.accession_issuer is None


def test_person_name_keeps_every_component_group() -> None:
    record = parse_study(load_json("qido-studies.json")[1])
    assert record.patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_missing_patient_name_and_description_parse_as_none() -> None:
    record = parse_study(load_json("qido-studies.json")[2])
    assert record.patient_name is None
    assert record.description is None
    assert record.birth_date is None


def test_modalities_in_study_are_sorted_and_unique() -> None:
    assert study(modalities=("MR", "CT", "MR")).modalities == ("CT", "MR")


def test_parse_series_from_a_recorded_answer() -> None:
    first, second = (parse_series(r) for r in load_json("qido-series.json"))
    assert (first.uid, first.number, first.modality) == ("1.2.826.0.1.3680043.8.498.10.999", 999, "SR")
    assert first.body_part is None
    assert second.description == "Thorax 1.0 B70f"
    assert (second.instance_count, second.body_part, second.laterality) == (244, "CHEST", None)
    assert (second.date, second.time) == ("20240115", "101602.5")


def test_parse_series_fields_from_a_built_row() -> None:
    record = parse_series(
        series_row(
            series_uid=uid(3, 1),
            number=7,
            modality="MG",
            laterality="R",
            body_part="BREAST",
            instance_count=4,
            description="R CC",
        )
    )
    assert (record.uid, record.number, record.modality) == (uid(3, 1), 7, "MG")
    assert (record.laterality, record.body_part, record.instance_count, record.description) == (
        "R",
        "BREAST",
        4,
        "R CC",
    )


def test_fingerprint_is_stable_and_changes_with_any_field() -> None:
    base = study()
    assert base.fingerprint() == study().fingerprint()
    for change in ({"series_count": 2}, {"description": "x"}, {"patient_id": "P2"}, {"time": None}):
        assert replace(base, **change).fingerprint() != base.fingerprint()


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (study_row(study_uid=uid(5)), uid(5)),
        ({}, None),
        ({"0020000D": {"vr": "UI"}}, None),
        ({"0020000D": {"vr": "UI", "Value": [7]}}, None),
    ],
)
def test_raw_uid_reads_the_uid_without_parsing(row: dict, expected: str | None) -> None:
    assert raw_uid(row) == expected


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


def test_an_accession_number_with_several_values_keeps_each_value_in_order() -> None:
    record = parse_study(study_row(accession=("ACC-B ", "ACC-A", "ACC-B")))
    assert record.accessions == ("ACC-B", "ACC-A")
    single = parse_study(study_row(accession="ACC-1"))
    assert (single.accession, single.accessions) == ("ACC-1", ("ACC-1",))
    assert parse_study(study_row(accession=None)).accessions == ()


def test_an_accession_value_invalid_for_its_vr_still_parks_naming_it() -> None:
    with pytest.raises(MappingError) as caught:
        parse_study(study_row(accession=("ACC-1", "X" * 40)))
    assert caught.value.attribute == "AccessionNumber"
