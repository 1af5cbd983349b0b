"""What the state store remembers and answers, as plain values.

A published study, one just published, a run's counts.

They are the store's values; the sync's StateStore protocol (bridge/sync/protocols.py) passes them.
No SQL here, so importing them loads no SQLAlchemy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KnownStudy:
    """What the store remembers of a published study."""

    study_uid: str
    qido_fingerprint: str
    resource_fingerprint: str
    fhir_id: str
    fhir_version: str | None
    patient_identity: str | None = None  # digest of the identity it was published under, if known
    withdrawn: str | None = None  # why it is withdrawn from clinicians; None when it is not


@dataclass(frozen=True, slots=True)
class Published:
    """A study just published, to be remembered."""

    study_uid: str
    qido_fingerprint: str
    resource_fingerprint: str
    fhir_id: str
    fhir_version: str | None
    started: str | None = None
    patient_identity: str | None = None  # digest of the study's (PatientID, IssuerOfPatientID)
    patient_id: str | None = None  # the FHIR id of the Patient it links to (None: a logical subject)


@dataclass(frozen=True, slots=True)
class RunCounts:
    """The outcome counts of a run."""

    seen: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    parked: int = 0
    deleted: int = 0
    claimed: int = 0  # skipped: another replica was publishing them
    fhir_writes: int = 0
    fallbacks: int = 0  # documented fallbacks used for missing Type 1 data (this run only, not stored)
