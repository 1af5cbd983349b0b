"""Browser login (OIDC code + PKCE), SMART EHR launch and sessions, in-process against a fake IdP and EHR."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI

from bridge.api.app import create_app
from bridge.api.auth.session import SessionStore, StoreBackend
from bridge.config import Settings, load_settings
from bridge.cookies import COOKIE as PLAIN_COOKIE
from bridge.cookies import HOST_PREFIX
from bridge.errors import ConfigurationError
from bridge.resolve.published import subject_patient
from tests.unit.resolve.fake_fhir import (
    DICOMWEB_BASE,
    FHIR_BASE,
    STUDY_UID,
    FakeFhir,
    endpoint,
    imaging_study,
)
from tests.unit.settings_factory import make_settings

pytestmark = pytest.mark.anyio

ISSUER = "https://idp.example"
EHR = "https://ehr.example/fhir"
EHR_AUTH = "https://ehr-auth.example"
PUBLIC = "https://bridge.example"
COOKIE = HOST_PREFIX + PLAIN_COOKIE  # the public URL is https: the cookie is __Host- prefixed
CLIENT = "bridge-web"
SECRET = "s3cret"
OTHER_UID = "1.2.826.0.1.3680043.8.498.2"


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class FakeIdp:
    """An OpenID provider and an EHR's SMART authorization server: discovery, JWKS, token endpoint."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    token_requests: list[httpx.Request] = field(default_factory=list)
    patient: Any = "p1"  # the launch context the EHR gives (None: none; else as given, of any JSON type)
    answer: dict[str, Any] = field(default_factory=dict)  # overrides of the token answer's members
    claims: dict[str, Any] = field(default_factory=dict)  # overrides of the ID token's claims
    signing_key: rsa.RSAPrivateKey | None = None  # sign with another key than the published one
    clients: dict[str, str] = field(default_factory=lambda: {CLIENT: SECRET})  # registered: id -> secret
    end_session: bool = False  # offers RP-Initiated Logout (end_session_endpoint in its discovery)

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}

    def authorize(self, location: str) -> dict[str, str]:
        """The browser at the authorization endpoint: logs in; returns the callback's query."""
        params = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
        code = f"code-{len(self.codes)}"
        self.codes[code] = params
        return {"code": code, "state": params["state"]}

    def handler(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        for base, issuer in ((ISSUER, ISSUER), (EHR_AUTH, EHR_AUTH)):
            if url == f"{base}/.well-known/openid-configuration":
                return httpx.Response(200, json=self._config(issuer))
            if url == f"{base}/jwks":
                return httpx.Response(200, json=self.jwks())
        if url == f"{EHR}/.well-known/smart-configuration":
            return httpx.Response(200, json=self._config(EHR_AUTH))
        if url in (f"{ISSUER}/token", f"{EHR_AUTH}/token"):
            return self._token(request, url.removesuffix("/token"))
        return httpx.Response(404)

    def _config(self, issuer: str) -> dict[str, Any]:
        return {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": f"{issuer}/jwks",
            **({"end_session_endpoint": f"{issuer}/session/end"} if self.end_session else {}),
        }

    def _token(self, request: httpx.Request, issuer: str) -> httpx.Response:
        self.token_requests.append(request)
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        asked = self.codes.pop(form.get("code", ""), None)
        client = asked["client_id"] if asked is not None else ""
        secret = self.clients.get(client)
        expected_auth = "Basic " + base64.b64encode(f"{client}:{secret}".encode()).decode()
        if asked is None or secret is None or request.headers.get("authorization") != expected_auth:
            return httpx.Response(400, json={"error": "invalid_grant"})
        challenge = _b64(hashlib.sha256(form["code_verifier"].encode()).digest())
        if challenge != asked["code_challenge"] or form["redirect_uri"] != asked["redirect_uri"]:
            return httpx.Response(400, json={"error": "invalid_grant"})
        now = int(time.time())
        claims = {
            "iss": issuer,
            "aud": asked["client_id"],
            "sub": "dr-who",
            "iat": now,
            "exp": now + 300,
            "nonce": asked["nonce"],
        }
        claims.update(self.claims)
        token = jwt.encode(claims, self.signing_key or self.key, algorithm="RS256", headers={"kid": "k1"})
        body: dict[str, Any] = {
            "access_token": "opaque-access-token",
            "token_type": "Bearer",
            "expires_in": 3600,
            "id_token": token,
            "scope": asked["scope"],
        }
        if "launch" in asked and self.patient is not None:
            body["patient"] = self.patient
        body.update(self.answer)
        return httpx.Response(200, json=body)


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "viewer_urls": {"ohif": "https://ohif.example"},
        "public_url": PUBLIC,
        "oidc_issuer": ISSUER,
        "oidc_client_id": CLIENT,
        "oidc_client_secret": SECRET,
        "smart_launch_issuers": [EHR],
        "api_keys": ["machine-key"],
    }
    return make_settings(tmp_path, **(values | overrides))


