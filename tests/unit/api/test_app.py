"""The API in-process against an in-memory FHIR server: answers, errors, metrics, auth, CORS."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.api.app import create_app
from bridge.config import Settings, load_settings
from bridge.errors import ConfigurationError
from tests.unit.resolve.fake_fhir import (
    DICOMWEB_BASE,
    FHIR_BASE,
    JWKS_URL,
    STUDY_UID,
    FakeFhir,
    endpoint,
    imaging_study,
)
from tests.unit.settings_factory import make_settings

OUTCOME = "OperationOutcome"
pytestmark = pytest.mark.anyio


def settings(tmp_path: Path, **overrides: Any) -> Settings:
    return make_settings(tmp_path, **{"viewer_urls": {"ohif": "https://ohif.example"}, **overrides})


@pytest.fixture
def fake() -> FakeFhir:
    server = FakeFhir()
    server.add(imaging_study(), endpoint())
    return server


@asynccontextmanager
async def client(tmp_path: Path, fake: FakeFhir, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, called in-process (ASGI), its FHIR server the fake."""
    app = create_app(settings(tmp_path, **overrides), transport=fake.transport())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bridge.test") as c:
            yield c


@pytest.fixture
async def api(tmp_path: Path, fake: FakeFhir) -> AsyncIterator[httpx.AsyncClient]:
    async with client(tmp_path, fake) as c:
        yield c


async def test_links_by_id(api: httpx.AsyncClient) -> None:
    response = await api.get("/imaging-studies/is1/links")
    assert response.status_code == 200
    body = response.json()
    assert body["study_uid"] == STUDY_UID
    assert body["study"]["metadata"] == f"{DICOMWEB_BASE}/studies/{STUDY_UID}/metadata"
    assert body["viewers"]["ohif"] == f"https://ohif.example/viewer?StudyInstanceUIDs={STUDY_UID}"
    assert body["default_viewer"] == "ohif"


async def test_viewer_redirect(api: httpx.AsyncClient) -> None:
    response = await api.get(f"/studies/{STUDY_UID}/viewer")
    assert response.status_code == 302
    assert response.headers["location"] == f"https://ohif.example/viewer?StudyInstanceUIDs={STUDY_UID}"
    assert (await api.get("/imaging-studies/is1/viewer", params={"viewer": "nope"})).status_code == 422


async def test_viewer_without_any_viewer_configured_names_bridge_viewer_urls(
    tmp_path: Path, fake: FakeFhir
) -> None:
    # The defaults, as the README's first "bridge serve" has them: no viewer URL.
    async with client(tmp_path, fake, viewer_urls={}) as api:
        response = await api.get(f"/studies/{STUDY_UID}/viewer")
    assert response.status_code == 409
    text = json.dumps(response.json())
    assert "set BRIDGE_VIEWER_URLS" in text
    assert "(BRIDGE_VIEWERS)" not in text


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/imaging-studies/nope/links", 404, "not-found"),
        ("/studies/1.2.abc/links", 422, "invalid"),
        ("/studies/01.2/links", 422, "invalid"),
        ("/studies/%201.2/links", 422, "invalid"),  # whitespace around a path UID is not trimmed
        ("/studies/1.2%20/links", 422, "invalid"),
        ("/studies/1.2%0A/links", 422, "invalid"),
        ("/imaging-studies/a%20b/links", 422, "invalid"),
        ("/links?reference=Patient/x", 422, "invalid"),
        ("/links", 422, "invalid"),
        ("/no/such/route", 404, "not-found"),
    ],
)
async def test_errors_are_operation_outcomes_with_a_reason(
    api: httpx.AsyncClient, path: str, status: int, code: str
) -> None:
    response = await api.get(path)
    assert response.status_code == status
    body = response.json()
    assert body["resourceType"] == OUTCOME
    assert body["issue"][0]["code"] == code
    assert body["issue"][0]["diagnostics"]


async def test_422_does_not_echo_the_input(api: httpx.AsyncClient) -> None:
    response = await api.get("/studies/Doe^Jane/links")
    assert response.status_code == 422
    assert "Doe" not in response.text
    assert "Study Instance UID" in response.text


