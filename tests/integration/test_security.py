"""The attacks tried on clinicians' sessions, the gateway and its nginx front, kept failing.

Everything is real: oidc-provider as the identity provider, the EHR's authorization server and the
SMART apps' token issuer; the bridge's app under uvicorn (`bridge serve` itself where the listening
options matter); Debian's nginx configured by `bridge front-config`; Orthanc and the FHIR server,
which receives the audit trail. Each test is one attack, as an attacker would try it, and what the
clinician, the archive and the audit trail see.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from pydicom.uid import generate_uid

from bridge.gateway.front import GRANT_PATH
from bridge.resolve.published import study_uid_of
from tests.integration.conftest import Stack
from tests.integration.test_front import (
    ARCHIVE_PASSWORD,
    FRONT_SECRET,
    FrontWorld,
    _answered,
    _bridge_with_front,
    _settled,
    launched_behind_front,
    world,  # noqa: F401 - the front's fixture, used by name
)
from tests.integration.test_login import (
    EHR_CLIENT_ID,
    EHR_CLIENT_SECRET,
    HOSP_A,
    HOSP_B,
    LAUNCH,
    _patient_id,
    _sign_in,
    login_stack,
)
from tests.integration.test_resolver import serve
from tests.integration.test_smart_app import AUDIENCE, SMART_SCOPES, app_token_settings
from tests.stack.faultproxy import Fault, FaultProxy
from tests.stack.front import NginxFront
from tests.stack.oidc import OidcProvider, secret_client
from tests.stack.process import free_loopback_port
from tests.stack.samples import SeriesSpec, StudySpec, build_study, load_demo, stow
from tests.stack.tls import make_pki
from tests.stack.viewer import ThreadedServer

pytestmark = pytest.mark.integration

HTML = {"Accept": "text/html"}
METADATA = {"Accept": "application/dicom+json"}
API_KEY = "security-test-key-8b1e"
FORGED_ADDRESS = "203.0.113.7"  # TEST-NET-3: no caller here has it
OTHER_LOOPBACK = "127.0.0.2"  # a caller on this host that is not 127.0.0.1 (Linux answers all of 127/8)


def _events(
    stack: Stack, wanted: Callable[[dict[str, Any]], bool], *, at_least: int = 1
) -> list[dict[str, Any]]:
    """The AuditEvents on the FHIR server that ``wanted`` picks, once at least ``at_least`` are there."""
    deadline = time.monotonic() + 20
    while True:
        found = [e for e in stack.fhir_search("AuditEvent") if wanted(e)]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def _action(event: dict[str, Any]) -> str:
    return str(event["subtype"][-1]["code"])


def _callback_of(browser: httpx.Client, form_page: httpx.Response, api: str) -> str:
    """Sign in at the provider and stop where it would send the browser back: the callback's URL."""
    answer = _sign_in(browser, form_page, follow=False)
    for _ in range(10):
        assert answer.is_redirect, answer.text[:300]
        location = str(answer.url.join(answer.headers["location"]))
        if location.startswith(f"{api}/login/callback"):
            return location
        answer = browser.get(location, follow_redirects=False)
    raise AssertionError("the provider never sent the browser back to the bridge")


# --- Login CSRF: a callback from someone else's login, opened in a clinician's browser ------------------


