"""The image gateway in-process, against a fake FHIR server and a fake archive: who gets which images."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.api.app import create_app
from bridge.api.routes.gateway import DICOM_JSON
from bridge.mapping.context import WITHDRAWN_EXTENSION, WITHDRAWN_INSTANCE_EXTENSION
from bridge.state.store import SqlStore
from tests.unit.settings_factory import make_settings

pytestmark = pytest.mark.anyio

FHIR_BASE = "https://fhir.example/R4"
ARCHIVE = "https://pacs.example/dicom-web"
ARCHIVE_USER, ARCHIVE_PASSWORD = "bridge", "archive-pass-71c"
AUDIENCE = "https://bridge.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = (
    KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.1000"
UID_1, UID_2 = "1.2.826.0.1.3680043.10.9.1", "1.2.826.0.1.3680043.10.9.2"
LISTED_SERIES = ("1.2", "1.2.3")  # the series each published study lists
PATIENTS = {
    "p1": {"resourceType": "Patient", "id": "p1", "identifier": [{"system": SYSTEM, "value": "MRN-1"}]},
    "p2": {"resourceType": "Patient", "id": "p2", "identifier": [{"system": SYSTEM, "value": "MRN-2"}]},
}
ENDPOINT = {
    "resourceType": "Endpoint",
    "id": "ep1",
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-wado-rs",
    },
    "address": ARCHIVE,
}


def _study(sid: str, uid: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": sid,
        "status": "available",
        "subject": {"reference": f"Patient/{patient}"},
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "endpoint": [{"reference": "Endpoint/ep1"}],
        "series": [{"uid": uid} for uid in LISTED_SERIES],
    }


STUDIES = {UID_1: _study("s1", UID_1, "p1"), UID_2: _study("s2", UID_2, "p2")}
# A study of p1 the sync withdrew: its archive holds its Study UID under another patient too.
UID_3 = "1.2.826.0.1.3680043.10.9.3"
STUDIES[UID_3] = {
    **_study("s3", UID_3, "p1"),
    "extension": [{"url": WITHDRAWN_EXTENSION, "valueCode": "conflicting-patient-identity"}],
}


def _row(uid: str, patient_id: str) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [uid]},
        "00100020": {"vr": "LO", "Value": [patient_id]},
    }


def _bundle(resources: list[dict[str, Any]]) -> httpx.Response:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in resources]
    return httpx.Response(200, json={"resourceType": "Bundle", "type": "searchset", "entry": entries})


@dataclass
class World:
    """The fake peers: what they hold, what they were asked, and whether the FHIR server is up."""

    archive_requests: list[httpx.Request] = field(default_factory=list)
    audit_bundles: list[dict[str, Any]] = field(default_factory=list)
    fhir_down: bool = False
    qido_rows: list[dict[str, Any]] = field(default_factory=list)
    body: bytes = b"\x00DICM" * 1000
    headers: dict[str, str] = field(default_factory=dict)
    json_paths: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # DICOM JSON by path
    missing: dict[str, str] = field(default_factory=dict)  # the archive's 404s by path, its own wording

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "pacs.example":
            return self.archive(request)
        return self.fhir(request)

    def fhir(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix("/R4").strip("/")
        if request.method == "POST" and path == "":
            if self.fhir_down:
                return httpx.Response(503)
            bundle = json.loads(request.content)
            self.audit_bundles.append(bundle)
            answers = [{"response": {"status": "201 Created"}} for _ in bundle["entry"]]
            return httpx.Response(
                200, json={"resourceType": "Bundle", "type": "transaction-response", "entry": answers}
            )
        kind, _, rid = path.partition("/")
        if path == "Patient":
            wanted = request.url.params.get("identifier", "")
            return _bundle([p for p in PATIENTS.values() if wanted in _identifiers(p)])
        if kind == "Patient" and rid in PATIENTS:
            return httpx.Response(200, json=PATIENTS[rid])
        if path == "Endpoint/ep1":
            return httpx.Response(200, json=ENDPOINT)
        if kind == "ImagingStudy" and rid:
            found = [s for s in STUDIES.values() if s["id"] == rid]
            if found:
                return httpx.Response(200, json=found[0])
        if path == "ImagingStudy":
            identifier = request.url.params.get("identifier", "")
            subject = request.url.params.get("subject", "")
            found = [
                s
                for uid, s in STUDIES.items()
                if identifier == f"urn:dicom:uid|urn:oid:{uid}" or subject == s["subject"]["reference"]
            ]
            return _bundle(found)
        return httpx.Response(404, json={"resourceType": "OperationOutcome", "issue": []})

    def archive(self, request: httpx.Request) -> httpx.Response:
        self.archive_requests.append(request)
        path = request.url.path.removeprefix("/dicom-web/")
        if path in self.missing:
            return httpx.Response(404, text=self.missing[path])
        if path in self.json_paths:
            return httpx.Response(200, json=self.json_paths[path], headers={"content-type": DICOM_JSON})
        if path in ("studies", "series"):
            return httpx.Response(
                200,
                content=_chunks(json.dumps(self.qido_rows).encode()),
                headers={"content-type": "application/dicom+json"},
            )
        headers = {
            "content-type": 'multipart/related; type="application/dicom"; boundary=x',
            "content-length": str(len(self.body)),
            **self.headers,
        }
        return httpx.Response(200, content=_chunks(self.body), headers=headers)


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    """The body as a real archive sends it: streamed, in pieces (httpx reads a bytes body at once)."""
    for start in range(0, len(body), 1000):
        yield body[start : start + 1000]


def token(lifetime: int = 300, **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": "dr-who", "aud": AUDIENCE, "iat": now, "exp": now + lifetime, **claims}
    return jwt.encode(body, KEY, algorithm="RS256")


def bearer(**claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(**claims)}"}


PATIENT_1 = {"patient": "p1", "scope": "launch/patient patient/ImagingStudy.read", "client_id": "viewer-app"}


def _identifiers(resource: dict[str, Any]) -> list[str]:
    return [f"{i['system']}|{i['value']}" for i in resource.get("identifier", [])]


@asynccontextmanager
async def gateway(tmp_path: Path, world: World, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        tmp_path,
        dicomweb_url=ARCHIVE,
        dicomweb_auth="basic",
        dicomweb_username=ARCHIVE_USER,
        dicomweb_password=ARCHIVE_PASSWORD,
        fhir_url=FHIR_BASE,
        patient_identifier_system=SYSTEM,
        jwt_public_key=PUBLIC_PEM,
        jwt_audience=AUDIENCE,
        api_keys=["machine-key-1"],
        write_strategy="conditional",
        **overrides,
    )
    app = create_app(settings, transport=httpx.MockTransport(world.handler))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def test_a_patient_token_gets_its_patients_study_through_the_archives_own_credentials(
    tmp_path: Path,
) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2.3/instances/4.5.6", headers=bearer(**PATIENT_1)
        )
    assert answer.status_code == 200
    assert answer.content == world.body
    assert answer.headers["content-type"].startswith("multipart/related")
    assert answer.headers["cache-control"] == "no-store"
    sent = world.archive_requests[-1]
    assert str(sent.url) == f"{ARCHIVE}/studies/{UID_1}/series/1.2.3/instances/4.5.6"
    expected = base64.b64encode(f"{ARCHIVE_USER}:{ARCHIVE_PASSWORD}".encode()).decode()
    assert sent.headers["authorization"] == f"Basic {expected}"  # never the caller's token


async def test_another_patients_study_is_403_and_never_reaches_the_archive(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(**PATIENT_1))
    assert answer.status_code == 403
    assert answer.json()["issue"][0]["code"] == "forbidden"
    assert world.archive_requests == []


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": f"Bearer {token(lifetime=-120, **PATIENT_1)}"}, 401),  # expired
        ({"Authorization": "Bearer not-a-jwt"}, 401),
        ({"X-API-Key": "wrong"}, 401),
    ],
    ids=["no caller", "expired token", "not a token", "wrong key"],
)
async def test_callers_that_do_not_authenticate_get_401(
    tmp_path: Path, headers: dict[str, str], status: int
) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers=headers)
    assert answer.status_code == status
    assert "www-authenticate" in answer.headers
    assert world.archive_requests == []


@pytest.mark.parametrize(
    "path",
    [
        "tools/find",
        "instances/1.2.3/file",
        "studies/not-a-uid/metadata",
        f"studies/{UID_1}/archive",
        f"studies/{UID_1}/series/1.2/instances/3.4/frames/0",
        f"studies/{UID_1}/series/1.2/instances/3.4/attachment",
        f"studies/{UID_1}/../../../app/explorer.html",
        "",
    ],
)
async def test_paths_outside_the_dicomweb_routes_are_404(tmp_path: Path, path: str) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/{path}", headers={"X-API-Key": "machine-key-1"})
    assert answer.status_code == 404
    assert world.archive_requests == []


async def test_scopes_decide_for_a_token_without_a_patient(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        user = await api.get(
            f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(scope="user/ImagingStudy.read")
        )
        v2 = await api.get(
            f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(scope="system/ImagingStudy.rs")
        )
        other = await api.get(
            f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(scope="user/Observation.read")
        )
        patient_scope = await api.get(
            f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(scope="patient/ImagingStudy.read")
        )
        no_read = await api.get(
            f"/dicom-web/studies/{UID_1}/metadata",
            headers=bearer(patient="p1", scope="patient/Observation.read"),
        )
    assert (user.status_code, v2.status_code) == (200, 200)
    assert (other.status_code, patient_scope.status_code, no_read.status_code) == (403, 403, 403)


async def test_range_and_gzip_pass_through_unchanged(tmp_path: Path) -> None:
    packed = gzip.compress(b"pixel data " * 500)
    world = World(
        body=packed,
        headers={"content-encoding": "gzip", "content-range": "bytes 0-99/5500", "accept-ranges": "bytes"},
    )
    async with gateway(tmp_path, world) as api:
        request = api.build_request(
            "GET",
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/3.4/frames/1",
            headers={**bearer(**PATIENT_1), "Range": "bytes=0-99", "Accept-Encoding": "gzip"},
        )
        answer = await api.send(request, stream=True)
        raw = b"".join([chunk async for chunk in answer.aiter_raw()])
        await answer.aclose()
    sent = world.archive_requests[-1]
    assert sent.headers["range"] == "bytes=0-99" and sent.headers["accept-encoding"] == "gzip"
    assert (
        answer.headers["content-encoding"] == "gzip" and answer.headers["content-range"] == "bytes 0-99/5500"
    )
    assert raw == packed  # passed on still encoded, byte for byte


async def test_without_accept_encoding_the_archive_is_asked_for_identity(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        await api.get(  # a retrieve passed on as it is (metadata is read, and filtered, by the bridge)
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/3.4",
            headers={**bearer(**PATIENT_1), "Accept-Encoding": ""},
        )
    assert world.archive_requests[-1].headers["accept-encoding"] == "identity"


async def test_an_answer_larger_than_the_bound_is_refused(tmp_path: Path) -> None:
    world = World(body=b"x" * 5000)
    async with gateway(tmp_path, world, gateway_max_response_bytes=2048) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers=bearer(**PATIENT_1))
    assert answer.status_code == 502


async def test_searching_across_studies_shows_only_the_patients_own_rows(tmp_path: Path) -> None:
    world = World(
        qido_rows=[
            _row(UID_1, "MRN-1"),
            _row(UID_2, "MRN-2"),  # another patient: the archive ignored the key
            _row(UID_2, "mrn-1"),  # case-insensitive matching: not this patient
            _row("1.2.99", "MRN-1"),  # the same PatientID, but no ImagingStudy of this patient
        ]
    )
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            "/dicom-web/studies", params={"PatientID": "MRN-2", "limit": "10"}, headers=bearer(**PATIENT_1)
        )
        machine = await api.get("/dicom-web/studies", headers={"X-API-Key": "machine-key-1"})
    assert answer.status_code == 200
    assert [r["0020000D"]["Value"][0] for r in answer.json()] == [UID_1]
    asked = world.archive_requests[0].url.params
    assert (
        asked.get_list("00100020") == ["MRN-1"] and "PatientID" not in asked
    )  # its own key, not the caller's
    assert len(machine.json()) == 4  # a machine client sees the archive's answer as is


async def test_a_patient_token_cannot_search_another_patients_key_or_all(tmp_path: Path) -> None:
    world = World(qido_rows=[_row(UID_2, "MRN-2")])
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            "/dicom-web/series", params={"PatientID": "MRN-2"}, headers=bearer(**PATIENT_1)
        )
        scoped_out = await api.get("/dicom-web/studies", headers=bearer(scope="patient/ImagingStudy.read"))
    assert answer.status_code == 200 and answer.json() == []
    assert scoped_out.status_code == 403


async def test_each_access_is_one_audit_event_per_minute_and_a_refusal_is_recorded(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        for frame in range(1, 11):
            await api.get(
                f"/dicom-web/studies/{UID_1}/series/1.2/instances/3.4/frames/{frame}",
                headers=bearer(**PATIENT_1),
            )
        await api.get(f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(**PATIENT_1))
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    assert len(events) == 2
    read, refused = sorted(events, key=lambda e: e["outcome"])
    assert read["outcome"] == "0" and refused["outcome"] == "4"
    assert {"reference": "Patient/p1"} in [e["what"] for e in read["entity"]]
    assert read["entity"][1]["what"]["reference"] == "ImagingStudy/s1"
    assert refused["entity"][0]["what"] == {"reference": "Patient/p2"}
    assert read["agent"][0]["who"]["identifier"]["value"] == "dr-who" and read["agent"][0]["requestor"]
    assert read["agent"][1]["who"]["identifier"]["value"] == "viewer-app"
    assert all(b["entry"][0]["request"]["method"] == "PUT" for b in world.audit_bundles)


async def test_audit_events_wait_in_the_store_while_the_fhir_server_is_down(tmp_path: Path) -> None:
    world = World(fhir_down=False)
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        world.fhir_down = True
        await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers=bearer(**PATIENT_1))
        await api.get(
            "/links", params={"reference": "ImagingStudy/s1"}, headers={"X-API-Key": "machine-key-1"}
        )
        trail = api.app.state.services.audit  # type: ignore[attr-defined]
        await trail.flush()
    assert world.audit_bundles == []
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert store.audit_backlog() == 2  # kept across the restart
    finally:
        store.close()
    world.fhir_down = False
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    assert sorted(e["subtype"][1]["code"] for e in events) == ["image-read", "links"]
    store = SqlStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        assert store.audit_backlog() == 0
    finally:
        store.close()


async def test_the_gateway_can_be_turned_off(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, gateway=False) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers={"X-API-Key": "machine-key-1"})
    assert answer.status_code == 404


async def test_links_and_viewer_of_another_patients_study_are_403_and_audited(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        links = await api.get(f"/studies/{UID_2}/links", headers=bearer(**PATIENT_1))
        viewer = await api.get("/imaging-studies/s2/viewer", headers=bearer(**PATIENT_1))
        own = await api.get(f"/studies/{UID_1}/links", headers=bearer(**PATIENT_1))
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    assert (links.status_code, viewer.status_code, own.status_code) == (403, 403, 200)
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    seen = sorted((e["subtype"][1]["code"], e["outcome"]) for e in events)
    assert seen == [("links", "0"), ("links", "4"), ("viewer", "4")]


async def test_iid_and_record_page_refusals_are_audited_as_the_access_they_refused(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        iid, who = "/IHEInvokeImageDisplay", bearer(**PATIENT_1)
        study = await api.get(iid, params={"requestType": "STUDY", "studyUID": UID_2}, headers=who)
        patient = await api.get(
            iid,
            params={"requestType": "PATIENT", "patientID": "MRN-2"},
            headers=bearer(**PATIENT_1),
        )
        page = await api.get("/record/patients/p2", headers=bearer(**PATIENT_1))
        own = await api.get(iid, params={"requestType": "STUDY", "studyUID": UID_1}, headers=who)
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    assert (study.status_code, patient.status_code, page.status_code, own.status_code) == (403, 403, 403, 302)
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    refused = sorted(e["subtype"][1]["code"] for e in events if e["outcome"] == "4")
    # the IID and page refusals of p2 are one record-view in the window
    assert refused == ["record-view", "viewer"]
    assert all({"reference": "Patient/p2"} in [x["what"] for x in e["entity"]] for e in events)


async def _stalling(body: bytes) -> AsyncIterator[bytes]:
    yield body[:100]
    await asyncio.sleep(5)  # the archive stops sending: the deadline, not this, ends the wait
    yield body[100:]


class StallingWorld(World):
    """An archive that declares its answer's length, sends a little of it, then nothing more."""

    def archive(self, request: httpx.Request) -> httpx.Response:
        self.archive_requests.append(request)
        return httpx.Response(
            200, content=_stalling(self.body), headers={"content-length": str(len(self.body))}
        )


