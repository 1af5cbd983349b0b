"""Each upstream auth mode against real peers: Orthanc checks basic credentials, the FHIR test server
checks bearer tokens issued by a real OpenID provider (oidc-provider) through its introspection
endpoint, and SMART system scopes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import ARTIFACTS
from tests.stack.faultproxy import FaultProxy
from tests.stack.fhir import FhirTestServer
from tests.stack.oidc import OidcProvider, jwt_client, secret_client
from tests.stack.orthanc import OrthancServer, ensure_installed
from tests.stack.samples import SeriesSpec, StudySpec, build_study, stow

pytestmark = pytest.mark.integration

ORTHANC_USER, ORTHANC_PASSWORD = "bridge", "orthanc-pass-8f2c"
STATIC_TOKEN = "static-token-5b7e91"
CLIENT_SECRET = "client-secret-d41e07"
WRITE_SCOPES = (
    "system/Endpoint.write system/Patient.read system/Patient.write "
    "system/ImagingStudy.read system/ImagingStudy.write"
)
SECRETS = (
    ORTHANC_PASSWORD,
    STATIC_TOKEN,
    CLIENT_SECRET,
    "wrong-password-1c9",
    "wrong-token-77aa",
    "wrong-secret-3e0",
)


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str, alg: str) -> dict[str, object]:
    algorithm = jwt.algorithms.RSAAlgorithm if alg.startswith("RS") else jwt.algorithms.ECAlgorithm
    jwk: dict[str, object] = json.loads(algorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig", "alg": alg}


@dataclass
class AuthStack:
    idp: OidcProvider
    fhir: FhirTestServer
    orthanc: OrthancServer
    keys: dict[str, Path]
    tmp: Path

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            "BRIDGE_DICOMWEB_URL": self.orthanc.dicomweb_url,
            "BRIDGE_DICOMWEB_AUTH": "basic",
            "BRIDGE_DICOMWEB_USERNAME": ORTHANC_USER,
            "BRIDGE_DICOMWEB_PASSWORD": ORTHANC_PASSWORD,
            "BRIDGE_FHIR_URL": self.fhir.base_url,
            "BRIDGE_FHIR_AUTH": "bearer",
            "BRIDGE_FHIR_TOKEN": STATIC_TOKEN,
            "BRIDGE_STATE_URL": f"sqlite:///{self.tmp / 'state.db'}",
            "BRIDGE_SOURCE_NAME": "auth-test",
            "BRIDGE_HTTP_RETRIES": "2",
            "BRIDGE_HTTP_RETRY_MAX_WAIT": "0.2",
        }
        for key, value in overrides.items():
            name = f"BRIDGE_{key.upper()}"
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def cli(self, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
        env.update(self.env(**overrides))
        return subprocess.run(
            [sys.executable, "-m", "bridge", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def imaging_studies(self) -> list[dict[str, object]]:
        response = httpx.get(
            f"{self.fhir.base_url}/ImagingStudy",
            params={"_count": "1000"},
            headers={"Authorization": f"Bearer {STATIC_TOKEN}"},
            timeout=30,
        )
        response.raise_for_status()
        return [e["resource"] for e in response.json().get("entry", [])]


@pytest.fixture(scope="module")
def auth_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[OidcProvider, FhirTestServer, OrthancServer, dict[str, Path]]]:
    folder = tmp_path_factory.mktemp("auth-keys")
    rs_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    es_key = ec.generate_private_key(ec.SECP384R1())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keys = {
        "rs384": _pem(rs_key, folder / "rs384.pem"),
        "es384": _pem(es_key, folder / "es384.pem"),
        "stranger": _pem(stranger, folder / "stranger.pem"),
    }
    clients = [
        secret_client("bridge-oauth", CLIENT_SECRET, scope=WRITE_SCOPES),
        secret_client("bridge-readonly", CLIENT_SECRET, scope="system/ImagingStudy.read"),
        jwt_client("bridge-rs384", _public_jwk(rs_key, "rs-1", "RS384"), "RS384", scope=WRITE_SCOPES),
        jwt_client("bridge-es384", _public_jwk(es_key, "es-1", "ES384"), "ES384", scope=WRITE_SCOPES),
    ]
    scopes = sorted(set(WRITE_SCOPES.split()))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ensure_installed()
    with OidcProvider(clients, scopes=scopes, log_path=ARTIFACTS / "oidc-provider.log") as idp:
        fhir = FhirTestServer(
            log_path=ARTIFACTS / "fhir-server-auth.log",
            env={
                **idp.fhir_server_env(),
                "FHIR_AUTH_STATIC_TOKENS": STATIC_TOKEN,
                "FHIR_AUTH_CHECK_SCOPES": "1",
            },
        )
        with fhir, OrthancServer(name="bridge-auth", basic_auth=(ORTHANC_USER, ORTHANC_PASSWORD)) as orthanc:
            yield idp, fhir, orthanc, keys


@pytest.fixture
def auth(
    auth_servers: tuple[OidcProvider, FhirTestServer, OrthancServer, dict[str, Path]], tmp_path: Path
) -> AuthStack:
    idp, fhir, orthanc, keys = auth_servers
    orthanc.clear()
    fhir.clear()
    fhir.reset_stats()
    idp.reset_stats()
    with httpx.Client(auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=60) as client:
        for i in range(3):
            spec = StudySpec(patient_id=f"AUTH{i}", accession=f"AUTH-{i}", series=[SeriesSpec(instances=1)])
            stow(orthanc.dicomweb_url, build_study(spec), client=client)
    return AuthStack(idp, fhir, orthanc, keys, tmp_path)


MODES = {
    "fhir-bearer": {},
    "fhir-oauth2": {
        "fhir_auth": "oauth2",
        "fhir_client_id": "bridge-oauth",
        "fhir_client_secret": CLIENT_SECRET,
        "fhir_scopes": WRITE_SCOPES,
    },
    "fhir-smart-rs384": {
        "fhir_auth": "smart",
        "fhir_client_id": "bridge-rs384",
        "fhir_key_id": "rs-1",
        "fhir_signing_alg": "RS384",
        "fhir_scopes": WRITE_SCOPES,
    },
    "fhir-smart-es384": {
        "fhir_auth": "smart",
        "fhir_client_id": "bridge-es384",
        "fhir_key_id": "es-1",
        "fhir_signing_alg": "ES384",
        "fhir_scopes": WRITE_SCOPES,
    },
}


def _mode_env(auth: AuthStack, mode: dict[str, str]) -> dict[str, str]:
    env = dict(mode)
    if env.get("fhir_auth") in ("oauth2", "smart"):
        env["fhir_token_url"] = auth.idp.token_url
        env["fhir_token"] = None  # type: ignore[assignment]
    if env.get("fhir_auth") == "smart":
        key = env.get("fhir_private_key_file") or env["fhir_signing_alg"].lower()  # a name in auth.keys
        env["fhir_private_key_file"] = str(auth.keys[key])
    return env


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_auth_mode_publishes_with_valid_credentials(auth: AuthStack, mode: str) -> None:
    result = auth.cli("sync", "--json", **_mode_env(auth, MODES[mode]))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["created"] == 3
    assert len(auth.imaging_studies()) == 3
    assert auth.fhir.stats()["auth"]["accepted"] > 0
    client = MODES[mode].get("fhir_client_id")
    if client:
        # One token served the whole run: cached, not fetched per request.
        assert auth.idp.stats()["by_client"] == {client: 1}
    _assert_no_secret(result)


def _assert_no_secret(result: subprocess.CompletedProcess[str]) -> None:
    shown = result.stdout + result.stderr
    for secret in SECRETS:
        assert secret not in shown, "a secret was printed"


BAD = {
    "archive-wrong-password": (
        {"dicomweb_password": "wrong-password-1c9"},
        ["DICOMweb archive refused", "401", "BRIDGE_DICOMWEB_AUTH"],
    ),
    "archive-no-credentials": (
        {"dicomweb_auth": "none", "dicomweb_username": None, "dicomweb_password": None},
        ["DICOMweb archive refused", "401"],
    ),
    "fhir-no-token": (
        {"fhir_auth": "none", "fhir_token": None},
        ["FHIR server refused", "401", "BRIDGE_FHIR_AUTH"],
    ),
    "fhir-wrong-static-token": ({"fhir_token": "wrong-token-77aa"}, ["FHIR server refused", "401"]),
    "fhir-oauth2-wrong-secret": (
        {**MODES["fhir-oauth2"], "fhir_client_secret": "wrong-secret-3e0"},
        ["FHIR server refused", "token endpoint", "invalid_client", "BRIDGE_FHIR_CLIENT_SECRET"],
    ),
    "fhir-smart-unregistered-key": (
        {**MODES["fhir-smart-rs384"], "fhir_private_key_file": "stranger"},
        ["FHIR server refused", "invalid_client", "BRIDGE_FHIR_PRIVATE_KEY_FILE"],
    ),
    "fhir-oauth2-insufficient-scope": (
        {
            **MODES["fhir-oauth2"],
            "fhir_client_id": "bridge-readonly",
            "fhir_scopes": "system/ImagingStudy.read",
        },
        ["FHIR server refused", "403", "BRIDGE_FHIR_SCOPES", "Insufficient scope"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_credentials_fail_clearly_with_exit_3_and_no_secret(auth: AuthStack, case: str) -> None:
    overrides, expected = BAD[case]
    env = _mode_env(auth, overrides)
    result = auth.cli("sync", **env)
    assert result.returncode == 3, (result.stdout, result.stderr)
    message = " ".join(result.stderr.split())
    for part in expected:
        assert part in message, (part, message)
    assert "Traceback" not in result.stderr
    assert auth.imaging_studies() == []
    _assert_no_secret(result)


def test_check_passes_with_the_right_credentials(auth: AuthStack) -> None:
    result = auth.cli("check")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "takes the writes of BRIDGE_WRITE_STRATEGY" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    "case", ["archive-wrong-password", "fhir-wrong-static-token", "fhir-oauth2-insufficient-scope"]
)
def test_check_names_refused_credentials_with_exit_3_and_no_secret(auth: AuthStack, case: str) -> None:
    overrides, expected = BAD[case]
    result = auth.cli("check", **_mode_env(auth, overrides))
    assert result.returncode == 3, (result.stdout, result.stderr)
    message = " ".join(result.stdout.split())
    assert "refused the bridge's credentials" in message
    for part in expected[1:]:
        assert part in message, (part, message)
    _assert_no_secret(result)


def test_a_token_revoked_mid_run_is_replaced_once_and_the_run_completes(auth: AuthStack) -> None:
    revoked: list[str] = []
    # Writes that share a target (conditional creates of several Patients, the batch Bundles posted
    # to the base) are told apart by their If-None-Exist and their length.
    sent: Counter[tuple[str, str, str, str]] = Counter()

    def revoke_first_token(method: str, target: str, headers: dict[str, str]) -> None:
        sent[(method, target, headers.get("if-none-exist", ""), headers.get("content-length", ""))] += 1
        if not revoked and method in ("POST", "PUT"):  # the run's first write
            token = headers["authorization"].removeprefix("Bearer ")
            httpx.post(
                f"{auth.idp.issuer}/token/revocation",
                data={"token": token},
                auth=("bridge-oauth", CLIENT_SECRET),
                timeout=10,
            ).raise_for_status()
            revoked.append(token)

    with FaultProxy(auth.fhir.root_url) as proxy:
        proxy.on_request = revoke_first_token
        env = _mode_env(auth, MODES["fhir-oauth2"])
        result = auth.cli("sync", "--json", fhir_url=proxy.proxied(auth.fhir.base_url), **env)
        refused = [(e.method, e.target) for e in proxy.log if e.status == 401]
    assert revoked, "the token was revoked during the run"
    assert result.returncode == 0, result.stderr
    # The requests in flight with the revoked token were each refused once and resent once, and
    # they shared one fresh token.
    assert 1 <= len(refused) <= 4
    assert max(sent.values()) <= 2, sent
    assert auth.idp.stats()["by_client"] == {"bridge-oauth": 2}
    assert len(auth.imaging_studies()) == 3


def test_two_sources_with_secrets_from_files_for_both_upstreams_sync_both(auth: AuthStack) -> None:
    # A config file with `sources:` and *_file secrets once stopped `bridge sync` with exit 2: the
    # secret read from its file was written back beside the file setting before each source was built.
    password_file = auth.tmp / "orthanc-password"
    password_file.write_text(ORTHANC_PASSWORD + "\n")
    token_file = auth.tmp / "fhir-token"
    token_file.write_text(STATIC_TOKEN + "\n")
    config = auth.tmp / "bridge.yaml"
    config.write_text(
        json.dumps(
            {
                "fhir_token_file": str(token_file),
                "dicomweb_password_file": str(password_file),  # inherited by archive-a
                "sources": [
                    {"name": "archive-a", "dicomweb_url": auth.orthanc.dicomweb_url},
                    {
                        "name": "archive-b",
                        "dicomweb_url": auth.orthanc.dicomweb_url,
                        "dicomweb_username": ORTHANC_USER,
                        "dicomweb_password_file": str(password_file),
                    },
                ],
            }
        )
    )

    result = auth.cli(
        "sync",
        "--json",
        config_file=str(config),
        dicomweb_password=None,  # type: ignore[arg-type]
        fhir_token=None,  # type: ignore[arg-type]
        source_name=None,  # type: ignore[arg-type]
    )

    assert result.returncode == 0, result.stderr
    reports = _json_documents(result.stdout)
    assert {(r["source"], r["created"]) for r in reports} == {("archive-a", 3), ("archive-b", 3)}
    endpoints = {entry["resource"]["identifier"][0]["value"] for entry in _search(auth, "Endpoint")}
    assert endpoints == {"archive-a", "archive-b"}
    _assert_no_secret(result)


def _search(auth: AuthStack, resource_type: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{auth.fhir.base_url}/{resource_type}",
        params={"_count": "1000"},
        headers={"Authorization": f"Bearer {STATIC_TOKEN}"},
        timeout=30,
    )
    response.raise_for_status()
    entries: list[dict[str, Any]] = response.json().get("entry", [])
    return entries


def _json_documents(text: str) -> list[dict[str, Any]]:
    """The JSON summaries printed one after another (one per source)."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at = len(text) - len(text[at:].lstrip())
        document, at = decoder.raw_decode(text, at)
        documents.append(document)
    return documents
