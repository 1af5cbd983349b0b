"""The one retry policy (backoff, Retry-After, time budget) and ``send``, which every client uses."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

import httpx

from bridge.errors import RetriableUpstreamError, UpstreamError, UpstreamUnavailableError
from bridge.upstream.bounds import CallLimit, send_bounded
from bridge.upstream.breaker import CircuitBreaker, Clock, Sleep
from bridge.upstream.errors import (
    AUTH_STATUS,
    TRANSPORT_ERRORS,
    auth_error,
    error_for_exception,
    error_for_response,
)

logger = logging.getLogger(__name__)


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
    parse_json: bool = False,
) -> httpx.Response:
    """Send ``request`` with retries; return the answer if ``ok``, else raise the mapped error.

    The body is read before returning so a truncated body is retried like any transport error;
    with a ``limit``, within its deadline and size cap (bridge/upstream/bounds.py), and with ``parse_json``
    too, a successful answer's JSON is parsed as it arrives (``json_body`` reads it the same way).
    A 401 or 403 always raises UpstreamAuthError, whatever ``ok`` says.
    """

    async def attempt() -> httpx.Response:
        try:
            if limit is not None:
                response = await send_bounded(client, request, limit, service, parse_json=parse_json)
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
