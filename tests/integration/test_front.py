"""The gateway's nginx front, for real: a SMART app's retrieves go from nginx straight to an archive that
requires credentials, once the bridge has granted the study; everything else is the bridge's own answer.

Real parts: Orthanc with HTTP basic credentials (which only the bridge knows), the FHIR test server,
oidc-provider issuing the app's patient-bound tokens, `bridge serve`'s app, and Debian's nginx
configured by `bridge front-config`. The app is dicomweb-client, pointed at the Endpoint's address,
which is the front's. The bridge's own request metrics show which requests the front served itself.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from requests import HTTPError

from bridge.api.app import create_app
from bridge.gateway.front import GRANT_PATH
from bridge.mapping.context import WITHDRAWN_EXTENSION
from bridge.metrics import REGISTRY
from bridge.resolve.published import study_uid_of
from tests.integration.conftest import Stack
from tests.integration.test_login import (
    CLIENT_ID,
    CLIENT_SECRET,
    HOSP_A,
    HOSP_B,
    LAUNCH,
    PASSWORD,
    USER,
    _patient_id,
    _sign_in,
)
from tests.integration.test_smart_app import World as SmartWorld
from tests.integration.test_smart_app import _audit_events, _smart_search, app_token_settings, smart_apps
from tests.stack.front import NginxFront
from tests.stack.oidc import LOGIN_SCOPES, OidcProvider, web_client
from tests.stack.orthanc import OrthancServer
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_rejection_note, build_study, load_demo, stow
from tests.stack.tls import Pki
from tests.stack.viewer import ThreadedServer

pytestmark = pytest.mark.integration

ARCHIVE_USER, ARCHIVE_PASSWORD = "bridge-reader", "archive-pass-83d1"
FRONT_SECRET = "front-secret-for-the-tests-5a7c9e1b3d"
GATEWAY_ROUTE = "/dicom-web/{path:path}"


def _answered(route: str, status: int) -> float:
    """How many GETs the bridge's app has answered on ``route`` with ``status`` (this process's registry)."""
    labels = {"method": "GET", "route": route, "status": str(status)}
    return REGISTRY.get_sample_value("bridge_http_requests_total", labels) or 0.0


def _dicom_part(answer: httpx.Response) -> bytes:
    """The one part of a multipart/related answer, without its part headers."""
    boundary = answer.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    part = answer.content.split(b"--" + boundary.encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")


def _settled(route: str, status: int) -> float:
    """`_answered`, once it has stopped moving: the app counts a request just after answering it."""
    last, steady_since = _answered(route, status), time.monotonic()
    while time.monotonic() - steady_since < 0.5:
        time.sleep(0.05)
        now = _answered(route, status)
        if now != last:
            last, steady_since = now, time.monotonic()
    return last


@dataclass
class FrontWorld(SmartWorld):
    front: NginxFront
    orthanc: OrthancServer
    env: dict[str, str]
    archive: dict[str, str] = field(default_factory=dict)  # the source's settings, for stack.sync


@contextmanager
def _bridge_and_front(env: dict[str, str], front_port: int, pki: Pki | None = None) -> Iterator[NginxFront]:
    """The bridge's app (in this process, for its metrics) and nginx in front of it, with these settings.

    With ``pki`` the front serves callers over TLS with its server certificate.
    """
    with _bridge_with_front(env, front_port, pki) as (_bridge, front):
        yield front


@contextmanager
def _bridge_with_front(
    env: dict[str, str], front_port: int, pki: Pki | None = None
) -> Iterator[tuple[str, NginxFront]]:
    """`_bridge_and_front`, with the bridge's own address (its Python gateway, without the front)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        from bridge.config import load_settings

        settings = load_settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    with ThreadedServer(create_app(settings), name="bridge API") as bridge:
        command_env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")} | env
        tls = {"certificate": pki.server_cert, "certificate_key": pki.server_key} if pki else {}
        with NginxFront(command_env, bridge.base_url, port=front_port, **tls) as front:
            yield bridge.base_url, front


