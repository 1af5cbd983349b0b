"""The minimal Patient the bridge may create, and the logical reference it may use instead."""

from __future__ import annotations

from typing import Any

from bridge.errors import MappingError
from bridge.mapping.context import BRIDGE_TAG_SYSTEM, MappingContext, resource_id
from bridge.mapping.dates import parse_date
from bridge.mapping.identifiers import PatientKey, other_patient_identifiers
from bridge.mapping.narrative import patient_narrative, with_narrative
from bridge.mapping.records import StudyRecord

_GENDER = {"M": "male", "F": "female", "O": "other"}


def fhir_gender(sex: str | None) -> str | None:
    """Patient.gender for a DICOM PatientSex: M, F, O mapped; another value ``unknown``; absent None."""
    if not sex:
        return None
    return _GENDER.get(sex, "unknown")


# The ISO 21090 name representation extension (core FHIR R4): tells the three DICOM PN component
# groups apart (PS3.5 6.2.1.1: alphabetic, ideographic, phonetic) on otherwise plain HumanNames.
NAME_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
_REPRESENTATIONS = ("ABC", "IDE", "SYL")


def _components(group: str) -> tuple[str, str, str, str, str]:
    parts = [p.strip() for p in group.split("^")] + [""] * 5
    return parts[0], parts[1], parts[2], parts[3], parts[4]


def human_names(pn: str) -> list[dict[str, Any]]:
    """FHIR HumanNames from a DICOM PN: one per non-empty component group.

    The alphabetic group comes first (the name most systems show); each name carries the
    ``iso21090-EN-representation`` extension: ABC (alphabetic), IDE (ideographic) or SYL
    (phonetic), so a reader can tell the kanji from the kana form of the same name.
    """
    names: list[dict[str, Any]] = []
    for group, representation in zip(pn.split("=")[:3], _REPRESENTATIONS, strict=False):
        family, given, middle, prefix, suffix = _components(group)
        name: dict[str, Any] = {}
        if family:
            name["family"] = family
        if given or middle:
            name["given"] = [g for g in (given, *middle.split(" ")) if g]
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        if name:
            name["extension"] = [{"url": NAME_REPRESENTATION, "valueCode": representation}]
            names.append(name)
    return names


def family_names(pn: str) -> list[str]:
    """The family name of each of a DICOM PN's component groups (alphabetic, ideographic, phonetic)."""
    return [family for group in pn.split("=")[:3] if (family := _components(group)[0])]


def display_name(pn: str) -> str:
    """A person's name as people write it ("Dr. Anna Smith"), from a DICOM PN's first non-empty group.

    Empty when the PN has no name in any group (the caller leaves the element out).
    """
    for group in pn.split("=")[:3]:
        family, given, middle, prefix, suffix = _components(group)
        text = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
        if text:
            return text
    return ""


def map_patient(study: StudyRecord, key: PatientKey, ctx: MappingContext) -> dict[str, Any]:
    """A minimal Patient from the study's demographics, for ``match-or-create``.

    A malformed birth date is left out rather than parking the study: the EHR owns demographics.
    """
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": BRIDGE_TAG_SYSTEM, "code": ctx.source_name}]},
        "identifier": [key.as_identifier()]
        + [i for i in other_patient_identifiers(study, ctx) if i != key.as_identifier()],
    }
    if study.patient_name:
        names = human_names(study.patient_name)
        if names:
            patient["name"] = names
    gender = fhir_gender(study.sex)
    if gender is not None:
        patient["gender"] = gender
    if study.birth_date:
        try:
            patient["birthDate"] = parse_date(study.birth_date, "PatientBirthDate").isoformat()
        except MappingError:
            pass
    return with_narrative(patient, patient_narrative)


def patient_resource_id(key: PatientKey) -> str:
    """The deterministic id of the Patient the bridge creates for (system, PatientID).

    Derived as ImagingStudy ids are (a UUID v5), from the escaped search token, so that
    ``("s|a", "b")`` and ``("s", "a|b")`` never share an id; not per source: two archives
    with the same (system, PatientID) mean the same person.
    """
    return resource_id("Patient", key.search())


def logical_subject(key: PatientKey) -> dict[str, Any]:
    """A Reference to the Patient by identifier only (policy ``logical``)."""
    return {"type": "Patient", "identifier": key.as_identifier()}
