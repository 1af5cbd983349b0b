"""The request's caller: an API key, a bearer JWT or the browser's session, worked out once a request.

Routes take the caller through ``CallerDep`` (or ``authenticate``); ``allow_patient`` applies the
one access rule (bridge/api/auth/access.py) and audits a refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from bridge.api.audit import note
from bridge.api.auth.access import decide
from bridge.api.auth.security import ANONYMOUS, UNAUTHENTICATED, Caller
from bridge.api.auth.session import session_caller
from bridge.api.errors import AccessDeniedError, AuthenticationError
from bridge.api.services import mount_path, services_of
from bridge.audit.events import Action
from bridge.gateway.paths import parse
from bridge.mapping.uid import is_uid
from bridge.resolve.links import StudyLocation

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
    if (
        uid is None
        and isinstance(params.get("path"), str)
        and request.url.path.startswith(mount_path(request) + "/dicom-web/")
    ):
        route = parse(params["path"])
        uid = route.study_uid if route is not None else None
    return uid if isinstance(uid, str) and is_uid(uid) else None


async def _authenticate(request: Request) -> Caller:
    s = services_of(request)
    if not s.authenticator.enabled and s.sessions is None:
        # no key, token or login configured: every caller is anonymous, whatever it sends
        request.scope[_CALLER] = ANONYMOUS
        return ANONYMOUS
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


def allow_patient(
    request: Request,
    who: Caller,
    action: Action,
    *,
    study: StudyLocation | None = None,
    patient: str | None = None,
) -> None:
    """AccessDeniedError unless ``who`` may see ``study`` or data of Patient ``patient`` (FHIR id).

    The one rule of bridge/api/auth/access.py: the patient in context, then the SMART scopes. A refusal
    is audited as the ``action`` it refused.
    """
    decision = decide(who, study.patient if study is not None else patient)
    if not decision.allowed:
        note(request, who, action, "refused", study=study, patient=patient, reason=decision.reason)
        raise AccessDeniedError(decision.reason)