@pytest.fixture
def world(stack: Stack) -> Iterator[FrontWorld]:
    front_port = free_loopback_port()
    front_url = f"http://127.0.0.1:{front_port}"
    studies: dict[str, tuple[str, list[str]]] = {}
    with OrthancServer(name="bridge-front", basic_auth=(ARCHIVE_USER, ARCHIVE_PASSWORD)) as orthanc:
        with httpx.Client(auth=(ARCHIVE_USER, ARCHIVE_PASSWORD), timeout=60) as client:
            for patient_id, name in (("MRN-ANN", "Ann^Example"), ("MRN-BOB", "Bob^Example")):
                spec = StudySpec(patient_id=patient_id, patient_name=name, series=[SeriesSpec(instances=3)])
                datasets = build_study(spec)
                stow(orthanc.dicomweb_url, datasets, client=client)
                studies[patient_id] = (
                    str(datasets[0].StudyInstanceUID),
                    sorted(str(ds.SOPInstanceUID) for ds in datasets),
                )
        archive = {
            "dicomweb_url": orthanc.dicomweb_url,
            "dicomweb_auth": "basic",
            "dicomweb_username": ARCHIVE_USER,
            "dicomweb_password": ARCHIVE_PASSWORD,
            "dicomweb_public_url": f"{front_url}/dicom-web",
        }
        report = stack.sync(**archive)
        assert report.counts.created == 2
        with smart_apps(stack) as (patients, idp):
            env = stack.settings_env(**archive, **app_token_settings(idp), gateway_front_secret=FRONT_SECRET)
            with _bridge_and_front(env, front_port) as front:
                yield FrontWorld(
                    stack.fhir.base_url, front_url, idp, patients, studies, front, orthanc, env, archive
                )


