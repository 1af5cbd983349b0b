"""The minimal Patient the bridge may create, and the logical reference it may use instead."""

from __future__ import annotations

from typing import Any

from bridge.dicomweb.records import StudyRecord
from bridge.errors import MappingError
from bridge.mapping.context import BRIDGE_TAG_SYSTEM, MappingContext
from bridge.mapping.dates import parse_date
from bridge.mapping.identifiers import PatientKey, other_patient_identifiers

_GENDER = {"M": "male", "F": "female", "O": "other"}


def human_names(pn: str) -> list[dict[str, Any]]:
    """FHIR HumanNames from a DICOM PN: one per component group (alphabetic, ideographic, phonetic)."""
    names: list[dict[str, Any]] = []
    for group in pn.split("="):
        parts = [p.strip() for p in group.split("^")] + [""] * 5
        family, given, middle, prefix, suffix = parts[:5]
        name: dict[str, Any] = {}
        if family:
            name["family"] = family
        if given or middle:
            name["given"] = [g for g in (given, *middle.split(" ")) if g]
        if prefix:
            name["prefix"] = [prefix]
        if suffix:
            name["suffix"] = [suffix]
        if name and name not in names:
            names.append(name)
    return names


def display_name(pn: str) -> str:
    """A person's name as people write it ("Dr. Anna Smith"), from a DICOM PN's first group."""
    parts = [p.strip() for p in pn.split("=")[0].split("^")] + [""] * 5
    family, given, middle, prefix, suffix = parts[:5]
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


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
    if study.sex in _GENDER:
        patient["gender"] = _GENDER[study.sex]
    elif study.sex:
        patient["gender"] = "unknown"
    if study.birth_date:
        try:
            patient["birthDate"] = parse_date(study.birth_date, "PatientBirthDate").isoformat()
        except MappingError:
            pass
    return patient


def logical_subject(key: PatientKey) -> dict[str, Any]:
    """A Reference to the Patient by identifier only (policy ``logical``)."""
    return {"type": "Patient", "identifier": key.as_identifier()}
