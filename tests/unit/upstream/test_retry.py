"""Retries, Retry-After, and the conversion of every httpx failure into a bridge error."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable

import httpx
import pytest

from bridge.errors import (
    FatalUpstreamError,
    RetriableUpstreamError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamUnavailableError,
)
from bridge.upstream.errors import error_for_response, parse_retry_after
from bridge.upstream.retry import RetryPolicy, send
from tests.unit.upstream.fakes import Clock, Upstream, get

pytestmark = pytest.mark.anyio

URL = "http://server.test/base/studies?PatientID=SECRET-PID&PatientName=Secret%5EName"


class Sleeps:
    """An injected sleep that records each wait instead of waiting, so tests stay fast."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def policy(
    retries: int = 3, *, base: float = 0.001, max_wait: float = 30.0, sleeps: Sleeps | None = None
) -> RetryPolicy:
    return RetryPolicy(retries=retries, base=base, max_wait=max_wait, sleep=sleeps or Sleeps())


class Counter:
    """A transport handler answering from a list (the last answer repeats), counting calls."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        return answer


async def call(handler: Callable[[httpx.Request], httpx.Response], retry: RetryPolicy) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await send(client, client.build_request("GET", URL), service="dicomweb", policy=retry)


async def test_503_with_retry_after_is_retried_after_the_server_given_wait() -> None:
    handler = Counter(httpx.Response(503, headers={"Retry-After": "7"}), httpx.Response(200, json=[]))
    sleeps = Sleeps()
    response = await call(handler, policy(max_wait=30, sleeps=sleeps))
    assert response.status_code == 200
    [wait] = sleeps.waits
    assert 7.0 <= wait <= 7.7  # the server's wait, plus at most a little jitter


async def test_a_retry_after_longer_than_max_wait_gives_up_at_once_naming_the_setting() -> None:
    handler = Counter(httpx.Response(503, headers={"Retry-After": "3600"}), httpx.Response(200))
    sleeps = Sleeps()
    # The one rule for a server-given wait longer than the bridge may wait: give up at once,
    # naming the wait and the setting; never retry early against the server's word.
    with pytest.raises(UpstreamUnavailableError, match=r"3600 s, longer than BRIDGE_HTTP_RETRY_MAX_WAIT"):
        await call(handler, policy(max_wait=2.5, sleeps=sleeps))
    assert handler.calls == 1
    assert sleeps.waits == []


async def test_without_retry_after_the_backoff_is_bounded_by_base_and_max_wait() -> None:
    handler = Counter(httpx.Response(502), httpx.Response(502), httpx.Response(502), httpx.Response(200))
    sleeps = Sleeps()
    await call(handler, policy(base=1.0, max_wait=3.0, sleeps=sleeps))
    assert len(sleeps.waits) == 3
    assert all(0 <= w <= c for w, c in zip(sleeps.waits, [1.0, 2.0, 3.0], strict=True))


async def test_the_default_sleep_retries_after_a_zero_retry_after() -> None:
    handler = Counter(httpx.Response(503, headers={"Retry-After": "0"}), httpx.Response(200))
    started = time.monotonic()
    await call(handler, RetryPolicy(retries=1, base=0.001, max_wait=1.0))
    assert time.monotonic() - started < 1.0
    assert handler.calls == 2


async def test_429_is_retried() -> None:
    handler = Counter(httpx.Response(429), httpx.Response(200))
    assert (await call(handler, policy())).status_code == 200
    assert handler.calls == 2


async def test_500_is_retried_then_unavailable_after_the_retries() -> None:
    handler = Counter(httpx.Response(500))
    with pytest.raises(UpstreamUnavailableError) as caught:
        await call(handler, policy(retries=3))
    assert handler.calls == 4
    assert caught.value.status == 500
    assert caught.value.service == "dicomweb"


@pytest.mark.parametrize("status", [400, 404, 405, 410])
async def test_other_4xx_are_not_retried(status: int) -> None:
    handler = Counter(httpx.Response(status))
    with pytest.raises(FatalUpstreamError) as caught:
        await call(handler, policy(retries=3))
    assert handler.calls == 1
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("status", "setting"), [(401, "BRIDGE_DICOMWEB_AUTH"), (403, "BRIDGE_DICOMWEB_SCOPES")]
)
async def test_401_and_403_are_not_retried_and_name_the_setting_to_check(status: int, setting: str) -> None:
    handler = Counter(httpx.Response(status))
    with pytest.raises(UpstreamAuthError, match=setting) as caught:
        await call(handler, policy(retries=3))
    assert handler.calls == 1
    assert caught.value.status == status


async def test_a_connect_error_is_retried_then_unavailable() -> None:
    handler = Counter(httpx.ConnectError("connection refused"))
    with pytest.raises(UpstreamUnavailableError, match="ConnectError"):
        await call(handler, policy(retries=2))
    assert handler.calls == 3


async def test_a_connect_error_then_success_recovers() -> None:
    handler = Counter(httpx.ConnectError("refused"), httpx.Response(200))
    assert (await call(handler, policy())).status_code == 200


def _transport_errors() -> list[type[httpx.TransportError]]:
    found: list[type[httpx.TransportError]] = []
    todo: list[type[httpx.TransportError]] = [httpx.TransportError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


def test_the_transport_error_list_is_complete_enough_to_mean_something() -> None:
    names = {c.__name__ for c in _transport_errors()}
    assert {
        "ConnectError",
        "ReadTimeout",
        "RemoteProtocolError",
        "ProxyError",
        "UnsupportedProtocol",
    } <= names


@pytest.mark.parametrize("exc_class", _transport_errors(), ids=lambda c: c.__name__)
async def test_every_httpx_transport_error_becomes_a_bridge_upstream_error(
    exc_class: type[httpx.TransportError],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_class("boom", request=request)

    with pytest.raises(UpstreamError) as caught:
        await call(handler, policy(retries=1))
    root: BaseException = caught.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert type(root) is exc_class  # converted once, with the original kept as the cause
    assert "SECRET" not in str(caught.value)


async def test_a_body_that_fails_to_decode_becomes_an_upstream_error() -> None:
    # A stream, so the body is decoded by the client rather than when the Response is built.
    handler = Counter(
        httpx.Response(200, stream=httpx.ByteStream(b"not gzip at all"), headers={"Content-Encoding": "gzip"})
    )
    with pytest.raises(UpstreamError):
        await call(handler, policy(retries=0))


@pytest.mark.parametrize(
    "answer",
    [httpx.Response(500), httpx.Response(404), httpx.ConnectError("refused"), httpx.ReadTimeout("slow")],
    ids=["500", "404", "connect", "timeout"],
)
async def test_error_messages_name_method_and_path_but_never_the_query(
    answer: httpx.Response | Exception,
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await call(Counter(answer), policy(retries=0))
    message = str(caught.value)
    assert "GET http://server.test/base/studies" in message
    assert "SECRET" not in message
    assert "PatientID" not in message
    assert "?" not in message


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (parse_retry_after(in_a_minute) or 0) <= 60
    long_ago = email.utils.formatdate(time.time() - 600, usegmt=True)
    assert parse_retry_after(long_ago) == 0.0


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_retriable_statuses(status: int) -> None:
    response = httpx.Response(status, request=httpx.Request("GET", URL))
    assert isinstance(error_for_response(response, "fhir"), RetriableUpstreamError)


async def test_retries_stop_when_the_next_wait_would_pass_the_total_budget() -> None:
    clock = Clock()
    upstream = Upstream()
    policy = RetryPolicy(retries=50, base=4, max_wait=4, total=10, clock=clock, sleep=clock.sleep)
    with pytest.raises(UpstreamUnavailableError, match="BRIDGE_HTTP_RETRY_TOTAL"):
        await get(upstream, policy)
    assert sum(clock.sleeps) <= 10
    assert 2 <= upstream.calls < 50
