"""The resolver API on the real stack: sync the demo, resolve every study every way, fetch from Orthanc."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.uri import URI, URISuffix

from bridge.api.app import create_app
from bridge.config import Settings
from tests.integration.conftest import Stack
from tests.stack.samples import StudySpec, load_demo

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

# Orthanc's QIDO does not return Issuer of Accession Number (0008,0051) at study level, so every
# accession gets the default system, and the API knows the RIS by that name.
ACCESSION_SYSTEM = "urn:oid:1.2.826.0.1.3680043.10.2000"
ACCESSION_SYSTEMS = {"RIS": ACCESSION_SYSTEM}
VIEWERS = {
    "ohif": "https://ohif.example.org",
    "stone": "https://orthanc.example.org",
    "iid": "https://pacs.example.org/iid",
    "generic": "https://viewer.example.org",
}
STUDY_UID_TAG = "0020000D"
SERIES_UID_TAG = "0020000E"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_for(stack: Stack, **overrides: str) -> Settings:
    """The bridge settings the stack's env describes (as `bridge serve` would read them)."""
    return stack.settings(
        accession_issuer_systems=json.dumps(ACCESSION_SYSTEMS),
        viewer_urls=json.dumps(VIEWERS),
        **overrides,
    )


@asynccontextmanager
async def running(settings: Settings, *, run_scheduler: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, lifespan running, called over ASGI (``run_scheduler``: as ``bridge run``)."""
    app = create_app(settings, run_scheduler=run_scheduler)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bridge.test", timeout=30
        ) as client:
            yield client


@pytest.fixture
def demo(stack: Stack) -> list[StudySpec]:
    specs = load_demo(stack.orthanc.dicomweb_url)
    report = stack.sync(accession_identifier_system=ACCESSION_SYSTEM)
    assert report.counts.created == len(specs) and report.counts.parked == 0
    return specs


def _imaging_studies(stack: Stack) -> dict[str, dict[str, Any]]:
    out = {}
    for resource in stack.fhir_search("ImagingStudy"):
        uid = next(i["value"] for i in resource["identifier"] if i.get("system") == "urn:dicom:uid")
        out[uid.removeprefix("urn:oid:")] = resource
    return out


def _check_in_orthanc(links: dict[str, Any], spec: StudySpec, allowed_base: str) -> None:
    """Fetch the returned WADO-RS URLs with dicomweb-client and check they are this study's."""
    study_uri = URI.from_string(links["study"]["url"])
    metadata_uri = URI.from_string(links["study"]["metadata"])
    assert study_uri.base_url == allowed_base
    assert study_uri.study_instance_uid == spec.uid and study_uri.suffix is None
    assert metadata_uri.study_instance_uid == spec.uid and metadata_uri.suffix is URISuffix.METADATA
    client = DICOMwebClient(url=study_uri.base_url)
    expected_series = {s.uid for s in spec.series}
    expected_count = sum(s.instances for s in spec.series)

    metadata = client.retrieve_study_metadata(metadata_uri.study_instance_uid)
    assert len(metadata) == expected_count
    assert {m[STUDY_UID_TAG]["Value"][0] for m in metadata} == {spec.uid}
    assert {m[SERIES_UID_TAG]["Value"][0] for m in metadata} == expected_series

    instances = client.retrieve_study(study_uri.study_instance_uid)
    assert len(instances) == expected_count
    assert {ds.StudyInstanceUID for ds in instances} == {spec.uid}
    assert {ds.SeriesInstanceUID for ds in instances} == expected_series

    series = links["series"][0]
    series_uri = URI.from_string(series["metadata"])
    series_metadata = client.retrieve_series_metadata(
        series_uri.study_instance_uid, series_uri.series_instance_uid
    )
    assert {m[SERIES_UID_TAG]["Value"][0] for m in series_metadata} == {series["uid"]}


@pytest.mark.interop
async def test_every_study_resolves_every_way_to_urls_orthanc_serves(
    stack: Stack, demo: list[StudySpec]
) -> None:
    published = _imaging_studies(stack)
    settings = settings_for(stack)
    base = stack.orthanc.dicomweb_url
    async with running(settings) as api:
        for spec in demo:
            assert spec.uid is not None
            fhir_id = published[spec.uid]["id"]
            ways = {
                "id": ("/imaging-studies/" + fhir_id + "/links", {}),
                "uid": (f"/studies/{spec.uid}/links", {}),
                "accession": (f"/accessions/{spec.accession}/links", {}),
                "accession+issuer": (
                    f"/accessions/{spec.accession}/links",
                    {"issuer": "RIS"},
                ),
                "accession+system": (f"/accessions/{spec.accession}/links", {"issuer": ACCESSION_SYSTEM}),
                "reference": ("/links", {"reference": f"ImagingStudy/{fhir_id}"}),
                "absolute": ("/links", {"reference": f"{stack.fhir.base_url}/ImagingStudy/{fhir_id}"}),
            }
            answers = {}
            for way, (path, params) in ways.items():
                response = await api.get(path, params=params)
                assert response.status_code == 200, (way, response.text)
                answers[way] = response.json()
            first = answers["id"]
            assert all(a == first for a in answers.values()), "every way gives the same links"
            assert first["study_uid"] == spec.uid
            assert first["imaging_study"] == f"ImagingStudy/{fhir_id}"
            assert first["dicomweb_base"] == base
            assert [s["uid"] for s in first["series"]] == [s.uid for s in spec.series]
            assert set(first["viewers"]) == set(VIEWERS)
            _check_in_orthanc(first, spec, base)


@pytest.mark.interop
async def test_an_uncached_search_brings_the_endpoint_in_the_same_request(
    stack: Stack, demo: list[StudySpec]
) -> None:
    # Searches ask for the study's Endpoint with _include=ImagingStudy:endpoint: an accession
    # lookup, and a Study UID lookup where ids are not derived from the UID, is one FHIR request
    # on every engine, where a search and the Endpoint's read were two.
    published = _imaging_studies(stack)
    base = stack.orthanc.dicomweb_url
    async with running(settings_for(stack, resolver_cache_ttl="0", write_strategy="conditional")) as api:
        for spec in demo:
            for path in (f"/accessions/{spec.accession}/links", f"/studies/{spec.uid}/links"):
                stack.fhir.reset_stats()
                response = await api.get(path)
                assert response.status_code == 200, (path, response.text)
                links = response.json()
                assert links["imaging_study"] == f"ImagingStudy/{published[str(spec.uid)]['id']}"
                assert links["dicomweb_base"] == base and links["study_uid"] == spec.uid
                stats = stack.fhir.stats()
                assert (stats["requests"], stats["by_method"]) == (1, {"GET": 1}), (path, stats)
        _check_in_orthanc(links, demo[-1], base)


@pytest.mark.parametrize(
    ("viewer", "expected"),
    [
        (None, "https://ohif.example.org/viewer?StudyInstanceUIDs={uid}"),
        ("ohif", "https://ohif.example.org/viewer?StudyInstanceUIDs={uid}"),
        ("stone", "https://orthanc.example.org/stone-webviewer/index.html?study={uid}"),
        ("iid", "https://pacs.example.org/iid/IHEInvokeImageDisplay?requestType=STUDY&studyUID={uid}"),
        (
            "generic",
            "https://viewer.example.org/?study={uid}&wadoRsRoot={base}&imagingStudy={study_url}",
        ),
    ],
)
@pytest.mark.interop
async def test_viewer_redirect_is_a_302_to_the_templates_url(
    stack: Stack, demo: list[StudySpec], viewer: str | None, expected: str
) -> None:
    published = _imaging_studies(stack)
    spec = demo[0]
    assert spec.uid is not None
    fhir_id = published[spec.uid]["id"]
    want = expected.format(
        uid=spec.uid,
        base=quote(stack.orthanc.dicomweb_url, safe=""),
        study_url=quote(f"{stack.fhir.base_url}/ImagingStudy/{fhir_id}", safe=""),
    )
    params = {"viewer": viewer} if viewer else {}
    async with running(settings_for(stack)) as api:
        for path in (f"/imaging-studies/{fhir_id}/viewer", f"/studies/{spec.uid}/viewer"):
            response = await api.get(path, params=params)
            assert response.status_code == 302, response.text
            assert response.headers["location"] == want


async def test_bad_input_unknown_study_and_conflicts(stack: Stack, demo: list[StudySpec]) -> None:
    # An Endpoint outside the configured bases, and one of the wrong type, on the real FHIR server.
    foreign = _post(stack, _endpoint("http://evil.example.com/dicom-web", "dicom-wado-rs"))
    qido = _post(stack, _endpoint(stack.orthanc.dicomweb_url, "dicom-qido-rs"))
    template = _imaging_studies(stack)[str(demo[0].uid)]
    strays = []
    for uid, endpoint_id in (
        ("1.2.826.0.1.3680043.8.498.777", foreign),
        ("1.2.826.0.1.3680043.8.498.778", qido),
    ):
        stray = {k: v for k, v in template.items() if k not in ("id", "meta", "series")}
        stray["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
        stray["endpoint"] = [{"reference": f"Endpoint/{endpoint_id}"}]
        strays.append(_post(stack, stray))
    async with running(settings_for(stack)) as api:
        for stray_id in strays:
            conflict = await api.get(f"/imaging-studies/{stray_id}/links")
            assert conflict.status_code == 409, conflict.text
            assert "evil.example.com" not in conflict.text
            assert conflict.json()["resourceType"] == "OperationOutcome"
        viewer = await api.get(f"/imaging-studies/{strays[0]}/viewer")
        assert viewer.status_code == 409

        missing = await api.get("/studies/1.2.826.0.1.3680043.8.498.999/links")
        assert missing.status_code == 404
        assert missing.json()["issue"][0]["code"] == "not-found"
        assert (await api.get("/imaging-studies/no-such-study/links")).status_code == 404
        assert (await api.get("/accessions/NOPE/links")).status_code == 404

        for path, params in [
            ("/studies/1.2.x/links", {}),
            ("/studies/1.02.3/links", {}),
            ("/imaging-studies/bad%20id/links", {}),
            ("/accessions/ABCDEFGHIJKLMNOPQ/links", {}),
            ("/links", {"reference": "Patient/123"}),
            ("/links", {"reference": "http://elsewhere.example.org/fhir/ImagingStudy/abc"}),
            ("/accessions/A1001/links", {"issuer": "no such issuer"}),
            (f"/studies/{demo[0].uid}/viewer", {"viewer": "nope"}),
        ]:
            response = await api.get(path, params=params)
            assert response.status_code == 422, (path, params, response.text)
            assert response.json()["issue"][0]["diagnostics"]


async def test_fhir_server_down_is_503_with_retry_after(stack: Stack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_for(stack, fhir_url=f"http://127.0.0.1:{port}/fhir/R4")
    async with running(settings) as api:
        response = await api.get("/studies/1.2.826.0.1.3680043.8.498.1/links")
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert str(port) not in response.text
        ready = await api.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["fhir"] != "ok"


async def test_readiness_asks_every_source_and_names_the_one_whose_archive_is_down(stack: Stack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sources = [
        {"name": "main", "dicomweb": {"url": stack.orthanc.dicomweb_url}},
        {"name": "second", "dicomweb": {"url": f"http://127.0.0.1:{port}/dicom-web"}},
    ]
    async with running(settings_for(stack, sources=json.dumps(sources))) as api:
        ready = await api.get("/readyz")
    assert ready.status_code == 503
    checks = ready.json()["checks"]
    assert checks["fhir"] == "ok"
    assert "source second" in checks["dicomweb"] and "source main" not in checks["dicomweb"]


@pytest.fixture
def public_demo(stack: Stack) -> tuple[list[StudySpec], str]:
    """The demo published under a public base (localhost) that differs from the polled one."""
    public = stack.orthanc.dicomweb_url.replace("127.0.0.1", "localhost")
    specs = load_demo(stack.orthanc.dicomweb_url)
    stack.sync(dicomweb_public_url=public, accession_identifier_system=ACCESSION_SYSTEM)
    return specs, public


async def test_series_endpoint_overrides_the_studys_on_the_real_servers(
    stack: Stack, public_demo: tuple[list[StudySpec], str]
) -> None:
    # One series points at the polled base (127.0.0.1): both bases are configured, both reach
    # the same Orthanc, and each URL must keep its own base.
    specs, public = public_demo
    spec = specs[0]
    resource = _imaging_studies(stack)[str(spec.uid)]
    polled = _post(stack, _endpoint(stack.orthanc.dicomweb_url, "dicom-wado-rs"))
    resource["series"][1]["endpoint"] = [{"reference": f"Endpoint/{polled}"}]
    httpx.put(
        f"{stack.fhir.base_url}/ImagingStudy/{resource['id']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    ).raise_for_status()
    async with running(settings_for(stack, dicomweb_public_url=public)) as api:
        links = (await api.get(f"/studies/{spec.uid}/links")).json()
    assert links["dicomweb_base"] == public
    bases = [s["dicomweb_base"] for s in links["series"]]
    assert bases[1] == stack.orthanc.dicomweb_url and set(bases[:1] + bases[2:]) == {public}
    _check_in_orthanc(links, spec, public)
    override = links["series"][1]
    uri = URI.from_string(override["metadata"])
    assert uri.base_url == stack.orthanc.dicomweb_url
    got = DICOMwebClient(url=uri.base_url).retrieve_series_metadata(
        uri.study_instance_uid, uri.series_instance_uid
    )
    assert {m[SERIES_UID_TAG]["Value"][0] for m in got} == {override["uid"]}


async def test_api_keys_and_jwts_guard_the_resolver(stack: Stack, demo: list[StudySpec]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = settings_for(
        stack,
        api_keys="key-1,key-2",
        jwt_public_key=pem,
        jwt_audience="bridge-api",
        jwt_issuer="https://idp.test",
    )
    path = f"/studies/{demo[0].uid}/links"

    def token(**claims: Any) -> str:
        payload = {
            "sub": "ehr-1",
            "aud": "bridge-api",
            "iss": "https://idp.test",
            "exp": int(time.time()) + 60,
        }
        payload.update(claims)
        return jwt.encode(payload, key, algorithm="ES256")

    async with running(settings) as api:
        assert (await api.get(path)).status_code == 401
        assert (await api.get(path, headers={"X-API-Key": "key-3"})).status_code == 401
        assert (await api.get(path, headers={"X-API-Key": "key-2"})).status_code == 200
        assert (await api.get(path, headers={"Authorization": f"Bearer {token()}"})).status_code == 200
        for bad in (token(aud="other"), token(exp=int(time.time()) - 300), token(iss="https://evil.test")):
            response = await api.get(path, headers={"Authorization": f"Bearer {bad}"})
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await api.get("/healthz")).status_code == 200


ACCESS_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO bridge\.api\.access: GET /studies/\{study_uid\}/links 200 "
    r"\d+\.\d ms"
)


def test_bridge_serve_logs_a_line_a_request_and_writes_the_last_ones_when_stopped(
    stack: Stack, demo: list[StudySpec], tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    with serve(stack, log=log, log_level="INFO") as url:
        for _ in range(2):  # the first lookups through the route, the second from the cached lane
            for spec in demo:
                assert httpx.get(f"{url}/studies/{spec.uid}/links", timeout=30).status_code == 200
        # stopped (SIGTERM) at once, within the 0.2 s a line may wait: the stop writes what waits
    text = log.read_text()
    access = [line for line in text.splitlines() if "bridge.api.access:" in line and "/links" in line]
    assert len(access) == 2 * len(demo)
    assert all(ACCESS_LINE.fullmatch(line) for line in access), access[:3]
    assert not any(spec.uid in line for spec in demo for line in access)  # route templates, not paths
    # uvicorn's last line, logged as it stops, milliseconds before it ends the process
    assert "Finished server process" in text


def test_bridge_serve_answers_over_http(stack: Stack, demo: list[StudySpec]) -> None:
    with serve(stack) as url:
        ready = httpx.get(f"{url}/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        response = httpx.get(f"{url}/studies/{demo[0].uid}/viewer", params={"viewer": "stone"}, timeout=30)
        assert response.status_code == 302
        assert response.headers["location"].endswith(f"?study={demo[0].uid}")
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'route="/studies/{study_uid}/viewer"' in metrics
        assert str(demo[0].uid) not in metrics


@contextmanager
def serve(stack: Stack, log: Path | None = None, **overrides: str) -> Iterator[str]:
    """`bridge serve` in a subprocess on a free loopback port; yields its URL; stopped with SIGTERM.

    ``log``: the file its standard error goes to.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(
        stack.settings_env(
            accession_issuer_systems=json.dumps(ACCESSION_SYSTEMS),
            viewer_urls=json.dumps(VIEWERS),
            **overrides,
        )
    )
    sink = log.open("wb") if log is not None else None
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE if sink is None else sink,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"bridge serve did not start: {process.stderr.read().decode() if process.stderr else ''}"
                )
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()
        if sink is not None:
            sink.close()


def _endpoint(address: str, connection: str) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": connection,
        },
        "payloadType": [{"text": "DICOM"}],
        "address": address,
    }


def _post(stack: Stack, resource: dict[str, Any]) -> str:
    response = httpx.post(
        f"{stack.fhir.base_url}/{resource['resourceType']}",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["id"])
