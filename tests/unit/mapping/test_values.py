"""Values from real archives: empty is absent, controls go, every value is checked against its VR."""

from __future__ import annotations

import base64
import logging
import warnings

import pytest
from pydicom.charset import convert_encodings

from bridge.errors import MappingError
from bridge.mapping.imaging_study import map_imaging_study
from bridge.mapping.records import parse_series, parse_study, raw_uid
from bridge.mapping.validate import validate
from bridge.mapping.values import check_value, clean_text, decode_text, vr_problem
from tests.builders import context, element, person_name, series_row, study_row, uid

SECRET = "SECRETVALUE"


def mapped(row: dict) -> dict:
    resource = map_imaging_study(
        parse_study(row),
        [parse_series(series_row(series_uid=uid(1, 1)))],
        context(),
        subject={"reference": "Patient/p"},
        endpoint_reference="Endpoint/e",
    )
    validate(resource)
    return resource


def inline(text: bytes) -> str:
    return base64.b64encode(text).decode()


@pytest.mark.parametrize("value", ["", " ", "    ", "\x00", " \x00 "])
def test_empty_and_blank_values_are_absent(value: str) -> None:
    assert clean_text(value) is None


def test_control_characters_are_removed() -> None:
    assert clean_text("CT\x07 Chest\x1b\x00 ") == "CT Chest"


@pytest.mark.parametrize("empty", ["", "  ", "^^^^", "=="])
def test_an_empty_referring_physician_is_no_referrer_and_does_not_park(empty: str) -> None:
    row = study_row(extra={"00080090": person_name(empty)})
    resource = mapped(row)
    assert "referrer" not in resource


def test_a_present_but_valueless_referring_physician_is_no_referrer() -> None:
    assert "referrer" not in mapped(study_row(extra={"00080090": element("PN")}))


def test_a_blank_description_is_left_out() -> None:
    assert "description" not in mapped(study_row(description="    "))


def test_a_description_with_control_characters_is_published_without_them() -> None:
    assert mapped(study_row(description="CT\x0b Chest"))["description"] == "CT Chest"


@pytest.mark.parametrize(
    ("vr", "value", "valid"),
    [
        ("LO", "x" * 64, True),
        ("LO", "x" * 65, False),
        ("LO", "a\\b", False),
        ("SH", "x" * 17, False),
        ("UI", "1.2.840.10008.1.2", True),
        ("UI", "1.2.03", False),
        ("UI", "1.2.abc", False),
        ("UI", "1." + "2" * 63, False),
        ("DA", "20240115", True),
        ("DA", "1997.04.24", True),
        ("DA", "2024-01-15", False),
        ("TM", "101530.123", True),
        ("TM", "10:15:30", True),
        ("TM", "10h15", False),
        ("DT", "20240115101530.5+0100", True),
        ("DT", "2024-01-15", False),
        ("CS", "CT", True),
        ("CS", "ct", False),
        ("IS", "12", True),
        ("IS", "1.5", False),
        ("PN", "Doe^Jane=山田^花子=やまだ^はなこ", True),
        ("PN", "x" * 65, False),
        ("PN", "a=b=c=d", False),
    ],
)
def test_values_are_checked_against_their_vr(vr: str, value: str, valid: bool) -> None:
    assert (vr_problem(value, vr) is None) is valid


def test_a_failing_value_names_the_attribute_never_the_value() -> None:
    with pytest.raises(MappingError) as caught:
        check_value(SECRET * 10, "LO", "PatientID")
    assert caught.value.attribute == "PatientID"
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("tag", "vr", "value", "attribute"),
    [
        ("00100020", "LO", "P" * 100_000, "PatientID"),
        ("00100020", "LO", "A\\" + SECRET, "PatientID"),
        ("00100021", "LO", "I" * 65, "IssuerOfPatientID"),
        ("00080050", "SH", "A" * 17, "AccessionNumber"),
        ("00081030", "LO", SECRET * 7, "StudyDescription"),
    ],
)
def test_a_study_with_an_invalid_value_is_parked_naming_the_attribute(
    tag: str, vr: str, value: str, attribute: str
) -> None:
    with pytest.raises(MappingError) as caught:
        parse_study(study_row(extra={tag: element(vr, value)}))
    assert caught.value.attribute == attribute
    assert SECRET not in str(caught.value) and "PPPP" not in str(caught.value)


def test_a_several_valued_patient_id_is_parked() -> None:
    with pytest.raises(MappingError) as caught:
        parse_study(study_row(extra={"00100020": element("LO", "A", "B")}))
    assert caught.value.attribute == "PatientID"


