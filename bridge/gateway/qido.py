"""QIDO-RS answers limited to one patient: the archive asked by the patient's identifiers, rows checked.

The archive's matching is not trusted: QIDO matching may be case-insensitive, fuzzy or wildcard,
and an archive may ignore a key it does not support. So each row must carry exactly the
identifier asked for, and its study must be one of the patient's ImagingStudies on the FHIR
server, the same rule that authorizes a retrieve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.mapping.identity import DERIVED_ISSUER_PREFIX

PATIENT_ID = "00100020"
ISSUER = "00100021"
STUDY_UID = "0020000D"
SERIES_UID = "0020000E"
SOP_UID = "00080018"
# Keys a caller may not set for itself when its answers are limited to one patient.
_PATIENT_KEYS = frozenset({"patientid", PATIENT_ID.lower(), "issuerofpatientid", ISSUER.lower()})
_WILDCARDS = frozenset("*?\\")


@dataclass(frozen=True, slots=True)
class PatientKey:
    """One way an archive knows the patient: PatientID, and its issuer when the system has one."""

    patient_id: str
    issuer: str | None


def patient_keys(
    identifiers: Iterable[tuple[str, str]],
    *,
    default_system: str,
    issuer_systems: Mapping[str, str],
) -> list[PatientKey]:
    """The (PatientID, issuer) pairs a source's archive would hold for a Patient's identifiers.

    The reverse of the sync's identity rule: the default system means no issuer, a mapped
    system its issuer, a derived system the issuer in it. Values with QIDO wildcards are left
    out: they would match other patients.
    """
    keys: list[PatientKey] = []
    for system, value in identifiers:
        if not value or _WILDCARDS & set(value):
            continue
        if system == default_system:
            keys.append(PatientKey(value, None))
        keys.extend(
            PatientKey(value, issuer) for issuer, mapped in issuer_systems.items() if mapped == system
        )
        if system.startswith(DERIVED_ISSUER_PREFIX):
            keys.append(PatientKey(value, system[len(DERIVED_ISSUER_PREFIX) :]))
    return list(dict.fromkeys(keys))


def query_params(given: Sequence[tuple[str, str]], key: PatientKey) -> list[tuple[str, str]]:
    """The caller's QIDO parameters, with the patient's identifier instead of any patient key it gave."""
    params = [(k, v) for k, v in given if k.lower() not in _PATIENT_KEYS]
    params.append((PATIENT_ID, key.patient_id))
    params.extend(("includefield", tag) for tag in (PATIENT_ID, ISSUER, STUDY_UID))
    return params


def value_of(row: Mapping[str, Any], tag: str) -> str | None:
    """The first value of a DICOM JSON attribute, as text."""
    element = row.get(tag)
    if not isinstance(element, dict):
        return None
    values = element.get("Value")
    if not isinstance(values, list) or not values or not isinstance(values[0], str | int | float):
        return None
    return str(values[0])


def keep(row: Any, key: PatientKey, studies: frozenset[str]) -> bool:
    """Whether a QIDO row belongs to the patient: exactly its identifier, and one of its studies."""
    if not isinstance(row, dict):
        return False
    if value_of(row, PATIENT_ID) != key.patient_id:
        return False
    if key.issuer is not None and value_of(row, ISSUER) != key.issuer:
        return False
    return value_of(row, STUDY_UID) in studies


def within_study(row: Any, keys: Sequence[PatientKey], series: frozenset[str]) -> bool:
    """Whether a row of one study (a series, instance or metadata row) is the study as published.

    Its series must be one the ImagingStudy lists (an archive may hold one Study Instance UID
    under several patients, and answers every patient's series of it), and a row that names its
    patient must name exactly one of the identifiers of the study's Patient. A row that names
    neither its series nor its patient cannot be placed, and is left out.
    """
    if not isinstance(row, dict):
        return False
    series_uid = value_of(row, SERIES_UID)
    if series_uid is not None and series_uid not in series:
        return False
    if PATIENT_ID in row:
        patient_id, issuer = value_of(row, PATIENT_ID) or "", value_of(row, ISSUER)
        return any(
            patient_id == key.patient_id and (key.issuer is None or issuer == key.issuer) for key in keys
        )
    return series_uid is not None


def within_study_params(given: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The caller's QIDO parameters within a study, asking also for what :func:`within_study` reads."""
    params = [(k, v) for k, v in given if k.lower() not in _PATIENT_KEYS]
    params.extend(("includefield", tag) for tag in (PATIENT_ID, ISSUER, SERIES_UID))
    return params


def row_key(row: Mapping[str, Any]) -> tuple[str | None, ...]:
    """What identifies a row across several queries (study, series, instance)."""
    return (value_of(row, STUDY_UID), value_of(row, SERIES_UID), value_of(row, SOP_UID))


def limit_of(given: Sequence[tuple[str, str]]) -> int | None:
    """The caller's ``limit``, if it gave a valid one."""
    for name, value in given:
        if name.lower() == "limit" and value.isdigit():
            return int(value)
    return None
