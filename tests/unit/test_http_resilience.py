"""The retry policy's bounds, the circuit breaker, and how auth and TLS failures are classified."""

from __future__ import annotations

import asyncio
import ssl

import httpx
import pytest

from bridge.errors import UpstreamAuthError, UpstreamUnavailableError
from bridge.http import CircuitBreaker, CircuitState, RetryPolicy, send

pytestmark = pytest.mark.anyio

URL = "http://archive.test/dicom-web/studies?PatientID=SECRET-PID"


class Clock:
    """A fake monotonic clock; its ``sleep`` advances time instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Upstream:
    """Answers 503 (or raises) while ``down``, 200 otherwise; counts what reached it."""

    def __init__(self, down: bool = True, error: Exception | None = None) -> None:
        self.down = down
        self.error = error
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            if self.error is not None:
                raise self.error
            return httpx.Response(503)
        return httpx.Response(200, json=[])


async def _get(handler: Upstream | httpx.MockTransport, policy: RetryPolicy) -> httpx.Response:
    transport = handler if isinstance(handler, httpx.MockTransport) else httpx.MockTransport(handler)
    async with httpx.AsyncClient(transport=transport) as client:
        return await send(client, client.build_request("GET", URL), service="dicomweb", policy=policy)


async def test_retries_stop_when_the_next_wait_would_pass_the_total_budget() -> None:
    clock = Clock()
    upstream = Upstream()
    policy = RetryPolicy(retries=50, base=4, max_wait=4, total=10, clock=clock, sleep=clock.sleep)
    with pytest.raises(UpstreamUnavailableError, match="BRIDGE_HTTP_RETRY_TOTAL"):
        await _get(upstream, policy)
    assert sum(clock.sleeps) <= 10
    assert 2 <= upstream.calls < 50


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_auth_errors_that_are_not_retried(status: int) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status)

    with pytest.raises(UpstreamAuthError) as caught:
        await _get(httpx.MockTransport(handler), RetryPolicy(retries=3, sleep=Clock().sleep))
    assert calls == 1
    message = str(caught.value)
    assert message.startswith("dicomweb GET http://archive.test/dicom-web/studies answered")
    assert "BRIDGE_DICOMWEB_" in message and "SECRET-PID" not in message


async def test_an_untrusted_server_certificate_is_an_auth_error_naming_the_ca_setting() -> None:
    failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    failure.verify_message = "unable to get local issuer certificate"
    error = httpx.ConnectError("TLS failed")
    error.__cause__ = failure
    upstream = Upstream(error=error)
    with pytest.raises(UpstreamAuthError, match="BRIDGE_DICOMWEB_CA_BUNDLE") as caught:
        await _get(upstream, RetryPolicy(retries=3, sleep=Clock().sleep))
    assert upstream.calls == 1
    assert "unable to get local issuer certificate" in str(caught.value)


async def test_an_open_circuit_stops_requests_and_one_probe_resumes_them() -> None:
    clock = Clock()
    breaker = CircuitBreaker("fhir", failures=3, reset_after=20, clock=clock, sleep=clock.sleep)
    upstream = Upstream(error=httpx.ConnectError("refused"))
    policy = RetryPolicy(
        retries=100, base=0.1, max_wait=1, total=300, breaker=breaker, clock=clock, sleep=clock.sleep
    )

    async def mend() -> None:
        # The upstream comes back 30 s (fake time) later.
        while clock.now < 1030:
            await asyncio.sleep(0)
        upstream.down = False

    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:

        async def one() -> int:
            request = client.build_request("GET", URL)
            return (await send(client, request, service="fhir", policy=policy)).status_code

        results = await asyncio.gather(one(), one(), one(), one(), mend())
    assert results[:4] == [200, 200, 200, 200]
    assert breaker.state is CircuitState.CLOSED
    assert breaker.opened >= 1
    # Without the circuit, four callers retrying every second or less for 30 s would send 100+
    # requests; with it, they send the few that open it and then a probe per pause.
    assert upstream.calls <= 3 + 2 * breaker.opened + 4


async def test_an_open_circuit_fails_fast_when_the_pause_outlasts_the_budget() -> None:
    clock = Clock()
    breaker = CircuitBreaker("fhir", failures=2, reset_after=60, clock=clock, sleep=clock.sleep)
    upstream = Upstream()
    policy = RetryPolicy(
        retries=10, base=0.1, max_wait=1, total=5, breaker=breaker, clock=clock, sleep=clock.sleep
    )
    with pytest.raises(UpstreamUnavailableError):
        await _get(upstream, policy)
    assert breaker.state is CircuitState.OPEN
    sent = upstream.calls
    with pytest.raises(UpstreamUnavailableError, match="circuit open"):
        await _get(upstream, policy)
    assert upstream.calls == sent, "an open circuit sends nothing"


async def test_429_does_not_open_the_circuit() -> None:
    clock = Clock()
    breaker = CircuitBreaker("fhir", failures=2, reset_after=60, clock=clock, sleep=clock.sleep)
    answers = iter([429, 429, 429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), headers={"Retry-After": "1"})

    policy = RetryPolicy(retries=5, max_wait=5, breaker=breaker, clock=clock, sleep=clock.sleep)
    response = await _get(httpx.MockTransport(handler), policy)
    assert response.status_code == 200
    assert breaker.opened == 0
    assert all(wait >= 1 for wait in clock.sleeps)