def test_an_invalid_value_inside_a_sequence_names_its_path() -> None:
    item = {"00100020": element("LO", "X" * 70), "00100021": element("LO", "HOSP-A")}
    row = study_row(extra={"00101002": {"vr": "SQ", "Value": [item]}})
    with pytest.raises(MappingError) as caught:
        parse_study(row)
    assert caught.value.attribute == "OtherPatientIDsSequence.PatientID"


def test_an_invalid_study_instance_uid_is_never_used_as_a_key_verbatim(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = f"1.2.{SECRET}"
    row = study_row(study_uid=bad)
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MappingError) as caught:
            parse_study(row)
        key = raw_uid(row)
    assert caught.value.attribute == "StudyInstanceUID"
    assert key is not None and key.startswith("invalid-uid:") and SECRET not in key
    assert key == raw_uid(study_row(study_uid=bad))  # stable: the same study parks once
    assert not [r for r in caplog.records if SECRET in r.getMessage()]


def test_a_valid_uid_is_its_own_key() -> None:
    assert raw_uid(study_row(study_uid=uid(7))) == uid(7)


def test_inline_binary_text_is_decoded_per_character_set() -> None:
    row = study_row(description=None)
    row["00080005"] = element("CS", "ISO_IR 100")
    row["00081030"] = {"vr": "LO", "InlineBinary": inline("Schädel".encode("latin-1"))}
    assert parse_study(row).description == "Schädel"


def test_inline_binary_that_is_not_text_in_the_character_set_is_left_out() -> None:
    row = study_row(description=None)
    row["00080005"] = element("CS", "ISO_IR 192")
    row["00081030"] = {"vr": "LO", "InlineBinary": inline(b"\xff\xfe\x00\x00")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        record = parse_study(row)
    assert record.description is None
    assert "b'" not in repr(mapped(row))


def test_inline_binary_of_an_unknown_vr_is_read_with_the_dictionary_vr() -> None:
    row = study_row(description=None)
    row["00081030"] = {"vr": "UN", "InlineBinary": inline(b"Head CT ")}
    assert parse_study(row).description == "Head CT"


def test_bulk_data_text_is_left_out_without_a_warning() -> None:
    row = study_row(description=None)
    row["00081030"] = {"vr": "LO", "BulkDataURI": "https://pacs.example.org/bulk/1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_study(row).description is None


# PS3.5 Annex H, Example 1: a Japanese name in ISO 2022 (JIS X 0208 in its ideographic and
# phonetic groups), as an archive may send it when it inlines the raw bytes.
ISO_2022_JAPANESE = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"


def test_an_iso_2022_person_name_sent_as_bytes_keeps_all_three_groups() -> None:
    encodings = convert_encodings(["", "ISO 2022 IR 87"])
    assert decode_text(ISO_2022_JAPANESE, "PN", encodings) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    row = study_row(patient_name=None)
    row["00080005"] = element("CS", "", "ISO 2022 IR 87")
    row["00100010"] = {"vr": "PN", "InlineBinary": inline(ISO_2022_JAPANESE)}
    assert parse_study(row).patient_name == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_a_korean_name_sent_as_bytes_is_decoded() -> None:
    # PS3.5 Annex I: KS X 1001 in ISO 2022 (G1), in the ideographic group.
    name = "Hong^Gildong=\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf"
    row = study_row(patient_name=None)
    row["00080005"] = element("CS", "", "ISO 2022 IR 149")
    row["00100010"] = {"vr": "PN", "InlineBinary": inline(name.encode("latin-1"))}
    assert parse_study(row).patient_name == "Hong^Gildong=洪^吉洞=홍^길동"


def test_a_gb18030_name_sent_as_bytes_is_decoded() -> None:
    row = study_row(patient_name=None)
    row["00080005"] = element("CS", "GB18030")
    row["00100010"] = {"vr": "PN", "InlineBinary": inline("Wang^XiaoDong=王^小东=".encode("gb18030"))}
    assert parse_study(row).patient_name == "Wang^XiaoDong=王^小东"


def test_an_accession_issuer_of_type_iso_must_be_an_oid() -> None:
    row = study_row(accession_issuer={"universal": "not-an-oid", "universal_type": "ISO"})
    with pytest.raises(MappingError) as caught:
        mapped(row)
    assert caught.value.attribute == "IssuerOfAccessionNumberSequence.UniversalEntityID"
