"""The minimal Patient the bridge may create, and how a study's PatientID is keyed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bridge.errors import MappingError, PatientLinkError
from bridge.mapping.identifiers import patient_key
from bridge.mapping.identity import UnmappedIssuer
from bridge.mapping.patient import NAME_REPRESENTATION, display_name, logical_subject, map_patient
from bridge.mapping.records import Issuer, OtherPatientId
from bridge.mapping.validate import validate
from tests.builders import PATIENT_SYSTEM, context, study


def patient(**study_kwargs: object) -> dict[str, object]:
    ctx = context()
    record = study(**study_kwargs)
    resource = map_patient(record, patient_key(record, ctx), ctx)
    validate(resource)
    return resource


def test_patient_identifier_uses_the_system_mapped_from_the_issuer() -> None:
    ctx = context(patient_issuer_systems={"HOSP-A": "urn:oid:1.2.3.4.5"})
    key = patient_key(study(patient_id="MRN-1", patient_issuer="HOSP-A"), ctx)
    assert key.as_identifier() == {"system": "urn:oid:1.2.3.4.5", "value": "MRN-1"}


def test_an_unmapped_issuer_parks_by_default_naming_the_attribute_and_the_setting() -> None:
    ctx = context(patient_issuer_systems={"HOSP-A": "urn:oid:1.2.3.4.5"})
    with pytest.raises(PatientLinkError) as caught:
        patient_key(study(patient_id="MRN-1", patient_issuer="HOSP-B"), ctx)
    assert caught.value.attribute == "IssuerOfPatientID"
    assert "BRIDGE_PATIENT_ISSUER_SYSTEMS" in str(caught.value)
    assert "MRN-1" not in str(caught.value)


def test_an_unmapped_qualifier_parks_naming_the_sequence() -> None:
    record = replace(study(patient_id="MRN-1"), patient_issuer_qualifier=Issuer(local="CLINIC-7"))
    with pytest.raises(PatientLinkError) as caught:
        patient_key(record, context())
    assert caught.value.attribute == "IssuerOfPatientIDQualifiersSequence"


def test_an_iso_qualifier_is_its_own_system_under_every_policy() -> None:
    qualifier = Issuer(universal="1.2.3", universal_type="ISO")
    record = replace(study(patient_id="MRN-1"), patient_issuer_qualifier=qualifier)
    assert patient_key(record, context()).system == "urn:oid:1.2.3"


def test_unmapped_issuer_default_uses_the_default_patient_system() -> None:
    ctx = context(
        patient_issuer_systems={"HOSP-A": "urn:oid:1.2.3.4.5"}, unmapped_issuer=UnmappedIssuer.DEFAULT
    )
    key = patient_key(study(patient_id="MRN-1", patient_issuer="HOSP-B"), ctx)
    assert key.as_identifier() == {"system": PATIENT_SYSTEM, "value": "MRN-1"}


def test_unmapped_issuer_derive_gives_each_issuer_its_own_system() -> None:
    ctx = context(unmapped_issuer=UnmappedIssuer.DERIVE)
    a = patient_key(study(patient_id="MRN-1", patient_issuer="Hosp B/East"), ctx)
    b = patient_key(study(patient_id="MRN-1", patient_issuer="hosp b/east"), ctx)
    none = patient_key(study(patient_id="MRN-1"), ctx)
    assert a.system == "urn:fhir-dicomweb-bridge:issuer:Hosp%20B%2FEast"
    assert len({a.system, b.system, none.system}) == 3  # case kept: two issuers never meet
    assert none.system == PATIENT_SYSTEM


def test_derive_also_names_other_patient_ids_of_unmapped_issuers() -> None:
    ctx = context(unmapped_issuer=UnmappedIssuer.DERIVE)
    record = replace(study(patient_id="MRN-1"), other_patient_ids=(OtherPatientId("X9", "LAB", None),))
    identifiers = map_patient(record, patient_key(record, ctx), ctx)["identifier"]
    assert identifiers[1] == {"system": "urn:fhir-dicomweb-bridge:issuer:LAB", "value": "X9"}


def test_the_policy_changes_the_context_fingerprint() -> None:
    assert context().fingerprint() != context(unmapped_issuer=UnmappedIssuer.DERIVE).fingerprint()


def test_no_issuer_uses_the_default_patient_system() -> None:
    key = patient_key(study(patient_id="MRN-1"), context())
    assert key.system == PATIENT_SYSTEM


def test_patient_search_escapes_fhir_token_separators() -> None:
    key = patient_key(study(patient_id="A|B,C$D"), context())
    assert key.search() == f"{PATIENT_SYSTEM}|A\\|B\\,C\\$D"


def test_patient_carries_the_identifier() -> None:
    assert patient(patient_id="MRN-9")["identifier"] == [{"system": PATIENT_SYSTEM, "value": "MRN-9"}]


def representation(code: str) -> list[dict[str, str]]:
    return [{"url": NAME_REPRESENTATION, "valueCode": code}]


def test_person_name_components() -> None:
    assert patient(patient_name="Muster^Erika^Maria^Dr.^MD")["name"] == [
        {
            "family": "Muster",
            "given": ["Erika", "Maria"],
            "prefix": ["Dr."],
            "suffix": ["MD"],
            "extension": representation("ABC"),
        }
    ]


def test_japanese_name_gives_one_human_name_per_component_group() -> None:
    groups = {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}
    assert patient(patient_name=groups)["name"] == [
        {"family": "Yamada", "given": ["Tarou"], "extension": representation("ABC")},
        {"family": "山田", "given": ["太郎"], "extension": representation("IDE")},
        {"family": "やまだ", "given": ["たろう"], "extension": representation("SYL")},
    ]


def test_ideographic_only_name_is_kept() -> None:
    assert patient(patient_name={"Ideographic": "山田^太郎"})["name"] == [
        {"family": "山田", "given": ["太郎"], "extension": representation("IDE")}
    ]


def test_phonetic_only_name_is_kept_as_syllabic() -> None:
    assert patient(patient_name={"Phonetic": "やまだ^たろう"})["name"] == [
        {"family": "やまだ", "given": ["たろう"], "extension": representation("SYL")}
    ]


@pytest.mark.parametrize("empty", ["", "   ", "^^^^", "==", "^="])
def test_an_empty_patient_name_gives_no_name(empty: str) -> None:
    assert "name" not in patient(patient_name=empty)


def test_no_name_element_without_patient_name() -> None:
    assert "name" not in patient(patient_name=None)


@pytest.mark.parametrize(
    ("sex", "gender"), [("M", "male"), ("F", "female"), ("O", "other"), ("X", "unknown")]
)
def test_gender_mapping(sex: str, gender: str) -> None:
    assert patient(sex=sex)["gender"] == gender


def test_no_gender_without_patient_sex() -> None:
    assert "gender" not in patient(sex=None)


def test_birth_date_is_a_fhir_date() -> None:
    assert patient(birth_date="19640812")["birthDate"] == "1964-08-12"


@pytest.mark.parametrize("bad", ["19641312", "1964", "unknown"])
def test_malformed_birth_date_is_left_out(bad: str) -> None:
    ctx = context()
    record = replace(study(), birth_date=bad)  # built directly: pydicom would warn while parsing
    resource = map_patient(record, patient_key(record, ctx), ctx)
    validate(resource)
    assert "birthDate" not in resource


def test_logical_subject_references_the_patient_by_identifier_only() -> None:
    key = patient_key(study(patient_id="MRN-3"), context())
    assert logical_subject(key) == {
        "type": "Patient",
        "identifier": {"system": PATIENT_SYSTEM, "value": "MRN-3"},
    }


def test_display_names_read_like_names() -> None:
    assert display_name("Smith^Anna^B^Dr^PhD") == "Dr Anna B Smith PhD"
    assert display_name("Yamada^Tarou=山田^太郎") == "Tarou Yamada"
@pytest.mark.parametrize("universal", ["1.2.03", "not-an-oid", "1." + "2" * 100_000])
def test_an_iso_qualifier_that_is_not_an_oid_parks_naming_it(universal: str) -> None:
    qualifier = Issuer(universal=universal, universal_type="ISO")
    record = replace(study(patient_id="MRN-1"), patient_issuer_qualifier=qualifier)
    with pytest.raises(MappingError) as caught:
        patient_key(record, context())
    assert caught.value.attribute == "IssuerOfPatientIDQualifiersSequence.UniversalEntityID"
    assert universal[:20] not in str(caught.value)


def test_a_huge_unmapped_qualifier_derives_no_system() -> None:
    record = replace(study(patient_id="MRN-1"), patient_issuer_qualifier=Issuer(local="L" * 10_000))
    with pytest.raises(PatientLinkError) as caught:
        patient_key(record, context(unmapped_issuer=UnmappedIssuer.DERIVE))
    assert caught.value.attribute == "IssuerOfPatientIDQualifiersSequence"