@dataclass
class Bridge:
    http: httpx.AsyncClient
    app: FastAPI
    idp: FakeIdp
    fhir: FakeFhir
    transport: httpx.MockTransport
    settings: Settings

    @asynccontextmanager
    async def replica(self) -> AsyncIterator[httpx.AsyncClient]:
        """Another replica of the API (same settings, same state store), with this browser's cookies."""
        app = create_app(self.settings, transport=self.transport)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url=PUBLIC, cookies=self.http.cookies
            ) as http:
                yield http

    async def page(self, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """A browser's navigation to ``path``."""
        return await self.http.get(path, headers={"Accept": "text/html,*/*", **(headers or {})}, **kwargs)

    async def login(self, start: str = "/login") -> httpx.Response:
        """Log in from ``start``; the callback's answer (the session cookie is then in the client)."""
        to_idp = await self.page(start)
        assert to_idp.status_code == 302, to_idp.text
        return await self.http.get("/login/callback", params=self.idp.authorize(to_idp.headers["location"]))

    async def launch(self) -> httpx.Response:
        to_ehr = await self.page("/launch", params={"iss": EHR, "launch": "xyz"})
        assert to_ehr.status_code == 302, to_ehr.text
        return await self.http.get("/login/callback", params=self.idp.authorize(to_ehr.headers["location"]))


@asynccontextmanager
async def bridge(tmp_path: Path, **overrides: Any) -> AsyncIterator[Bridge]:
    fhir = FakeFhir()
    fhir.add(
        imaging_study(),
        imaging_study("is2", OTHER_UID, accession="A2002", subject={"reference": "Patient/p2"}),
        endpoint(),
        {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}]},
        {"resourceType": "Patient", "id": "p2", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN2"}]},
    )
    idp = FakeIdp()

    def route(request: httpx.Request) -> httpx.Response:
        if request.url.host in ("idp.example", "ehr.example", "ehr-auth.example"):
            return idp.handler(request)
        return fhir.handler(request)

    settings = _settings(tmp_path, **overrides)
    mock = httpx.MockTransport(route)
    app = create_app(settings, transport=mock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as http:
            yield Bridge(http, app, idp, fhir, mock, settings)


async def test_a_page_without_session_goes_to_login_and_comes_back(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        to_idp = await b.page("/record/patients/p1")
        assert to_idp.status_code == 302
        location = to_idp.headers["location"]
        params = parse_qs(urlsplit(location).query)
        assert location.startswith(f"{ISSUER}/authorize?")
        assert params["response_type"] == ["code"] and params["client_id"] == [CLIENT]
        assert params["code_challenge_method"] == ["S256"] and params["nonce"] and params["state"]
        assert params["redirect_uri"] == [f"{PUBLIC}/login/callback"]
        assert "record" not in location  # where the browser was going stays server-side
        back = await b.http.get("/login/callback", params=b.idp.authorize(location))
        assert back.status_code == 303 and back.headers["location"] == "/record/patients/p1"
        cookie = back.headers["set-cookie"]
        assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "Secure" in cookie
        assert "samesite=lax" in cookie.lower()
        assert "opaque-access-token" not in cookie and "code-0" not in back.text
        page = await b.page("/record/patients/p1")
        assert page.status_code == 200
        # the code was exchanged with the client's secret and its PKCE verifier
        assert b.idp.token_requests[0].headers["authorization"].startswith("Basic ")


async def test_api_calls_without_credentials_get_401_and_keys_keep_working(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        api = await b.http.get("/imaging-studies/is1/links")
        html_api = await b.http.get("/imaging-studies/is1/links", headers={"Accept": "text/html"})
        keyed = await b.http.get("/imaging-studies/is1/links", headers={"X-API-Key": "machine-key"})
        bad_key_page = await b.page("/record", headers={"X-API-Key": "wrong"})
    assert api.status_code == 401 and api.json()["resourceType"] == "OperationOutcome"
    assert html_api.status_code == 401  # not a page: programs are never sent to a login form
    assert keyed.status_code == 200
    assert bad_key_page.status_code == 401


async def test_the_session_is_a_session_caller_of_the_api(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.login()
        links = await b.http.get("/imaging-studies/is1/links")
        viewer = await b.page("/imaging-studies/is2/viewer")
        store: SessionStore = b.app.state.services.sessions
        assert isinstance(store.backend, StoreBackend)  # in the state store: every replica knows it
        session = await store.get(b.http.cookies[COOKIE])
    assert links.status_code == 200
    assert viewer.status_code == 302 and viewer.headers["location"].startswith("https://ohif.example")
    assert session is not None
    caller = session.caller()
    assert caller.method == "session" and caller.subject == "dr-who" and caller.patient is None
    assert caller.client_id == CLIENT and "openid" in caller.scopes


@pytest.mark.parametrize(
    ("claims", "why"),
    [
        ({"nonce": "another"}, "nonce"),
        ({"aud": "someone-else"}, "another client"),
        ({"iss": "https://evil.example"}, "another issuer"),
        ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "expired"),
        ({"aud": [CLIENT, "another-client"]}, "another client"),  # several audiences and no azp
        ({"aud": [CLIENT, "another-client"], "azp": "another-client"}, "another client"),
    ],
)
async def test_an_id_token_that_does_not_check_out_opens_no_session(
    tmp_path: Path, claims: dict[str, Any], why: str
) -> None:
    async with bridge(tmp_path) as b:
        b.idp.claims = claims
        answer = await b.login()
        after = await b.http.get("/imaging-studies/is1/links")
    assert answer.status_code == 502 and why in answer.text
    assert "set-cookie" not in answer.headers and after.status_code == 401


async def test_an_id_token_for_several_audiences_with_this_client_as_azp_is_accepted(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        b.idp.claims = {"aud": [CLIENT, "another-client"], "azp": CLIENT}
        answer = await b.login()
    assert answer.status_code == 303


async def test_an_id_token_signed_by_another_key_opens_no_session(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        b.idp.signing_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        answer = await b.login()
    assert answer.status_code == 502 and "signature" in answer.text
    assert "set-cookie" not in answer.headers


async def test_callback_refusals(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        unknown = await b.http.get("/login/callback", params={"state": "forged", "code": "x"})
        no_state = await b.http.get("/login/callback", params={"code": "x"})
        to_idp = await b.page("/login")
        query = b.idp.authorize(to_idp.headers["location"])
        denied = await b.http.get(
            "/login/callback", params={"state": query["state"], "error": "access_denied"}
        )
        replay = await b.http.get("/login/callback", params=query)  # the state was spent by the refusal
        to_idp = await b.page("/login")
        query = b.idp.authorize(to_idp.headers["location"])
        bad_code = await b.http.get("/login/callback", params={**query, "code": "not-issued"})
    assert unknown.status_code == 400 and no_state.status_code == 400
    assert denied.status_code == 401 and "access_denied" in denied.text
    assert replay.status_code == 400
    assert bad_code.status_code == 502 and "invalid_grant" in bad_code.text


async def test_login_returns_only_to_paths_of_this_site(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        for target in ("https://evil.example/x", "//evil.example/x", "/\\evil.example"):
            to_idp = await b.page("/login", params={"next": target})
            back = await b.http.get("/login/callback", params=b.idp.authorize(to_idp.headers["location"]))
            assert back.headers["location"] == "/record"


async def test_an_expired_session_redirects_pages_and_refuses_api_calls(tmp_path: Path) -> None:
    now = [1000.0]
    async with bridge(tmp_path) as b:
        shared = b.app.state.services.sessions.backend
        b.app.state.services.sessions = SessionStore(60, backend=shared, clock=lambda: now[0])
        await b.login()
        assert (await b.http.get("/imaging-studies/is1/links")).status_code == 200
        now[0] += 61
        api = await b.http.get("/imaging-studies/is1/links")
        page = await b.page("/record/patients/p1")
    assert api.status_code == 401 and "expired" in api.json()["issue"][0]["diagnostics"]
    assert page.status_code == 302 and page.headers["location"].startswith(f"{ISSUER}/authorize")


async def test_logout_ends_the_session(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.login()
        old = b.http.cookies[COOKIE]
        page = await b.page("/logout")  # a link cannot log anyone out: the page asks for a POST
        assert page.status_code == 200 and 'method="post"' in page.text
        assert (await b.http.get("/imaging-studies/is1/links")).status_code == 200
        out = await b.http.post("/logout")
        assert out.status_code == 200 and f'{COOKIE}=""' in out.headers["set-cookie"]
        replayed = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={old}"})
    assert replayed.status_code == 401


async def test_logout_ends_the_providers_session_too_where_it_offers_that(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        b.idp.end_session = True
        await b.login()
        old = b.http.cookies[COOKIE]
        record = await b.page("/record")
        out = await b.http.post("/logout")
        replayed = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={old}"})
        done = await b.page("/logout/done")
    # The record page names who is signed in and has the button; its form may go on to the provider.
    assert "Signed in as" in record.text and 'action="/logout"' in record.text
    assert f"form-action 'self' {ISSUER}" in record.headers["content-security-policy"]
    # Ended here, then the browser goes to the provider's end-session endpoint and comes back.
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    target = urlsplit(out.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{ISSUER}/session/end"
    assert parse_qs(target.query) == {
        "client_id": [CLIENT],
        "post_logout_redirect_uri": [f"{PUBLIC}/logout/done"],
    }
    assert replayed.status_code == 401
    assert done.status_code == 200 and "Your session here has ended" in done.text


async def test_logout_of_an_ehr_launch_leaves_the_ehrs_session_to_the_ehr(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        b.idp.end_session = True
        await b.launch()
        out = await b.http.post("/logout")
    assert out.status_code == 200 and "Your session here has ended" in out.text


async def test_logout_page_lets_its_form_go_on_to_the_provider(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        page = await b.page("/logout")
    assert f"form-action 'self' {ISSUER}" in page.headers["content-security-policy"]


async def test_ehr_launch_limits_the_session_to_the_patient_in_context(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        to_ehr = await b.page("/launch", params={"iss": EHR, "launch": "xyz"})
        params = parse_qs(urlsplit(to_ehr.headers["location"]).query)
        assert to_ehr.headers["location"].startswith(f"{EHR_AUTH}/authorize?")
        assert params["launch"] == ["xyz"] and params["aud"] == [EHR]
        assert {"launch", "launch/patient", "openid", "fhirUser"} <= set(params["scope"][0].split())
        back = await b.http.get("/login/callback", params=b.idp.authorize(to_ehr.headers["location"]))
        assert back.status_code == 303 and back.headers["location"] == "/record/patients/p1"
        index = await b.page("/record")
        own = await b.page("/record/patients/p1")
        other = await b.page("/record/patients/p2")
        own_viewer = await b.page("/imaging-studies/is1/viewer")
        other_viewer = await b.page("/imaging-studies/is2/viewer")
        other_by_uid = await b.page(f"/studies/{OTHER_UID}/viewer")
        other_links = await b.http.get("/imaging-studies/is2/links")
        other_thumb = await b.http.get("/record/imaging-studies/is2/thumbnail")
    assert index.status_code == 302 and index.headers["location"] == "/record/patients/p1"
    assert own.status_code == 200 and own_viewer.status_code == 302
    for refused in (other, other_viewer, other_by_uid, other_links, other_thumb):
        assert refused.status_code == 403, refused.url
        assert "p2" not in refused.text


async def test_ehr_launch_refusals(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        unknown = await b.page("/launch", params={"iss": "https://other-ehr.example/fhir", "launch": "x"})
        no_launch = await b.page("/launch", params={"iss": EHR})
        no_iss = await b.page("/launch", params={"launch": "x"})
        b.idp.patient = None
        no_patient = await b.launch()
    assert unknown.status_code == 403 and "not allowed" in unknown.text
    assert no_launch.status_code == 400 and "launch" in no_launch.text
    assert no_iss.status_code == 400 and "iss" in no_iss.text
    assert no_patient.status_code == 403 and "no patient" in no_patient.text
    assert "set-cookie" not in no_patient.headers


async def test_launch_only_deployments_send_browsers_to_their_ehr(tmp_path: Path) -> None:
    async with bridge(tmp_path, oidc_issuer=None) as b:
        page = await b.page("/record")
        launched = await b.launch()
    assert page.status_code == 401 and "EHR" in page.text
    assert launched.status_code == 303


async def test_iid_study_and_patient_requests(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        anonymous = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "STUDY", "studyUID": STUDY_UID}
        )
        assert anonymous.status_code == 302 and anonymous.headers["location"].startswith(ISSUER)
        await b.login()
        by_uid = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "STUDY", "studyUID": STUDY_UID}
        )
        by_accession = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "STUDY", "accessionNumber": "A1001"}
        )
        patient = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MRN2^^^&1.2.3&ISO"}
        )
    assert by_uid.status_code == 302 and by_uid.headers["location"] == "/imaging-studies/is1/viewer"
    assert by_accession.headers["location"] == "/imaging-studies/is1/viewer"
    assert patient.status_code == 302 and patient.headers["location"] == "/record/patients/p2"


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({}, "requestType"),
        ({"requestType": "SERIES", "studyUID": STUDY_UID}, "requestType"),
        ({"requestType": "STUDY"}, "studyUID or accessionNumber"),
        ({"requestType": "STUDY", "studyUID": STUDY_UID, "accessionNumber": "A1"}, "one of them"),
        ({"requestType": "STUDY", "studyUID": f"{STUDY_UID},{OTHER_UID}"}, "exactly one"),
        ({"requestType": "STUDY", "studyUID": "not-a-uid"}, "not a Study Instance UID"),
        ({"requestType": "PATIENT"}, "needs patientID"),
        ({"requestType": "PATIENT", "patientID": "MRN1^^^&not an oid&ISO"}, "issuer"),
        ({"requestType": "PATIENT", "patientID": "MRN1^x"}, "CX"),
    ],
)
async def test_iid_bad_requests_are_400_with_a_reason(
    tmp_path: Path, params: dict[str, str], why: str
) -> None:
    async with bridge(tmp_path) as b:
        answer = await b.http.get(
            "/IHEInvokeImageDisplay", params=params, headers={"X-API-Key": "machine-key"}
        )
    assert answer.status_code == 400
    assert why in answer.json()["issue"][0]["diagnostics"]


async def test_iid_in_a_launched_session_refuses_other_patients(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.launch()
        own = await b.page("/IHEInvokeImageDisplay", params={"requestType": "STUDY", "studyUID": STUDY_UID})
        other = await b.page("/IHEInvokeImageDisplay", params={"requestType": "STUDY", "studyUID": OTHER_UID})
        other_patient = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MRN2^^^&1.2.3&ISO"}
        )
        unknown = await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MRN9^^^&1.2.3&ISO"}
        )
    assert own.status_code == 302
    assert other.status_code == 403 and other_patient.status_code == 403
    assert unknown.status_code == 404


async def test_the_ehr_launch_uses_its_own_client_registration_when_one_is_set(tmp_path: Path) -> None:
    async with bridge(
        tmp_path, smart_launch_client_id="bridge-at-ehr", smart_launch_client_secret="ehr-s3cret"
    ) as b:
        b.idp.clients["bridge-at-ehr"] = "ehr-s3cret"
        to_ehr = await b.page("/launch", params={"iss": EHR, "launch": "xyz"})
        launched = await b.http.get("/login/callback", params=b.idp.authorize(to_ehr.headers["location"]))
        session = await b.app.state.services.sessions.get(b.http.cookies[COOKIE])
        to_idp = await b.page("/login")
    assert parse_qs(urlsplit(to_ehr.headers["location"]).query)["client_id"] == ["bridge-at-ehr"]
    assert launched.status_code == 303, launched.text  # the code was exchanged with the launch's secret
    assert session is not None and session.caller().client_id == "bridge-at-ehr"
    assert parse_qs(urlsplit(to_idp.headers["location"]).query)["client_id"] == [CLIENT]  # login: its own


async def test_cookie_is_not_secure_only_for_a_loopback_http_address(tmp_path: Path) -> None:
    async with bridge(tmp_path, public_url="http://127.0.0.1:8080") as b:
        to_idp = await b.page("/login")
        back = await b.http.get("/login/callback", params=b.idp.authorize(to_idp.headers["location"]))
    assert "HttpOnly" in back.headers["set-cookie"] and "Secure" not in back.headers["set-cookie"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"oidc_client_id": None}, "BRIDGE_OIDC_CLIENT_ID"),
        (
            {"oidc_client_id": None, "oidc_issuer": None, "smart_launch_issuers": "https://ehr.example/fhir"},
            "BRIDGE_SMART_LAUNCH_CLIENT_ID",
        ),
        (
            {"smart_launch_client_id": "x", "smart_launch_client_secret_file": "/nonexistent/secret"},
            "BRIDGE_SMART_LAUNCH_CLIENT_SECRET_FILE",
        ),
        ({"public_url": None}, "BRIDGE_PUBLIC_URL"),
        ({"public_url": "http://bridge.example"}, "BRIDGE_PUBLIC_URL"),
        ({"smart_launch_issuers": "ftp://ehr"}, "BRIDGE_SMART_LAUNCH_ISSUERS"),
        ({"oidc_client_secret_file": "/nonexistent/secret"}, "BRIDGE_OIDC_CLIENT_SECRET_FILE"),
    ],
)
def test_bad_login_settings_fail_at_start_up(tmp_path: Path, overrides: dict[str, Any], named: str) -> None:
    values: dict[str, Any] = {
        "dicomweb_url": DICOMWEB_BASE,
        "fhir_url": FHIR_BASE,
        "public_url": PUBLIC,
        "oidc_issuer": ISSUER,
        "oidc_client_id": CLIENT,
        **overrides,
    }
    with pytest.raises(ConfigurationError, match=named):
        load_settings(**values)


def test_the_client_secret_can_come_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file\n")
    settings = load_settings(
        dicomweb_url=DICOMWEB_BASE,
        fhir_url=FHIR_BASE,
        public_url=PUBLIC,
        oidc_issuer=ISSUER,
        oidc_client_id=CLIENT,
        oidc_client_secret_file=str(secret),
    )
    assert settings.oidc.secret is not None and settings.oidc.secret.get_secret_value() == "from-file"


async def test_no_token_code_or_patient_in_the_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with bridge(tmp_path) as b:
        await b.launch()
        await b.page("/record/patients/p2")
        await b.page(
            "/IHEInvokeImageDisplay", params={"requestType": "PATIENT", "patientID": "MRN2^^^&1.2.3&ISO"}
        )
        b.idp.claims = {"nonce": "wrong"}
        await b.login()
        cookie = b.http.cookies[COOKIE]
    logged = caplog.text
    assert "session opened (launch)" in logged  # the log does say what happened
    for secret in ("opaque-access-token", "code-0", cookie, "MRN2", "Patient/p2", "dr-who", "eyJ"):
        assert secret not in logged


@pytest.mark.parametrize(
    ("reference", "patient"),
    [
        ("Patient/p1", "p1"),
        ("https://fhir.example/R4/Patient/p-2", None),  # maybe another server's Patient p-2
        ("Patient/p3/_history/4", None),
        ("Patient/bad id", None),
        ("Group/g1", None),
        (None, None),
    ],
)
def test_the_study_location_knows_its_patient(reference: str | None, patient: str | None) -> None:
    resource = {"subject": {"reference": reference}} if reference else {}
    assert subject_patient(resource) == patient


async def test_with_login_only_a_key_or_token_sent_is_refused_not_taken_as_anonymous(tmp_path: Path) -> None:
    async with bridge(tmp_path, api_keys=[]) as b:
        keyed = await b.http.get("/imaging-studies/is1/links", headers={"X-API-Key": "anything"})
        bearer = await b.http.get("/imaging-studies/is1/links", headers={"Authorization": "Bearer x.y.z"})
        nothing = await b.http.get("/imaging-studies/is1/links")
        await b.login()
        with_session = await b.http.get("/imaging-studies/is1/links")
    assert keyed.status_code == bearer.status_code == nothing.status_code == 401
    assert with_session.status_code == 200


async def test_replicas_sharing_the_state_store_share_sessions_and_logins(tmp_path: Path) -> None:
    async with bridge(tmp_path, session_cache_ttl=0) as b:  # no cache: a logout elsewhere counts at once
        to_idp = await b.page("/record/patients/p1")
        query = b.idp.authorize(to_idp.headers["location"])
        async with b.replica() as other:
            back = await other.get("/login/callback", params=query)  # the login comes back elsewhere
            cookie = back.cookies[COOKIE]
            on_first = await b.http.get(
                "/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={cookie}"}
            )
            await other.post("/logout", headers={"Cookie": f"{COOKIE}={cookie}"})
        after = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={cookie}"})
    assert back.status_code == 303 and back.headers["location"] == "/record/patients/p1"
    assert on_first.status_code == 200
    assert after.status_code == 401  # logged out on one replica: out on all


async def test_a_replica_reads_a_session_from_the_store_once_per_cache_ttl(tmp_path: Path) -> None:
    now = [1000.0]
    async with bridge(tmp_path) as b:
        shared = b.app.state.services.sessions.backend
        sessions = SessionStore(60, backend=shared, clock=lambda: now[0], cache_ttl=5)
        b.app.state.services.sessions = sessions
        await b.login()
        first = [(await b.http.get("/imaging-studies/is1/links")).status_code for _ in range(20)]
        reads_while_cached = sessions.reads
        now[0] += 6
        after_ttl = (await b.http.get("/imaging-studies/is1/links")).status_code
    assert first == [200] * 20
    assert reads_while_cached == 1
    assert after_ttl == 200 and sessions.reads == 2


async def test_a_logout_elsewhere_counts_here_within_the_cache_ttl_and_here_at_once(tmp_path: Path) -> None:
    now = [1000.0]
    async with bridge(tmp_path) as b:
        shared = b.app.state.services.sessions.backend
        b.app.state.services.sessions = SessionStore(60, backend=shared, clock=lambda: now[0], cache_ttl=5)
        await b.login()
        cookie = b.http.cookies[COOKIE]
        before = await b.http.get("/imaging-studies/is1/links")
        async with b.replica() as other:
            await other.post("/logout", headers={"Cookie": f"{COOKIE}={cookie}"})
        within_ttl = await b.http.get("/imaging-studies/is1/links")
        now[0] += 5
        after_ttl = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={cookie}"})
        await b.login()
        assert (await b.http.get("/imaging-studies/is1/links")).status_code == 200  # now cached
        second = b.http.cookies[COOKIE]
        await b.http.post("/logout")
        here = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={second}"})
    assert before.status_code == 200 and within_ttl.status_code == 200
    assert after_ttl.status_code == 401
    assert here.status_code == 401  # logged out on this replica: its cache forgets the session at once


async def test_a_key_sent_with_a_stale_session_cookie_is_what_counts(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.login()
        cookie = b.http.cookies[COOKIE]
        await b.http.post("/logout")
        stale = {"Cookie": f"{COOKIE}={cookie}"}
        with_key = await b.http.get(
            "/imaging-studies/is1/links", headers={**stale, "X-API-Key": "machine-key"}
        )
        with_bad_key = await b.http.get("/imaging-studies/is1/links", headers={**stale, "X-API-Key": "wrong"})
        cookie_only = await b.http.get("/imaging-studies/is1/links", headers=stale)
    assert with_key.status_code == 200  # the key decides; the ended session is not consulted
    assert with_bad_key.status_code == 401 and "API key" in with_bad_key.text
    assert cookie_only.status_code == 401 and "ended" in cookie_only.text


async def test_a_cached_session_ends_at_its_own_expiry(tmp_path: Path) -> None:
    now = [1000.0]
    async with bridge(tmp_path) as b:
        shared = b.app.state.services.sessions.backend
        b.app.state.services.sessions = SessionStore(60, backend=shared, clock=lambda: now[0], cache_ttl=30)
        await b.login()
        now[0] += 59
        last = await b.http.get("/imaging-studies/is1/links")  # read and cached with 1 s left
        now[0] += 2
        expired = await b.http.get("/imaging-studies/is1/links")
    assert last.status_code == 200
    assert expired.status_code == 401


async def test_too_many_logins_under_way_are_refused_with_429(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        b.app.state.services.sessions = SessionStore(60, backend=_Full())
        answer = await b.page("/login")
    assert answer.status_code == 429 and "Retry-After" in answer.headers


class _Full:
    """A store that holds no more entries."""

    threaded = False

    def put(
        self, key: str, kind: str, data: dict[str, Any], expires_at: float, now: float, limit: int
    ) -> bool:
        return False

    def get(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        return None

    def take(self, key: str, kind: str, now: float) -> dict[str, Any] | None:
        return None

    def delete(self, key: str) -> None:
        pass

    def purge(self, now: float) -> None:
        pass


async def test_a_launched_session_may_not_use_the_operators_routes(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.launch()
        failures = await b.http.get("/failures")
        sync = await b.http.post(f"/studies/{OTHER_UID}/sync")
        keyed = await b.http.get("/failures", headers={"X-API-Key": "machine-key", "Cookie": ""})
    assert failures.status_code == 403 and sync.status_code == 403
    assert keyed.status_code == 200


async def test_an_identity_provider_answering_too_much_opens_no_session(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        to_idp = await b.page("/login")
        query = b.idp.authorize(to_idp.headers["location"])
        answer_normally = b.idp.handler

        def huge_token_answer(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/token"):  # read within its bound, then refused
                return httpx.Response(200, content=b'{"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}')
            return answer_normally(request)

        b.idp.handler = huge_token_answer  # type: ignore[method-assign]
        back = await b.http.get("/login/callback", params=query)
        assert back.status_code == 502 and "more than 1048576 bytes" in back.text
        assert COOKIE not in back.headers.get("set-cookie", "")


async def test_a_callback_begun_in_another_browser_is_refused_and_the_session_here_stays(
    tmp_path: Path,
) -> None:
    async with bridge(tmp_path, audit="log") as b:
        await b.login()
        mine = b.http.cookies[COOKIE]
        # Another browser begins a login and hands its callback URL over (login CSRF).
        async with httpx.AsyncClient(transport=b.http._transport, base_url=PUBLIC) as other:
            to_idp = await other.get("/login", headers={"Accept": "text/html"})
            assert other.cookies.get(HOST_PREFIX + "bridge_login")
        swapped = await b.http.get("/login/callback", params=b.idp.authorize(to_idp.headers["location"]))
        still = await b.http.get("/imaging-studies/is1/links")
    assert swapped.status_code == 403 and "Sign in again" in swapped.text
    assert "set-cookie" not in swapped.headers
    assert b.http.cookies[COOKIE] == mine and still.status_code == 200


async def test_two_session_cookies_are_refused_never_one_picked(tmp_path: Path) -> None:
    async with bridge(tmp_path) as b:
        await b.login()
        real = b.http.cookies[COOKIE]
        b.http.cookies.clear()
        one = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}={real}"})
        two = await b.http.get(
            "/imaging-studies/is1/links", headers={"Cookie": f"{COOKIE}=alias; {COOKIE}={real}"}
        )
        quoted = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f'{COOKIE}="{real}"'})
        plain = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": f"{PLAIN_COOKIE}={real}"})
    assert one.status_code == 200
    assert two.status_code == 401 and "more than one" in two.json()["issue"][0]["diagnostics"]
    assert quoted.status_code == 401
    assert plain.status_code == 401  # over https only the __Host- cookie is the session's


# --- Refused logins and launches are security alerts (BALP), bounded per address and window ---------------

FORGED_STATE, FORGED_CODE = "forged-state-5d1c", "forged-code-5d1c"
ODD_PATIENT = "pat-7731"  # a value no message, log line or AuditEvent may repeat


async def _begun(b: Bridge, start: str = "/login") -> dict[str, str]:
    """A login begun in this browser and signed in at the provider: the callback's query."""
    to_idp = await b.page(start)
    assert to_idp.status_code == 302, to_idp.text
    return b.idp.authorize(to_idp.headers["location"])


async def _forged(b: Bridge) -> httpx.Response:
    return await b.http.get("/login/callback", params={"state": FORGED_STATE, "code": FORGED_CODE})


async def _stateless(b: Bridge) -> httpx.Response:
    return await b.http.get("/login/callback", params={"code": FORGED_CODE})


async def _replayed(b: Bridge) -> httpx.Response:
    query = await _begun(b)
    assert (await b.http.get("/login/callback", params=query)).status_code == 303  # not an alert
    return await b.http.get("/login/callback", params=query)


async def _denied(b: Bridge) -> httpx.Response:
    query = await _begun(b)
    return await b.http.get("/login/callback", params={"state": query["state"], "error": "access_denied"})


async def _made_up_error(b: Bridge) -> httpx.Response:
    query = await _begun(b)  # an error the provider never sends: words an attacker put in the URL
    return await b.http.get("/login/callback", params={"state": query["state"], "error": "call_7731_now"})


async def _no_code(b: Bridge) -> httpx.Response:
    query = await _begun(b)
    return await b.http.get("/login/callback", params={"state": query["state"]})


async def _code_not_issued(b: Bridge) -> httpx.Response:
    query = await _begun(b)
    return await b.http.get("/login/callback", params={**query, "code": FORGED_CODE})


async def _nonce_mismatch(b: Bridge) -> httpx.Response:
    b.idp.claims = {"nonce": "another-login"}
    return await b.login()


async def _foreign_signature(b: Bridge) -> httpx.Response:
    b.idp.signing_key = _new_key()
    return await b.login()


async def _launched_with(b: Bridge, **answer: Any) -> httpx.Response:
    if "patient" in answer:
        b.idp.patient = answer.pop("patient")
    b.idp.answer = answer
    return await b.launch()


async def _unknown_ehr(b: Bridge) -> httpx.Response:
    return await b.page("/launch", params={"iss": "https://other-ehr.example/fhir", "launch": "x"})


def _login_alerts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The access audit's lines (BRIDGE_AUDIT=log) of refused logins and launches."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.audit.access" and "action=login " in r.getMessage()
    ]


EXPIRED = "was already used, or took too long"  # the 400 page, in a clinician's words


@pytest.mark.parametrize(
    ("attempt", "status", "why", "shown"),
    [
        (_forged, 400, "state is unknown, already used or expired", EXPIRED),
        (_stateless, 400, "without a state", EXPIRED),
        (_replayed, 400, "state is unknown, already used or expired", EXPIRED),
        (_denied, 401, "the identity provider answered access_denied", "answered: access_denied"),
        # an error no provider sends is not repeated: the words an attacker put in the URL
        (_made_up_error, 401, "the identity provider answered an error", "answered: an error"),
        (_no_code, 401, "the identity provider answered no code", "answered: no code"),
        (_code_not_issued, 502, "the token endpoint refused the request: HTTP 400 (invalid_grant)", None),
        (_nonce_mismatch, 502, "nonce does not match", None),
        (_foreign_signature, 502, "signature or claims are invalid", None),
        (lambda b: _launched_with(b, patient=None), 403, "no patient in context", None),
        (lambda b: _launched_with(b, patient=7731), 502, "patient is a number, not a FHIR id", None),
        (lambda b: _launched_with(b, patient=[ODD_PATIENT]), 502, "patient is a list, not a FHIR id", None),
        (lambda b: _launched_with(b, patient=""), 502, "patient is an empty string, not a FHIR id", None),
        (lambda b: _launched_with(b, patient=f"{ODD_PATIENT}/x"), 502, "an id cannot have", None),
        (
            lambda b: _launched_with(b, scope=["launch", "openid", "patient/ImagingStudy.read"]),
            502,
            "scope is a list, not a space-separated string",
            None,
        ),
        (_unknown_ehr, 403, "not in BRIDGE_SMART_LAUNCH_ISSUERS", "not allowed to launch"),
    ],
    ids=[
        "forged state",
        "no state",
        "replayed callback",
        "provider error",
        "made-up error",
        "no code",
        "code not issued",
        "nonce mismatch",
        "foreign signature",
        "launch without patient",
        "launch patient a number",
        "launch patient a list",
        "launch patient empty",
        "launch patient not an id",
        "launch scope a list",
        "launch from an unknown EHR",
    ],
)
async def test_a_refused_login_or_launch_is_one_security_alert_naming_why_and_nothing_secret(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    attempt: Any,
    status: int,
    why: str,
    shown: str | None,
) -> None:
    caplog.set_level(logging.INFO)
    async with bridge(tmp_path, audit="log") as b:
        answer = await attempt(b)
        after = await b.http.get("/imaging-studies/is1/links")
    assert answer.status_code == status, answer.text
    assert (shown or why) in answer.text  # the page says why (a failed login: the audit's own words)
    assert COOKIE not in answer.headers.get("set-cookie", "")
    # no session was opened (a replay leaves the session its first use opened as it was)
    assert after.status_code == (200 if attempt is _replayed else 401)
    (alert,) = _login_alerts(caplog)  # one AuditEvent-to-be; a login that succeeded (replayed) is none
    assert "outcome=refused caller=unauthenticated" in alert and why in alert
    for secret in (FORGED_STATE, FORGED_CODE, "code-0", "opaque-access-token", "eyJ", "7731", "dr-who"):
        assert secret not in caplog.text
        assert secret not in answer.text


async def test_a_burst_of_refused_callbacks_from_one_address_is_one_security_alert_a_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A prober varying what it replays is one AuditEvent per BRIDGE_AUDIT_WINDOW; a window of 0 shows all."""
    caplog.set_level(logging.INFO)
    burst = [_forged, _stateless, _replayed, _denied, _code_not_issued] * 4
    for window, expected in (("60", 1), ("0", len(burst))):
        caplog.clear()
        async with bridge(tmp_path / window, audit="log", audit_window=window) as b:
            statuses = {(await attempt(b)).status_code for attempt in burst}
            alerts = _login_alerts(caplog)
        assert statuses == {400, 401, 502}
        assert len(alerts) == expected, (window, alerts)


@pytest.mark.parametrize(
    "written",
    ["{name} ={real}", "{name}\t={real}", "\xa0{name}={real}", "a=1;\t{name}={real}", "{plain} ={real}"],
)
async def test_a_session_cookie_whose_name_is_written_oddly_is_refused_not_trimmed(
    tmp_path: Path, written: str
) -> None:
    """The nginx front reads no session in these; were the bridge to trim the name, it would authenticate
    one, and the front would file the grant under an empty cookie (bridge/cookies.py)."""
    async with bridge(tmp_path) as b:
        await b.login()
        real = b.http.cookies[COOKIE]
        b.http.cookies.clear()
        cookie = written.format(name=COOKIE, plain=PLAIN_COOKIE, real=real)
        odd = await b.http.get("/imaging-studies/is1/links", headers={"Cookie": cookie.encode("latin-1")})
    assert odd.status_code == 401
    assert "written with spaces or control characters" in odd.json()["issue"][0]["diagnostics"]
    assert real not in odd.text
