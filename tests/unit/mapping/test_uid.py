"""The one UID rule (PS3.5 9.1), exact where a caller names a UID, padding-tolerant for archive values."""

from __future__ import annotations

import pytest

from bridge.errors import MappingError
from bridge.mapping.identifiers import check_uid
from bridge.mapping.records import parse_study, raw_uid
from bridge.mapping.uid import MAX_UID_LENGTH, archive_uid, is_uid
from tests.builders import study_row

VALID = ["0", "1.2", "1.2.840.10008.1.2.1", "2.25.0", "1." + "2" * 62]
INVALID = ["", ".", "1.", ".1", "1..2", "01.2", "1.02", "1.2a", "1,2", "-1.2", "1.2.+3", "1." + "2" * 63]


@pytest.mark.parametrize("value", VALID)
def test_a_uid_of_digit_components_without_leading_zeros_is_valid(value: str) -> None:
    assert is_uid(value)
    assert archive_uid(value) == value


@pytest.mark.parametrize("value", INVALID)
def test_anything_else_is_not_a_uid_at_either_entry_point(value: str) -> None:
    assert not is_uid(value)
    assert archive_uid(value) is None


def test_a_uid_is_at_most_64_characters() -> None:
    longest = "1." + "2" * (MAX_UID_LENGTH - 2)
    assert is_uid(longest) and not is_uid(longest + "3")


@pytest.mark.parametrize("value", [" 1.2", "1.2 ", "1.2\n", "\t1.2"])
def test_a_caller_named_uid_with_whitespace_around_it_is_not_a_uid(value: str) -> None:
    assert not is_uid(value)


@pytest.mark.parametrize("value", [" 1.2", "1.2 ", "1.2\n", "\t1.2 "])
def test_an_archive_value_is_trimmed_of_its_padding(value: str) -> None:
    assert archive_uid(value) == "1.2"


@pytest.mark.parametrize("value", ["1. 2", "1 .2", "1.2\x001"])
def test_whitespace_inside_a_uid_is_never_removed(value: str) -> None:
    assert not is_uid(value)
    assert archive_uid(value) is None


def test_a_study_read_from_the_archive_carries_its_uid_without_padding() -> None:
    assert parse_study(study_row(study_uid="1.2.3 ")).uid == "1.2.3"
    assert raw_uid(study_row(study_uid="1.2.3\x00")) == "1.2.3"
    assert check_uid(" 1.2.3 ", "StudyInstanceUID") == "1.2.3"


def test_a_study_whose_uid_has_a_space_inside_is_parked_naming_the_attribute() -> None:
    with pytest.raises(MappingError) as caught:
        parse_study(study_row(study_uid="1.2. 3"))
    assert caught.value.attribute == "StudyInstanceUID"