@pytest.mark.interop
def test_a_smart_apps_retrieves_go_from_the_front_to_the_archive_once_the_study_is_granted(
    world: FrontWorld, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = world.token("app-ann")
    ann = world.patients["MRN-ANN"]
    studies, endpoints = _smart_search(world, token, ann)
    endpoint = endpoints[studies[0]["endpoint"][0]["reference"]]
    assert endpoint["address"] == f"{world.front.url}/dicom-web"  # the Endpoint sends the app to the front
    study_uid, sop_uids = world.studies["MRN-ANN"]
    grants, relayed = _answered(GRANT_PATH, 200), _answered(GATEWAY_ROUTE, 200)

    app = DICOMwebClient(url=endpoint["address"], headers={"Authorization": f"Bearer {token}"})
    metadata = app.retrieve_study_metadata(study_uid)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sop_uids
    series_uid = metadata[0]["0020000E"]["Value"][0]
    for row in metadata:  # what a viewer does: every instance of the study, one request each
        instance = app.retrieve_instance(study_uid, series_uid, row["00080018"]["Value"][0])
        assert instance.PatientID == "MRN-ANN"
    # A search is not a retrieve: the bridge answers it, filtered to the patient, as without the front.
    assert [s["0020000D"]["Value"][0] for s in app.search_for_studies()] == [study_uid]
    # Four retrieves of one study: two grants, and none of them relayed by the bridge's Python gateway,
    # which answered only the search.
    # Grants are kept per study and series: one for the study's metadata, one for its series.
    assert _settled(GRANT_PATH, 200) - grants == 2
    assert _settled(GATEWAY_ROUTE, 200) - relayed == 1

    # The front's bytes are the archive's bytes, headers as the gateway gives them.
    path = f"/studies/{study_uid}/series/{series_uid}/instances/{sop_uids[0]}"
    accept = {"Accept": 'multipart/related; type="application/dicom"'}
    through = httpx.get(
        f"{endpoint['address']}{path}", headers={**accept, "Authorization": f"Bearer {token}"}, timeout=30
    )
    archive = (ARCHIVE_USER, ARCHIVE_PASSWORD)
    direct = httpx.get(f"{world.orthanc.dicomweb_url}{path}", headers=accept, auth=archive, timeout=30)
    assert through.status_code == direct.status_code == 200
    assert _dicom_part(through) == _dicom_part(direct)  # each answer has its own multipart boundary
    assert through.headers["content-type"].split(";")[:2] == direct.headers["content-type"].split(";")[:2]
    assert through.headers["cache-control"] == "no-store"
    assert "set-cookie" not in through.headers and "www-authenticate" not in through.headers

    # Refusals are the bridge's, with its reasons and audit: another patient's study, no token.
    bob_uid, _ = world.studies["MRN-BOB"]
    with pytest.raises(HTTPError) as refused:
        app.retrieve_study_metadata(bob_uid)
    assert refused.value.response.status_code == 403
    assert refused.value.response.json()["resourceType"] == "OperationOutcome"
    with pytest.raises(HTTPError) as unauthenticated:
        DICOMwebClient(url=endpoint["address"]).retrieve_study_metadata(study_uid)
    assert unauthenticated.value.response.status_code == 401
    assert unauthenticated.value.response.headers["www-authenticate"].startswith("Bearer")
    # Ann's grant is Ann's: Bob's token on Ann's study is asked again, and refused.
    bob_token = world.token("app-bob")
    bob = DICOMwebClient(url=endpoint["address"], headers={"Authorization": f"Bearer {bob_token}"})
    with pytest.raises(HTTPError) as crossed:
        bob.retrieve_study_metadata(study_uid)
    assert crossed.value.response.status_code == 403
    assert len(bob.retrieve_study_metadata(bob_uid)) == 3
    # Outside the DICOMweb routes: the bridge's 404, never the archive's other services.
    assert httpx.get(f"{world.front.url}/dicom-web/system", timeout=10).status_code in (401, 404)
    assert httpx.get(f"{world.front.url}/dicom-web/../system", timeout=10).status_code in (400, 401, 404)

    # Five accesses: Ann's read (the grant's), Ann's search across studies, Ann's token refused on
    # Bob's study, Bob's token refused on Ann's, Bob's read; and the call without a token, a security
    # alert naming the study it asked for (one per address). Waiting for fewer than all six could
    # stop between two flushes of the trail.
    everything = _audit_events(world, expected=6)
    assert len(everything) == 6, sorted((e["subtype"][1]["code"], e["outcome"]) for e in everything)
    alerts = [e for e in everything if e["type"]["code"] == "110113"]
    events = [e for e in everything if e["type"]["code"] != "110113"]
    assert [a["entity"][0]["what"]["identifier"]["value"] for a in alerts] == [f"urn:oid:{study_uid}"]
    by_outcome = {
        (e["outcome"], e["subtype"][1]["code"], e["entity"][0]["what"]["reference"]) for e in events
    }
    assert ("0", "image-read", f"Patient/{ann}") in by_outcome  # the grant's
    assert ("4", "image-read", f"Patient/{world.patients['MRN-BOB']}") in by_outcome
    assert ("4", "image-read", f"Patient/{ann}") in by_outcome  # Bob's token on Ann's study
    reads = [e for e in events if e["subtype"][1]["code"] == "image-read" and e["outcome"] == "0"]
    assert len(reads) == 2  # Ann's retrieves of one study are one event; Bob's is another

    # What the bridge and nginx logged (the test's own clients log their URLs, UIDs included).
    ours = ("bridge", "uvicorn")
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ours)
    assert world.front.log_path is not None
    logged += world.front.log_path.read_text(errors="replace")
    for secret in (token, ARCHIVE_PASSWORD, FRONT_SECRET, "MRN-ANN", "MRN-BOB", "Ann^Example", study_uid):
        assert secret not in logged


