"""API bounds: closed metric labels, nosniff everywhere, paged links off the loop, guarded on-demand syncs."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bridge.api.errors import RateLimitedError
from bridge.api.ondemand import OnDemandGate
from tests.unit.api.test_app import client
from tests.unit.resolve.fake_fhir import STUDY_UID, FakeFhir, endpoint, imaging_study

pytestmark = pytest.mark.anyio


def many_series(n: int) -> list[dict[str, object]]:
    return [{"uid": f"{STUDY_UID}.{i}", "number": i, "modality": {"code": "CT"}} for i in range(1, n + 1)]


@pytest.fixture
def fake() -> FakeFhir:
    server = FakeFhir()
    server.add(imaging_study(), endpoint(), imaging_study("big", "1.2.3.9", series=many_series(2500)))
    return server


@pytest.fixture
async def api(tmp_path: Path, fake: FakeFhir) -> AsyncIterator[httpx.AsyncClient]:
    async with client(tmp_path, fake) as c:
        yield c


async def test_invented_methods_and_paths_share_one_label_each(api: httpx.AsyncClient) -> None:
    for i in range(40):
        await api.request(f"BREW{i}", "/healthz")
        await api.get(f"/x{i}/" + "a" * 2000)
    text = (await api.get("/metrics")).text
    assert "BREW" not in text
    assert "aaaa" not in text
    # the registry is the process's: other tests' requests are in it too, all from the same closed sets
    labels = re.findall(r'^bridge_http_requests_total\{method="([^"]*)",route="([^"]*)"', text, re.MULTILINE)
    assert {method for method, _ in labels} <= {
        "GET",
        "HEAD",
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
        "OPTIONS",
        "other",
    }
    assert ("other", "unmatched") in labels or ("other", "/healthz") in labels
    assert all(route == "unmatched" or route.startswith("/") and "/x" not in route for _, route in labels)
    assert len([1 for _, route in labels if route == "unmatched"]) <= 4


async def test_every_answer_says_nosniff(api: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/imaging-studies/is1/links", "/no/such", "/studies/x/links", "/metrics"):
        response = await api.get(path)
        assert response.headers.get("x-content-type-options") == "nosniff", path


async def test_links_of_a_large_study_come_in_pages(api: httpx.AsyncClient) -> None:
    first = (await api.get("/imaging-studies/big/links")).json()
    assert len(first["series"]) == 1000
    assert first["series_total"] == 2500
    assert first["series_offset"] == 0
    last = (
        await api.get("/imaging-studies/big/links", params={"series_offset": 2000, "series_count": 5000})
    ).json()
    assert len(last["series"]) == 500
    assert last["series"][0]["number"] == 2001
    small = (await api.get("/imaging-studies/is1/links")).json()
    assert small["series_total"] == len(small["series"]) == 2


async def test_the_links_page_size_is_a_setting(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, api_links_max_series=10) as c:
        body = (await c.get("/imaging-studies/big/links", params={"series_count": 50})).json()
    assert len(body["series"]) == 10


async def test_concurrent_syncs_of_one_study_share_one_run() -> None:
    gate: OnDemandGate[int] = OnDemandGate(per_minute=5)
    release = asyncio.Event()

    async def start() -> int:
        await release.wait()
        return 7

    waiting = [asyncio.create_task(gate.run("1.2.3", f"client-{i}", start)) for i in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiting) == [7] * 50
    assert gate.started == 1


async def test_a_client_past_its_rate_gets_429_with_a_wait() -> None:
    now = [0.0]
    gate: OnDemandGate[int] = OnDemandGate(per_minute=3, clock=lambda: now[0])

    async def start() -> int:
        return 1

    for i in range(3):
        await gate.run(f"1.2.{i}", "me", start)
    with pytest.raises(RateLimitedError) as caught:
        await gate.run("1.2.9", "me", start)
    assert 0 < caught.value.retry_after <= 20
    await gate.run("1.2.9", "someone-else", start)  # others are not held back
    now[0] += 20
    await gate.run("1.2.9", "me", start)
    assert gate.started == 5


async def test_the_on_demand_route_answers_429_past_the_rate(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, api_sync_rate=2) as c:
        answers = [(await c.post(f"/studies/1.2.3.{i}/sync")).status_code for i in range(4)]
    assert answers[-1] == 429
    assert answers.count(429) == 2
