"""The circuit breaker: an open circuit sends nothing, one probe resumes, 429 never opens it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bridge.errors import UpstreamUnavailableError
from bridge.upstream.breaker import CircuitBreaker, CircuitState
from bridge.upstream.retry import RetryPolicy, send
from tests.unit.upstream.fakes import URL, Clock, Upstream, get

pytestmark = pytest.mark.anyio


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
        await get(upstream, policy)
    assert breaker.state is CircuitState.OPEN
    sent = upstream.calls
    with pytest.raises(UpstreamUnavailableError, match="circuit open"):
        await get(upstream, policy)
    assert upstream.calls == sent, "an open circuit sends nothing"


async def test_429_does_not_open_the_circuit() -> None:
    clock = Clock()
    breaker = CircuitBreaker("fhir", failures=2, reset_after=60, clock=clock, sleep=clock.sleep)
    answers = iter([429, 429, 429, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), headers={"Retry-After": "1"})

    policy = RetryPolicy(retries=5, max_wait=5, breaker=breaker, clock=clock, sleep=clock.sleep)
    response = await get(httpx.MockTransport(handler), policy)
    assert response.status_code == 200
    assert breaker.opened == 0
    assert all(wait >= 1 for wait in clock.sleeps)
