"""Who may see which study: the SMART context and scopes against the study's patient."""

from __future__ import annotations

import pytest

from bridge.api.auth.access import decide, may_see_all, patient_limit
from bridge.api.auth.security import Caller


def jwt(patient: str | None = None, scope: str = "") -> Caller:
    return Caller("jwt", "u1", patient=patient, scopes=frozenset(scope.split()))


@pytest.mark.parametrize(
    ("caller", "study_patient", "allowed"),
    [
        (Caller("anonymous"), "p2", True),
        (Caller("api-key"), "p2", True),
        (jwt(), "p2", True),  # a plain JWT: what the rest of the API shows it
        (jwt("p1", "patient/ImagingStudy.read"), "p1", True),
        (jwt("p1", "patient/*.read"), "p1", True),
        (jwt("p1", "patient/ImagingStudy.rs"), "p1", True),  # SMART v2
        (jwt("p1", "patient/ImagingStudy.read"), "p2", False),
        (jwt("p1", "patient/ImagingStudy.read"), None, False),  # a study without a Patient subject
        (jwt("p1", "user/ImagingStudy.read"), "p2", False),  # a patient in context limits even user scopes
        (jwt("p1", "patient/Observation.read"), "p1", False),
        (jwt("p1", "patient/ImagingStudy.write"), "p1", False),
        (jwt("p1", "patient/ImagingStudy.cud"), "p1", False),
        (jwt("p1"), "p1", True),  # patient context, no SMART scopes at all
        (jwt(None, "user/ImagingStudy.read"), "p2", True),
        (jwt(None, "system/*.*"), "p2", True),
        (jwt(None, "patient/ImagingStudy.read"), "p2", False),  # patient scope without a patient
        (jwt(None, "openid fhirUser user/Observation.read"), "p2", False),
    ],
)
def test_decide(caller: Caller, study_patient: str | None, allowed: bool) -> None:
    decision = decide(caller, study_patient)
    assert decision.allowed is allowed
    assert bool(decision.reason) is not allowed


def test_only_a_caller_with_a_patient_in_context_is_limited() -> None:
    assert patient_limit(jwt("p1")) == "p1"
    assert patient_limit(Caller("api-key", patient="p1")) is None
    assert not may_see_all(jwt("p1", "user/*.read"))
    assert may_see_all(Caller("api-key"))
