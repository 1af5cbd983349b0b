"""The value-size guard: outsized short values park the study by name; real overshoots pass."""

from __future__ import annotations

import pytest

from bridge.dicomweb.guard import check_value_sizes
from bridge.errors import MappingError
from tests.builders import study_row


def test_a_huge_patient_id_is_refused_by_name_without_its_value() -> None:
    row = study_row(patient_id="SECRETPID" * 2000)
    with pytest.raises(MappingError) as caught:
        check_value_sizes(row)
    assert caught.value.attribute == "PatientID"
    assert "(0010,0020)" in str(caught.value)
    assert "SECRETPID" not in str(caught.value)


def test_a_huge_person_name_is_refused() -> None:
    with pytest.raises(MappingError) as caught:
        check_value_sizes(study_row(patient_name="Doe^" + "J" * 5000))
    assert caught.value.attribute == "PatientName"


def test_values_a_little_over_the_standard_and_long_text_pass() -> None:
    row = study_row(description="D" * 200, extra={"00324000": {"vr": "LT", "Value": ["x" * 50_000]}})
    assert check_value_sizes(row) is row


def test_rows_that_are_not_objects_are_left_to_the_parser() -> None:
    assert check_value_sizes("not a row") == "not a row"
