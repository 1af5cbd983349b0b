"""Recording an API access in the audit trail, from a request, its caller and the study it touched."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import Request

from bridge.api.auth.security import Caller
from bridge.audit.events import Access, Action, Outcome, window_key
from bridge.resolve.links import StudyLocation


def note(
    request: Request,
    who: Caller,
    action: Action,
    outcome: Outcome = "success",
    *,
    study: StudyLocation | None = None,
    patient: str | None = None,
    study_uid: str | None = None,
    reason: str | None = None,
) -> None:
    """Record one access (once per caller, study and window; nothing when the audit is off).

    ``study_uid`` names a study not looked up (a refused credential's target), when ``study`` is None.
    """
    trail = getattr(request.app.state.services, "audit", None)
    if trail is None:
        return
    uid = study.study_uid if study else study_uid
    fhir_id = study.fhir_id if study else None
    patient = patient or (study.patient if study else None)
    client = request.scope.get("client")
    address = client[0] if client else None
    key = window_key(action, outcome, who.method, who.subject, who.client_id, uid, fhir_id, patient, address)
    if trail.repeats(key):  # the common case of a busy API: decided before an Access is made
        return
    trail.record(
        Access(
            action=action,
            outcome=outcome,
            recorded=datetime.now(UTC),
            caller_method=who.method,
            user=who.subject,
            client_id=who.client_id,
            patient=patient,
            study_fhir_id=fhir_id,
            study_uid=uid,
            address=address,
            reason=reason,
        )
    )