async def test_a_small_answer_that_stalls_past_the_deadline_is_a_clean_502(tmp_path: Path) -> None:
    started = time.monotonic()
    async with gateway(tmp_path, StallingWorld(), http_deadline=0.5) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers=bearer(**PATIENT_1))
    # read whole before answering: an error the caller can see, not a transfer cut short
    assert answer.status_code == 502
    assert answer.json()["resourceType"] == "OperationOutcome"
    assert time.monotonic() - started < 4


async def test_a_large_answer_streams_through_whole(tmp_path: Path) -> None:
    world = World(body=bytes(range(256)) * (6 * 1024))  # 1.5 MiB: more than is sent as one body
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/3.4", headers=bearer(**PATIENT_1)
        )
    assert answer.status_code == 200
    assert answer.content == world.body
    assert answer.headers["content-length"] == str(len(world.body))


# One study, one patient: row by row for a caller limited to one patient
def _series_row(series_uid: str, patient_id: str | None = "MRN-1") -> dict[str, Any]:
    row: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": [UID_1]},
        "0020000E": {"vr": "UI", "Value": [series_uid]},
    }
    if patient_id is not None:
        row["00100020"] = {"vr": "LO", "Value": [patient_id]}
    return row


async def test_a_series_the_published_study_does_not_list_is_404_and_never_asked_of_the_archive(
    tmp_path: Path,
) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        paths = [f"series/9.9/{tail}" for tail in ("metadata", "instances/9.9.1/frames/1", "rendered")]
        answers = [
            await api.get(f"/dicom-web/studies/{UID_1}/{p}", headers=bearer(**PATIENT_1)) for p in paths
        ]
        machine = await api.get(
            f"/dicom-web/studies/{UID_1}/series/9.9/rendered", headers={"X-API-Key": "machine-key-1"}
        )
    assert [a.status_code for a in answers] == [404, 404, 404]
    assert all("not a series of the study's published ImagingStudy" in a.text for a in answers)
    # A caller who may see every patient is refused an unlisted series too: rejected images (IHE
    # IOCM) are left out of the listing, and are never served to clinicians.
    assert machine.status_code == 404
    assert world.archive_requests == []


