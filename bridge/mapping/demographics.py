"""The demographics cross-check: whether a study's birth date, sex and family name agree with its Patient.

Pure: a study record and a Patient resource in, the names of the attributes that disagree out.
A value that is absent, empty or unreadable on either side never disagrees; the EHR's Patient may
be less precise (a birth year only) or keep former names, and both count as agreeing.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any

from bridge.errors import MappingError
from bridge.mapping.dates import parse_date
from bridge.mapping.patient import family_names, fhir_gender
from bridge.mapping.records import StudyRecord

# Combining marks after characters below this code point are accents (Latin, Greek, Cyrillic)
# and are dropped; after kana or other scripts they change the letter (a dakuten) and are kept.
_ACCENTED_SCRIPTS_END = 0x0530


def normalise_name(text: str) -> str:
    """A name reduced to what identifies it: no case, accents, spacing, punctuation or separators.

    ``"Müller-Lüdenscheidt"`` and ``"MULLER LUDENSCHEIDT"`` both give ``"mullerludenscheidt"``;
    full-width and half-width forms are folded alike (NFKC), so are the PN separators ``^`` and ``=``.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    kept: list[str] = []
    for char in decomposed:
        if unicodedata.category(char) == "Mn":
            if kept and ord(kept[-1]) < _ACCENTED_SCRIPTS_END:
                continue  # an accent on a Latin (Greek, Cyrillic) letter
            kept.append(char)
        elif char.isalnum():
            kept.append(char)
    return unicodedata.normalize("NFKC", "".join(kept)).casefold()


def _patient_families(patient: Mapping[str, Any]) -> set[str]:
    """Every family name the Patient has or had (all its HumanNames, former ones included)."""
    families = set()
    for name in patient.get("name") or ():
        if isinstance(name, Mapping) and isinstance(name.get("family"), str):
            families.add(normalise_name(name["family"]))
    return families - {""}


def _birth_dates_agree(study_value: str, patient_value: str) -> bool:
    """A DICOM date against a FHIR date of any precision (``1970``, ``1970-05``, ``1970-05-17``)."""
    try:
        day = parse_date(study_value, "PatientBirthDate").isoformat()
    except MappingError:
        return True  # an unreadable birth date is no evidence either way
    return day.startswith(patient_value.strip()) if patient_value.strip() else True


def disagreements(study: StudyRecord, patient: Mapping[str, Any]) -> list[str]:
    """The DICOM attributes of the study that disagree with the Patient, in a fixed order.

    ``PatientBirthDate``: both dates known and different (at the Patient's precision).
    ``PatientSex``: both known, neither ``unknown``, and different.
    ``PatientName``: the study's family names (from each PN component group) match none of the
    Patient's, after :func:`normalise_name`; a side with no family name never disagrees.
    """
    found: list[str] = []
    birth = patient.get("birthDate")
    if study.birth_date and isinstance(birth, str) and not _birth_dates_agree(study.birth_date, birth):
        found.append("PatientBirthDate")
    gender = fhir_gender(study.sex)
    theirs = patient.get("gender")
    if gender not in (None, "unknown") and theirs not in (None, "unknown") and gender != theirs:
        found.append("PatientSex")
    ours = {normalise_name(f) for f in family_names(study.patient_name or "")} - {""}
    families = _patient_families(patient)
    if ours and families and not ours & families:
        found.append("PatientName")
    return found
