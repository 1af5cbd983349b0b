"""One place that turns httpx outcomes into bridge errors and decides what is retried."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from bridge.errors import (
    FatalUpstreamError,
    RetriableUpstreamError,
    UpstreamError,
    UpstreamUnavailableError,
)

logger = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


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


def error_for_response(response: httpx.Response, service: str, detail: str | None = None) -> UpstreamError:
    """The bridge error for a non-2xx answer: retriable for 408/425/429/5xx, fatal otherwise."""
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


def error_for_exception(exc: httpx.HTTPError, request: httpx.Request, service: str) -> UpstreamError:
    """Convert an httpx transport error; every one of them is worth a retry except a bad URL."""
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return FatalUpstreamError(
            f"{service} {where(request)}: unsupported URL ({type(exc).__name__})", service=service
        )
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "failed"
    return RetriableUpstreamError(f"{service} {where(request)} {kind}: {type(exc).__name__}", service=service)


class RetryPolicy:
    """Exponential backoff with full jitter, honouring Retry-After, bounded in attempts and wait."""

    def __init__(self, retries: int = 4, base: float = 0.5, max_wait: float = 30.0) -> None:
        self.retries = retries
        self.base = base
        self.max_wait = max_wait

    def wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetriableUpstreamError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_wait)
        ceiling = min(self.max_wait, self.base * 2 ** (state.attempt_number - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not security

    async def run(self, attempt: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """Call ``attempt`` until it succeeds, fails fatally, or the retries run out."""
        retrying = AsyncRetrying(
            retry=retry_if_exception(lambda e: isinstance(e, RetriableUpstreamError)),
            stop=stop_after_attempt(self.retries + 1),
            wait=self.wait,
            reraise=True,
            before_sleep=_log_retry,
        )
        try:
            async for try_ in retrying:
                with try_:
                    return await attempt()
        except RetriableUpstreamError as exc:
            raise UpstreamUnavailableError(
                f"{exc} (gave up after {self.retries + 1} attempts)",
                service=exc.service,
                status=exc.status,
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    logger.warning("retrying after attempt %d: %s", state.attempt_number, exc)


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    service: str,
    policy: RetryPolicy,
    ok: Callable[[httpx.Response], bool] = lambda r: r.is_success,
    detail: Callable[[httpx.Response], str | None] = lambda r: None,
) -> httpx.Response:
    """Send ``request`` with retries; return the answer if ``ok``, else raise the mapped error.

    The body is read before returning so a truncated body is retried like any transport error.
    """

    async def attempt() -> httpx.Response:
        try:
            response = await client.send(request)
            await response.aread()
        except httpx.HTTPError as exc:
            raise error_for_exception(exc, request, service) from exc
        if ok(response):
            return response
        raise error_for_response(response, service, detail(response))

    return await policy.run(attempt)


def json_body(response: httpx.Response, service: str) -> Any:
    """The response's JSON, or a fatal error naming the request if the body is not JSON."""
    try:
        return response.json()
    except ValueError as exc:
        raise FatalUpstreamError(
            f"{service} {where(response.request)} sent a body that is not JSON",
            service=service,
            status=response.status_code,
        ) from exc
