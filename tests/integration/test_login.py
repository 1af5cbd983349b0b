"""Browser ways in against a real OpenID provider (oidc-provider): login at its form, SMART EHR launch.

The bridge's API runs under uvicorn on a loopback port with login on; the provider is both the
hospital's identity provider and the EHR's SMART authorization server (its smart-configuration
under ``/fhir``, the launch's patient in its token answer). A plain httpx client plays the browser:
it follows redirects and keeps cookies, and fills in the provider's login form.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from bridge.api.app import create_app
from bridge.config import load_settings
from tests.conftest import ARTIFACTS
from tests.integration.conftest import Stack
from tests.integration.test_resolver import serve
from tests.stack.oidc import LOGIN_SCOPES, OidcProvider, web_client
from tests.stack.process import free_loopback_port
from tests.stack.samples import StudySpec, load_demo
from tests.stack.viewer import ThreadedServer, ViewerServer, ensure_chromium, run_clickthrough

pytestmark = pytest.mark.integration

BROWSER_TIMEOUT_S = 180

CLIENT_ID, CLIENT_SECRET = "bridge-web", "web-secret-6a1f"
# the bridge as the EHR's authorization server knows it (BRIDGE_SMART_LAUNCH_CLIENT_ID)
EHR_CLIENT_ID, EHR_CLIENT_SECRET = "bridge-at-ehr", "ehr-secret-93c2"
USER, PASSWORD = "dr-who", "tardis-pass-91"
LAUNCH = "launch-abc123"
HOSP_A = "urn:oid:1.2.826.0.1.3680043.10.1001"
HOSP_B = "urn:oid:1.2.826.0.1.3680043.10.1002"


def _patient_id(stack: Stack, family: str, system: str) -> str:
    for patient in stack.fhir_search("Patient"):
        names = [n.get("family") for n in patient.get("name", [])]
        if family in names and system in [i.get("system") for i in patient.get("identifier", [])]:
            return str(patient["id"])
    raise AssertionError(f"no Patient {family} under {system}")


@contextmanager
def login_stack(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    launches: dict[str, str] | None = None,
    viewer_url: str = "http://viewer.invalid",
    port: int | None = None,
    **settings: str,
) -> Iterator[tuple[str, OidcProvider]]:
    """The bridge with login on (issuer and EHR both the provider); yields (bridge URL, provider)."""
    port = port or free_loopback_port()
    public = f"http://127.0.0.1:{port}"
    with OidcProvider(
        [
            web_client(
                CLIENT_ID,
                CLIENT_SECRET,
                f"{public}/login/callback",
                post_logout_redirect_uri=f"{public}/logout/done",
            ),
            web_client(EHR_CLIENT_ID, EHR_CLIENT_SECRET, f"{public}/login/callback"),
        ],
        scopes=LOGIN_SCOPES,
        users={USER: PASSWORD},
        launches=launches or {},
    ) as idp:
        env = stack.settings_env(
            viewer_urls=json.dumps({"ohif": viewer_url}),
            default_viewer="ohif",
            public_url=public,
            oidc_issuer=idp.issuer,
            oidc_client_id=CLIENT_ID,
            oidc_client_secret=CLIENT_SECRET,
            smart_launch_issuers=idp.fhir_iss,
            **settings,
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with ThreadedServer(create_app(load_settings()), port=port, name="bridge API") as server:
            yield server.base_url, idp


def _sign_in(
    browser: httpx.Client, form_page: httpx.Response, password: str = PASSWORD, *, follow: bool = True
) -> httpx.Response:
    """Fill in the provider's login form and follow where it sends the browser (unless ``follow`` is off)."""
    assert form_page.status_code == 200 and "Sign in" in form_page.text, form_page.text[:500]
    action = re.search(r'action="([^"]+)"', form_page.text)
    assert action is not None
    target = httpx.URL(str(form_page.url)).join(action[1])
    return browser.post(target, data={"username": USER, "password": password}, follow_redirects=follow)


