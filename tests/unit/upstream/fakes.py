"""Fakes for the HTTP tests: a clock that sleeps in fake time, and an upstream that can be down."""

from __future__ import annotations

import asyncio

import httpx

from bridge.upstream.retry import RetryPolicy, send

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


async def get(handler: Upstream | httpx.MockTransport, policy: RetryPolicy) -> httpx.Response:
    transport = handler if isinstance(handler, httpx.MockTransport) else httpx.MockTransport(handler)
    async with httpx.AsyncClient(transport=transport) as client:
        return await send(client, client.build_request("GET", URL), service="dicomweb", policy=policy)
