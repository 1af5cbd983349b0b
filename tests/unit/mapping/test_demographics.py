"""The demographics cross-check: which attributes of a study disagree with its Patient."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.mapping.demographics import disagreements, normalise_name
from bridge.mapping.records import parse_study
from tests.builders import study_row


def patient(**elements: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", **elements}


def study(**row: Any) -> Any:
    return parse_study(study_row(**row))


def test_the_same_person_agrees() -> None:
    found = disagreements(
        study(patient_name="Doe^Jane", birth_date="19700101", sex="F"),
        patient(name=[{"family": "Doe", "given": ["Jane"]}], birthDate="1970-01-01", gender="female"),
    )
    assert found == []


def test_each_disagreeing_attribute_is_named_never_its_value() -> None:
    found = disagreements(
        study(patient_name="Roe^Richard", birth_date="19851231", sex="M"),
        patient(name=[{"family": "Doe"}], birthDate="1970-01-01", gender="female"),
    )
    assert found == ["PatientBirthDate", "PatientSex", "PatientName"]


@pytest.mark.parametrize(
    ("pn", "family"),
    [
        ("MÜLLER-LÜDENSCHEIDT^Hans", "Müller Lüdenscheidt"),
        ("o'brien^sean", "O'Brien"),
        ("  Van der Berg ^Anna", "VanDerBerg"),
        ("García^José", "GARCIA"),
        ("ＹＡＭＡＤＡ^ＴＡＲＯ", "Yamada"),  # full-width letters, as some modalities send them
    ],
)
def test_family_names_are_compared_without_case_accents_spacing_or_punctuation(pn: str, family: str) -> None:
    assert disagreements(study(patient_name=pn), patient(name=[{"family": family}])) == []


def test_any_component_group_may_match_any_of_the_patients_names() -> None:
    pn = {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    kanji_only = patient(name=[{"family": "山田", "given": ["太郎"]}])
    assert disagreements(study(patient_name=pn), kanji_only) == []
    assert disagreements(study(patient_name=pn), patient(name=[{"family": "やまだ"}])) == []
    # Kana that differ by a voicing mark are other names: the mark is kept, not taken for an accent.
    assert disagreements(study(patient_name=pn), patient(name=[{"family": "やまた"}])) == ["PatientName"]


def test_a_former_name_of_the_patient_agrees() -> None:
    married = patient(name=[{"use": "official", "family": "Smith"}, {"use": "old", "family": "Jones"}])
    assert disagreements(study(patient_name="JONES^MARY"), married) == []


@pytest.mark.parametrize(
    ("row", "resource"),
    [
        (
            {"patient_name": None, "birth_date": None, "sex": None},
            {"name": [{"family": "Doe"}], "gender": "male"},
        ),
        ({"patient_name": "", "birth_date": "", "sex": ""}, {"birthDate": "1970-01-01", "gender": "male"}),
        ({"patient_name": "^Jane", "sex": "F"}, {"name": [{"family": "Roe"}]}),  # no family in the study
        ({"patient_name": "Doe^Jane", "sex": "F"}, {"name": [{"text": "Jane Roe"}], "gender": "unknown"}),
        ({"sex": "O"}, {"gender": "unknown"}),
        ({"birth_date": "notadate"}, {"birthDate": "1970-01-01"}),
    ],
)
def test_absent_empty_or_unknown_values_never_disagree(row: dict[str, Any], resource: dict[str, Any]) -> None:
    assert disagreements(study(**row), patient(**resource)) == []


def test_a_birth_date_is_compared_at_the_patients_precision() -> None:
    assert disagreements(study(birth_date="19700517"), patient(birthDate="1970")) == []
    assert disagreements(study(birth_date="19700517"), patient(birthDate="1970-05")) == []
    assert disagreements(study(birth_date="19700517"), patient(birthDate="1971")) == ["PatientBirthDate"]


def test_normalise_name_keeps_letters_and_digits_only() -> None:
    assert normalise_name("D'Ávila-Souza^=") == "davilasouza"
