"""Bounded answers: one deadline for the whole exchange, a size cap on the decoded body, no retry."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from bridge.errors import UpstreamLimitError
from bridge.http import RetryPolicy, send
from bridge.limits import CallLimit, send_bounded

pytestmark = pytest.mark.anyio

URL = "http://archive.test/dicom-web/studies?PatientID=SECRET-PID"


def limit(max_bytes: int = 10_000, deadline: float = 5.0) -> CallLimit:
    return CallLimit("study page", max_bytes, "BRIDGE_DICOMWEB_MAX_PAGE_BYTES", deadline)


class Body:
    """An answer body that goes on as long as it is read, recording how far it got."""

    def __init__(self, chunk: bytes, pause: float = 0.0) -> None:
        self.chunk = chunk
        self.pause = pause
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self.pause:
                await asyncio.sleep(self.pause)
            self.sent += len(self.chunk)
            yield self.chunk


def client(body: Body | bytes, headers: dict[str, str] | None = None) -> tuple[httpx.AsyncClient, list[int]]:
    calls: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, headers=headers or {}, content=body)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), calls


async def test_a_body_that_drips_fails_at_the_deadline_naming_the_setting() -> None:
    body = Body(b"[", pause=0.05)  # one byte every 50 ms, forever: no single read ever times out
    http, _ = client(body)
    started = time.monotonic()
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), limit(deadline=0.5), "dicomweb")
    elapsed = time.monotonic() - started
    print(f"drip ended after {elapsed:.2f} s")
    assert 0.4 < elapsed < 2.0
    assert caught.value.setting == "BRIDGE_HTTP_DEADLINE"
    assert "did not complete within 0.5 s" in str(caught.value)
    assert "SECRET-PID" not in str(caught.value)


async def test_an_endless_body_stops_at_the_size_cap() -> None:
    body = Body(b"x" * 4096)
    http, _ = client(body)
    with pytest.raises(UpstreamLimitError) as caught:
        await send_bounded(http, http.build_request("GET", URL), limit(max_bytes=100_000), "dicomweb")
    assert caught.value.setting == "BRIDGE_DICOMWEB_MAX_PAGE_BYTES"
    assert "larger than 100000 bytes" in str(caught.value)
    assert body.sent <= 100_000 + 4096


async def test_the_cap_counts_decoded_bytes_so_a_gzip_bomb_is_caught() -> None:
    bomb = gzip.compress(b"0" * 5_000_000)
    assert len(bomb) < 10_000
    http, _ = client(bomb, {"Content-Encoding": "gzip"})
    with pytest.raises(UpstreamLimitError):
        await send_bounded(http, http.build_request("GET", URL), limit(max_bytes=1_000_000), "dicomweb")


async def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    body = Body(b"x" * 1024)
    http, _ = client(body, {"Content-Length": "99999999"})
    with pytest.raises(UpstreamLimitError):
        await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb")
    assert body.sent == 0


async def test_an_answer_within_bounds_comes_back_decoded_and_read() -> None:
    http, _ = client(gzip.compress(b'[{"a": 1}]'), {"Content-Encoding": "gzip", "Warning": "299 x"})
    response = await send_bounded(http, http.build_request("GET", URL), limit(), "dicomweb")
    assert response.json() == [{"a": 1}]
    assert response.headers["warning"] == "299 x"
    assert "content-encoding" not in response.headers


async def test_send_does_not_retry_an_answer_that_broke_a_bound() -> None:
    http, calls = client(Body(b"x" * 4096))
    policy = RetryPolicy(retries=3, base=0.001)
    with pytest.raises(UpstreamLimitError):
        await send(http, http.build_request("GET", URL), service="dicomweb", policy=policy, limit=limit())
    assert len(calls) == 1
