"""Bridge errors to HTTP answers with OperationOutcome bodies; no stack trace or input is echoed."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bridge.api.models import OperationOutcome
from bridge.errors import (
    BridgeError,
    ConfigurationError,
    FatalUpstreamError,
    InvalidLookupError,
    NoUsableEndpointError,
    RetriableUpstreamError,
    StoreError,
    StudyNotFoundError,
    StudyWithdrawnError,
    UpstreamError,
)

logger = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 5
# Why a malformed parameter was refused, added to the validation message.
PARAMETER_HINTS: Mapping[str, str] = {
    "id": "a FHIR id is 1-64 characters of A-Z, a-z, 0-9, '-' and '.'",
    "study_uid": "a Study Instance UID is up to 64 characters of digits and dots, e.g. 1.2.840.10008.1",
    "accession": "an accession number is 1-16 characters without backslash or control characters",
    "issuer": "an issuer is a configured issuer name, an OID or a system URI",
    "reference": "give ImagingStudy/{id} or the ImagingStudy's absolute URL on the FHIR server",
    "viewer": "a viewer name from GET /viewers",
}


class AuthenticationError(BridgeError):
    """The caller gave no credentials, or ones that do not check out (401)."""

    def __init__(self, message: str, *, bearer_error: str | None = None) -> None:
        super().__init__(message)
        self.bearer_error = bearer_error


class AccessDeniedError(BridgeError):
    """The caller is who it says, but may not see this study (403)."""


class RateLimitedError(BridgeError):
    """The caller asked for more work than its rate allows (429, with Retry-After)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def outcome(
    status: int, code: str, diagnostics: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer with a one-issue OperationOutcome."""
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _retry_after(exc: BaseException) -> str:
    """The upstream's own Retry-After (kept on the error or the one it wraps), else a default."""
    seen: BaseException | None = exc
    while seen is not None:
        wait = seen.retry_after if isinstance(seen, RetriableUpstreamError) else None
        if wait is not None:
            return str(max(1, math.ceil(wait)))
        seen = seen.__cause__
    return str(DEFAULT_RETRY_AFTER)


def response_for(exc: BridgeError) -> JSONResponse:
    """The HTTP answer for a bridge error."""
    if isinstance(exc, InvalidLookupError):
        return outcome(422, "invalid", str(exc))
    if isinstance(exc, StudyNotFoundError):
        return outcome(404, "not-found", str(exc))
    if isinstance(exc, NoUsableEndpointError | StudyWithdrawnError):
        return outcome(409, "conflict", str(exc))
    if isinstance(exc, AuthenticationError):
        challenge = 'Bearer realm="fhir-dicomweb-bridge"'
        if exc.bearer_error:
            challenge += f', error="{exc.bearer_error}"'
        return outcome(401, "login", str(exc), {"WWW-Authenticate": challenge})
    if isinstance(exc, AccessDeniedError):
        return outcome(403, "forbidden", str(exc))
    if isinstance(exc, RateLimitedError):
        return outcome(429, "throttled", str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, UpstreamError):
        # The upstream's message names its URL; the log keeps it, the caller gets the gist.
        logger.warning("upstream failure while answering: %s", exc)
        server = "FHIR server" if exc.service == "fhir" else "DICOMweb archive"
        if isinstance(exc, FatalUpstreamError):
            return outcome(502, "exception", f"the {server} refused the bridge's request")
        return outcome(
            503, "transient", f"the {server} is unavailable; retry later", {"Retry-After": _retry_after(exc)}
        )
    if isinstance(exc, StoreError):
        logger.warning("state store failure while answering: %s", exc)
        return outcome(503, "transient", "the state store is unavailable", {"Retry-After": _retry_after(exc)})
    if isinstance(exc, ConfigurationError):
        # A setting the request needed is wrong (say, a FHIR server that refuses the write strategy):
        # the message names it, for the operator's log; the caller learns where to look, not the URLs.
        logger.error("configuration problem while answering: %s", exc)
        return outcome(500, "exception", "a setting of the bridge stopped this request; its log names which")
    logger.error("unmapped %s while answering", type(exc).__name__)
    return outcome(500, "exception", "internal error")


def _describe(errors: Sequence[Any]) -> str:
    parts = []
    for error in errors:
        loc = [str(x) for x in error.get("loc", ())]
        name = loc[-1] if loc else "request"
        where = f"{loc[0]} parameter {name}" if len(loc) > 1 else name
        hint = PARAMETER_HINTS.get(name)
        message = str(error.get("msg", "is invalid"))
        parts.append(f"{where}: {message}" + (f" ({hint})" if hint else ""))
    return "; ".join(parts) or "invalid request"


async def _bridge_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BridgeError)
    return response_for(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # The input values are left out on purpose: they could be anything, patient data included.
    return outcome(422, "invalid", _describe(exc.errors()))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden"}
    text = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return outcome(exc.status_code, codes.get(exc.status_code, "invalid"), text, exc.headers)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(BridgeError, _bridge_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": OperationOutcome, "description": "Credentials missing or invalid (when auth is on)"},
    403: {
        "model": OperationOutcome,
        "description": "The study belongs to another patient than the one in context",
    },
    404: {"model": OperationOutcome, "description": "No such ImagingStudy"},
    409: {
        "model": OperationOutcome,
        "description": "No usable WADO-RS endpoint, ambiguous lookup, or a study withdrawn from clinicians",
    },
    422: {"model": OperationOutcome, "description": "A malformed id, UID, reference or parameter, and why"},
    502: {"model": OperationOutcome, "description": "The FHIR server refused the bridge's request"},
    503: {"model": OperationOutcome, "description": "The FHIR server is unavailable; see Retry-After"},
}