async def test_no_usable_endpoint_is_409(api: httpx.AsyncClient, fake: FakeFhir) -> None:
    fake.add(imaging_study("is2", "1.2.3.4", endpoints=[]))
    response = await api.get("/imaging-studies/is2/links")
    assert response.status_code == 409
    assert "no usable WADO-RS endpoint" in response.json()["issue"][0]["diagnostics"]


async def test_fhir_down_is_503_with_retry_after_and_no_url(api: httpx.AsyncClient, fake: FakeFhir) -> None:
    fake.down = True
    response = await api.get("/imaging-studies/is1/links")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert "fhir.example.org" not in response.text
    fake.status_when_down = 503
    response = await api.get("/imaging-studies/is9/links")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"


async def test_readyz_and_healthz(api: httpx.AsyncClient, fake: FakeFhir) -> None:
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    ready = await api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"fhir": "ok", "dicomweb": "ok", "store": "ok"}
    fake.down = True
    ready = await api.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["fhir"] != "ok"


async def test_metrics_count_by_route_template_not_raw_path(api: httpx.AsyncClient) -> None:
    await api.get("/imaging-studies/is1/links")
    text = (await api.get("/metrics")).text
    assert 'route="/imaging-studies/{id}/links"' in text
    assert "is1" not in text
    assert "bridge_http_request_duration_seconds_bucket" in text


