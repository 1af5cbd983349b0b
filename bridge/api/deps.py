"""FastAPI dependencies: the app's services, the caller, and "load the study or fail" per lookup kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from bridge.api.access import decide
from bridge.api.audit import note
from bridge.api.errors import AccessDeniedError, AuthenticationError
from bridge.api.readiness import ReadinessProbe
from bridge.api.security import Authenticator, Caller
from bridge.api.session import session_caller
from bridge.audit.events import Action
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.resolve.links import StudyLocation, ViewerTemplate
from bridge.resolve.resolver import Resolver
from bridge.runtime import Runtime

FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
# Accession Number is VR SH: up to 16 characters, no backslash, no control characters.
ACCESSION_PATTERN = r"^[^\\\x00-\x1f\x7f]{1,16}$"


@dataclass
class Services:
    """What the routes use, built by the app factory and opened by its lifespan."""

    settings: Settings
    authenticator: Authenticator
    viewers: dict[str, ViewerTemplate]
    resolver: Resolver | None = None
    readiness: ReadinessProbe | None = None
    runtimes: list[Runtime] = field(default_factory=list)  # one per source
    audit: AuditTrail | None = None  # the access audit trail, open for the app's lifetime


async def services(request: Request) -> Services:
    """The app's services (set up by create_app)."""
    found: Services = request.app.state.services
    return found


ServicesDep = Annotated[Services, Depends(services)]


async def resolver(s: ServicesDep) -> Resolver:
    """The resolver, open for the app's lifetime."""
    if s.resolver is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the app's lifespan has not run")
    return s.resolver


ResolverDep = Annotated[Resolver, Depends(resolver)]

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey")
BEARER_HEADER = HTTPBearer(auto_error=False, scheme_name="BearerJWT", bearerFormat="JWT")


async def caller(
    s: ServicesDep,
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_HEADER)],
    session: Annotated[Caller | None, Depends(session_caller)] = None,
) -> Caller:
    """The authenticated caller (anonymous when authentication is off), else 401.

    A key or bearer token sent with the request wins; otherwise the browser's session cookie.
    """
    if s.settings.login_enabled and not s.authenticator.enabled:
        if session is not None and api_key is None and bearer is None:
            return session
        # no key or token is configured: one sent is refused, never taken as anonymous
        raise AuthenticationError("authentication required: log in at /login")
    if api_key is None and bearer is None and session is not None:
        return session
    return await s.authenticator.check(api_key, bearer.credentials if bearer else None)


CallerDep = Annotated[Caller, Depends(caller)]


async def unlimited_caller(who: CallerDep) -> Caller:
    """The caller, if not limited to one patient: operators' routes (failures, on-demand sync), else 403."""
    if who.patient is not None:
        raise AccessDeniedError("this needs a caller not limited to one patient")
    return who


def mount_path(request: Request) -> str:
    """Where the app is mounted (``root_path``, no trailing slash), so links work behind a prefix."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def allow_patient(
    request: Request,
    who: Caller,
    action: Action,
    *,
    study: StudyLocation | None = None,
    patient: str | None = None,
) -> None:
    """AccessDeniedError unless ``who`` may see ``study`` or data of Patient ``patient`` (FHIR id).

    The one rule of bridge/api/access.py: the patient in context, then the SMART scopes. A refusal
    is audited as the ``action`` it refused.
    """
    decision = decide(who, study.patient if study is not None else patient)
    if not decision.allowed:
        note(request, who, action, "refused", study=study, patient=patient, reason=decision.reason)
        raise AccessDeniedError(decision.reason)


FhirId = Annotated[
    str,
    Path(
        description="FHIR id of the ImagingStudy",
        pattern=FHIR_ID_PATTERN,
        max_length=64,
        examples=["abc-123"],
    ),
]
StudyUid = Annotated[
    str,
    Path(
        description="Study Instance UID", pattern=UID_PATTERN, max_length=64, examples=["1.2.840.113619.2.1"]
    ),
]


async def study_by_id(
    id: FhirId,  # noqa: A002
    r: ResolverDep,
    who: CallerDep,
    request: Request,
) -> StudyLocation:
    """The study of ImagingStudy/{id}, or 403/404/409/503."""
    return _allowed(await r.by_id(id), who, request)


async def study_by_uid(
    study_uid: StudyUid, r: ResolverDep, who: CallerDep, request: Request
) -> StudyLocation:
    """The study with this Study Instance UID, or 403/404/409/503."""
    return _allowed(await r.by_study_uid(study_uid), who, request)


def _allowed(study: StudyLocation, who: Caller, request: Request) -> StudyLocation:
    """The study, if the caller may see it (the gateway's rule, bridge/api/access.py); else 403, audited."""
    path = request.url.path
    action: Action = (
        "viewer" if path.endswith("/viewer") else "record-view" if path.startswith("/record") else "links"
    )
    allow_patient(request, who, action, study=study)
    return study


async def study_by_accession(
    accession: Annotated[str, Path(description="Accession Number (0008,0050)", pattern=ACCESSION_PATTERN)],
    r: ResolverDep,
    who: CallerDep,
    request: Request,
    issuer: Annotated[
        str | None,
        Query(
            description="Issuer: a BRIDGE_ACCESSION_ISSUER_SYSTEMS name, an OID or the identifier system",
            min_length=1,
            max_length=256,
            pattern=r"^\S+$",
        ),
    ] = None,
) -> StudyLocation:
    """The one study with this accession number, or 403/404/409/503."""
    return _allowed(await r.by_accession(accession, issuer), who, request)


async def study_by_reference(
    reference: Annotated[
        str,
        Query(
            description="ImagingStudy/{id}, or the ImagingStudy's absolute URL on the FHIR server",
            min_length=1,
            max_length=2048,
            examples=["ImagingStudy/abc-123"],
        ),
    ],
    r: ResolverDep,
    who: CallerDep,
    request: Request,
) -> StudyLocation:
    """The study a FHIR reference or absolute URL names, or 403/404/409/422/503."""
    return _allowed(await r.by_reference(reference), who, request)


StudyById = Annotated[StudyLocation, Depends(study_by_id)]
StudyByUid = Annotated[StudyLocation, Depends(study_by_uid)]
StudyByAccession = Annotated[StudyLocation, Depends(study_by_accession)]
StudyByReference = Annotated[StudyLocation, Depends(study_by_reference)]