async def test_study_metadata_keeps_only_rows_of_listed_series_and_of_the_studys_patient(
    tmp_path: Path,
) -> None:
    world = World(
        json_paths={
            f"studies/{UID_1}/metadata": [
                _series_row("1.2"),
                _series_row("9.9", "MRN-2"),  # another patient's series under the same Study UID
                _series_row("1.2.3", "MRN-2"),  # a listed series, but a row naming another patient
                _series_row("1.2.3", "mrn-1"),  # not exactly the patient's identifier
            ]
        }
    )
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_1}/metadata", headers=bearer(**PATIENT_1))
    assert answer.status_code == 200
    assert answer.json() == [_series_row("1.2")]


async def test_a_search_within_the_study_keeps_only_the_listed_series(tmp_path: Path) -> None:
    world = World(
        json_paths={f"studies/{UID_1}/series": [_series_row("1.2", None), _series_row("9.9", None)]}
    )
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            f"/dicom-web/studies/{UID_1}/series", params={"PatientID": "MRN-2"}, headers=bearer(**PATIENT_1)
        )
    assert [row["0020000E"]["Value"] for row in answer.json()] == [["1.2"]]
    asked = world.archive_requests[-1].url.params
    assert "PatientID" not in asked  # the caller's patient keys are not passed on
    assert {"00100020", "0020000E"} <= set(asked.get_list("includefield"))


