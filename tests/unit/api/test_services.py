"""The app's composition root: one client per upstream, readiness of every source, one archive rule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bridge.api.app import create_app
from bridge.api.services import Services
from bridge.config import Settings
from tests.unit.resolve.fake_fhir import (
    DICOMWEB_BASE,
    FHIR_BASE,
    STUDY_UID,
    FakeFhir,
    endpoint,
    imaging_study,
)

pytestmark = pytest.mark.anyio

# Source b is published under a public address nested in source a's, and polled elsewhere.
ARCHIVE_B = "https://pacs-b.internal/rs"
PUBLIC_B = f"{DICOMWEB_BASE}/b"
DICOM_JSON = "application/dicom+json"
JPEG = b"\xff\xd8\xff\xe0 a picture"


class Archives:
    """The fake FHIR server, and two archives that answer QIDO, thumbnails and retrieves (or are down)."""

    def __init__(self) -> None:
        self.fhir = FakeFhir()
        self.asked: list[str] = []
        self.down: set[str] = set()

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        for base in (ARCHIVE_B, DICOMWEB_BASE):
            if url.startswith(base):
                self.asked.append(url)
                if base in self.down:
                    raise httpx.ConnectError("refused", request=request)
                if "/thumbnail" in url or "/rendered" in url:
                    return httpx.Response(200, content=JPEG, headers={"Content-Type": "image/jpeg"})
                # streamed, as a real archive sends it (the gateway relays the raw stream)
                return httpx.Response(200, content=_streamed(b"[]"), headers={"content-type": DICOM_JSON})
        return self.fhir.handler(request)


async def _streamed(body: bytes) -> AsyncIterator[bytes]:
    yield body


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_url": FHIR_BASE,
        "state_url": f"sqlite:///{tmp_path / 'state.db'}",
        "http_retries": 0,
        "viewer_urls": {"ohif": "https://ohif.example"},
        "sources": [
            {"name": "a", "dicomweb": {"url": DICOMWEB_BASE}},
            {"name": "b", "dicomweb": {"url": ARCHIVE_B, "public_url": PUBLIC_B}},
        ],
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def running(tmp_path: Path, archives: Archives) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(_settings(tmp_path), transport=httpx.MockTransport(archives.handler))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
            yield app, client


async def test_each_archive_and_the_fhir_server_have_one_client_that_every_part_of_the_app_shares(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, Archives()) as (app, _):
        services: Services = app.state.services
        assert services.connections is not None and services.gateway is not None
        assert services.resolver is not None and services.readiness is not None
        conn = services.connections
        assert [each.source.name for each in conn.sources] == ["a", "b"]
        # two archives, two clients: never the same one for both, never a second one for either
        assert conn.sources[0].http is not conn.sources[1].http
        for index, each in enumerate(conn.sources):
            http = each.http
            assert services.gateway.archives[index].client is http  # the gateway
            assert services.pictures[each.source.name]._client is http  # the record pages
            assert services.runtimes[index].dicomweb._client is http  # the sync (on demand, scheduled)
            assert services.readiness.archives[index][1]._client is http  # readiness
        fhir_http = conn.fhir_http
        assert services.resolver.fhir._client is fhir_http  # the resolver (and the audit trail)
        assert services.readiness.fhir._client is fhir_http
        assert all(runtime.fhir._client is fhir_http for runtime in services.runtimes)


async def test_readiness_names_a_second_source_whose_archive_is_down(tmp_path: Path) -> None:
    archives = Archives()
    async with running(tmp_path, archives) as (_, client):
        ready = await client.get("/readyz")
        archives.down.add(ARCHIVE_B)
        not_ready = await client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["dicomweb"] == "ok"
    assert not_ready.status_code == 503
    checks = not_ready.json()["checks"]
    assert checks["fhir"] == "ok" and checks["store"] == "ok"
    assert "source b" in checks["dicomweb"] and "source a" not in checks["dicomweb"]
    assert any(url.startswith(ARCHIVE_B) for url in archives.asked)  # it was asked, not assumed


async def test_with_nested_base_urls_the_record_and_the_gateway_reach_the_same_archive(
    tmp_path: Path,
) -> None:
    archives = Archives()
    archives.fhir.add(imaging_study(), endpoint(address=PUBLIC_B))  # a study of source b
    async with running(tmp_path, archives) as (app, client):
        thumbnail = await client.get("/record/imaging-studies/is1/thumbnail")
        by_record = list(archives.asked)
        archives.asked.clear()
        metadata = await client.get(f"/dicom-web/studies/{STUDY_UID}/metadata")
        by_gateway = list(archives.asked)
    assert thumbnail.status_code == 200 and thumbnail.content == JPEG
    assert metadata.status_code == 200, metadata.text
    # the longest configured base the Endpoint's address falls under: source b, polled at its own URL
    assert by_record and all(url.startswith(f"{ARCHIVE_B}/studies/{STUDY_UID}/") for url in by_record)
    assert by_gateway == [f"{ARCHIVE_B}/studies/{STUDY_UID}/metadata"]
