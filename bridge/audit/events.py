"""Access records and the FHIR R4 AuditEvents made from them (IHE Basic Audit Log Patterns); pure.

One ``Access`` is one thing a caller did with patient data: viewed the record page, looked up a
study's links, was redirected to a viewer, read or searched images through the gateway. Its
AuditEvent says who (the user and the client app), what (the Patient and the ImagingStudy), when,
with what outcome and from which network address, in the shape of the BALP "Read" and "Query"
patterns (https://profiles.ihe.net/ITI/BALP/).

A refused credential (a bad token, a wrong API key, none where one is needed) and a refused login
or EHR launch (a forged, replayed or other browser's callback, the identity provider's error, a
failed code exchange or ID token, a launch without a well-typed patient) are security alerts
instead: DICOM's "Security Alert" event (DCM 110113, sub-type 110132 "Use of Restricted Function"),
outcome minor failure, with the source's network address. They are one event per source address
and action within the audit window, so probing cannot flood the FHIR server with AuditEvents (see
``Access.window_key``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from bridge.mapping.context import DICOM_UID_SYSTEM

Action = Literal[
    "record-view", "links", "viewer", "image-read", "image-query", "operator-retry", "authentication", "login"
]
# Actions recorded as security alerts (failures to authenticate), not as reads of patient data.
SECURITY_ALERTS: frozenset[str] = frozenset({"authentication", "login"})
Outcome = Literal["success", "refused", "failed"]

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/"
_AUDIT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
_INTERACTION = "http://hl7.org/fhir/restful-interaction"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_BRIDGE_ACTION = "urn:fhir-dicomweb-bridge:audit-action"
OBSERVER = "fhir-dicomweb-bridge"

# R4 AuditEvent.outcome: 0 success, 4 minor failure (refused: the system did what it should), 8 serious.
_OUTCOME_CODE = {"success": "0", "refused": "4", "failed": "8"}
_ACTION_TEXT = {
    "record-view": "Record page viewed",
    "links": "Study links looked up",
    "viewer": "Viewer opened",
    "image-read": "Images retrieved through the gateway",
    "image-query": "Images searched through the gateway",
    "authentication": "Credentials refused",
    "login": "Login or EHR launch refused",
    "operator-retry": "Parked study retried from the operator page",
}


@dataclass(frozen=True, slots=True)
class Access:
    """One access to patient data, as the API saw it."""

    action: Action
    outcome: Outcome
    recorded: datetime  # aware, UTC
    caller_method: str  # "api-key" | "jwt" | "session" | "anonymous"
    user: str | None = None  # the token's or session's subject
    client_id: str | None = None
    patient: str | None = None  # FHIR Patient id
    study_fhir_id: str | None = None
    study_uid: str | None = None
    address: str | None = None  # the caller's network address
    reason: str | None = None  # why it was refused or failed (never patient data)

    def window_key(self) -> WindowKey | None:
        """What makes two accesses "the same" for the once-per-window rule (see `window_key`)."""
        who = (self.caller_method, self.user, self.client_id)
        study = (self.study_uid, self.study_fhir_id, self.patient)
        return window_key(self.action, self.outcome, *who, *study, self.address)


WindowKey = tuple[str | None, ...]


def window_key(
    action: Action,
    outcome: Outcome,
    caller_method: str,
    user: str | None,
    client_id: str | None,
    study_uid: str | None,
    study_fhir_id: str | None,
    patient: str | None,
    address: str | None,
) -> WindowKey | None:
    """What makes two accesses "the same" for the once-per-window rule; None: each one counts.

    Security alerts count per source address and action alone: whatever a prober varies (the
    token, the study, the path), its refusals within the window are one AuditEvent. An operator's
    every retry counts. Other accesses are one per caller, action, study (its UID, else its FHIR
    id, else the Patient's) and outcome.
    """
    if action in SECURITY_ALERTS:
        return ("security-alert", action, address)
    if action == "operator-retry":
        return None
    return (caller_method, user, client_id, action, study_uid or study_fhir_id or patient, outcome)


def audit_event(access: Access, event_id: str | None = None) -> dict[str, Any]:
    """The AuditEvent (R4 JSON) recording ``access``; its id is new unless given."""
    query = access.action == "image-query"
    operation = access.action == "operator-retry"  # an operation (a sync) on the study, not a read
    agents: list[dict[str, Any]] = [
        {
            "type": {
                "coding": [{"system": _PARTICIPATION, "code": "IRCP", "display": "information recipient"}]
            },
            "who": (
                {"identifier": {"value": access.user}, "display": access.user}
                if access.user
                else {"display": f"{access.caller_method} caller"}
            ),
            "requestor": True,
            **({"network": {"address": access.address, "type": "2"}} if access.address else {}),
        }
    ]
    if access.client_id:
        agents.append(
            {
                "type": {"coding": [{"system": _DCM, "code": "110150", "display": "Application"}]},
                "who": {"identifier": {"value": access.client_id}, "display": access.client_id},
                "requestor": False,
            }
        )
    agents.append(
        {
            "type": {"coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]},
            "who": {"display": OBSERVER},
            "requestor": False,
        }
    )
    entities: list[dict[str, Any]] = []
    if access.patient:
        entities.append(
            {
                "what": {"reference": f"Patient/{access.patient}"},
                "type": {"system": _ENTITY_TYPE, "code": "1", "display": "Person"},
                "role": {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    if access.study_fhir_id or access.study_uid:
        what: dict[str, Any] = {}
        if access.study_fhir_id:
            what["reference"] = f"ImagingStudy/{access.study_fhir_id}"
        if access.study_uid:
            what["identifier"] = {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{access.study_uid}"}
        entities.append(
            {
                "what": what,
                "type": {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"},
                "role": {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"},
            }
        )
    event: dict[str, Any] = {"resourceType": "AuditEvent", "id": event_id or str(uuid.uuid4())}
    if access.action in SECURITY_ALERTS:
        event.update(
            type={"system": _DCM, "code": "110113", "display": "Security Alert"},
            subtype=[
                {"system": _DCM, "code": "110132", "display": "Use of Restricted Function"},
                {"system": _BRIDGE_ACTION, "code": access.action, "display": _ACTION_TEXT[access.action]},
            ],
            action="E",
        )
    else:
        event.update(
            meta={
                "profile": [BALP + ("IHE.BasicAudit.PatientQuery" if query else "IHE.BasicAudit.PatientRead")]
            },
            type={"system": _AUDIT_TYPE, "code": "rest", "display": "Restful Operation"},
            subtype=[
                {"system": _INTERACTION, "code": "search" if query else "operation" if operation else "read"},
                {"system": _BRIDGE_ACTION, "code": access.action, "display": _ACTION_TEXT[access.action]},
            ],
            action="E" if query or operation else "R",
        )
    event.update(
        recorded=access.recorded.isoformat().replace("+00:00", "Z"),
        outcome=_OUTCOME_CODE[access.outcome],
        agent=agents,
        source={
            "observer": {"display": OBSERVER},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
    )
    if access.reason:
        event["outcomeDesc"] = access.reason
    if entities:
        event["entity"] = entities
    return event


def log_line(access: Access) -> str:
    """The access as one log line: no Patient, no names; the study by its UID and FHIR id."""
    parts = [
        f"action={access.action}",
        f"outcome={access.outcome}",
        f"caller={access.caller_method}",
    ]
    if access.client_id:
        parts.append(f"client={access.client_id}")
    if access.study_fhir_id:
        parts.append(f"imaging_study={access.study_fhir_id}")
    if access.study_uid:
        parts.append(f"study_uid={access.study_uid}")
    if access.reason:
        parts.append(f"reason={access.reason!r}")
    return " ".join(parts)