async def test_an_unexpected_exception_is_a_bare_500(
    tmp_path: Path, fake: FakeFhir, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(request: Any) -> Any:
        raise RuntimeError("secret detail Doe^Jane")

    fake.handler = broken  # type: ignore[method-assign]
    async with client(tmp_path, fake) as c:
        response = await c.get("/imaging-studies/is1/links")
    assert response.status_code == 500
    assert response.json()["issue"][0]["diagnostics"] == "internal error"
    assert "Doe" not in caplog.text and "Traceback" not in caplog.text


async def test_bad_viewer_setting_fails_at_start_up(tmp_path: Path, fake: FakeFhir) -> None:
    with pytest.raises(ConfigurationError, match="BRIDGE_DEFAULT_VIEWER"):
        create_app(
            settings(tmp_path, viewers=["stone"], viewer_urls={"stone": "https://orthanc.example"}),
            transport=fake.transport(),
        )


async def test_cors_allows_configured_origins_only(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, cors_origins=["https://viewer.example"]) as c:
        ok = await c.get("/imaging-studies/is1/links", headers={"Origin": "https://viewer.example"})
        assert ok.headers["access-control-allow-origin"] == "https://viewer.example"
        other = await c.get("/imaging-studies/is1/links", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ----------------------------------------------------------------------------- auth


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _token(key: Any, **claims: Any) -> str:
    payload = {"sub": "ehr", "aud": "bridge", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm="RS256")


async def test_api_key_auth(tmp_path: Path, fake: FakeFhir) -> None:
    async with client(tmp_path, fake, api_keys=["k-one", "k-two"]) as c:
        assert (await c.get("/imaging-studies/is1/links")).status_code == 401
        assert (await c.get("/imaging-studies/is1/links", headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await c.get("/imaging-studies/is1/links", headers={"X-API-Key": "k-two"})).status_code == 200
        assert (await c.get("/healthz")).status_code == 200


async def test_jwt_auth_checks_signature_audience_and_expiry(
    tmp_path: Path, fake: FakeFhir, rsa_key: rsa.RSAPrivateKey
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with client(tmp_path, fake, jwt_public_key=_pem(rsa_key), jwt_audience="bridge") as c:

        async def get(token: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return await c.get("/imaging-studies/is1/links", headers=headers)

        assert (await get(_token(rsa_key))).status_code == 200
        missing = await get(None)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert "audience" in (await get(_token(rsa_key, aud="someone-else"))).text
        assert "expired" in (await get(_token(rsa_key, exp=int(time.time()) - 120))).text
        assert (await get(_token(rsa_key, exp=None))).status_code == 401
        assert (await get(_token(other))).status_code == 401
        assert (await get("not-a-jwt")).status_code == 401
        hs = jwt.encode(
            {"aud": "bridge", "exp": int(time.time()) + 60},
            "secret-secret-secret-secret-secret",
            algorithm="HS256",
        )
        assert (await get(hs)).status_code == 401


async def test_jwt_without_audience_is_a_configuration_error(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    with pytest.raises(ConfigurationError, match="BRIDGE_JWT_AUDIENCE"):
        load_settings(
            dicomweb_url=DICOMWEB_BASE,
            fhir_url=FHIR_BASE,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            jwt_public_key=_pem(rsa_key),
        )


def test_the_openapi_schema_documents_every_route(tmp_path: Path) -> None:
    schema = create_app(settings(tmp_path)).openapi()
    assert {
        "/imaging-studies/{id}/links",
        "/studies/{study_uid}/links",
        "/accessions/{accession}/links",
        "/links",
        "/imaging-studies/{id}/viewer",
        "/studies/{study_uid}/viewer",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(schema["paths"])
    # Every operation says what it answers, errors included.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("responses"), f"{method.upper()} {path} documents no response"


async def test_jwt_keys_from_a_jwks_url(tmp_path: Path, fake: FakeFhir, rsa_key: rsa.RSAPrivateKey) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    fake.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}
    async with client(tmp_path, fake, jwt_jwks_url=JWKS_URL, jwt_audience="bridge") as c:
        good = jwt.encode(
            {"aud": "bridge", "exp": int(time.time()) + 60}, rsa_key, algorithm="RS256", headers={"kid": "k1"}
        )
        unknown = jwt.encode(
            {"aud": "bridge", "exp": int(time.time()) + 60}, rsa_key, algorithm="RS256", headers={"kid": "k9"}
        )
        ok = await c.get("/imaging-studies/is1/links", headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200
        refused = await c.get("/imaging-studies/is1/links", headers={"Authorization": f"Bearer {unknown}"})
        assert refused.status_code == 401


async def test_the_schema_names_the_security_schemes_of_the_routes_that_authenticate(
    api: httpx.AsyncClient,
) -> None:
    schema = (await api.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["BearerJWT"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    both = [{"ApiKey": []}, {"BearerJWT": []}]
    paths = schema["paths"]
    for path, method in (
        ("/studies/{study_uid}/links", "get"),
        ("/imaging-studies/{id}/viewer", "get"),
        ("/failures", "get"),
        ("/studies/{study_uid}/sync", "post"),
        ("/metrics", "get"),
    ):
        assert paths[path][method]["security"] == both, path
    assert "security" not in paths["/healthz"]["get"] and "security" not in paths["/readyz"]["get"]


@pytest.mark.parametrize(
    ("authorization", "status"),
    [("Bearer", 401), ("Basic azp2", 401), ("bearer  not-a-jwt ", 401), ("", 401)],
    ids=["no token", "another scheme", "not a JWT", "empty"],
)
async def test_an_authorization_header_that_is_not_a_good_bearer_token_is_401(
    tmp_path: Path, fake: FakeFhir, rsa_key: rsa.RSAPrivateKey, authorization: str, status: int
) -> None:
    async with client(tmp_path, fake, jwt_public_key=_pem(rsa_key), jwt_audience="bridge") as c:
        answer = await c.get("/imaging-studies/is1/links", headers={"Authorization": authorization})
        good = await c.get(
            "/imaging-studies/is1/links", headers={"Authorization": f"bearer {_token(rsa_key)}"}
        )
    assert answer.status_code == status
    assert good.status_code == 200  # the scheme's name is case-insensitive


def test_a_configuration_error_while_answering_points_at_the_log_which_names_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json as jsonlib

    from bridge.api.errors import response_for
    from bridge.errors import ConfigurationError

    problem = ConfigurationError(
        "the FHIR server at http://fhir.internal.example/R4 refused to create Patient by PUT (405): "
        "set BRIDGE_WRITE_STRATEGY to 'conditional'"
    )
    with caplog.at_level("ERROR", logger="bridge.api.errors"):
        answer = response_for(problem)
    assert answer.status_code == 500
    diagnostics = jsonlib.loads(bytes(answer.body))["issue"][0]["diagnostics"]
    assert "setting" in diagnostics and "log" in diagnostics  # not the bare "internal error" of a bug
    assert "fhir.internal" not in diagnostics  # the upstream's address stays in the log
    assert "BRIDGE_WRITE_STRATEGY" in caplog.text
