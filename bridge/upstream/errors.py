"""Turns httpx outcomes into bridge errors: which answers are retriable, which are fatal, and why."""

from __future__ import annotations

import email.utils
import re
import ssl
import time
from typing import Any

import httpx

from bridge.errors import (
    FatalUpstreamError,
    RetriableUpstreamError,
    UpstreamAuthError,
    UpstreamError,
)
from bridge.upstream.jsonstream import ParsedResponse

RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})

def setting_prefix(service: str) -> str:
    """The environment prefix of an upstream's settings, e.g. ``BRIDGE_FHIR_``."""
    return f"BRIDGE_{service.upper()}_"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def where(request: httpx.Request) -> str:
    """Method and path of a request, never its query string (which may carry a PatientID)."""
    return f"{request.method} {request.url.scheme}://{request.url.netloc.decode()}{request.url.path}"


_CHALLENGE_DESCRIPTION = re.compile(r'error_description="([^"]*)"')


def refusal_detail(response: httpx.Response) -> str | None:
    """The server's short reason for a 401/403: its Bearer challenge or OperationOutcome text."""
    found = _CHALLENGE_DESCRIPTION.search(response.headers.get("WWW-Authenticate", ""))
    if found:
        return found.group(1)[:200]
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        for issue in body.get("issue") or []:
            if isinstance(issue, dict):
                text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
                if text:
                    return str(text)[:200]
    return None


def auth_error(response: httpx.Response, service: str, detail: str | None = None) -> UpstreamAuthError:
    """The error for a 401 or 403: which upstream refused, and which settings to check."""
    detail = detail or refusal_detail(response)
    prefix = setting_prefix(service)
    if response.status_code == 401:
        problem = f"the credentials were refused; check {prefix}AUTH and its credential settings"
    else:
        problem = f"the credentials lack permission for this request; check {prefix}SCOPES and the grants"
    message = f"{service} {where(response.request)} answered {response.status_code}: {problem}"
    if detail:
        message = f"{message} ({detail})"
    return UpstreamAuthError(message, service=service, status=response.status_code)


def error_for_response(response: httpx.Response, service: str, detail: str | None = None) -> UpstreamError:
    """The bridge error for a non-2xx answer: retriable for 408/425/429/5xx, fatal otherwise."""
    if response.status_code in AUTH_STATUS:
        return auth_error(response, service, detail)
    message = f"{service} {where(response.request)} answered {response.status_code}"
    if detail:
        message = f"{message}: {detail}"
    if response.status_code in RETRIABLE_STATUS:
        return RetriableUpstreamError(
            message,
            service=service,
            status=response.status_code,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    return FatalUpstreamError(message, service=service, status=response.status_code)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind an httpx error, if the connection failed in the TLS layer."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            # A connection cut mid-stream is a network fault, worth a retry, not a refusal.
            transient = isinstance(current, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError)
            return None if transient else current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# What a request can raise below the HTTP layer: httpx's errors, and TLS alerts that httpx lets
# through unwrapped (a server refusing the client certificate over HTTP/1.1, for one).
TRANSPORT_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, ssl.SSLError)


def error_for_exception(exc: Exception, request: httpx.Request, service: str) -> UpstreamError:
    """Convert a transport error; every one is worth a retry except a bad URL or a TLS refusal."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return FatalUpstreamError(
            f"{service} {where(request)}: unsupported URL ({type(exc).__name__})", service=service
        )
    tls = _tls_failure(exc)
    if tls is not None:
        prefix = setting_prefix(service)
        reason = getattr(tls, "verify_message", None) or getattr(tls, "reason", None) or type(tls).__name__
        if isinstance(tls, ssl.SSLCertVerificationError):
            hint = f"the server's certificate was not trusted ({reason}); check {prefix}CA_BUNDLE"
        else:
            hint = (
                f"the TLS handshake failed ({reason}); check {prefix}CLIENT_CERT / {prefix}CLIENT_KEY "
                "and that the URL's scheme is right"
            )
        return UpstreamAuthError(f"{service} {where(request)}: {hint}", service=service)
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return RetriableUpstreamError(f"{service} {where(request)} {kind}: {type(exc).__name__}", service=service)


def body_is_empty(response: httpx.Response) -> bool:
    """Whether the answer's body is nothing but white space (whether read whole or parsed as it came)."""
    if isinstance(response, ParsedResponse):
        return response.empty
    return not response.content.strip()


def json_body(response: httpx.Response, service: str) -> Any:
    """The response's JSON, or a fatal error naming the request if the body is not JSON."""
    try:
        return response.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: json.loads of a body nested too deep
        raise FatalUpstreamError(
            f"{service} {where(response.request)} sent a body that is not JSON",
            service=service,
            status=response.status_code,
        ) from exc
