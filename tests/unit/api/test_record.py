"""The record page in-process against a small fake FHIR server: escaping, order, links, errors, auth."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.api.app import create_app
from bridge.config import Settings

pytestmark = pytest.mark.anyio

FHIR_BASE = "https://fhir.example/R4"
DICOMWEB_BASE = "https://pacs.example/dicom-web"
HOSTILE = '<img src=x onerror="alert(1)">'

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "O'Brien", "given": ["<b>Ann</b>"]}],
    "birthDate": "1970-01-01",
    "gender": "female",
}


def _study(sid: str, **extra: Any) -> dict[str, Any]:
    study = {
        "resourceType": "ImagingStudy",
        "id": sid,
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.3.{len(sid)}"}],
        "endpoint": [{"reference": "Endpoint/ep1"}],
    }
    study.update(extra)
    return study


STUDIES = [
    _study("old", started="2023-05-01T09:00:00+01:00", description="Old CT", modality=[{"code": "CT"}]),
    _study("undated", description="No date"),
    _study(
        "new",
        started="2024-03-15T08:30:00+01:00",
        description=HOSTILE,
        numberOfSeries=2,
        numberOfInstances=4,
        series=[{"uid": "1.2.3.4", "modality": {"code": "MG"}}],
    ),
    _study("gone", status="entered-in-error", started="2024-06-01", description="Withdrawn"),
]


def _handler(request: httpx.Request) -> httpx.Response:
    path = request.url.path.removeprefix("/R4/")
    if path == "Patient/p1":
        return httpx.Response(200, content=json.dumps(PATIENT))
    if path.startswith("Patient/"):
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})
    if path == "ImagingStudy" and request.url.params.get("subject") == "Patient/p1":
        entries = [{"resource": s, "search": {"mode": "match"}} for s in STUDIES]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
    if path == "Patient":
        entries = [{"resource": PATIENT, "search": {"mode": "match"}}]
        return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset"})


@asynccontextmanager
async def record_api(tmp_path: Path, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        dicomweb_url=DICOMWEB_BASE,
        fhir_url=FHIR_BASE,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        http_retries=0,
        **overrides,
    )
    app = create_app(settings, transport=httpx.MockTransport(_handler))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
            yield client


async def test_patient_page_lists_studies_newest_first_escaped(tmp_path: Path) -> None:
    async with record_api(tmp_path) as api:
        response = await api.get("/record/patients/p1")
    page = response.text
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    # Nothing from the FHIR server reaches the page unescaped.
    assert HOSTILE not in page and "<b>Ann</b>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page
    assert "&lt;b&gt;Ann&lt;/b&gt; O&#x27;Brien" in page
    # Newest first, undated last; a withdrawn study is shown without a link to open it.
    order = [page.index(f'data-imaging-study="{sid}"') for sid in ("gone", "new", "old", "undated")]
    assert order == sorted(order)
    assert 'href="/imaging-studies/new/viewer"' in page
    assert 'href="/imaging-studies/old/viewer"' in page
    assert "/imaging-studies/gone/viewer" not in page
    assert 'src="/record/imaging-studies/new/thumbnail"' in page
    # Date, modalities (from the series when the study has none), size.
    assert "2024-03-15 08:30" in page and "2 series, 4 images" in page
    assert '<td class="modalities">MG</td>' in page and '<td class="modalities">CT</td>' in page


async def test_index_links_each_patient(tmp_path: Path) -> None:
    async with record_api(tmp_path) as api:
        response = await api.get("/record")
    assert response.status_code == 200
    assert (
        '<a class="patient" href="/record/patients/p1">&lt;b&gt;Ann&lt;/b&gt; O&#x27;Brien</a>'
        in response.text
    )


async def test_unknown_and_malformed_patients(tmp_path: Path) -> None:
    async with record_api(tmp_path) as api:
        missing = await api.get("/record/patients/p2")
        malformed = await api.get("/record/patients/bad%20id")
    assert missing.status_code == 404 and "No such patient" in missing.text
    assert malformed.status_code == 422
    assert malformed.json()["resourceType"] == "OperationOutcome"


async def test_record_needs_the_api_key_when_keys_are_set(tmp_path: Path) -> None:
    async with record_api(tmp_path, api_keys=["k-123"]) as api:
        anonymous = await api.get("/record/patients/p1")
        with_key = await api.get("/record/patients/p1", headers={"X-API-Key": "k-123"})
    assert anonymous.status_code == 401 and "Ann" not in anonymous.text
    assert with_key.status_code == 200


async def test_record_is_not_in_the_api_schema(tmp_path: Path) -> None:
    async with record_api(tmp_path) as api:
        schema = (await api.get("/openapi.json")).json()
    assert not [p for p in schema["paths"] if p.startswith("/record")]