async def test_a_whole_study_retrieve_is_refused_while_the_archive_holds_unlisted_series(
    tmp_path: Path,
) -> None:
    world = World(json_paths={f"studies/{UID_1}/series": [_series_row("1.2"), _series_row("9.9", "MRN-2")]})
    async with gateway(tmp_path, world) as api:
        refused = await api.get(f"/dicom-web/studies/{UID_1}", headers=bearer(**PATIENT_1))
        world.json_paths[f"studies/{UID_1}/series"] = [_series_row("1.2"), _series_row("1.2.3")]
        served = await api.get(f"/dicom-web/studies/{UID_1}", headers=bearer(**PATIENT_1))
    assert refused.status_code == 403
    assert "does not list" in refused.json()["issue"][0]["diagnostics"]
    assert served.status_code == 200 and served.content == world.body


async def test_another_patients_instance_and_an_unknown_one_get_the_same_answer_never_the_archives(
    tmp_path: Path,
) -> None:
    world = World(
        missing={
            f"studies/{UID_1}/series/1.2/instances/7.7.7": f"Instance 7.7.7 is in study {UID_2}, not {UID_1}",
            f"studies/{UID_1}/series/1.2/instances/8.8.8": "Unknown resource",
        }
    )
    async with gateway(tmp_path, world) as api:
        other = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/7.7.7", headers=bearer(**PATIENT_1)
        )
        unknown = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/8.8.8", headers=bearer(**PATIENT_1)
        )
    assert other.status_code == unknown.status_code == 404
    assert other.content == unknown.content
    assert UID_2 not in other.text and "Unknown resource" not in unknown.text


