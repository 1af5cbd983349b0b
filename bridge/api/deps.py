"""FastAPI dependencies: the app's services, the caller, and "load the study or fail" per lookup kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.routing import APIRoute

from bridge.api.access import decide
from bridge.api.audit import note
from bridge.api.errors import AccessDeniedError, AuthenticationError
from bridge.api.readiness import ReadinessProbe
from bridge.api.security import UNAUTHENTICATED, Authenticator, Caller
from bridge.api.session import session_caller
from bridge.audit.events import Action
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.gateway.paths import parse
from bridge.mapping.uid import UID_PATTERN, is_uid
from bridge.resolve.links import StudyLocation, ViewerTemplate
from bridge.resolve.resolver import Resolver
from bridge.runtime import Runtime
from bridge.sync.pushes import PushDrainer

FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"
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
    drainer: PushDrainer | None = None  # the push queue's drainer, under `bridge run`


# FastAPI solves every dependency of a request anew (cache keys, scopes, sub-dependencies), which
# for a cached lookup was most of the API's own time. So the per-request services are plain reads
# of ``request.app.state``, and each dependency below takes the Request alone: one layer, no more.


def services_of(request: Request) -> Services:
    """The app's services (set up by create_app)."""
    found: Services = request.app.state.services
    return found


def resolver_of(request: Request) -> Resolver:
    """The resolver, open for the app's lifetime."""
    found = services_of(request).resolver
    if found is None:  # only outside the lifespan, i.e. a wiring mistake
        raise RuntimeError("the app's lifespan has not run")
    return found


async def services(request: Request) -> Services:
    """The app's services, as a dependency."""
    return services_of(request)


ServicesDep = Annotated[Services, Depends(services)]


async def resolver(request: Request) -> Resolver:
    """The resolver, as a dependency."""
    return resolver_of(request)


ResolverDep = Annotated[Resolver, Depends(resolver)]

# The schemes the OpenAPI schema names for every route that authenticates its caller (the routes of
# AuthenticatedRoute; the app adds the schemes to the schema's components). `authenticate` reads them.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "BearerJWT": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
}


class AuthenticatedRoute(APIRoute):
    """A route whose caller authenticates: its operation names the API's security schemes.

    (FastAPI learns them from ``Security`` parameters, which it would solve on every request.)
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        extra.setdefault("security", [{name: []} for name in SECURITY_SCHEMES])
        super().__init__(path, endpoint, openapi_extra=extra, **kwargs)


_CALLER = "bridge.caller"  # where the request's caller is kept once known (the ASGI scope)


def _bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header; None for none or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if not scheme or not token or scheme.lower() != "bearer":
        return None
    return token


async def authenticate(request: Request, *, audit_refusal: bool = True) -> Caller:
    """The authenticated caller (anonymous when authentication is off), else 401; worked out once a request.

    A key or bearer token sent with the request wins; otherwise the browser's session cookie. A
    refusal is a security alert in the audit trail (one per source address and audit window),
    unless ``audit_refusal`` is False (the front's question: the gateway audits when it answers).
    """
    known: Caller | None = request.scope.get(_CALLER)
    if known is not None:
        return known
    try:
        return await _authenticate(request)
    except AuthenticationError as exc:
        if not audit_refusal:
            raise
        note(
            request,
            UNAUTHENTICATED,
            "authentication",
            "refused",
            study_uid=_named_study(request),
            reason=str(exc),
        )
        raise


def _named_study(request: Request) -> str | None:
    """The Study Instance UID the request's path names (a lookup's or the gateway's), if any."""
    params = request.path_params
    uid = params.get("study_uid")
    if uid is None and isinstance(params.get("path"), str) and request.url.path.startswith(
        mount_path(request) + "/dicom-web/"
    ):
        route = parse(params["path"])
        uid = route.study_uid if route is not None else None
    return uid if isinstance(uid, str) and is_uid(uid) else None


async def _authenticate(request: Request) -> Caller:
    s = services_of(request)
    headers = request.headers
    api_key = headers.get("x-api-key") or None
    bearer = _bearer_token(headers.get("authorization"))
    if api_key is None and bearer is None:
        session = await session_caller(request)
        if session is not None:
            request.scope[_CALLER] = session
            return session
    if s.settings.login_enabled and not s.authenticator.enabled:
        # no key or token is configured: one sent is refused, never taken as anonymous
        raise AuthenticationError("authentication required: log in at /login")
    who = await s.authenticator.check(api_key, bearer)
    request.scope[_CALLER] = who
    return who


async def caller(request: Request) -> Caller:
    """The authenticated caller, as a dependency (see `authenticate`)."""
    return await authenticate(request)


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


async def study_by_id(id: FhirId, request: Request) -> StudyLocation:  # noqa: A002
    """The study of ImagingStudy/{id}, or 403/404/409/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_id(id), who, request)


async def study_by_uid(study_uid: StudyUid, request: Request) -> StudyLocation:
    """The study with this Study Instance UID, or 403/404/409/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_study_uid(study_uid), who, request)


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
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_accession(accession, issuer), who, request)


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
    request: Request,
) -> StudyLocation:
    """The study a FHIR reference or absolute URL names, or 403/404/409/422/503."""
    who = await authenticate(request)
    return _allowed(await resolver_of(request).by_reference(reference), who, request)


StudyById = Annotated[StudyLocation, Depends(study_by_id)]
StudyByUid = Annotated[StudyLocation, Depends(study_by_uid)]
StudyByAccession = Annotated[StudyLocation, Depends(study_by_accession)]
StudyByReference = Annotated[StudyLocation, Depends(study_by_reference)]
