"""Upstream authentication: bearer, OAuth2 client credentials, SMART Backend Services, and their settings."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from bridge.config import Settings, load_settings
from bridge.errors import ConfigurationError, UpstreamAuthError
from bridge.upstream.client import http_client
from bridge.upstream.credentials import BearerToken, ClientCredentials, SmartBackendServices
from bridge.upstream.retry import RetryPolicy, send

pytestmark = pytest.mark.anyio

TOKEN_URL = "https://idp.test/oauth2/token"
FHIR = "https://ehr.test/fhir/R4"
SECRET = "s3cret/with:odd&chars"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class IdP:
    """A token endpoint and a FHIR server in one MockTransport handler."""

    def __init__(self, lifetime: int = 600) -> None:
        self.lifetime = lifetime
        self.token_requests: list[httpx.Request] = []
        self.valid: set[str] = set()
        self.fhir_calls: list[str | None] = []
        self.refuse_client = False
        self.endless = False  # the token answer never ends

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL:
            self.token_requests.append(request)
            if self.endless:
                return httpx.Response(200, content=_endless())
            if self.refuse_client:
                return httpx.Response(
                    401, json={"error": "invalid_client", "error_description": "client authentication failed"}
                )
            token = f"token-{len(self.token_requests)}"
            self.valid.add(token)
            return httpx.Response(
                200, json={"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}
            )
        header = request.headers.get("Authorization")
        self.fhir_calls.append(header)
        if header is None or header.removeprefix("Bearer ") not in self.valid:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200, json={"resourceType": "Bundle"})


def _client(idp: IdP, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(idp), auth=auth)


def _credentials(idp: IdP, clock: Clock | None = None, scopes: tuple[str, ...] = ()) -> ClientCredentials:
    return ClientCredentials(
        service="fhir",
        token_url=TOKEN_URL,
        client_id="bridge",
        client_secret=SecretStr(SECRET),
        scopes=scopes,
        client=_client(idp),
        clock=clock or Clock(),
    )


async def _get(client: httpx.AsyncClient, path: str = "ImagingStudy") -> httpx.Response:
    request = client.build_request("GET", f"{FHIR}/{path}")
    return await send(client, request, service="fhir", policy=RetryPolicy(retries=2, sleep=_no_sleep))


async def _no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


async def test_a_static_bearer_token_is_sent() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=BearerToken("abc")) as client:
        await client.get(FHIR)
    assert seen == ["Bearer abc"]


async def test_client_credentials_fetch_one_token_for_concurrent_requests_with_basic_client_auth() -> None:
    idp = IdP()
    auth = _credentials(idp, scopes=("system/ImagingStudy.write", "system/Patient.read"))
    async with _client(idp, auth) as client:
        answers = await asyncio.gather(*(_get(client) for _ in range(8)))
    assert {a.status_code for a in answers} == {200}
    [token_request] = idp.token_requests
    form = parse_qs(token_request.content.decode())
    assert form == {
        "grant_type": ["client_credentials"],
        "scope": ["system/ImagingStudy.write system/Patient.read"],
    }
    basic = token_request.headers["Authorization"].removeprefix("Basic ")
    # RFC 6749 2.3.1: each part form-urlencoded before the Basic encoding
    assert base64.b64decode(basic).decode() == "bridge:s3cret%2Fwith%3Aodd%26chars"
    assert set(idp.fhir_calls) == {"Bearer token-1"}


async def test_the_token_is_refreshed_before_it_expires() -> None:
    idp, clock = IdP(lifetime=300), Clock()
    auth = _credentials(idp, clock)
    async with _client(idp, auth) as client:
        await _get(client)
        clock.now = 200  # 100 s left of 300: still more than a fifth
        await _get(client)
        assert len(idp.token_requests) == 1
        clock.now = 245  # 55 s left: less than a fifth of the lifetime, refreshed before it expires
        await _get(client)
    assert len(idp.token_requests) == 2
    assert idp.fhir_calls == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


async def test_a_401_fetches_a_new_token_and_resends_once() -> None:
    idp = IdP()
    auth = _credentials(idp)
    async with _client(idp, auth) as client:
        await _get(client)
        idp.valid.clear()  # the server revoked every token it knew
        response = await _get(client)
    assert response.status_code == 200
    assert idp.fhir_calls == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]


async def test_a_second_401_is_an_auth_error_and_not_a_loop() -> None:
    idp = IdP()

    class Revoking(IdP):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if str(request.url) != TOKEN_URL:
                self.valid.clear()  # every token is refused
            return super().__call__(request)

    idp = Revoking()
    auth = _credentials(idp)
    async with _client(idp, auth) as client:
        with pytest.raises(UpstreamAuthError) as caught:
            await _get(client)
    assert len(idp.fhir_calls) == 2 and len(idp.token_requests) == 2
    assert "answered 401" in str(caught.value) and "BRIDGE_FHIR_AUTH" in str(caught.value)


async def test_a_refused_client_is_an_auth_error_naming_the_settings_without_the_secret() -> None:
    idp = IdP()
    idp.refuse_client = True
    auth = _credentials(idp)
    async with _client(idp, auth) as client:
        with pytest.raises(UpstreamAuthError) as caught:
            await _get(client)
    message = str(caught.value)
    assert "invalid_client" in message and "BRIDGE_FHIR_CLIENT_SECRET" in message
    assert SECRET not in message and "s3cret" not in message
    assert len(idp.token_requests) == 1, "a refused client is not retried"
    assert idp.fhir_calls == [], "nothing is sent without a token"


async def _endless() -> AsyncIterator[bytes]:
    yield b'{"access_token": "'
    while True:
        yield b"x" * 65536
        await asyncio.sleep(0)


async def test_an_endless_token_answer_stops_the_run_naming_the_token_url() -> None:
    idp = IdP()
    idp.endless = True
    async with _client(idp, _credentials(idp)) as client:
        with pytest.raises(UpstreamAuthError) as caught:
            await _get(client)
    assert "BRIDGE_FHIR_TOKEN_URL" in str(caught.value)
    assert idp.fhir_calls == []


async def test_a_token_endpoint_that_is_down_is_retried_by_the_one_policy() -> None:
    idp = IdP()
    answers = [httpx.Response(503, headers={"Retry-After": "0"})]

    def handler(request: httpx.Request) -> httpx.Response:
        if str(request.url) == TOKEN_URL and answers:
            idp.token_requests.append(request)
            return answers.pop()
        return idp(request)

    auth = ClientCredentials(
        service="fhir",
        token_url=TOKEN_URL,
        client_id="bridge",
        client_secret=SecretStr(SECRET),
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=auth) as client:
        response = await _get(client)
    assert response.status_code == 200
    assert len(idp.token_requests) == 2


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize(("algorithm", "make_key"), [("RS384", _rsa), ("ES384", _p384)])
async def test_smart_backend_services_sends_a_signed_client_assertion(
    algorithm: str, make_key: object
) -> None:
    key = make_key()  # type: ignore[operator]
    idp = IdP()
    auth = SmartBackendServices(
        service="fhir",
        token_url=TOKEN_URL,
        client_id="bridge-smart",
        private_key=key,
        algorithm=algorithm,
        key_id="key-1",
        scopes=("system/ImagingStudy.write",),
        client=_client(idp),
    )
    async with _client(idp, auth) as client:
        assert (await _get(client)).status_code == 200
    [token_request] = idp.token_requests
    assert "Authorization" not in token_request.headers
    form = {k: v[0] for k, v in parse_qs(token_request.content.decode()).items()}
    assert form["grant_type"] == "client_credentials"
    assert form["scope"] == "system/ImagingStudy.write"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assertion = form["client_assertion"]
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == algorithm and header["kid"] == "key-1" and header["typ"] == "JWT"
    claims = jwt.decode(assertion, key.public_key(), algorithms=[algorithm], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "bridge-smart"
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["jti"]


def test_a_key_that_cannot_sign_with_the_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="RSA"):
        SmartBackendServices(
            service="fhir",
            token_url=TOKEN_URL,
            client_id="x",
            private_key=_p384(),
            algorithm="RS384",
            client=httpx.AsyncClient(),
        )


# Settings ------------------------------------------------------------------------------------

BASE = {"BRIDGE_DICOMWEB_URL": "http://pacs.test/dicom-web", "BRIDGE_FHIR_URL": FHIR}


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in {**BASE, **env}.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def test_oauth2_without_a_token_url_fails_at_start_up_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        _settings(
            monkeypatch,
            BRIDGE_FHIR_AUTH="oauth2",
            BRIDGE_FHIR_CLIENT_ID="bridge",
            BRIDGE_FHIR_CLIENT_SECRET=SECRET,
        )
    assert "BRIDGE_FHIR_TOKEN_URL" in str(caught.value) and "oauth2" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_basic_without_a_password_names_both_ways_to_give_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ConfigurationError, match=r"BRIDGE_DICOMWEB_PASSWORD \(or BRIDGE_DICOMWEB_PASSWORD_FILE\)"
    ):
        _settings(monkeypatch, BRIDGE_DICOMWEB_AUTH="basic", BRIDGE_DICOMWEB_USERNAME="bridge")


def test_a_secret_is_read_from_its_file_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    settings = _settings(
        monkeypatch,
        BRIDGE_FHIR_AUTH="oauth2",
        BRIDGE_FHIR_TOKEN_URL=TOKEN_URL,
        BRIDGE_FHIR_CLIENT_ID="bridge",
        BRIDGE_FHIR_CLIENT_SECRET_FILE=str(secret_file),
    )
    secret = settings.fhir.secret("client_secret")
    assert secret is not None and secret.get_secret_value() == SECRET
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_a_secret_and_its_file_together_are_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc")
    with pytest.raises(ConfigurationError, match="BRIDGE_FHIR_TOKEN or BRIDGE_FHIR_TOKEN_FILE, not both"):
        _settings(
            monkeypatch,
            BRIDGE_FHIR_AUTH="bearer",
            BRIDGE_FHIR_TOKEN="abc",
            BRIDGE_FHIR_TOKEN_FILE=str(token_file),
        )


def test_a_smart_key_of_the_wrong_kind_names_the_key_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        _p384().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigurationError) as caught:
        _settings(
            monkeypatch,
            BRIDGE_FHIR_AUTH="smart",
            BRIDGE_FHIR_TOKEN_URL=TOKEN_URL,
            BRIDGE_FHIR_CLIENT_ID="bridge",
            BRIDGE_FHIR_PRIVATE_KEY_FILE=str(key_file),
            BRIDGE_FHIR_SIGNING_ALG="RS384",
        )
    assert "BRIDGE_FHIR_PRIVATE_KEY_FILE" in str(caught.value) and "RSA" in str(caught.value)


def test_an_unreadable_ca_bundle_names_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="BRIDGE_FHIR_CA_BUNDLE"):
        _settings(monkeypatch, BRIDGE_FHIR_CA_BUNDLE=str(tmp_path / "missing.pem"))


async def test_the_runtime_client_carries_the_configured_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch,
        BRIDGE_DICOMWEB_AUTH="basic",
        BRIDGE_DICOMWEB_USERNAME="u",
        BRIDGE_DICOMWEB_PASSWORD="p",
        BRIDGE_FHIR_AUTH="bearer",
        BRIDGE_FHIR_TOKEN="t",
    )
    dicomweb = settings.each_source()[0].dicomweb
    limits = httpx.Limits(max_connections=2)
    async with (
        http_client(settings, dicomweb, "dicomweb", limits=limits) as archive,
        http_client(settings, settings.fhir, "fhir", limits=limits) as fhir,
    ):
        assert isinstance(archive.auth, httpx.BasicAuth)
        assert isinstance(fhir.auth, BearerToken)
        request = fhir.build_request("GET", FHIR)
        flow = fhir.auth.sync_auth_flow(request)
        assert next(flow).headers["Authorization"] == "Bearer t"
