"""Bad DICOM data raises MappingError naming the attribute, and never echoes patient data."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import replace

import pytest

from bridge.errors import MappingError
from bridge.mapping.identifiers import patient_key
from bridge.mapping.imaging_study import map_imaging_study
from bridge.mapping.records import StudyRecord, parse_series, parse_study
from bridge.mapping.validate import validate
from tests.builders import context, series, series_row, study, study_row, uid

# Distinctive patient data that must never show up in an error message.
NAME = "Secretfamily^Secretgiven"
PATIENT_ID = "PID-SECRET-4242"
BIRTH_DATE = "19610203"


def patient_study(**kwargs: object) -> StudyRecord:
    return study(patient_name=NAME, patient_id=PATIENT_ID, birth_date=BIRTH_DATE, **kwargs)


def map_study(record: StudyRecord, series_records: list | None = None) -> dict:
    return map_imaging_study(
        record,
        [series()] if series_records is None else series_records,
        context(),
        subject={"reference": "Patient/p"},
        endpoint_reference="Endpoint/e",
    )


# Each case: a call that must fail, and the attribute it must name. Malformed values are put in
# the record directly, because parsing them is a separate concern (see the parse tests below).
CASES: dict[str, tuple[Callable[[], object], str]] = {
    "missing PatientID": (
        lambda: patient_key(replace(patient_study(), patient_id=None), context()),
        "PatientID",
    ),
    "malformed StudyInstanceUID": (
        lambda: map_study(replace(patient_study(), uid="1.2.abc")),
        "StudyInstanceUID",
    ),
    "StudyInstanceUID with a leading zero component": (
        lambda: map_study(replace(patient_study(), uid="1.2.03")),
        "StudyInstanceUID",
    ),
    "StudyDate not a calendar date": (
        lambda: map_study(replace(patient_study(), date="20241399")),
        "StudyDate",
    ),
    "StudyDate not a date at all": (
        lambda: map_study(replace(patient_study(), date="2024-1-5")),
        "StudyDate",
    ),
    "StudyTime hour out of range": (
        lambda: map_study(replace(patient_study(), time="251530")),
        "StudyTime",
    ),
    "StudyTime not a time": (
        lambda: map_study(replace(patient_study(), time="10h15")),
        "StudyTime",
    ),
    "StudyTime without StudyDate": (
        lambda: map_study(replace(patient_study(), date=None, time="99")),
        "StudyTime",
    ),
    "TimezoneOffsetFromUTC malformed": (
        lambda: map_study(replace(patient_study(), tz_offset="+1")),
        "TimezoneOffsetFromUTC",
    ),
    "TimezoneOffsetFromUTC out of range": (
        lambda: map_study(replace(patient_study(), tz_offset="+1500")),
        "TimezoneOffsetFromUTC",
    ),
    "series without Modality, when the setting parks it": (
        lambda: map_imaging_study(
            patient_study(),
            [series(modality=None)],
            context(missing_modality=None),
            subject={"reference": "Patient/p"},
            endpoint_reference="Endpoint/e",
        ),
        "Modality",
    ),
    "malformed SeriesInstanceUID": (
        lambda: map_study(patient_study(), [replace(series(), uid="1.2.x.3")]),
        "SeriesInstanceUID",
    ),
    "malformed SeriesDate": (
        lambda: map_study(patient_study(), [replace(series(), date="20240230")]),
        "SeriesDate",
    ),
    "negative SeriesNumber": (
        lambda: map_study(patient_study(), [replace(series(), number=-1)]),
        "SeriesNumber",
    ),
    "study row without StudyInstanceUID": (
        lambda: parse_study(study_row(study_uid=None, patient_name=NAME, patient_id=PATIENT_ID)),
        "StudyInstanceUID",
    ),
    "series row without SeriesInstanceUID": (
        lambda: parse_series(series_row(series_uid=None)),
        "SeriesInstanceUID",
    ),
}


# pydicom warns while check_uid tests a malformed UID; that warning is its own (xfail) test below.
uid_warning = pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")


@uid_warning
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_attribute(case: str) -> None:
    call, attribute = CASES[case]
    with pytest.raises(MappingError) as caught:
        call()
    assert caught.value.attribute == attribute


@uid_warning
@pytest.mark.parametrize("case", list(CASES))
def test_mapping_errors_carry_no_patient_data(case: str) -> None:
    call, _ = CASES[case]
    with pytest.raises(MappingError) as caught:
        call()
    message = str(caught.value)
    for secret in ("Secretfamily", "Secretgiven", PATIENT_ID, BIRTH_DATE, "1961-02-03"):
        assert secret not in message


def test_validation_errors_name_elements_not_values() -> None:
    resource = {"resourceType": "Patient", "birthDate": "Secret-1961", "gender": "Secretgender"}
    with pytest.raises(MappingError) as caught:
        validate(resource)
    assert "birthDate" in str(caught.value)
    assert "Secret" not in str(caught.value)


def test_unknown_resource_type_is_a_mapping_error() -> None:
    with pytest.raises(MappingError):
        validate({"resourceType": "NoSuchThing"})


def test_the_fhir_validator_rejects_an_imaging_study_without_subject() -> None:
    resource = map_study(study())
    del resource["subject"]
    with pytest.raises(MappingError, match="subject"):
        validate(resource)


def test_a_malformed_uid_is_refused_without_a_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MappingError):
            map_study(replace(study(), uid="1.2.abc"))
    assert [str(w.message) for w in caught] == []


def test_a_study_row_that_is_not_dicom_json_is_a_mapping_error() -> None:
    with pytest.raises(MappingError):
        parse_study({"0020000D": {"vr": "UI", "Value": "not-a-list"}})


def test_parsing_odd_values_neither_warns_nor_logs_patient_data(caplog: pytest.LogCaptureFixture) -> None:
    row = study_row(patient_id="X" * 70 + "SECRETPID", birth_date="1961-02-03", patient_name=NAME)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        with pytest.raises(MappingError) as parked:
            parse_study(row)
        record = parse_study(study_row(birth_date="1961-02-03", patient_name=NAME))
    assert parked.value.attribute == "PatientID"  # too long for LO: parked, named, not quoted
    assert record.birth_date is None  # not a DICOM date: left out, the study still maps
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records] + [str(parked.value)]
    assert not [t for t in texts if "1961-02-03" in t or "SECRETPID" in t or "XXXX" in t]


def test_non_integer_series_number_names_the_attribute() -> None:
    with pytest.raises(MappingError) as caught:
        parse_series(series_row(series_uid=uid(1, 1), number="x"))  # type: ignore[arg-type]
    assert caught.value.attribute == "SeriesNumber"