def test_the_bridge_says_how_long_the_front_keeps_a_grant(world: FrontWorld) -> None:
    """With BRIDGE_SESSION_CACHE_TTL=0 nothing is kept: every retrieve is asked of the bridge."""
    token = world.token("app-ann")
    study_uid, sop_uids = world.studies["MRN-ANN"]
    env = dict(world.env, BRIDGE_SESSION_CACHE_TTL="0")
    port = free_loopback_port()
    with _bridge_and_front(env, port) as front:
        app = DICOMwebClient(url=f"{front.url}/dicom-web", headers={"Authorization": f"Bearer {token}"})
        grants = _answered(GRANT_PATH, 200)
        for _ in range(3):
            assert len(app.retrieve_study_metadata(study_uid)) == len(sop_uids)
        assert _settled(GRANT_PATH, 200) - grants == 3


@dataclass
class FrontSession:
    """A browser with an EHR-launched session (Jane's) opened through the front."""

    front: NginxFront
    browser: httpx.Client
    cookie: str  # the session cookie's value
    jane_uid: str
    john_uid: str
    idp: OidcProvider
    cookie_name: str = "bridge_session"


@contextmanager
def launched_behind_front(stack: Stack, pki: Pki | None = None, **settings: str) -> Iterator[FrontSession]:
    """The demo studies synced, the bridge and its front up, and a browser launched for Jane through it.

    With ``pki`` the front serves https, which is the bridge's public URL: its cookies are __Host- ones.
    """
    load_demo(stack.orthanc.dicomweb_url)
    port = free_loopback_port()
    public = f"{'https' if pki else 'http'}://127.0.0.1:{port}"
    cookie_name = "__Host-bridge_session" if pki else "bridge_session"
    assert stack.sync(dicomweb_public_url=f"{public}/dicom-web").counts.parked == 0
    jane, john = _patient_id(stack, "Doe", HOSP_A), _patient_id(stack, "Smith", HOSP_B)
    studies = {s["subject"]["reference"]: s for s in stack.fhir_search("ImagingStudy")}
    jane_uid = study_uid_of(studies[f"Patient/{jane}"])
    john_uid = study_uid_of(studies[f"Patient/{john}"])
    assert jane_uid and john_uid
    with OidcProvider(
        [web_client(CLIENT_ID, CLIENT_SECRET, f"{public}/login/callback")],
        scopes=LOGIN_SCOPES,
        users={USER: PASSWORD},
        launches={LAUNCH: jane},
    ) as idp:
        env = stack.settings_env(
            dicomweb_public_url=f"{public}/dicom-web",
            public_url=public,
            oidc_issuer=idp.issuer,
            oidc_client_id=CLIENT_ID,
            oidc_client_secret=CLIENT_SECRET,
            smart_launch_issuers=idp.fhir_iss,
            gateway_front_secret=FRONT_SECRET,
            **settings,
        )
        verify = ssl.create_default_context(cafile=str(pki.ca_cert)) if pki else True
        with (
            _bridge_and_front(env, port, pki) as front,
            httpx.Client(follow_redirects=True, timeout=30, verify=verify) as browser,
        ):
            html = {"Accept": "text/html"}
            launch = {"iss": idp.fhir_iss, "launch": LAUNCH}
            form = browser.get(f"{front.url}/launch", params=launch, headers=html)
            record = _sign_in(browser, form)
            assert record.status_code == 200 and str(record.url) == f"{public}/record/patients/{jane}"
            cookie = browser.cookies.get(cookie_name)
            assert cookie
            yield FrontSession(front, browser, cookie, jane_uid, john_uid, idp, cookie_name)


# One study, one patient: the archive files another patient's images under a published Study UID
def _file_under(world: FrontWorld, study_uid: str, patient_id: str) -> tuple[str, str]:
    """One instance of ``patient_id`` stored under ``study_uid`` in its own series: (series, SOP UIDs)."""
    series_uid = generate_uid()
    spec = StudySpec(
        patient_id=patient_id,
        patient_name="Bob^Example",
        uid=study_uid,
        series=[SeriesSpec(instances=1, uid=series_uid)],
    )
    datasets = build_study(spec)
    with httpx.Client(auth=(ARCHIVE_USER, ARCHIVE_PASSWORD), timeout=60) as client:
        stow(world.orthanc.dicomweb_url, datasets, client=client)
    return series_uid, str(datasets[0].SOPInstanceUID)


