"""What Patient linking passes around: the Patient a key links to, and the Patient the bridge would create."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.mapping.context import MappingContext
from bridge.mapping.identifiers import PatientKey
from bridge.mapping.patient import map_patient, patient_resource_id
from bridge.mapping.records import StudyRecord
from bridge.mapping.validate import validate
from bridge.sync.policy import WriteStrategy

NEW_PATIENT = "(new)"  # a dry run's stand-in for a Patient the sync would create


@dataclass(frozen=True, slots=True)
class LinkedPatient:
    """The Patient a key links to: its id, the resource as read or written, and the merge it came through."""

    id: str
    resource: dict[str, Any]
    replaced: str | None = None  # the id of the merged-away Patient that led here, if any


def new_patient(
    study: StudyRecord, key: PatientKey, ctx: MappingContext, strategy: WriteStrategy
) -> dict[str, Any]:
    """The Patient the bridge would create for a study, validated (MappingError if it is not valid).

    Under ``client-id`` it carries the id derived from the key, so a replay PUTs the same Patient.
    """
    patient = map_patient(study, key, ctx)
    if strategy is WriteStrategy.CLIENT_ID:
        patient = {"resourceType": "Patient", "id": patient_resource_id(key), **patient}
    validate(patient)
    return patient
