"""One study, one patient: whether what the archive says of a Study Instance UID names one patient; pure.

An archive may hold one Study Instance UID under several patients (Orthanc keeps a second study
when an instance arrives with a known Study UID and another PatientID; a modality may reuse UIDs).
Such a study is a conflict, never a merge: it is parked and, if published, withdrawn from
clinicians until the archive is corrected (docs/integrator-guide.md, "One study, one patient").
"""

from __future__ import annotations

from collections.abc import Iterable

from bridge.errors import PatientConflictError
from bridge.mapping.records import PatientIdentity, digest

CONFLICT_REASON = "conflicting patient identity"
CONFLICT_CODE = "conflicting-patient-identity"  # the withdrawal extension's code (bridge.mapping.context)
CONFLICT_ATTRIBUTE = "PatientID"


def conflict(where: str) -> PatientConflictError:
    """The error that parks (and withdraws) a study whose ``where`` name several patients."""
    # Attribute names only: the values are patient data.
    return PatientConflictError(
        f"{CONFLICT_REASON}: {where} name more than one patient (PatientID, IssuerOfPatientID); "
        "correct the archive (integrator guide, 'One study, one patient'); it is then published again",
        attribute=CONFLICT_ATTRIBUTE,
    )


def agree(a: PatientIdentity, b: PatientIdentity) -> bool:
    """Whether two identities can be one patient: the same PatientID, and the same issuer where both give one.

    An issuer one row leaves out is not a disagreement (archives return Issuer of Patient ID at
    some query levels and not at others); two different issuers are.
    """
    if a.patient_id != b.patient_id:
        return False
    return a.issuer is None or b.issuer is None or a.issuer == b.issuer


def conflicting(identities: Iterable[PatientIdentity | None]) -> bool:
    """Whether the identities (None: a row that did not say) name more than one patient."""
    seen: list[PatientIdentity] = []
    for identity in identities:
        if identity is None or identity in seen:
            continue
        if any(not agree(identity, other) for other in seen):
            return True
        seen.append(identity)
    return False


def identity_digest(identity: PatientIdentity) -> str:
    """What the state store keeps of the identity a study was published under (never the values)."""
    return digest([identity.patient_id, identity.issuer])