def _withdrawn_gauge(bridge: str) -> float:
    """bridge_sync_withdrawn_studies as the bridge's /metrics serves it to a scraper."""
    answer = httpx.get(f"{bridge}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    [value] = [
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == "bridge_sync_withdrawn_studies"
    ]
    return value


def _diagnostics(answer: httpx.Response) -> str:
    body = answer.json()
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


@pytest.mark.interop
def test_a_published_study_another_patient_is_filed_under_is_withdrawn_everywhere_until_corrected(
    world: FrontWorld, stack: Stack
) -> None:
    token = world.token("app-ann")
    ann = {"Authorization": f"Bearer {token}"}
    study_uid, sop_uids = world.studies["MRN-ANN"]
    [published] = stack.fhir_search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
    [ann_series] = [s["uid"] for s in published["series"]]
    # Caches off: every request below is decided on what the FHIR server holds now. /metrics open, as
    # for a scraper without credentials.
    env = dict(
        world.env,
        BRIDGE_RESOLVER_CACHE_TTL="0",
        BRIDGE_SESSION_CACHE_TTL="0",
        BRIDGE_API_METRICS_AUTH="false",
    )
    with _bridge_with_front(env, free_loopback_port()) as (bridge, front):
        ways = {"front": f"{front.url}/dicom-web", "gateway": f"{bridge}/dicom-web"}
        bob_series, bob_sop = _file_under(world, study_uid, "MRN-BOB")

        # Before the next sync: Ann's caller still sees Ann's study, and nothing of Bob's.
        for way, base in ways.items():
            # Orthanc answers 404 to a study-level retrieve of a UID it holds twice; the bridge's own 404
            # then, never Bob's rows.
            metadata = httpx.get(f"{base}/studies/{study_uid}/metadata", headers=ann, timeout=30)
            assert metadata.status_code in (200, 404), (way, metadata.text)
            if metadata.status_code == 200:
                assert {r["00100020"]["Value"][0] for r in metadata.json()} == {"MRN-ANN"}, way
            else:
                assert _diagnostics(metadata) == "not found in the study's archive"
            own_metadata = httpx.get(
                f"{base}/studies/{study_uid}/series/{ann_series}/metadata", headers=ann, timeout=30
            )
            assert own_metadata.status_code == 200, (way, own_metadata.text)
            assert {r["00100020"]["Value"][0] for r in own_metadata.json()} == {"MRN-ANN"}, way
            assert sorted(r["00080018"]["Value"][0] for r in own_metadata.json()) == sop_uids, way
            series = httpx.get(f"{base}/studies/{study_uid}/series", headers=ann, timeout=30)
            assert [r["0020000E"]["Value"][0] for r in series.json()] == [ann_series], way
            # Instance-level QIDO, within the study and across studies: Ann's rows only.
            for path, params in (
                (f"studies/{study_uid}/instances", {}),
                (f"studies/{study_uid}/series/{ann_series}/instances", {}),
                ("instances", {"StudyInstanceUID": study_uid}),
            ):
                rows = httpx.get(f"{base}/{path}", params=params, headers=ann, timeout=30)
                assert rows.status_code == 200, (way, path, rows.text)
                assert {r["00100020"]["Value"][0] for r in rows.json()} == {"MRN-ANN"}, (way, path)
                assert sorted(r["00080018"]["Value"][0] for r in rows.json()) == sop_uids, (way, path)
            for path in (
                f"series/{bob_series}/metadata",
                f"series/{bob_series}/instances",
                f"series/{bob_series}/instances/{bob_sop}",
                f"series/{bob_series}/instances/{bob_sop}/frames/1",
            ):
                refused = httpx.get(f"{base}/studies/{study_uid}/{path}", headers=ann, timeout=30)
                assert refused.status_code == 404, (way, path, refused.status_code)
                assert "not a series of the study's published ImagingStudy" in _diagnostics(refused)
            whole = httpx.get(f"{base}/studies/{study_uid}", headers=ann, timeout=30)
            assert whole.status_code == 403 and "does not list" in _diagnostics(whole), way
            own = httpx.get(
                f"{base}/studies/{study_uid}/series/{ann_series}/instances/{sop_uids[0]}",
                headers=ann,
                timeout=30,
            )
            assert own.status_code == 200, way

        # The sync parks the study and withdraws it; its subject stays Ann's.
        report = stack.sync(**world.archive)
        assert report.status == "parked" and report.counts.parked == 1, (report.counts, report.error)
        [parked_study] = report.parked
        assert parked_study.study_uid == study_uid and parked_study.kind == "identity"
        [withdrawn] = stack.fhir_search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
        assert withdrawn["subject"] == published["subject"]
        assert [s["uid"] for s in withdrawn["series"]] == [ann_series]
        labels = withdrawn.get("extension", [])
        assert [(label["url"], label["valueCode"]) for label in labels] == [
            (WITHDRAWN_EXTENSION, "conflicting-patient-identity")
        ]
        status = stack.cli("status", "--json", **world.archive)
        data = json.loads(status.stdout)
        assert data["withdrawn"] == 1
        assert _withdrawn_gauge(bridge) == 1
        assert data["withdrawn_studies"] == [
            {"source": "test-orthanc", "study_uid": study_uid, "reason": "conflicting patient identity"}
        ]

        # Withdrawn: the resolver, the gateway and the front refuse it to Ann's caller, with the reason.
        links = httpx.get(f"{bridge}/studies/{study_uid}/links", headers=ann, timeout=30)
        assert links.status_code == 409 and "conflicting patient identity" in _diagnostics(links)
        for way, base in ways.items():
            for path in ("metadata", f"series/{ann_series}/instances/{sop_uids[0]}"):
                answer = httpx.get(f"{base}/studies/{study_uid}/{path}", headers=ann, timeout=30)
                assert answer.status_code == 409, (way, path, answer.status_code)
                assert "conflicting patient identity" in _diagnostics(answer)

        # The integrator removes Bob's images from the study: published again, to Ann, as before.
        found = world.orthanc.client.post("/tools/lookup", content=bob_series.encode("ascii"))
        [hit] = [h for h in found.json() if h.get("Type") == "Series"]
        world.orthanc.client.delete(f"/series/{hit['ID']}").raise_for_status()
        again = stack.sync(**world.archive)
        assert (again.status, again.counts.updated, again.counts.parked) == ("ok", 1, 0)
        [republished] = stack.fhir_search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
        assert republished["subject"] == published["subject"]
        assert not republished.get("extension")
        assert json.loads(stack.cli("status", "--json", **world.archive).stdout)["withdrawn"] == 0
        assert _withdrawn_gauge(bridge) == 0
        for way, base in ways.items():
            metadata = httpx.get(f"{base}/studies/{study_uid}/metadata", headers=ann, timeout=30)
            assert metadata.status_code == 200, (way, metadata.text)