@pytest.mark.parametrize("way", ["login", "launch"])
def test_a_callback_begun_in_another_browser_is_refused_audited_and_the_clinicians_session_stays(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    jane = _patient_id(stack, "Doe", HOSP_A)
    john = _patient_id(stack, "Smith", HOSP_B)
    with (
        login_stack(
            stack,
            monkeypatch,
            launches={LAUNCH: jane, "launch-john": john},
            smart_launch_client_id=EHR_CLIENT_ID,
            smart_launch_client_secret=EHR_CLIENT_SECRET,
            audit="fhir",
            audit_flush_interval="0.2",
        ) as (api, idp),
        httpx.Client(follow_redirects=True, timeout=30) as clinician,
        httpx.Client(follow_redirects=True, timeout=30) as attacker,
    ):
        # The clinician works in Jane's context.
        form = clinician.get(f"{api}/launch", params={"iss": idp.fhir_iss, "launch": LAUNCH}, headers=HTML)
        assert _sign_in(clinician, form).status_code == 200
        mine = clinician.cookies.get("bridge_session")
        # The attacker begins a login of their own (John's launch) and keeps the callback's URL.
        if way == "launch":
            start = attacker.get(
                f"{api}/launch", params={"iss": idp.fhir_iss, "launch": "launch-john"}, headers=HTML
            )
        else:
            start = attacker.get(f"{api}/login", headers=HTML)
        callback = _callback_of(attacker, start, api)
        # ... and has the clinician's browser open it.
        opened = clinician.get(callback, headers=HTML)
        record = clinician.get(f"{api}/record", headers=HTML)
        refused = _events(stack, lambda e: _action(e) == "login")

    assert opened.status_code == 403 and "Sign in again" in opened.text
    assert clinician.cookies.get("bridge_session") == mine  # the session was neither replaced nor ended
    assert str(record.url) == f"{api}/record/patients/{jane}"  # still Jane's context, never John's
    assert len(refused) == 1 and refused[0]["outcome"] == "4"
    assert refused[0]["type"]["code"] == "110113"  # DICOM Security Alert
    assert refused[0]["agent"][0]["network"]["address"] == "127.0.0.1"


# --- Cookie aliasing and logout at the nginx front ---------------------------------------------------------


def test_two_session_cookies_cannot_file_a_grant_under_an_alias_at_the_front(stack: Stack) -> None:
    with launched_behind_front(stack) as session:
        url = f"{session.front.url}/dicom-web/studies/{session.jane_uid}/metadata"
        real = session.cookie
        one_header = {**METADATA, "Cookie": f"bridge_session=alias; bridge_session={real}"}
        aliased = httpx.get(url, headers=one_header, timeout=30)
        two_headers = [
            *METADATA.items(),
            ("Cookie", "bridge_session=alias"),
            ("Cookie", f"bridge_session={real}"),
        ]
        aliased_twice = httpx.get(url, headers=two_headers, timeout=30)
        # What the alias alone gets afterwards: nothing was filed under it.
        alias_alone = httpx.get(url, headers={**METADATA, "Cookie": "bridge_session=alias"}, timeout=30)
        # The real cookie alone still works: the refusals ended nothing.
        own = httpx.get(url, headers={**METADATA, "Cookie": f"bridge_session={real}"}, timeout=30)
        direct = httpx.get(
            url.replace(session.front.url, session.front.bridge_url), headers=one_header, timeout=30
        )
    assert aliased.status_code == 401 and "more than one" in aliased.text
    assert aliased_twice.status_code == 401
    assert alias_alone.status_code == 401
    assert own.status_code == 200 and own.json()
    assert direct.status_code == 401  # the bridge refuses it as well, with or without the front


def _raw_get(url: str, headers: list[tuple[str, bytes]]) -> tuple[int, bytes]:
    """GET with header values sent byte for byte (httpx refuses control characters in them)."""
    parts = urlsplit(url)
    lines = [f"GET {parts.path} HTTP/1.1".encode(), f"Host: {parts.netloc}".encode()]
    lines += [name.encode("ascii") + b": " + value for name, value in headers]
    lines.append(b"Connection: close")
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_a_session_cookie_written_oddly_files_no_grant_at_the_front_for_callers_without_credentials(
    stack: Stack,
) -> None:
    """`bridge_session =<real>`: a bridge that trimmed names authenticated it, while nginx read no cookie
    and filed the grant under an empty key, which every caller without credentials then shared."""
    with launched_behind_front(stack) as session:
        path = f"/dicom-web/studies/{session.jane_uid}/metadata"
        front, bridge = session.front.url + path, session.front.bridge_url + path
        accept = ("Accept", b"application/dicom+json")
        real = session.cookie.encode("ascii")
        grants = _settled(GRANT_PATH, 200)
        odd = {
            "space": b"bridge_session =" + real,
            "tab": b"bridge_session\t=" + real,
            "tab after ;": b"theme=dark;\tbridge_session=" + real,
            "no-break space": b"\xa0bridge_session=" + real,
            "control character": b"\x1fbridge_session=" + real,
        }
        answers = {
            (way, name): _raw_get(url, [accept, ("Cookie", cookie)])
            for name, cookie in odd.items()
            for way, url in (("front", front), ("bridge", bridge))
        }
        refused_grants = _settled(GRANT_PATH, 200) - grants
        # Then a caller with no credentials, or an empty cookie, asks for the same study.
        nothing = _raw_get(front, [accept])
        empty = _raw_get(front, [accept, ("Cookie", b"bridge_session=")])
        own = _raw_get(front, [accept, ("Cookie", b"bridge_session=" + real)])
    for (way, name), (status, body) in answers.items():
        if name == "control character":
            # The bridge's HTTP parser refuses a control character in a header outright (400).
            assert status in (400, 401), (way, name, status)
        else:
            assert status == 401, (way, name, status)
            assert b"written with spaces or control characters" in body, (way, name)
        assert b"00100020" not in body  # no DICOM JSON: not a byte of the study
    assert refused_grants == 0  # nothing was granted, so nothing was filed under any key
    for status, body in (nothing, empty):
        assert status == 401 and b"00100020" not in body
    assert own[0] == 200 and b"00100020" in own[1]  # the real cookie, written plainly, still works


def test_a_logged_out_session_gets_nothing_from_the_front_once_the_grant_lifetime_is_over(
    stack: Stack,
) -> None:
    """Logout ends the session at the bridge at once; a grant the front keeps lasts its lifetime at most.

    The front cannot be told of a logout (nginx keeps no per-session state the bridge could clear), so
    the bound is BRIDGE_SESSION_CACHE_TTL, the lifetime the bridge gives each grant: pinned here.
    """
    ttl = 1.0
    with launched_behind_front(stack, session_cache_ttl=str(ttl)) as session:
        url = f"{session.front.url}/dicom-web/studies/{session.jane_uid}/metadata"
        copied = {**METADATA, "Cookie": f"bridge_session={session.cookie}"}
        assert httpx.get(url, headers=copied, timeout=30).status_code == 200  # a grant is kept
        assert session.browser.post(f"{session.front.url}/logout").status_code == 200
        ended = time.monotonic()
        at_the_bridge = httpx.get(
            url.replace(session.front.url, session.front.bridge_url), headers=copied, timeout=30
        )
        while (status := httpx.get(url, headers=copied, timeout=30).status_code) == 200:
            assert time.monotonic() - ended < ttl + 1.0, "the front kept serving past the grant's lifetime"
            time.sleep(0.1)
    assert at_the_bridge.status_code == 401
    assert status == 401


def test_over_https_the_session_is_a_host_cookie_and_the_front_reads_that_name(
    stack: Stack, tmp_path: Path
) -> None:
    """BRIDGE_PUBLIC_URL https (the front serving TLS): __Host- cookies, and nginx keys on the same name."""
    with launched_behind_front(stack, make_pki(tmp_path / "pki")) as session:
        jar = {c.name: c for c in session.browser.cookies.jar}
        url = f"{session.front.url}/dicom-web/studies/{session.jane_uid}/metadata"
        name, real = session.cookie_name, session.cookie
        own = session.browser.get(url, headers=METADATA)
        plain = session.browser.get(url, headers={**METADATA, "Cookie": f"bridge_session={real}"})
        aliased = session.browser.get(url, headers={**METADATA, "Cookie": f"{name}=alias; {name}={real}"})
        alias_alone = session.browser.get(url, headers={**METADATA, "Cookie": f"{name}=alias"})
    session_cookie, login_cookie = jar["__Host-bridge_session"], jar["__Host-bridge_login"]
    for cookie in (session_cookie, login_cookie):
        assert cookie.secure and cookie.path == "/" and not cookie.domain_specified
        assert cookie.has_nonstandard_attr("HttpOnly")
    assert "bridge_session" not in jar  # no cookie by the plain name a sibling host could plant
    assert own.status_code == 200 and own.json()
    assert plain.status_code == 401  # the plain name is not the session's over https
    assert aliased.status_code == 401 and alias_alone.status_code == 401


# --- Loose claims: a signed token whose SMART claims are of another type ---------------------------------


def test_tokens_whose_patient_claim_is_not_a_string_are_refused_not_unlimited(stack: Stack) -> None:
    uids = {}
    for patient_id, name in (("MRN-ANN", "Ann^Example"), ("MRN-BOB", "Bob^Example")):
        datasets = build_study(StudySpec(patient_id=patient_id, patient_name=name, series=[SeriesSpec()]))
        stow(stack.orthanc.dicomweb_url, datasets)
        uids[patient_id] = str(datasets[0].StudyInstanceUID)
    port = free_loopback_port()
    gateway_url = f"http://127.0.0.1:{port}/dicom-web"
    assert stack.sync(dicomweb_public_url=gateway_url).counts.created == 2
    ann = next(p["id"] for p in stack.fhir_search("Patient") if "MRN-ANN" in json.dumps(p["identifier"]))
    secrets = {"app-ann": "s-ann-1", "app-number": "s-number-2", "app-list": "s-list-3"}
    # The provider signs what it is given: a number and a list where SMART says a FHIR id (a string).
    patients: dict[str, Any] = {"app-ann": ann, "app-number": 123, "app-list": [ann]}
    with OidcProvider(
        [secret_client(c, s, scope=SMART_SCOPES) for c, s in secrets.items()],
        scopes=SMART_SCOPES.split(),
        resource={"audience": AUDIENCE, "scopes": SMART_SCOPES},
        patients=patients,
    ) as idp:
        settings = stack.settings(dicomweb_public_url=gateway_url, **app_token_settings(idp))
        from bridge.api.app import create_app

        with ThreadedServer(create_app(settings), port=port, name="bridge API"):

            def get(client: str, uid: str) -> httpx.Response:
                answer = httpx.post(
                    idp.token_url,
                    data={"grant_type": "client_credentials", "scope": SMART_SCOPES},
                    auth=(client, secrets[client]),
                    timeout=10,
                )
                answer.raise_for_status()
                token = answer.json()["access_token"]
                assert isinstance(
                    jwt.decode(token, options={"verify_signature": False})["patient"], type(patients[client])
                )
                return httpx.get(
                    f"{gateway_url}/studies/{uid}/metadata",
                    headers={**METADATA, "Authorization": f"Bearer {token}"},
                    timeout=30,
                )

            own = get("app-ann", uids["MRN-ANN"])
            crossed = get("app-ann", uids["MRN-BOB"])
            number = get("app-number", uids["MRN-BOB"])
            listed = get("app-list", uids["MRN-BOB"])
    assert own.status_code == 200 and crossed.status_code == 403
    for refused in (number, listed):
        assert refused.status_code == 401, refused.text
        assert "patient claim" in refused.json()["issue"][0]["diagnostics"]


# --- bridge serve: forwarded headers, security alerts, documentation -------------------------------------


@contextmanager
def _served(stack: Stack, **overrides: str) -> Iterator[tuple[str, str]]:
    """The demo synced, `bridge serve` with an API key and the audit trail on; yields (URL, a study UID)."""
    specs = load_demo(stack.orthanc.dicomweb_url)
    assert stack.sync().counts.parked == 0
    with serve(stack, api_keys=API_KEY, audit="fhir", audit_flush_interval="0.2", **overrides) as url:
        yield url, specs[0].uid


def _address(event: dict[str, Any]) -> str | None:
    network = event["agent"][0].get("network")
    return network["address"] if network else None


@pytest.mark.parametrize(
    ("trusted", "recorded"), [(None, "127.0.0.1"), ("127.0.0.1", FORGED_ADDRESS)], ids=["default", "named"]
)
def test_forwarded_headers_are_believed_only_from_the_proxies_the_operator_names(
    stack: Stack, trusted: str | None, recorded: str
) -> None:
    overrides = {"trusted_proxies": trusted} if trusted else {}
    with _served(stack, **overrides) as (url, uid):
        answer = httpx.get(
            f"{url}/studies/{uid}/links",
            headers={"X-API-Key": API_KEY, "X-Forwarded-For": FORGED_ADDRESS},
            timeout=30,
        )
        events = _events(stack, lambda e: _action(e) == "links")
    assert answer.status_code == 200
    assert [_address(e) for e in events] == [recorded]


def test_behind_the_front_the_audit_trail_names_the_caller_the_front_saw_not_a_forged_address(
    stack: Stack,
) -> None:
    """`bridge serve` with no trusted proxies behind `bridge front-config`'s nginx: the front proves itself
    with its secret, so its X-Forwarded-For is believed; a local caller's own X-Forwarded-For is not,
    sent straight to the bridge or through the front."""
    with _served(stack, gateway_front_secret=FRONT_SECRET) as (url, _):
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env |= stack.settings_env(api_keys=API_KEY, gateway_front_secret=FRONT_SECRET)
        uids = [study_uid_of(study) for study in stack.fhir_search("ImagingStudy")]
        with NginxFront(env, url) as front:
            forged = {"X-API-Key": API_KEY, "X-Forwarded-For": FORGED_ADDRESS}
            # A caller on another loopback address, through the front (one study each: an AuditEvent
            # is kept per caller, study and window).
            with httpx.Client(transport=httpx.HTTPTransport(local_address=OTHER_LOOPBACK), timeout=30) as far:
                through = far.get(f"{front.url}/studies/{uids[0]}/links", headers=forged)
            direct = httpx.get(f"{url}/studies/{uids[1]}/links", headers=forged, timeout=30)
            guessed = httpx.get(
                f"{url}/studies/{uids[2]}/links",
                headers={**forged, "X-Bridge-Front-Secret": FRONT_SECRET[:-1] + "x"},
                timeout=30,
            )
            events = _events(stack, lambda e: _action(e) == "links", at_least=3)
    assert [a.status_code for a in (through, direct, guessed)] == [200, 200, 200]
    by_study = {uid: [_address(e) for e in events if uid in json.dumps(e)] for uid in uids[:3]}
    assert by_study == {uids[0]: [OTHER_LOOPBACK], uids[1]: ["127.0.0.1"], uids[2]: ["127.0.0.1"]}


def test_refused_credentials_are_one_security_alert_per_address_and_window(stack: Stack) -> None:
    with _served(stack) as (url, uid):
        attempts = [
            {"X-API-Key": "guess-1"},
            {"X-API-Key": "guess-2"},
            {"Authorization": "Bearer not.a.jwt"},
            {},
        ] * 10
        statuses = {
            httpx.get(f"{url}/studies/{uid}/links", headers=headers, timeout=30).status_code
            for headers in attempts
        }
        statuses |= {httpx.get(f"{url}/dicom-web/studies/{uid}/metadata", timeout=30).status_code}
        alerts = _events(stack, lambda e: e["type"]["code"] == "110113")
        time.sleep(1.0)  # a second flush: still one
        alerts = _events(stack, lambda e: e["type"]["code"] == "110113")
    assert statuses == {401}
    assert len(alerts) == 1  # 41 refusals from one address within the window: one AuditEvent
    (alert,) = alerts
    assert alert["outcome"] == "4" and _action(alert) == "authentication"
    assert _address(alert) == "127.0.0.1"
    assert alert["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{uid}"
    assert "guess-1" not in json.dumps(alert) and "guess-2" not in json.dumps(alert)


def test_metrics_and_the_api_documentation_need_the_auth_once_it_is_configured(stack: Stack) -> None:
    closed = ("/metrics", "/docs", "/openapi.json")
    with _served(stack) as (url, _uid):
        anonymous = [httpx.get(f"{url}{path}", timeout=30).status_code for path in closed]
        keyed = [httpx.get(f"{url}{path}", headers={"X-API-Key": API_KEY}, timeout=30) for path in closed]
        probes = [httpx.get(f"{url}{path}", timeout=30).status_code for path in ("/healthz", "/readyz")]
    with serve(stack, api_keys=API_KEY, api_metrics_auth="false", api_docs_auth="false") as url:
        opened = [httpx.get(f"{url}{path}", timeout=30).status_code for path in closed]
    assert anonymous == [401, 401, 401]
    assert [a.status_code for a in keyed] == [200, 200, 200]
    assert "bridge_http_requests_total" in keyed[0].text and keyed[2].json()["openapi"]
    assert probes == [200, 200]
    assert opened == [200, 200, 200]


# --- The SMART app's way through the front: attacks that already failed, kept failing ---------------------


def _bearer(token: str) -> dict[str, str]:
    return {**METADATA, "Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def test_forged_tokens_path_tricks_foreign_uids_and_replayed_grants_get_nothing(world: FrontWorld) -> None:  # noqa: F811
    ann_uid, _ = world.studies["MRN-ANN"]
    bob_uid, _ = world.studies["MRN-BOB"]
    token = world.token("app-ann")
    front = f"{world.front.url}/dicom-web"
    bridge = f"{world.front.bridge_url}/dicom-web"
    assert (
        httpx.get(f"{front}/studies/{ann_uid}/metadata", headers=_bearer(token), timeout=30).status_code
        == 200
    )
    grants = _answered(GRANT_PATH, 200)

    # Alg confusion: the same claims signed with HS256 using the provider's public key (PEM) as the
    # HMAC secret, and unsigned (alg none). Signed by hand: PyJWT itself refuses to make such a token.
    header, claims, _signature = token.split(".")
    key = jwt.PyJWKSet.from_dict(httpx.get(world.idp.jwks_url, timeout=10).json()).keys[0].key
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    mac = hmac.new(pem, f"{hs_header}.{claims}".encode(), hashlib.sha256).digest()
    hs256 = f"{hs_header}.{claims}.{_b64(mac)}"
    unsigned = f"{_b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{claims}."
    for forged in (hs256, unsigned):
        for base in (front, bridge):
            answer = httpx.get(f"{base}/studies/{bob_uid}/metadata", headers=_bearer(forged), timeout=30)
            assert answer.status_code == 401, (base, answer.text)

    # Path tricks: dot segments, escapes and doubled slashes towards Bob's study or the archive's other parts.
    tricks = [
        f"/studies/{ann_uid}/../{bob_uid}/metadata",
        f"/studies/{ann_uid}/%2e%2e/%2e%2e/studies/{bob_uid}/metadata",
        f"/studies/{ann_uid}//../../studies/{bob_uid}/metadata",
        f"/studies/{ann_uid}/series/../../../system",
        f"/studies/{ann_uid}%2f..%2f{bob_uid}/metadata",
    ]
    for trick in tricks:
        answer = httpx.get(front + trick, headers=_bearer(token), timeout=30)
        assert answer.status_code in (400, 403, 404), (trick, answer.status_code)
        assert "MRN-BOB" not in answer.text and "Bob" not in answer.text

    # A foreign UID in the path, and Ann's grant replayed without credentials or with Bob's token.
    assert (
        httpx.get(f"{front}/studies/{bob_uid}/metadata", headers=_bearer(token), timeout=30).status_code
        == 403
    )
    replayed = httpx.get(f"{front}/studies/{ann_uid}/metadata", headers=METADATA, timeout=30)
    crossed = httpx.get(
        f"{front}/studies/{ann_uid}/metadata", headers=_bearer(world.token("app-bob")), timeout=30
    )
    assert replayed.status_code == 401 and crossed.status_code == 403
    assert _settled(GRANT_PATH, 200) == grants  # none of it was granted


@pytest.mark.interop
def test_another_patients_uid_and_an_unknown_uid_are_indistinguishable(world: FrontWorld) -> None:  # noqa: F811
    """Within its own study, a patient-limited caller learns nothing from another patient's UIDs: the
    archive's error bodies (which tell a UID it holds from one it does not) never reach the caller,
    through the front or the Python gateway."""
    ann = {"Authorization": f"Bearer {world.token('app-ann')}"}  # each retrieve with its own default type
    study_uid, _ = world.studies["MRN-ANN"]
    _, bob_sops = world.studies["MRN-BOB"]
    with _bridge_with_front(world.env, free_loopback_port()) as (bridge, front):
        for base in (f"{front.url}/dicom-web", f"{bridge}/dicom-web"):
            series = httpx.get(f"{base}/studies/{study_uid}/series", headers=ann, timeout=30)
            within = f"{base}/studies/{study_uid}/series/{series.json()[0]['0020000E']['Value'][0]}/instances"
            for tail in ("", "/metadata"):
                foreign = httpx.get(f"{within}/{bob_sops[0]}{tail}", headers=ann, timeout=30)
                missing = httpx.get(f"{within}/{generate_uid()}{tail}", headers=ann, timeout=30)
                assert foreign.status_code == missing.status_code == 404, (base, tail, foreign.status_code)
                assert foreign.content == missing.content, (base, tail)
                assert foreign.json()["issue"][0]["diagnostics"] == "not found in the study's archive"


@pytest.mark.parametrize("status", [402, 409, 422, 451, 507])
def test_no_error_body_of_the_archive_reaches_a_caller_through_the_front(
    world: FrontWorld,  # noqa: F811
    status: int,
) -> None:
    """Whatever error the archive answers a granted retrieve with, the caller gets the bridge's own answer."""
    ann = {"Authorization": f"Bearer {world.token('app-ann')}"}
    study_uid, sop_uids = world.studies["MRN-ANN"]
    with FaultProxy(world.orthanc.base_url) as archive:
        env = dict(world.env, BRIDGE_DICOMWEB_URL=archive.proxied(world.orthanc.dicomweb_url))
        with _bridge_with_front(env, free_loopback_port()) as (bridge, front):
            series = httpx.get(f"{front.url}/dicom-web/studies/{study_uid}/series", headers=ann, timeout=30)
            series_uid = series.json()[0]["0020000E"]["Value"][0]
            path = f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_uids[0]}"
            grants = _answered(GRANT_PATH, 200)
            archive.add(Fault(status=status, path="/instances/"))
            through = httpx.get(f"{front.url}{path}", headers=ann, timeout=30)
            direct = httpx.get(f"{bridge}{path}", headers=ann, timeout=30)
            granted = _settled(GRANT_PATH, 200) - grants
    answered = [e.status for e in archive.events("status")]
    assert granted == 1 and len(answered) >= 2  # the fast path asked the archive, and so did the bridge
    for answer in (through, direct):
        assert answer.status_code >= 400
        assert answer.json()["resourceType"] == "OperationOutcome"
        assert "fault proxy" not in answer.text and "injected" not in answer.text
        assert ARCHIVE_PASSWORD not in answer.text
    assert through.status_code == direct.status_code and through.content == direct.content
