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
from tests.unit.settings_factory import make_settings

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
async def record_api(
    tmp_path: Path, handler: Any = _handler, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(tmp_path, dicomweb_url=DICOMWEB_BASE, fhir_url=FHIR_BASE, **overrides)
    app = create_app(settings, transport=httpx.MockTransport(handler))
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


HOSP_A = "urn:oid:1.2.826.0.1.3680043.10.1001"
HOSP_B = "urn:oid:1.2.826.0.1.3680043.10.1002"
MR = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}
NAMESAKES = [
    {**PATIENT, "id": "pa", "identifier": [{"system": HOSP_A, "value": "MRN-7", "type": MR}]},
    {**PATIENT, "id": "pb", "identifier": [{"system": HOSP_B, "value": "MRN-7", "type": MR}]},
]


class Searches:
    """A FHIR server of two namesakes that notes the Patient searches it is asked."""

    def __init__(self) -> None:
        self.asked: list[httpx.QueryParams] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/R4/")
        if path == "Patient":
            self.asked.append(request.url.params)
            entries = [{"resource": p, "search": {"mode": "match"}} for p in NAMESAKES]
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        if path == "Patient/pa":
            return httpx.Response(200, json=NAMESAKES[0])
        if path == "ImagingStudy":
            study = _study(
                "s1",
                started="2024-03-15T08:30:00-05:00",
                description="CT head",
                identifier=[
                    {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"},
                    {"system": "urn:oid:1.2.3.99", "value": "ACC-42", "type": ACSN},
                ],
                referrer={"display": "Dr. Referring House"},
            )
            entries = [{"resource": study, "search": {"mode": "match"}}]
            return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})


async def test_namesakes_are_told_apart_by_their_mrn_and_its_issuer(tmp_path: Path) -> None:
    fhir = Searches()
    issuers = {"HOSP-A": HOSP_A, "HOSP-B": HOSP_B}
    async with record_api(tmp_path, fhir, patient_issuer_systems=issuers) as api:
        index = (await api.get("/record")).text
        page = (await api.get("/record/patients/pa")).text
    # Both are listed with the same MRN, each with its own issuer and system.
    assert index.count('<span class="mrn">MRN-7</span>') == 2
    assert f"(issuer HOSP-A {HOSP_A})" in index and f"(issuer HOSP-B {HOSP_B})" in index
    assert f"(issuer HOSP-A {HOSP_A})" in page and HOSP_B not in page


async def test_a_study_row_shows_accession_referrer_and_the_time_with_its_zone(tmp_path: Path) -> None:
    async with record_api(tmp_path, Searches()) as api:
        page = (await api.get("/record/patients/pa")).text
    assert '<td class="accession">ACC-42 (urn:oid:1.2.3.99)</td>' in page
    assert '<td class="referrer">Dr. Referring House</td>' in page
    assert '<td class="date">2024-03-15 08:30 UTC-05:00</td>' in page


async def test_patients_are_searched_by_identifier_and_name_with_the_search_syntax_escaped(
    tmp_path: Path,
) -> None:
    fhir = Searches()
    async with record_api(tmp_path, fhir, patient_issuer_systems={"HOSP-A": HOSP_A}) as api:
        by_id = await api.get("/record", params={"identifier": "MRN,7|x", "system": HOSP_A})
        anywhere = await api.get("/record", params={"identifier": "MRN-7", "system": ""})
        by_name = await api.get("/record", params={"name": "O'Brien, Ann$"})
        hostile = await api.get("/record", params={"name": HOSTILE})
    assert by_id.status_code == anywhere.status_code == by_name.status_code == 200
    # A comma would be "or", a bar would split system from value: both are searched as typed.
    assert fhir.asked[0]["identifier"] == f"{HOSP_A}|MRN\\,7\\|x"
    assert fhir.asked[1]["identifier"] == "MRN-7"
    assert fhir.asked[2]["name"] == "O'Brien\\, Ann\\$" and "identifier" not in fhir.asked[2]
    # The typed text comes back in the form, escaped; the issuer chosen stays chosen.
    assert 'value="MRN,7|x"' in by_id.text
    assert f'<option value="{HOSP_A}" selected>HOSP-A ({HOSP_A})</option>' in by_id.text
    assert HOSTILE not in hostile.text and "&lt;img src=x" in hostile.text


async def test_a_too_long_search_is_refused_with_a_reason(tmp_path: Path) -> None:
    async with record_api(tmp_path, Searches()) as api:
        answer = await api.get("/record", params={"name": "x" * 300})
    assert answer.status_code == 422 and answer.json()["resourceType"] == "OperationOutcome"


async def test_the_page_says_who_is_signed_in(tmp_path: Path) -> None:
    async with record_api(tmp_path, api_keys=["k-123"]) as api:
        page = (await api.get("/record", headers={"X-API-Key": "k-123"})).text
    async with record_api(tmp_path) as api:
        anonymous = (await api.get("/record")).text
    assert "Signed in with an API key" in page and 'class="logout"' not in page  # a key has no session
    assert "Not signed in: authentication is off" in anonymous


async def test_a_browser_without_credentials_gets_a_page_on_how_to_sign_in_not_json(tmp_path: Path) -> None:
    async with record_api(tmp_path, api_keys=["k-123"]) as api:
        browser = await api.get("/record/patients/p1", headers={"Accept": "text/html,*/*;q=0.8"})
        program = await api.get("/record/patients/p1", headers={"Accept": "application/json"})
    assert browser.status_code == 401 and browser.headers["content-type"].startswith("text/html")
    assert "Sign-in needed" in browser.text and "BRIDGE_OIDC_ISSUER" in browser.text
    assert "Ann" not in browser.text and browser.headers["cache-control"] == "no-store"
    assert program.status_code == 401 and program.json()["resourceType"] == "OperationOutcome"