async def test_a_withdrawn_study_is_refused_with_its_reason_to_everyone(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        patient = await api.get(
            f"/dicom-web/studies/{UID_3}/series/1.2/instances/3.4", headers=bearer(**PATIENT_1)
        )
        machine = await api.get(
            f"/dicom-web/studies/{UID_3}/metadata", headers={"X-API-Key": "machine-key-1"}
        )
        links = await api.get(
            "/links", params={"reference": "ImagingStudy/s3"}, headers={"X-API-Key": "machine-key-1"}
        )
        across = await api.get("/dicom-web/studies", headers=bearer(**PATIENT_1))
    for answer in (patient, machine, links):
        assert answer.status_code == 409
        assert "conflicting patient identity" in answer.json()["issue"][0]["diagnostics"]
    assert all(UID_3 not in str(r.url) for r in world.archive_requests)
    assert across.status_code == 200


@pytest.mark.parametrize(
    "claims",
    [
        {"patient": 123, "scope": "patient/ImagingStudy.read"},
        {"patient": ["p1"], "scope": "patient/ImagingStudy.read"},
        {"patient": "", "scope": "patient/ImagingStudy.read"},
        {"patient": "p1", "scope": ["patient/ImagingStudy.read"]},
        {"scope": ["user/ImagingStudy.read"]},
    ],
    ids=["patient a number", "patient a list", "patient empty", "scope a list", "scope a list, no patient"],
)
async def test_smart_claims_of_another_type_are_refused_never_read_as_unlimited(
    tmp_path: Path, claims: dict[str, Any]
) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/studies/{UID_2}/metadata", headers=bearer(**claims))
    assert answer.status_code == 401 and 'error="invalid_token"' in answer.headers["www-authenticate"]
    assert world.archive_requests == []


async def test_refused_credentials_are_one_security_alert_per_address_and_window(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world, audit="fhir", audit_flush_interval=3600) as api:
        for attempt in range(30):  # a prober varying the credential and the study
            headers = [{"X-API-Key": f"guess-{attempt}"}, {"Authorization": "Bearer x.y.z"}, {}][attempt % 3]
            uid = (UID_1, UID_2)[attempt % 2]
            assert (await api.get(f"/dicom-web/studies/{uid}/metadata", headers=headers)).status_code == 401
        await api.app.state.services.audit.flush()  # type: ignore[attr-defined]
    events = [e["resource"] for b in world.audit_bundles for e in b["entry"]]
    assert len(events) == 1
    (alert,) = events
    assert alert["type"]["code"] == "110113" and alert["outcome"] == "4"
    assert alert["subtype"][1]["code"] == "authentication"
    assert alert["agent"][0]["network"]["address"] == "127.0.0.1"
    assert alert["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{UID_1}"


async def test_a_series_the_published_study_leaves_out_is_not_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rejected images (IHE IOCM) and the rejection note's own series are left out of the study.
    listed = {**STUDIES[UID_1], "series": [{"uid": "1.2.3", "modality": {"code": "CT"}}]}
    monkeypatch.setitem(STUDIES, UID_1, listed)
    world = World()
    machine = {"X-API-Key": "machine-key-1"}  # not limited to one patient: answers are streamed as they are
    async with gateway(tmp_path, world) as api:
        shown = await api.get(f"/dicom-web/studies/{UID_1}/series/1.2.3/metadata", headers=machine)
        withdrawn = await api.get(f"/dicom-web/studies/{UID_1}/series/1.2.9/instances/4.5.6", headers=machine)
    assert shown.status_code == 200
    assert withdrawn.status_code == 404
    assert "its images were rejected" in withdrawn.json()["issue"][0]["diagnostics"]
    assert [r.url.path for r in world.archive_requests] == [
        f"/dicom-web/studies/{UID_1}/series/1.2.3/metadata"
    ]


# Rejected images (IHE IOCM) inside a series the published study keeps: never served to clinicians
WITHDRAWN_SOP, KEPT_SOP = "1.2.7.2", "1.2.7.1"


def _instance_row(sop_uid: str, series_uid: str = "1.2", study_uid: str = UID_1) -> dict[str, Any]:
    return {
        "0020000D": {"vr": "UI", "Value": [study_uid]},
        "0020000E": {"vr": "UI", "Value": [series_uid]},
        "00080018": {"vr": "UI", "Value": [sop_uid]},
        "00100020": {"vr": "LO", "Value": ["MRN-1"]},
    }


@pytest.fixture
def rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Study 1 as the sync publishes it once a rejection note withdrew one instance of series 1.2."""
    extension = [{"url": WITHDRAWN_INSTANCE_EXTENSION, "valueId": WITHDRAWN_SOP}]
    monkeypatch.setitem(STUDIES, UID_1, {**STUDIES[UID_1], "extension": extension})


CALLERS = [pytest.param(bearer, id="patient-token"), pytest.param(None, id="api-key")]


def _headers(caller: Any) -> dict[str, str]:
    return caller(**PATIENT_1) if caller is not None else {"X-API-Key": "machine-key-1"}


@pytest.mark.usefixtures("rejected")
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    "tail", ["", "/metadata", "/frames/1", "/frames/1/rendered", "/rendered", "/thumbnail", "/bulk/7FE00010"]
)
async def test_a_withdrawn_instance_is_404_in_every_form_and_never_asked_of_the_archive(
    tmp_path: Path, caller: Any, tail: str
) -> None:
    world = World(
        json_paths={f"studies/{UID_1}/series/1.2/instances/{KEPT_SOP}/metadata": [_instance_row(KEPT_SOP)]}
    )
    async with gateway(tmp_path, world) as api:
        refused = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/{WITHDRAWN_SOP}{tail}", headers=_headers(caller)
        )
        kept = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/{KEPT_SOP}{tail}", headers=_headers(caller)
        )
    assert refused.status_code == 404
    assert "rejection note" in refused.json()["issue"][0]["diagnostics"]
    assert kept.status_code == 200
    assert all(WITHDRAWN_SOP not in r.url.path for r in world.archive_requests)


@pytest.mark.usefixtures("rejected")
@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(
    "path",
    [f"studies/{UID_1}/metadata", f"studies/{UID_1}/series/1.2/metadata", f"studies/{UID_1}/instances",
     f"studies/{UID_1}/series/1.2/instances"],
)  # fmt: skip
async def test_metadata_and_instance_searches_leave_the_withdrawn_instance_out(
    tmp_path: Path, caller: Any, path: str
) -> None:
    world = World(json_paths={path: [_instance_row(KEPT_SOP), _instance_row(WITHDRAWN_SOP)]})
    async with gateway(tmp_path, world) as api:
        answer = await api.get(f"/dicom-web/{path}", headers=_headers(caller))
    assert answer.status_code == 200
    assert answer.json() == [_instance_row(KEPT_SOP)]


@pytest.mark.usefixtures("rejected")
@pytest.mark.parametrize("caller", CALLERS)
async def test_a_whole_series_holding_a_withdrawn_instance_and_the_whole_study_are_refused(
    tmp_path: Path, caller: Any
) -> None:
    world = World(
        json_paths={
            f"studies/{UID_1}/series/1.2/instances": [_instance_row(KEPT_SOP), _instance_row(WITHDRAWN_SOP)],
            f"studies/{UID_1}/series/1.2.3/instances": [_instance_row("1.2.3.1", "1.2.3")],
        }
    )
    async with gateway(tmp_path, world) as api:
        series = await api.get(f"/dicom-web/studies/{UID_1}/series/1.2", headers=_headers(caller))
        thumbnail = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/thumbnail", headers=_headers(caller)
        )
        study = await api.get(f"/dicom-web/studies/{UID_1}", headers=_headers(caller))
        clean = await api.get(f"/dicom-web/studies/{UID_1}/series/1.2.3", headers=_headers(caller))
    assert (series.status_code, thumbnail.status_code, study.status_code) == (404, 404, 404)
    assert "retrieve its instances one by one" in series.json()["issue"][0]["diagnostics"]
    assert clean.status_code == 200 and clean.content == world.body
    assert [r.url.path for r in world.archive_requests if "instances" not in r.url.path] == [
        f"/dicom-web/studies/{UID_1}/series/1.2.3"
    ]


@pytest.mark.usefixtures("rejected")
@pytest.mark.parametrize("caller", CALLERS)
async def test_an_instance_search_across_studies_leaves_the_withdrawn_instance_out(
    tmp_path: Path, caller: Any
) -> None:
    world = World(json_paths={"instances": [_instance_row(KEPT_SOP), _instance_row(WITHDRAWN_SOP)]})
    async with gateway(tmp_path, world) as api:
        answer = await api.get("/dicom-web/instances", headers=_headers(caller))
    assert answer.status_code == 200
    assert [row["00080018"]["Value"] for row in answer.json()] == [[KEPT_SOP]]


async def test_a_study_without_withdrawn_instances_is_streamed_as_before(tmp_path: Path) -> None:
    world = World()
    async with gateway(tmp_path, world) as api:
        answer = await api.get(
            f"/dicom-web/studies/{UID_1}/series/1.2/instances/{WITHDRAWN_SOP}",
            headers={"X-API-Key": "machine-key-1"},
        )
    assert answer.status_code == 200 and answer.content == world.body, "nothing withdrawn, nothing refused"
    assert [r.url.path for r in world.archive_requests] == [
        f"/dicom-web/studies/{UID_1}/series/1.2/instances/{WITHDRAWN_SOP}"
    ]