def test_login_at_the_provider_opens_the_record_and_logout_ends_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    jane = _patient_id(stack, "Doe", HOSP_A)
    start = len(caplog.records)  # the sync logs the FHIR ids it wrote; what follows is the API's log
    with (
        login_stack(stack, monkeypatch) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        html = {"Accept": "text/html"}
        api_call = httpx.get(f"{api}/record/patients/{jane}", timeout=30)
        form = browser.get(f"{api}/record/patients/{jane}", headers=html)
        assert urlsplit(str(form.url)).netloc == urlsplit(idp.issuer).netloc  # at the provider's form
        wrong = _sign_in(browser, form, password="wrong")
        record = _sign_in(browser, wrong)
        cookie = browser.cookies.get("bridge_session")
        links = browser.get(f"{api}/imaging-studies/{_first_study(record.text)}/links")
        logout = browser.post(f"{api}/logout")
        after = browser.get(f"{api}/imaging-studies/{_first_study(record.text)}/links")

    assert api_call.status_code == 401  # a program without credentials is never sent to a form
    assert "Unknown user or wrong password" in wrong.text
    assert record.status_code == 200 and str(record.url) == f"{api}/record/patients/{jane}"
    assert "CT Chest Abdomen with contrast" in record.text
    assert cookie and links.status_code == 200
    assert logout.status_code == 200 and after.status_code == 401
    # The bridge logs what happened, never a token, a code, the cookie or whose record it was.
    logged = "\n".join(r.getMessage() for r in caplog.records[start:])
    assert "session opened (login)" in logged
    for secret in (cookie, CLIENT_SECRET, PASSWORD, jane, "Doe", "eyJ"):
        assert secret not in logged


def test_logout_ends_the_providers_session_so_the_next_person_must_sign_in(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared workstation: after "Log out", the next visitor meets the provider's form, not the record."""
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    html = {"Accept": "text/html"}
    with (
        login_stack(stack, monkeypatch) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        record = _sign_in(browser, browser.get(f"{api}/record", headers=html))
        # The control: forgetting only the bridge's cookie (what logout did before), the provider's own
        # session signs the browser in again without a form.
        browser.cookies.delete("bridge_session")
        silently = browser.get(f"{api}/record", headers=html)
        confirm = browser.post(f"{api}/logout")  # the record page's button, to the provider's logout
        form = re.search(
            r'<form id="op.logoutForm" method="post" action="([^"]+)">(.*?)</form>', confirm.text
        )
        assert form is not None, confirm.text[:500]
        hidden = dict(re.findall(r'name="([^"]+)" value="([^"]*)"', form[2]))
        done = browser.post(httpx.URL(str(confirm.url)).join(form[1]), data={**hidden, "logout": "yes"})
        after = browser.get(f"{api}/record", headers=html)

    assert record.status_code == 200 and str(record.url) == f"{api}/record"
    assert f'Signed in as <strong class="user">{USER}</strong>' in record.text
    assert '<form method="post" action="/logout">' in record.text
    assert str(silently.url) == f"{api}/record" and "Sign in" not in silently.text
    assert urlsplit(str(confirm.url)).netloc == urlsplit(idp.issuer).netloc  # at the provider
    assert str(done.url) == f"{api}/logout/done" and "Your session here has ended" in done.text
    assert urlsplit(str(after.url)).netloc == urlsplit(idp.issuer).netloc and "Sign in" in after.text


@pytest.mark.interop  # the record's searches, escaped, against each engine's token and string search
def test_keys_only_a_browser_meets_a_sign_in_page_and_the_record_searches_the_fhir_server(
    stack: Stack,
) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    key = {"X-API-Key": "k-9f2e"}
    with serve(stack, api_keys="k-9f2e") as api:
        browser = httpx.get(f"{api}/record", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=30)
        program = httpx.get(f"{api}/record", timeout=30)
        with_key = httpx.get(f"{api}/record", headers=key, timeout=30)
        in_a = httpx.get(f"{api}/record", params={"identifier": "PAT001", "system": HOSP_A}, headers=key)
        anywhere = httpx.get(f"{api}/record", params={"identifier": "PAT001"}, headers=key)
        by_name = httpx.get(f"{api}/record", params={"name": "Müller"}, headers=key)
        comma = httpx.get(f"{api}/record", params={"identifier": "PAT001,12345"}, headers=key)
    assert browser.status_code == 401 and browser.headers["content-type"].startswith("text/html")
    assert "Sign-in needed" in browser.text and "BRIDGE_OIDC_ISSUER" in browser.text
    assert program.status_code == 401 and program.json()["resourceType"] == "OperationOutcome"
    assert with_key.status_code == 200 and "Signed in with an API key" in with_key.text
    # PAT001 is Jane Doe at hospital A and John Smith at hospital B: the issuer tells them apart.
    assert in_a.text.count('class="patient-item"') == 1 and "Jane Doe" in in_a.text
    assert f"(issuer HOSP-A {HOSP_A})" in in_a.text
    assert anywhere.text.count('class="patient-item"') == 2
    assert "Jane Doe" in anywhere.text and "John Smith" in anywhere.text
    assert by_name.text.count('class="patient-item"') == 1 and "Jürgen Müller" in by_name.text
    # A comma is searched as typed, not as "PAT001 or 12345".
    assert comma.status_code == 200 and 'class="patient-item"' not in comma.text


def _first_study(page: str) -> str:
    found = re.search(r'data-imaging-study="([^"]+)"', page)
    assert found is not None, "no study on the record page"
    return found[1]


def test_ehr_launch_limits_the_session_to_the_patient_in_context(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    jane = _patient_id(stack, "Doe", HOSP_A)
    john = _patient_id(stack, "Smith", HOSP_B)
    john_study = next(
        s["id"] for s in stack.fhir_search("ImagingStudy") if s["subject"]["reference"] == f"Patient/{john}"
    )
    with (
        login_stack(
            stack,
            monkeypatch,
            launches={LAUNCH: jane},
            smart_launch_client_id=EHR_CLIENT_ID,
            smart_launch_client_secret=EHR_CLIENT_SECRET,
        ) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        html = {"Accept": "text/html"}
        launch = {"iss": idp.fhir_iss, "launch": LAUNCH}
        to_ehr = browser.get(f"{api}/launch", params=launch, headers=html, follow_redirects=False)
        form = browser.get(f"{api}/launch", params=launch, headers=html)
        record = _sign_in(browser, form)
        index = browser.get(f"{api}/record", headers=html)
        johns = browser.get(f"{api}/record/patients/{john}", headers=html)
        johns_viewer = browser.get(f"{api}/imaging-studies/{john_study}/viewer", headers=html)
        own_viewer = browser.get(
            f"{api}/imaging-studies/{_first_study(record.text)}/viewer", headers=html, follow_redirects=False
        )
        unknown_launch = httpx.Client(follow_redirects=True, timeout=30)
        with unknown_launch:
            refused_form = unknown_launch.get(
                f"{api}/launch", params={"iss": idp.fhir_iss, "launch": "forged"}, headers=html
            )
            refused = _sign_in(unknown_launch, refused_form)
        foreign_iss = browser.get(
            f"{api}/launch", params={"iss": "http://127.0.0.1:9/fhir", "launch": LAUNCH}, headers=html
        )
    # the launch's own registration at the EHR, its secret accepted by the provider's token endpoint
    assert f"client_id={EHR_CLIENT_ID}" in to_ehr.headers["location"]
    assert record.status_code == 200 and str(record.url) == f"{api}/record/patients/{jane}"
    assert str(index.url) == f"{api}/record/patients/{jane}"  # the record shows only this patient
    assert johns.status_code == 403 and "Smith" not in johns.text
    assert own_viewer.status_code == 302
    assert johns_viewer.status_code == 403
    assert refused.status_code == 401 and "access_denied" in refused.text
    assert foreign_iss.status_code == 403


def test_clickthrough_with_login_in_chromium(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Log in at the provider's form, open the record, click "Open images": OHIF draws the study.

    OHIF reads the images through the bridge's image gateway (the viewer's same-origin proxy forwards
    the browser's session cookie to it), which authorizes every request by the session's patient.
    """
    caplog.set_level(logging.INFO)
    chromium = ensure_chromium()
    specs: list[StudySpec] = load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    ct = next(s for s in specs if s.description == "CT Chest Abdomen with contrast")
    jane = _patient_id(stack, "Doe", HOSP_A)
    john = _patient_id(stack, "Smith", HOSP_B)
    john_study = next(
        s["id"] for s in stack.fhir_search("ImagingStudy") if s["subject"]["reference"] == f"Patient/{john}"
    )
    shots = ARTIFACTS / "clickthrough-login"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    start = len(caplog.records)
    port = free_loopback_port()
    with (
        # OHIF reads the images through the bridge's gateway, with the session
        ViewerServer(f"http://127.0.0.1:{port}/dicom-web") as viewer,
        login_stack(
            stack,
            monkeypatch,
            launches={LAUNCH: jane},
            viewer_url=viewer.base_url,
            port=port,
            audit="fhir",
            audit_flush_interval="0.2",
        ) as (api, idp),
    ):
        launch_url = httpx.URL(f"{api}/launch", params={"iss": idp.fhir_iss, "launch": LAUNCH})
        options = {
            # an EHR launch for Jane: the session is hers alone, and lands on her record
            "startUrl": str(launch_url),
            "recordUrl": f"{api}/record/patients/{jane}",
            "login": {"username": USER, "password": PASSWORD},
            "study": ct.description,
            "series": [s.description for s in ct.series],
            "forbiddenUrl": f"{api}/imaging-studies/{john_study}/viewer",
            "screenshotDir": str(shots),
            "chromium": chromium,
            "timeoutMs": 60_000,
        }
        seen = run_clickthrough(options, shots, BROWSER_TIMEOUT_S)

    assert seen["login_page"] == idp.issuer  # the browser was sent to the provider's form
    session = next(c for c in seen["cookies"] if c["name"] == "bridge_session")
    assert session["httpOnly"] and session["sameSite"] == "Lax"
    assert seen["record_rows"] == 2 and seen["thumbnails_loaded"] == 2
    expected = f"{viewer.base_url}/viewer?StudyInstanceUIDs={ct.uid}"
    assert seen["redirect"] == {"status": 302, "location": expected}
    assert sorted(s["description"] for s in seen["series_listed"]) == sorted(s.description for s in ct.series)
    assert seen["canvas"]["lit_fraction"] > 0.05 and seen["canvas"]["grey_levels"] > 16
    assert seen["forbidden_status"] == 403  # the same session, another patient's study
    logged = "\n".join(r.getMessage() for r in caplog.records[start:])
    assert re.search(r"GET /dicom-web/\{path:path\} 200", logged), (
        "the images did not come through the gateway"
    )
    # Each step is an AuditEvent on the FHIR server, the user and the client app named: the record
    # page, the viewer, the images through the gateway, and the refusal of John's study.
    events = [e for e in stack.fhir_search("AuditEvent") if _who(e, USER)]
    actions = {(_action(e), e["outcome"]) for e in events}
    assert {("record-view", "0"), ("viewer", "0"), ("image-read", "0")} <= actions, actions
    assert ("viewer", "4") in actions, actions  # refused: another patient's study
    assert all(_who(e, CLIENT_ID) for e in events)
    assert "session opened (launch)" in logged
    for secret in (PASSWORD, CLIENT_SECRET, jane, john, "Doe", "Smith", "eyJ"):
        assert secret not in logged


def test_invoke_image_display_opens_the_viewer_or_the_record(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs: list[StudySpec] = load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    ct = next(s for s in specs if s.description == "CT Chest Abdomen with contrast")
    jane = _patient_id(stack, "Doe", HOSP_A)
    (mrn,) = [i["value"] for i in stack.fhir_read(f"Patient/{jane}")["identifier"] if i["system"] == HOSP_A]
    oid = HOSP_A.removeprefix("urn:oid:")
    with (
        login_stack(stack, monkeypatch) as (api, _idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        html = {"Accept": "text/html"}
        iid = f"{api}/IHEInvokeImageDisplay"
        form = browser.get(
            iid, params={"requestType": "PATIENT", "patientID": f"{mrn}^^^&{oid}&ISO"}, headers=html
        )
        record = _sign_in(browser, form)  # logged in, the browser is back at its IID request, then the record
        study = browser.get(
            iid, params={"requestType": "STUDY", "studyUID": ct.uid}, headers=html, follow_redirects=False
        )
        unmapped = browser.get(iid, params={"requestType": "PATIENT", "patientID": f"{mrn}^^^&1.2.3.999&ISO"})
        bad = browser.get(iid, params={"requestType": "SERIES", "studyUID": ct.uid})
    # Smith^John has the same Patient ID under HOSP-B: the issuer picks Jane, exactly
    assert str(record.url) == f"{api}/record/patients/{jane}" and "CT Chest" in record.text
    assert study.status_code == 302 and re.fullmatch(
        r"/imaging-studies/[A-Za-z0-9\-.]+/viewer", study.headers["location"]
    )
    assert unmapped.status_code == 404  # an OID no Patient of this ID is under: nobody, never a guess
    assert bad.status_code == 400 and "requestType" in bad.json()["issue"][0]["diagnostics"]


def _who(event: dict[str, Any], name: str) -> bool:
    return any(a.get("who", {}).get("identifier", {}).get("value") == name for a in event.get("agent", []))


def _action(event: dict[str, Any]) -> str:
    return str(next(c["code"] for c in event["subtype"] if c["code"] not in ("read", "search")))


def test_invoke_image_display_refusals_in_a_launched_session_are_audited(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    jane = _patient_id(stack, "Doe", HOSP_A)
    john = _patient_id(stack, "Smith", HOSP_B)
    identifiers = stack.fhir_read(f"Patient/{john}")["identifier"]
    (johns_mrn,) = [i["value"] for i in identifiers if i["system"] == HOSP_B]
    johns_uid = next(
        s["identifier"][0]["value"].removeprefix("urn:oid:")
        for s in stack.fhir_search("ImagingStudy")
        if s["subject"]["reference"] == f"Patient/{john}"
    )
    oid = HOSP_B.removeprefix("urn:oid:")
    with (
        login_stack(
            stack, monkeypatch, launches={LAUNCH: jane}, audit="fhir", audit_flush_interval="0.2"
        ) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as browser,
    ):
        html = {"Accept": "text/html"}
        form = browser.get(f"{api}/launch", params={"iss": idp.fhir_iss, "launch": LAUNCH}, headers=html)
        assert _sign_in(browser, form).status_code == 200
        iid = f"{api}/IHEInvokeImageDisplay"
        study = browser.get(iid, params={"requestType": "STUDY", "studyUID": johns_uid}, headers=html)
        patient = browser.get(
            iid, params={"requestType": "PATIENT", "patientID": f"{johns_mrn}^^^&{oid}&ISO"}, headers=html
        )
        deadline = time.monotonic() + 20
        refused: set[str] = set()
        while time.monotonic() < deadline and refused != {"viewer", "record-view"}:
            time.sleep(0.3)
            refused = {
                _action(e)
                for e in stack.fhir_search("AuditEvent")
                if e["outcome"] == "4"
                and _who(e, USER)
                and {"reference": f"Patient/{john}"} in [x.get("what") for x in e.get("entity", [])]
            }
    assert study.status_code == 403 and patient.status_code == 403
    # each IID refusal is recorded as the access it refused: John's viewer, John's record
    assert refused == {"viewer", "record-view"}