def test_an_ehr_launched_session_behind_the_front_sees_its_patients_images_until_logout(
    stack: Stack,
) -> None:
    """The browser's way: login and launch pass through the front; the session cookie keys the grant."""
    with launched_behind_front(stack, session_cache_ttl="1") as session:
        front, browser, cookie = session.front, session.browser, session.cookie
        jane_uid, john_uid = session.jane_uid, session.john_uid
        metadata = {"Accept": "application/dicom+json"}
        grants, relayed = _settled(GRANT_PATH, 200), _settled(GATEWAY_ROUTE, 200)
        own = [
            browser.get(f"{front.url}/dicom-web/studies/{jane_uid}/metadata", headers=metadata)
            for _ in range(3)
        ]
        assert [a.status_code for a in own] == [200, 200, 200], own[0].text
        assert own[0].json()
        assert _settled(GRANT_PATH, 200) - grants == 1 and _settled(GATEWAY_ROUTE, 200) == relayed
        other = browser.get(f"{front.url}/dicom-web/studies/{john_uid}/metadata", headers=metadata)
        assert other.status_code == 403
        assert browser.post(f"{front.url}/logout").status_code == 200
        time.sleep(1.5)  # the grant the front kept lasts BRIDGE_SESSION_CACHE_TTL
        replayed = httpx.get(
            f"{front.url}/dicom-web/studies/{jane_uid}/metadata",
            headers=metadata,
            cookies={"bridge_session": cookie},
            timeout=30,
        )
        assert replayed.status_code == 401  # the ended session, not the archive's answer


