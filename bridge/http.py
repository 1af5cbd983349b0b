"""One place that turns httpx outcomes into bridge errors and decides what is retried, and how."""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import random
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from tenacity import RetryCallState

from bridge.errors import (
    FatalUpstreamError,
    RetriableUpstreamError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamUnavailableError,
)
from bridge.limits import CallLimit, send_bounded

logger = logging.getLogger(__name__)

RETRIABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
AUTH_STATUS = frozenset({401, 403})

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


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


class CircuitState(enum.StrEnum):
    """Where a circuit breaker stands."""

    CLOSED = "closed"  # requests flow
    OPEN = "open"  # the upstream looks down: nothing is sent until the pause ends
    HALF_OPEN = "half-open"  # one probe is allowed through; its outcome closes or re-opens


class CircuitBreaker:
    """Stops sending to an upstream after consecutive failures, and lets one probe through later.

    A failure is a transport error or a 5xx answer; 429 and other answers prove the server is up.
    While the circuit is open, callers wait for the pause to end (if their retry budget allows)
    instead of each hammering the upstream; then one caller probes and the others wait for it.
    """

    def __init__(
        self,
        service: str,
        *,
        failures: int = 5,
        reset_after: float = 30.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.service = service
        self.failures = failures
        self.reset_after = reset_after
        self._clock = clock
        self._sleep = sleep
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._probing = False
        self._settled: asyncio.Event | None = None
        self.opened = 0  # how often the circuit opened, for tests and metrics

    @property
    def state(self) -> CircuitState:
        """The current state."""
        return self._state

    @staticmethod
    def counts_as_failure(exc: RetriableUpstreamError) -> bool:
        """Whether an error says the upstream is down (rather than busy)."""
        return exc.status is None or exc.status >= 500

    async def acquire(self, deadline: float) -> None:
        """Return when a request may be sent; raise UpstreamUnavailableError if not before ``deadline``."""
        while True:
            now = self._clock()
            if self._state is CircuitState.CLOSED:
                return
            if self._state is CircuitState.OPEN:
                resume = self._opened_at + self.reset_after
                if now >= resume:
                    self._half_open()
                    return
                if resume > deadline:
                    raise self._unavailable(resume - now)
                await self._sleep(resume - now)
                continue
            if not self._probing:
                self._probing = True
                return
            settled = self._settled
            if settled is None or now >= deadline:
                raise self._unavailable(0.0)
            try:
                await asyncio.wait_for(settled.wait(), timeout=deadline - now)
            except TimeoutError:
                raise self._unavailable(0.0) from None

    def _half_open(self) -> None:
        self._state = CircuitState.HALF_OPEN
        self._probing = True
        self._settled = asyncio.Event()
        logger.info("%s: circuit half-open, probing the upstream", self.service)

    def _settle(self) -> None:
        self._probing = False
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def _unavailable(self, pause: float) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(
            f"{self.service}: the upstream failed {self._consecutive} times in a row; the bridge stopped "
            f"sending to it (circuit open, next try in {pause:.1f} s, beyond the retry budget)",
            service=self.service,
        )

    def success(self) -> None:
        """The upstream answered: close the circuit."""
        if self._state is not CircuitState.CLOSED:
            logger.info("%s: upstream answers again, circuit closed", self.service)
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._settle()

    def failure(self) -> None:
        """The upstream failed one attempt: open the circuit after enough of them in a row."""
        self._consecutive += 1
        if self._state is CircuitState.HALF_OPEN or (
            self._state is CircuitState.CLOSED and self._consecutive >= self.failures
        ):
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
            self.opened += 1
            logger.warning(
                "%s: %d consecutive failures, circuit open: no request for %.1f s",
                self.service,
                self._consecutive,
                self.reset_after,
            )
            self._settle()

    def abandon(self) -> None:
        """A probe ended without an answer (cancelled): let another caller probe."""
        if self._state is CircuitState.HALF_OPEN:
            self._settle()


class RetryPolicy:
    """The one retry policy: exponential backoff with full jitter, Retry-After honoured, bounded.

    Timeouts, connection errors, 408/425/429 and 5xx are retried, at most ``retries`` times and
    never past ``total`` seconds after the first attempt. A Retry-After is waited in full (plus a
    little jitter); one longer than ``max_wait`` ends the retries at once rather than retrying
    early. With a ``breaker``, attempts also wait while the upstream's circuit is open.
    """

    def __init__(
        self,
        retries: int = 4,
        base: float = 0.5,
        max_wait: float = 30.0,
        *,
        total: float = 120.0,
        breaker: CircuitBreaker | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.retries = retries
        self.base = base
        self.max_wait = max_wait
        self.total = total
        self.breaker = breaker
        self._clock = clock
        self._sleep = sleep

    def delay(self, attempt_number: int, exc: BaseException | None) -> float:
        """Seconds before the attempt after ``attempt_number`` (counted from 1)."""
        if isinstance(exc, RetriableUpstreamError) and exc.retry_after is not None:
            jitter = random.uniform(0, min(1.0, 0.1 * exc.retry_after))  # noqa: S311 - not security
            return exc.retry_after + jitter
        ceiling = min(self.max_wait, self.base * 2 ** (attempt_number - 1))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not security

    def wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt, for callers driving tenacity themselves."""
        exc = state.outcome.exception() if state.outcome else None
        return min(self.delay(state.attempt_number, exc), max(self.max_wait, 0.0))

    def _give_up(self, exc: RetriableUpstreamError, attempts: int, why: str) -> UpstreamUnavailableError:
        return UpstreamUnavailableError(
            f"{exc} (gave up after {attempts} attempt{'s' if attempts != 1 else ''}: {why})",
            service=exc.service,
            status=exc.status,
        )

    async def run(self, attempt: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """Call ``attempt`` until it succeeds, fails fatally, or the retries or the time run out."""
        deadline = self._clock() + self.total
        breaker = self.breaker
        number = 0
        while True:
            number += 1
            if breaker is not None:
                await breaker.acquire(deadline)
            try:
                response = await attempt()
            except RetriableUpstreamError as exc:
                if breaker is not None:
                    if breaker.counts_as_failure(exc):
                        breaker.failure()
                    else:
                        breaker.success()
                if isinstance(exc, UpstreamUnavailableError):
                    raise
                if number > self.retries:
                    raise self._give_up(exc, number, "no retries left") from exc
                wait = self.delay(number, exc)
                if exc.retry_after is not None and exc.retry_after > self.max_wait:
                    raise self._give_up(
                        exc,
                        number,
                        f"asked to retry after {exc.retry_after:.0f} s, longer than "
                        f"BRIDGE_HTTP_RETRY_MAX_WAIT ({self.max_wait:g} s)",
                    ) from exc
                if self._clock() + wait > deadline:
                    raise self._give_up(
                        exc, number, f"the next try would pass BRIDGE_HTTP_RETRY_TOTAL ({self.total:g} s)"
                    ) from exc
                logger.warning("retrying in %.2f s after attempt %d: %s", wait, number, exc)
                await self._sleep(wait)
                continue
            except UpstreamError:
                if breaker is not None:
                    breaker.success()  # a final answer: the upstream is up
                raise
            except BaseException:
                if breaker is not None:
                    breaker.abandon()
                raise
            if breaker is not None:
                breaker.success()
            return response


async def send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    service: str,
    policy: RetryPolicy,
    ok: Callable[[httpx.Response], bool] = lambda r: r.is_success,
    detail: Callable[[httpx.Response], str | None] = lambda r: None,
    limit: CallLimit | None = None,
) -> httpx.Response:
    """Send ``request`` with retries; return the answer if ``ok``, else raise the mapped error.

    The body is read before returning so a truncated body is retried like any transport error;
    with a ``limit``, within its deadline and size cap (bridge/limits.py).
    A 401 or 403 always raises UpstreamAuthError, whatever ``ok`` says.
    """

    async def attempt() -> httpx.Response:
        try:
            if limit is not None:
                response = await send_bounded(client, request, limit, service)
            else:
                response = await client.send(request)
                await response.aread()
        except TRANSPORT_ERRORS as exc:
            raise error_for_exception(exc, request, service) from exc
        if response.status_code in AUTH_STATUS:
            raise auth_error(response, service, detail(response))
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
