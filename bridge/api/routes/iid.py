"""IHE Invoke Image Display (IID, RAD-106): an EHR asks for a study's images or a patient's imaging.

``requestType=STUDY`` with ``studyUID`` or ``accessionNumber`` opens the viewer (through the
bridge's own viewer redirect); ``requestType=PATIENT`` with ``patientID`` (HL7 CX:
``ID^^^&issuerOID&ISO``, or ``ID^^^issuer``) opens the patient's record page. The same
authentication as every page; a study or patient outside the session's patient is a 403.
"""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import RedirectResponse, Response

from bridge.api.auth.caller import CallerDep, allow_patient, caller
from bridge.api.auth.security import Caller
from bridge.api.deps import ACCESSION_PATTERN, ResolverDep, ServicesDep
from bridge.api.errors import outcome
from bridge.api.services import Services, mount_path
from bridge.errors import InvalidLookupError, NoUsableEndpointError, StudyNotFoundError
from bridge.mapping.identifiers import PatientKey
from bridge.mapping.uid import UID_PATTERN
from bridge.resolve.resolver import Resolver

router = APIRouter(tags=["iid"], dependencies=[Depends(caller)], include_in_schema=False)

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_NO_STORE = {"Cache-Control": "no-store"}


def _one(value: str | None, name: str) -> str | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if len(items) != 1:
        raise InvalidLookupError(
            f"{name}: give exactly one value (several studies in one request are not supported)"
        )
    return items[0]


def parse_cx(value: str) -> tuple[str, str | None]:
    """An HL7 CX patient id (``ID^^^namespace&universalId&type``) as (ID, issuer or None)."""
    parts = value.split("^")
    ident = parts[0]
    if not ident or len(ident) > 64 or any(c in ident for c in "&\\") or not ident.isprintable():
        raise InvalidLookupError("patientID: the ID part is empty or not a valid Patient ID")
    if len(parts) > 1 and (len(parts) < 4 or any(parts[1:3])):
        raise InvalidLookupError("patientID: use the HL7 CX form ID^^^issuer")
    authority = parts[3] if len(parts) >= 4 else ""
    namespace, _, rest = authority.partition("&")
    universal = rest.partition("&")[0]
    return ident, (namespace or universal or None)


def patient_system(issuer: str | None, s: Services) -> str:
    """The identifier system of Patient IDs from ``issuer``: configured, an OID, else 422."""
    source = s.settings.each_source()[0]
    if issuer is None:
        return source.patient_identifier_system
    for each in s.settings.each_source():
        if issuer in each.patient_issuer_systems:
            return each.patient_issuer_systems[issuer]
    if _OID.match(issuer):
        return f"urn:oid:{issuer}"
    raise InvalidLookupError("patientID: its issuer is neither an OID nor in BRIDGE_PATIENT_ISSUER_SYSTEMS")


@router.get("/IHEInvokeImageDisplay")
async def invoke_image_display(
    request: Request,
    s: ServicesDep,
    r: ResolverDep,
    who: CallerDep,
    request_type: Annotated[str | None, Query(alias="requestType", max_length=16)] = None,
    study_uid: Annotated[str | None, Query(alias="studyUID", max_length=4096)] = None,
    accession_number: Annotated[str | None, Query(alias="accessionNumber", max_length=4096)] = None,
    patient_id: Annotated[str | None, Query(alias="patientID", max_length=512)] = None,
) -> Response:
    """302 to the viewer (STUDY) or the record page (PATIENT); 400 with the reason for a bad request."""
    try:
        return await _invoke(request, s, r, who, request_type, study_uid, accession_number, patient_id)
    except InvalidLookupError as exc:  # IID's invoker made a bad request: 400, as the profile expects
        return outcome(400, "invalid", str(exc))


async def _invoke(
    request: Request,
    s: Services,
    r: Resolver,
    who: Caller,
    request_type: str | None,
    study_uid: str | None,
    accession_number: str | None,
    patient_id: str | None,
) -> RedirectResponse:
    kind = (request_type or "").upper()
    if kind == "STUDY":
        if (study_uid is None) == (accession_number is None):
            raise InvalidLookupError("requestType=STUDY needs studyUID or accessionNumber (one of them)")
        uid = _one(study_uid, "studyUID")
        accession = _one(accession_number, "accessionNumber")
        if uid is not None:
            if len(uid) > 64 or not re.match(UID_PATTERN, uid):
                raise InvalidLookupError("studyUID: not a Study Instance UID")
            study = await r.by_study_uid(uid)
        else:
            assert accession is not None
            if not re.match(ACCESSION_PATTERN, accession):
                raise InvalidLookupError(
                    "accessionNumber: 1-16 characters without backslash or control characters"
                )
            study = await r.by_accession(accession, None)
        allow_patient(request, who, "viewer", study=study)
        target = f"{mount_path(request)}/imaging-studies/{quote(study.fhir_id, safe='')}/viewer"
        return RedirectResponse(target, status_code=302, headers=_NO_STORE)
    if kind == "PATIENT":
        if patient_id is None:
            raise InvalidLookupError("requestType=PATIENT needs patientID")
        if study_uid is not None or accession_number is not None:
            raise InvalidLookupError("requestType=PATIENT takes patientID only")
        ident, issuer = parse_cx(patient_id)
        system = patient_system(issuer, s)
        found = [
            p
            for p in await r.fhir.search("Patient", {"identifier": PatientKey(system, ident).search()})
            # the answer is checked, never trusted: exactly this system and value
            if any(
                isinstance(i, dict) and i.get("system") == system and i.get("value") == ident
                for i in p.get("identifier") or []
            )
        ]
        if not found:
            raise StudyNotFoundError("no Patient has this patientID")
        if len(found) > 1:
            raise NoUsableEndpointError(
                "several Patients have this patientID; ask the EHR to fix the duplicate"
            )
        fhir_id = str(found[0].get("id") or "")
        allow_patient(request, who, "record-view", patient=fhir_id)
        target = f"{mount_path(request)}/record/patients/{quote(fhir_id, safe='')}"
        return RedirectResponse(target, status_code=302, headers=_NO_STORE)
    raise InvalidLookupError("requestType must be STUDY or PATIENT")