@pytest.mark.interop
def test_an_image_a_rejection_note_withdrew_from_a_kept_series_is_served_by_neither_way(
    world: FrontWorld, stack: Stack
) -> None:
    ann = {"Authorization": f"Bearer {world.token('app-ann')}"}
    study_uid, sop_uids = world.studies["MRN-ANN"]
    with httpx.Client(auth=(ARCHIVE_USER, ARCHIVE_PASSWORD), timeout=60) as client:
        rows = client.get(
            f"{world.orthanc.dicomweb_url}/studies/{study_uid}/instances",
            params={"includefield": "00080016"},
        ).json()
        [row] = [r for r in rows if r["00080018"]["Value"][0] == sop_uids[1]]
        rejected = Dataset()
        rejected.SeriesInstanceUID = row["0020000E"]["Value"][0]
        rejected.SOPClassUID = row["00080016"]["Value"][0]
        rejected.SOPInstanceUID = sop_uids[1]
        spec = StudySpec(patient_id="MRN-ANN", patient_name="Ann^Example", uid=study_uid)
        stow(world.orthanc.dicomweb_url, [build_rejection_note(spec, [rejected])], client=client)
    report = stack.sync(**world.archive)
    assert report.counts.updated == 1, (report.counts, report.error)
    [published] = stack.fhir_search("ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{study_uid}")
    [series] = published["series"]
    assert series["numberOfInstances"] == 2, "the series keeps its two other images"
    shown = sorted(set(sop_uids) - {sop_uids[1]})
    env = dict(world.env, BRIDGE_RESOLVER_CACHE_TTL="0", BRIDGE_SESSION_CACHE_TTL="0")
    with _bridge_with_front(env, free_loopback_port()) as (bridge, front):
        for way, base in {"front": f"{front.url}/dicom-web", "gateway": f"{bridge}/dicom-web"}.items():
            instance = f"{base}/studies/{study_uid}/series/{series['uid']}/instances"
            for tail in ("", "/metadata", "/frames/1", "/rendered"):
                refused = httpx.get(f"{instance}/{sop_uids[1]}{tail}", headers=ann, timeout=30)
                assert refused.status_code == 404, (way, tail, refused.status_code)
                assert "rejection note" in _diagnostics(refused), (way, tail)
            kept = httpx.get(f"{instance}/{shown[0]}/frames/1", headers=ann, timeout=30)
            assert kept.status_code == 200, (way, kept.status_code)
            for path in (
                f"series/{series['uid']}/metadata",
                "metadata",
                "instances",
                f"series/{series['uid']}/instances",
            ):
                answer = httpx.get(f"{base}/studies/{study_uid}/{path}", headers=ann, timeout=30)
                assert answer.status_code == 200, (way, path, answer.text)
                assert sorted(r["00080018"]["Value"][0] for r in answer.json()) == shown, (way, path)
            whole = httpx.get(f"{base}/studies/{study_uid}/series/{series['uid']}", headers=ann, timeout=30)
            assert whole.status_code == 404 and "one by one" in _diagnostics(whole), way
            across = httpx.get(
                f"{base}/instances", params={"StudyInstanceUID": study_uid}, headers=ann, timeout=30
            )
            assert sorted(r["00080018"]["Value"][0] for r in across.json()) == shown, way
